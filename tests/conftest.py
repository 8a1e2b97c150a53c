import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Diffusers folders of a tiny SD1.5-shaped and a tiny SDXL-shaped model, built once per run."""
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: save_tiny(fam, root / fam) for fam in ("sd15", "sdxl")}


@pytest.fixture(scope="session")
def tiny_spm(tiny_dirs, tmp_path_factory):
    """A randomly initialised small SPM whose tokenizer is the tiny model's."""
    from spo_studio.backend.preference.spm import StepAwarePreferenceModel, pocket_clip_config
    from transformers import CLIPModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dirs["sd15"] / "tokenizer")
    torch.manual_seed(3)
    clip = CLIPModel(pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                        tok.model_max_length, image_size=16))
    spm = StepAwarePreferenceModel(clip, tok)
    with torch.no_grad():  # give the time conditioning some effect
        for p in spm.time.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return spm.save(tmp_path_factory.mktemp("spm") / "spm")


@pytest.fixture(scope="session")
def official(tiny_dirs, tmp_path_factory):
    """A tiny SPM in the official SPO layout (`tiny_models.save_official_spm`)."""
    from tiny_models import save_official_spm
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_dirs["sd15"] / "tokenizer")
    return save_official_spm(tmp_path_factory.mktemp("official_spm"), tok)


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\na green circle\na photo of a cat\n")
    return path


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core box can be 30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
