"""Matching a LoRA's layer names to a model's modules.

webui/kohya keys name a layer by its LDM path or kohya's diffusers path with every dot turned into
an underscore (`input_blocks_1_1_transformer_blocks_0_attn1_to_q`), which is ambiguous without the
model: `resolve_names` looks each key up in a table built from the module names of the model (or
of a reference model built on the meta device from a UNet config), through `ldm_names.unet_name_map`.
Every key must match; a key that matches nothing is reported with the first such keys.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .ldm_names import canonical_clip_name, unet_name_map
from .lora_types import FAMILIES, FAMILY_NAMES, LoraError, LoraModule, LoraWeights


def reference_unet_config(family: str, source: str) -> dict:
    """The shipped UNet config of a family (`backend/model_configs/<family>/unet/config.json`)."""
    try:
        from .model_configs import config_dir

        config_file = Path(config_dir(family)) / "unet" / "config.json"
        return json.loads(config_file.read_text())
    except (ImportError, OSError, json.JSONDecodeError) as exc:
        raise LoraError(
            f"{source}: no shipped {FAMILY_NAMES[family]} UNet config to name the LoRA's layers ({exc}); "
            f"give the UNet config of the base model"
        ) from exc


def _reference_unet_modules(unet_config) -> list[str]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _reference_clip_modules(num_layers: int) -> list[str]:
    layers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
    return [f"text_model.encoder.layers.{i}.{layer}" for i in range(num_layers) for layer in layers]


def _lookup_table(component: str, module_names: list[str], unet_config) -> dict[str, str]:
    """Underscored key → module name. For the UNet both LDM and diffusers spellings are entries."""
    table: dict[str, str] = {}

    def add(key: str, name: str) -> None:
        if table.setdefault(key, name) != name:
            raise ValueError(f"ambiguous webui name {key!r}: {table[key]} or {name}")

    if component == "unet":
        names = unet_name_map(unet_config)
        for name in module_names:
            add(name.replace(".", "_"), name)
            try:
                add(names.to_ldm(name).replace(".", "_"), name)
            except KeyError:  # container modules (e.g. "down_blocks.0") have no own LDM name
                pass
    else:
        for name in module_names:  # kohya's names carry `text_model_`; diffusers' converter on transformers 5 not
            canonical = canonical_clip_name(name)
            add(canonical.replace(".", "_"), canonical)
            add(canonical.removeprefix("text_model.").replace(".", "_"), canonical)
    return table


def unmatched_error(
    weights: LoraWeights, component: str, missing: list[str], target: str, reference: bool = False
) -> LoraError:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hint = "; if the LoRA is for a non-standard UNet, give that UNet's config" if reference else ""
    return LoraError(
        f"{weights.source}: {len(missing)} {component} LoRA keys match no layer of {target}: {shown}{hint}"
    )


def resolve_names(
    weights: LoraWeights,
    module_names: dict[str, list[str]] | None = None,
    unet_config=None,
    target: str = "the reference model",
) -> LoraWeights:
    """Match the layers of a LoRA to module names; every key must match.

    Args:
        weights (`LoraWeights`): as read.
        module_names (`dict[str, list[str]]`, *optional*): per component, the module names of the
            model the LoRA is for (canonical names for text encoders). Defaults to a reference
            model built on the meta device from `unet_config` (and 12 / 32 CLIP layers).
        unet_config (*optional*): the UNet config for LDM names; defaults to the family's shipped one.
    """
    if weights.family not in FAMILIES:
        raise LoraError(f"{weights.source}: the LoRA's family is unknown; say which it is (family='sd15' or 'sdxl')")
    unet_config = unet_config or weights.unet_config or reference_unet_config(weights.family, weights.source)
    reference = module_names is None
    if reference:
        module_names = {
            "unet": _reference_unet_modules(unet_config),
            "text_encoder": _reference_clip_modules(12),
            "text_encoder_2": _reference_clip_modules(32),
        }
    resolved: dict[str, dict[str, LoraModule]] = {}
    for component, modules in weights.modules.items():
        names = module_names.get(component)
        if names is None:
            raise LoraError(f"{weights.source}: the LoRA has a {component} part, but {target} has no {component}")
        if weights.resolved:
            known = set(names) if component == "unet" else {canonical_clip_name(n) for n in names}
            missing = [n for n in modules if n not in known]
            mapping = {n: n for n in modules}
        else:
            table = _lookup_table(component, names, unet_config)
            missing = [k for k in modules if k not in table]
            mapping = {k: table.get(k) for k in modules}
        if missing:
            raise unmatched_error(weights, component, missing, target, reference)
        out: dict[str, LoraModule] = {}
        for key, module in modules.items():
            name = mapping[key]
            if name in out:
                raise LoraError(f"{weights.source}: two keys name the same layer {component}.{name}")
            out[name] = module
        resolved[component] = out
    return LoraWeights(resolved, weights.family, weights.family_evidence, dict(weights.metadata), weights.source,
                       weights.format, resolved=True, unet_config=dict(unet_config))
