"""Loading our LoRA files (webui/kohya and diffusers/peft) through ComfyUI's own LoRA patching.

ComfyUI reads kohya keys (`lora_unet_…`, `lora_te_…`) but not the attention projections of modern
peft/diffusers files. So every file is read with `backend.lora.read_lora` and
re-keyed to kohya names ComfyUI maps, with the true alpha as an explicit `.alpha`:

    webui keys              kept as they are (LDM or kohya-diffusers names)
    unet.<diffusers name>   lora_unet_<diffusers name, dots → _>   (ComfyUI maps it via unet_to_diffusers)
    text_encoder.<name>     lora_te_<…> (SD1.5) / lora_te1_<…> (SDXL), text_encoder_2 → lora_te2_<…>

Every key is checked against ComfyUI's key map before patching, so a file either loads completely
(never a "lora key not loaded" line) or fails with a message naming the file and the keys.
The patch goes through `comfy.sd.load_lora_for_models` on clones, so it stacks with other LoRAs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..backend.lora import FAMILY_NAMES, LoraError, LoraWeights, read_lora

logger = logging.getLogger(__name__)

TE_PREFIXES = {("sd15", "text_encoder"): "lora_te_", ("sdxl", "text_encoder"): "lora_te1_",
               ("sdxl", "text_encoder_2"): "lora_te2_"}


def comfy_lora_tensors(weights: LoraWeights, family: str) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {kohya tensor key: tensor}} for ComfyUI, alphas explicit (float32 scalars)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for component, name, module in weights.items():
        if component == "unet":
            prefix = "lora_unet_"
        else:
            prefix = TE_PREFIXES.get((family, component))
            if prefix is None:
                raise LoraError(f"{weights.source}: a {FAMILY_NAMES[family]} model has no {component}")
        # diffusers UNet names, canonical CLIP names (with text_model.), or webui keys (prefix stripped)
        base = prefix + name.replace(".", "_")
        part = out.setdefault(component, {})
        part[f"{base}.lora_down.weight"] = module.down
        part[f"{base}.lora_up.weight"] = module.up
        part[f"{base}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return out


def load_spo_lora(runtime, model, clip, path: str | Path, strength_model: float, strength_clip: float):
    """Patch clones of `model` (and `clip`) with a LoRA file of either format; returns (model, clip)."""
    path = Path(path)
    weights = read_lora(path)
    family = runtime.family(model) if model is not None else None
    if model is not None and family is None:
        logger.warning("SPO LoRA Loader: %s is for %s, but the model is %s; SPO LoRAs are for SD1.5 and SDXL. "
                       "The LoRA was NOT applied.", path.name, FAMILY_NAMES.get(weights.family, "an unknown model"),
                       runtime.model_name(model))
        return model, clip
    if weights.family is not None and family is not None and weights.family != family:
        logger.warning("SPO LoRA Loader: %s is a %s LoRA (%s) but the model is %s. The LoRA was NOT applied; "
                       "pick a %s LoRA or a %s model.", path.name, FAMILY_NAMES[weights.family],
                       weights.family_evidence, FAMILY_NAMES[family], FAMILY_NAMES[family],
                       FAMILY_NAMES[weights.family])
        return model, clip
    family = family or weights.family or "sd15"
    parts = comfy_lora_tensors(weights, family)
    if clip is None and any(c != "unet" for c in parts):
        logger.info("SPO LoRA Loader: %s has a text-encoder part; no CLIP is connected, so only the UNet part "
                    "is applied", path.name)
        parts = {c: v for c, v in parts.items() if c == "unet"}
    if model is None and "unet" in parts:
        parts.pop("unet")
    tensors = {k: v for part in parts.values() for k, v in part.items()}
    if not tensors:
        logger.warning("SPO LoRA Loader: nothing of %s applies to the connected inputs", path.name)
        return model, clip
    key_map = runtime.lora_key_map(model, clip)
    bases = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors})
    missing = [b for b in bases if b not in key_map]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise LoraError(f"{path}: {len(missing)} of {len(bases)} LoRA layers match no layer of this "
                        f"{FAMILY_NAMES[family]} model: {shown}. Was the LoRA made for another base model?")
    logger.info("SPO LoRA Loader: %s (%s, %s, %d layers) at model %g / clip %g", path.name, weights.format,
                FAMILY_NAMES[family], len(bases), strength_model, strength_clip)
    return runtime.apply_lora(model, clip, tensors, strength_model, strength_clip)
