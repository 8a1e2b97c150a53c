"""The SPO loop end to end on a tiny model: pairs, metrics, LoRA files, exact resume, stop flag."""

import json

import pytest
import torch

from spo_studio.backend.config import load_config
from spo_studio.backend.runs import read_jsonl
from spo_studio.backend.train.loop import train_spo
from spo_studio.backend.train.spo import SPOConfig


@pytest.fixture(scope="module")
def tiny_spm(tiny_dirs, tmp_path_factory):
    """A randomly initialised small SPM whose tokenizer is the tiny model's."""
    from transformers import CLIPModel, CLIPTokenizer

    from spo_studio.backend.preference.spm import StepAwarePreferenceModel, pocket_clip_config

    tok = CLIPTokenizer.from_pretrained(tiny_dirs["sd15"] / "tokenizer")
    torch.manual_seed(3)
    clip = CLIPModel(pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                        tok.model_max_length, image_size=16))
    spm = StepAwarePreferenceModel(clip, tok)
    with torch.no_grad():  # give the time conditioning some effect
        for p in spm.time.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return spm.save(tmp_path_factory.mktemp("spm") / "spm")


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    path.write_text("a red circle\na blue square\na green circle\na photo of a cat\n")
    return path


def _cfg(tiny_dirs, tiny_spm, prompts_file, out, **over):
    base = {"base_model": str(tiny_dirs["sd15"]), "spm": str(tiny_spm), "prompts": str(prompts_file),
            "output_dir": str(out), "num_steps": 6, "divert_start_step": 2, "pool_size": 3, "threshold": 0.0,
            "prompts_per_round": 2, "train_batch_size": 3, "epochs": 2, "lr": 1e-3, "checkpoint_every": 100,
            "sample_prompts": ["a red circle"]}
    base.update(over)
    return load_config(SPOConfig, None, [f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in base.items()])


def _lora(run):
    from safetensors.torch import load_file

    return load_file(run / "lora" / "spo_lora_diffusers.safetensors")


def test_spo_run_writes_metrics_lora_and_samples(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    result = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "run"))
    assert result["status"] == "finished" and result["step"] > 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics and {"loss", "ratio_w", "ratio_l", "pair_yield", "score_mean", "score_std", "lr", "grad_norm"} <= set(metrics[-1])
    assert all(m["pair_yield"] == 1.0 for m in metrics if "pair_yield" in m)  # threshold 0: every pool gives a pair
    assert (tmp_path / "run" / "samples" / "epoch-001.png").exists()
    events = [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert events[0] == "started" and events[-1] == "finished" and "sample" in events
    lora = _lora(tmp_path / "run")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k), "the LoRA learned something"
    assert (tmp_path / "run" / "lora" / "spo_lora_webui.safetensors").exists()


def test_resume_mid_round_equals_uninterrupted(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    full = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "full"))
    total = full["step"]
    assert total >= 6
    cut = total // 2 + 1  # lands inside a round (rounds have several micro-steps)
    first = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "cut", max_steps=cut))
    assert first["step"] == cut
    state = torch.load(next((tmp_path / "cut" / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)
    second = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "cut"))
    assert second["step"] == total
    a, b = _lora(tmp_path / "full"), _lora(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    assert state["pending"] is not None or state["micro"] == 0


def test_stop_file_ends_with_a_checkpoint(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").write_text("")
    result = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, run))
    assert result["status"] == "stopped" and result["step"] == 1
    assert list((run / "checkpoints").glob("step-00000001"))
    assert json.loads((run / "events.jsonl").read_text().splitlines()[-1])["event"] == "stopped"
