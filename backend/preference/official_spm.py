"""The official SPO step-aware preference models, read as they are.

The SPO release ships its SPMs (`sd-v1-5_step-aware_preference_model.bin`,
`sdxl_step-aware_preference_model.bin`, and safetensors conversions of them) as plain state dicts
of a time-conditioned CLIP-H wrapped in a module named `model`:

    model.text_model.*, model.vision_model.{embeddings, pre_layrnorm, post_layernorm}.*,
    model.visual_projection.weight, model.text_projection.weight, model.logit_scale     CLIP (PickScore_v1)
    model.t_embedder.mlp.{0,2}.{weight,bias}          c = MLP(sinusoidal(t)), sinusoid 256-d, cos half first
    model.vision_model.encoder.layers.{l}.adaLN_modulation.1.{weight,bias}   d → 6d on SiLU(c):
                                                      (β1, γ1, α1, β2, γ2, α2) in that order
    model.vision_model.adaLN_modulation.1.{weight,bias}                       d → 2d on SiLU(c): (β_p, γ_p),
                                                      applied to the post-layernorm pooled token

which is exactly our `StepAwarePreferenceModel` (the modulation equations are in `spm.py`): the CLIP
keys load into transformers' `CLIPModel`, the time keys into `TimeConditioning` (`mlp`, `layers.{l}`,
`final`). The file holds no config or tokenizer: those come from the CLIP folder the model was
initialised from (PickScore_v1's config.json, CLIP-ViT-H-14's tokenizer files), given explicitly or
found beside the file. The official code scores images resized with plain bicubic interpolation
(no antialiasing) to the CLIP resolution on the shorter side, centre-cropped and clamped to [0, 1];
an imported model keeps that preprocessing (`preprocess = "official"`).

`.bin` files are read with `torch.load(weights_only=True, mmap=True)` — no pickled code runs, and the
tensors stay on disk until each is copied, once, into the model in the requested dtype.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from .spm import StepAwarePreferenceModel, TimeConditioning, find_tokenizer

logger = logging.getLogger(__name__)

CHECKPOINT_SUFFIXES = (".bin", ".safetensors", ".pt", ".pth")
PREFIX = "model."
_LAYER = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.adaLN_modulation\.1\.(weight|bias)$")
_FINAL = re.compile(r"^vision_model\.adaLN_modulation\.1\.(weight|bias)$")
_TIME_MLP = re.compile(r"^t_embedder\.mlp\.([02])\.(weight|bias)$")


def is_checkpoint_file(path: str | Path) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() in CHECKPOINT_SUFFIXES


def is_clip_folder(folder: Path) -> bool:
    """A plain CLIP model folder (config.json of model_type "clip"), not one of our SPM folders."""
    config = folder / "config.json"
    if (folder / "spm.json").exists() or not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("model_type") == "clip"
    except (OSError, ValueError):
        return False


def find_clip_folder(checkpoint: Path) -> Path:
    """The CLIP folder beside an official checkpoint: its own folder, or the one CLIP folder next to it."""
    if is_clip_folder(checkpoint.parent):
        return checkpoint.parent
    siblings = sorted(p for p in checkpoint.parent.iterdir() if p.is_dir() and is_clip_folder(p))
    if len(siblings) == 1:
        return siblings[0]
    found = f"found {len(siblings)}: {', '.join(p.name for p in siblings)}" if siblings else "found none"
    raise ValueError(
        f"{checkpoint}: an official SPO preference model needs the CLIP folder it was initialised from "
        f"(PickScore_v1's config.json with CLIP-ViT-H-14's tokenizer files); put the file inside that folder "
        f"or next to exactly one such folder ({found}), or give the folder explicitly (spm_clip / --spm-clip)"
    )


def read_state_dict(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (cast to `dtype` if given), without running pickled code."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: _cast(f.get_tensor(k), dtype) for k in f.keys()}
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # an old (non-zip) torch file cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch and safetensors raise many types for a bad file
        raise ValueError(f"{path}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: not a state dict of tensors")
    return {k: _cast(v, dtype) for k, v in state.items()}


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def split_state_dict(state: dict[str, torch.Tensor], source: str) -> tuple[dict, dict]:
    """(CLIPModel state dict, TimeConditioning state dict) of an official checkpoint's state dict."""
    if not state or not all(k.startswith(PREFIX) for k in state):
        odd = [k for k in state if not k.startswith(PREFIX)][:5]
        raise ValueError(f"{source}: not an official SPO preference model: every key should start with "
                         f"'{PREFIX}' (found {', '.join(odd) or 'no keys'})")
    clip, time = {}, {}
    for key, value in state.items():
        key = key[len(PREFIX):]
        if m := _LAYER.match(key):
            time[f"layers.{m.group(1)}.{m.group(2)}"] = value
        elif m := _FINAL.match(key):
            time[f"final.{m.group(1)}"] = value
        elif m := _TIME_MLP.match(key):
            time[f"mlp.{m.group(1)}.{m.group(2)}"] = value
        elif key.endswith("embeddings.position_ids"):  # a buffer older transformers saved; rebuilt by the model
            continue
        else:
            clip[key] = value
    if "mlp.0.weight" not in time or "final.weight" not in time:
        raise ValueError(f"{source}: has no time conditioning (t_embedder / adaLN_modulation keys): a plain CLIP "
                         f"state dict, not a step-aware preference model")
    return clip, time


def load_official_spm(path: str | Path, clip_folder: str | Path | None = None, dtype: torch.dtype = torch.float32,
                      device=None) -> StepAwarePreferenceModel:
    """An official SPM checkpoint file as our `StepAwarePreferenceModel` (scores identical to the official one)."""
    from transformers import CLIPConfig, CLIPModel

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such preference model file")
    folder = Path(clip_folder).expanduser() if clip_folder else find_clip_folder(path)
    if not is_clip_folder(folder):
        raise ValueError(f"{folder}: not a CLIP model folder (config.json of model_type 'clip'), needed for {path}")
    config = CLIPConfig.from_pretrained(folder)
    clip_state, time_state = split_state_dict(read_state_dict(path, dtype), str(path))
    try:
        clip = CLIPModel.from_pretrained(None, config=config, state_dict=clip_state, dtype=dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path}: does not fit the CLIP config of {folder} ({exc})") from exc
    unused = set(clip_state) - set(clip.state_dict())
    if unused:
        raise ValueError(f"{path}: keys the CLIP of {folder} has no place for: {', '.join(sorted(unused)[:5])}")
    vision = config.vision_config
    freq_dim = time_state["mlp.0.weight"].shape[1]
    with torch.device("meta"):
        time = TimeConditioning(vision.hidden_size, vision.num_hidden_layers, freq_dim)
    try:
        time.load_state_dict(time_state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: its time conditioning does not fit the CLIP of {folder} ({exc})") from exc
    tokenizer = find_tokenizer(folder, folder / "tokenizer")
    if tokenizer is None:
        raise ValueError(f"{folder}: no tokenizer files (vocab.json + merges.txt or tokenizer.json; PickScore uses "
                         f"CLIP-ViT-H-14's) in the folder or its tokenizer/ subfolder")
    model = StepAwarePreferenceModel(clip, tokenizer, time=time, preprocess="official")
    logger.info("loaded the official SPM %s with the CLIP config and tokenizer of %s", path, folder)
    model.to(dtype=dtype)
    if device is not None:
        model.to(device)
    return model.eval()


def import_official_spm(path: str | Path, out_dir: str | Path, clip_folder: str | Path | None = None) -> Path:
    """Convert an official SPM checkpoint once into our SPM folder format (`StepAwarePreferenceModel.save`)."""
    model = load_official_spm(path, clip_folder)
    return model.save(out_dir, extra={"imported_from": Path(path).name})
