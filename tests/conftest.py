import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """Diffusers folders of a tiny SD1.5-shaped and a tiny SDXL-shaped model, built once per run."""
    from tiny_models import save_tiny

    root = tmp_path_factory.mktemp("tiny_models")
    return {fam: save_tiny(fam, root / fam) for fam in ("sd15", "sdxl")}


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; two threads on a shared 2-core box can be 30x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
