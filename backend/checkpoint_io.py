"""Single-file checkpoints in LDM (SD1.5) / SGM (SDXL) layout, and atomic safetensors writes.

    from spo_studio.backend.checkpoint_io import save_single_file
    save_single_file(model.unet, model.vae, model.text_encoders, "sd15", "merged.safetensors")

The file is what A1111, ComfyUI's CheckpointLoaderSimple and diffusers' `from_single_file` read:

    model.diffusion_model.*                  the UNet, LDM/SGM names
    first_stage_model.*                      the VAE, LDM names (mid attention as 1x1 convs)
    cond_stage_model.transformer.text_model.*            SD1.5 text encoder (transformers names)
    conditioner.embedders.0.transformer.text_model.*     SDXL text encoder 1 (transformers names)
    conditioner.embedders.1.model.*                      SDXL text encoder 2 (OpenCLIP layout)

Names come from `ldm_names.py`. Writes go to `<path>.tmp` first and are renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path

import torch

from .ldm_names import (
    CLIP_PREFIXES,
    canonical_clip_name,
    is_vae_attention_weight,
    openclip_name_map,
    openclip_qkv,
    unet_name_map,
    vae_name_map,
)

logger = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl")
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


def _file_mode() -> int:
    """0666 less the process umask: the mode `open(..., "w")` gives a new file."""
    try:
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def save_safetensors_atomic(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> Path:
    """Write a safetensors file via `<path>.tmp` + `os.replace`; metadata values must be strings."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise ValueError(f"{path}: safetensors metadata values must be strings, got {bad}")
    tmp = path.with_name(path.name + ".tmp")
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.chmod(tmp, _file_mode())  # safetensors creates 0600; give the mode every other file of a run gets
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def atomic_folder(out_dir: str | Path):
    """Write a folder atomically: yields a fresh temporary sibling, which replaces `out_dir` only when the
    block ends without an error (a crash leaves the old folder, or none, never a half-written one)."""
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)


def _check_plain(state_dict: dict[str, torch.Tensor], what: str) -> None:
    adapters = [k for k in state_dict if ".lora_" in k or ".base_layer." in k]
    if adapters:
        raise ValueError(
            f"the {what} still has LoRA adapters attached ({adapters[0]}, ...): merge them into the weights "
            f"(lora.merge_lora) or remove them before saving a single-file checkpoint"
        )


def unet_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict renamed to LDM/SGM names (no prefix)."""
    _check_plain(state_dict, "UNet")
    names = unet_name_map(config)
    return {names.to_ldm(k): v for k, v in state_dict.items()}


def vae_to_ldm(state_dict: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict in LDM names; mid-attention Linear weights become [C, C, 1, 1]."""
    _check_plain(state_dict, "VAE")
    names = vae_name_map(config)
    out = {}
    for key, value in state_dict.items():
        ldm = names.to_ldm(key)
        out[ldm] = value[:, :, None, None] if is_vae_attention_weight(ldm) and value.ndim == 2 else value
    return out


def clip_to_ldm(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text encoder in checkpoint names (`text_model.` level restored)."""
    _check_plain(state_dict, "text encoder")
    return {canonical_clip_name(k): v for k, v in state_dict.items() if not k.endswith("position_ids")}


def openclip_to_ldm(state_dict: dict[str, torch.Tensor], num_layers: int) -> dict[str, torch.Tensor]:
    """A transformers `CLIPTextModelWithProjection` in OpenCLIP layout (SDXL's second encoder).

    q/k/v projections are stacked into `attn.in_proj_weight` / `in_proj_bias` (q, k, v order);
    `text_projection` is stored as [hidden, projection], the transpose of the Linear weight.
    """
    _check_plain(state_dict, "text encoder 2")
    names = openclip_name_map(num_layers)
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, list] = {}
    for key, value in state_dict.items():
        key = canonical_clip_name(key)
        if key.endswith("position_ids"):
            continue
        qkv = openclip_qkv(key)
        if qkv is not None:
            stacked.setdefault(qkv[0], [None, None, None])[qkv[1]] = value
        elif key == "text_projection.weight":
            out[names.to_ldm(key)] = value.T
        else:
            out[names.to_ldm(key)] = value
    for name, parts in stacked.items():
        if any(p is None for p in parts):
            raise ValueError(f"text encoder 2: {name} is missing one of q/k/v")
        out[name] = torch.cat(parts, dim=0)
    return out


def single_file_state_dict(unet, vae, text_encoders: list, family: str) -> dict[str, torch.Tensor]:
    """All components of a model, in one LDM/SGM-layout state dict (tensors shared, not copied)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    expected = len(CLIP_PREFIXES[family])
    if len(text_encoders) != expected:
        raise ValueError(f"a {family} model has {expected} text encoder(s), got {len(text_encoders)}")
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae.state_dict(), vae.config).items()})
    out.update({CLIP_PREFIXES[family][0] + k: v for k, v in clip_to_ldm(text_encoders[0].state_dict()).items()})
    if family == "sdxl":
        te2 = text_encoders[1]
        converted = openclip_to_ldm(te2.state_dict(), te2.config.num_hidden_layers)
        out.update({CLIP_PREFIXES["sdxl"][1] + k: v for k, v in converted.items()})
    return out


def save_single_file(
    unet,
    vae,
    text_encoders: list,
    family: str,
    path: str | Path,
    dtype: torch.dtype | None = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a model as one LDM/SGM-layout `.safetensors` file, atomically.

    Args:
        unet, vae: the diffusers `UNet2DConditionModel` and `AutoencoderKL` (no LoRA attached).
        text_encoders (`list`): `[CLIPTextModel]` for sd15, `[CLIPTextModel, CLIPTextModelWithProjection]` for sdxl.
        family (`str`): "sd15" or "sdxl".
        path (`str | Path`): the output file; must end in `.safetensors`.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): floating tensors are cast to it;
            `None` keeps each tensor's dtype.
        metadata (`dict[str, str]`, *optional*): extra safetensors metadata (e.g. provenance).
    """
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a single-file checkpoint must be written as .safetensors")
    state = single_file_state_dict(unet, vae, text_encoders, family)
    tensors = {
        k: (v.detach().to("cpu", dtype) if dtype is not None and v.is_floating_point() else v.detach().cpu())
        for k, v in state.items()
    }
    meta = {"format": "pt", "spo.family": family, "spo.layout": "ldm" if family == "sd15" else "sgm"}
    meta.update(metadata or {})
    logger.info("writing %s single-file checkpoint (%d tensors) to %s", family, len(tensors), path)
    return save_safetensors_atomic(tensors, path, meta)
