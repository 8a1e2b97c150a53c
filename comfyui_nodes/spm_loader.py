"""Finding and loading step-aware preference models for the SPM Loader node.

An SPM is a folder (`spm.json`, `clip/`, `tokenizer/`, `time_conditioning.safetensors`, as
`StepAwarePreferenceModel.save` writes it), a plain CLIP/PickScore folder to start an SPM from, or an
official SPO checkpoint file (`sd-v1-5_step-aware_preference_model.bin`, `.safetensors` too) lying
inside the CLIP folder it was initialised from or next to exactly one CLIP folder (PickScore_v1 with
CLIP-ViT-H-14's tokenizer files), or a latent SPM folder (`lspm.json`). The node lists these under
ComfyUI's `spo_preference` model folders (models/spo_preference by default, more through
extra_model_paths.yaml), plus the pocket SPM shipped with this pack.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..backend.preference.official_spm import CHECKPOINT_SUFFIXES, is_clip_folder

logger = logging.getLogger(__name__)

FOLDER_NAME = "spo_preference"
POCKET = "pocket (shipped)"
MAX_DEPTH = 3
# the weight files of a model folder itself (a CLIP's own weights are not an SPM checkpoint)
_FOLDER_WEIGHTS = re.compile(r"^(pytorch_model|model|diffusion_pytorch_model|open_clip_\w+)(-\d+-of-\d+)?\.\w+$")


def is_preference_model(folder: Path) -> bool:
    """An SPM folder, a latent SPM folder (lspm.json), or a CLIP model folder (config.json of model_type "clip")."""
    return (folder / "spm.json").is_file() or (folder / "lspm.json").is_file() or is_clip_folder(folder)


def find_models(roots: list[str]) -> dict[str, Path]:
    """{name: folder} of the preference models under `roots` (names are paths relative to their root)."""
    found: dict[str, Path] = {}
    for root in roots:
        root_path = Path(root)
        if not root_path.is_dir():
            continue
        for current, dirs, files in os.walk(root_path, followlinks=True):
            here = Path(current)
            depth = len(here.relative_to(root_path).parts)
            if not ((here / "spm.json").is_file() or (here / "lspm.json").is_file()):
                for file in sorted(files):
                    if file.lower().endswith(CHECKPOINT_SUFFIXES) and not _FOLDER_WEIGHTS.match(file):
                        found.setdefault((here / file).relative_to(root_path).as_posix(), here / file)
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

    if name == POCKET:
        scorer = Scorer.from_path("pocket", device=device, latent_decode=latent_decode)
        logger.info("SPM Loader: the pocket SPM (judges the pocket world's 64 px images)")
        return scorer
    models = find_models(roots)
    if name not in models:
        where = ", ".join(roots) or "(no spo_preference folders)"
        raise FileNotFoundError(f"preference model {name!r} not found in {where}; put SPM folders "
                                f"(spm.json + clip/), a PickScore/CLIP folder, or an official SPO .bin there")
    logger.info("SPM Loader: %s", models[name])
    return Scorer.from_path(models[name], device=device, latent_decode=latent_decode)
