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
