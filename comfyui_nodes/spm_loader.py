"""Finding and loading step-aware preference models for the SPM Loader node.

An SPM is a folder (`spm.json`, `clip/`, `tokenizer/`, `time_conditioning.safetensors`, as
`StepAwarePreferenceModel.save` writes it), or a plain CLIP/PickScore folder to start an SPM from.
The node lists such folders under ComfyUI's `spo_preference` model folders (models/spo_preference
by default, more through extra_model_paths.yaml), plus the pocket SPM shipped with this pack.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

logger = logging.getLogger(__name__)

FOLDER_NAME = "spo_preference"
POCKET = "pocket (shipped)"
MAX_DEPTH = 3


def is_preference_model(folder: Path) -> bool:
    """An SPM folder, or a CLIP model folder (config.json of model_type "clip")."""
    if (folder / "spm.json").is_file():
        return True
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def find_models(roots: list[str]) -> dict[str, Path]:
    """{name: folder} of the preference models under `roots` (names are paths relative to their root)."""
    found: dict[str, Path] = {}
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for current, dirs, _files in os.walk(root_path, followlinks=True):
            here = Path(current)
            depth = len(here.relative_to(root_path).parts)
            if depth and is_preference_model(here):
                found.setdefault(here.relative_to(root_path).as_posix(), here)
                dirs[:] = []  # an SPM's own subfolders (clip/, tokenizer/) are not models
            elif depth >= MAX_DEPTH:
                dirs[:] = []
            else:
                dirs.sort()
    return found


def choices(roots: list[str]) -> list[str]:
    return [POCKET] + sorted(find_models(roots))


def load_scorer(name: str, roots: list[str], device=None, latent_decode: bool = False):
    """The backend `Scorer` for a listed name (the SPO_PREFERENCE value); `latent_decode` makes the
    scoring nodes use the fast preview decode (x̂0 shrunk to the SPM's input size before the VAE)."""
    from ..backend.preference.scoring import Scorer
    from ..backend.preference.spm import StepAwarePreferenceModel

    if name == POCKET:
        scorer = Scorer.from_path("pocket", device=device, latent_decode=latent_decode)
        logger.info("SPM Loader: the pocket SPM (judges the pocket world's 64 px images)")
        return scorer
    models = find_models(roots)
    if name not in models:
        where = ", ".join(roots) or "(no spo_preference folders)"
        raise FileNotFoundError(f"preference model {name!r} not found in {where}; put SPM folders "
                                f"(spm.json + clip/) or a PickScore/CLIP folder there")
    logger.info("SPM Loader: %s", models[name])
    return Scorer(StepAwarePreferenceModel.load(models[name]), device=device, latent_decode=latent_decode)
