"""ComfyUI's LoRA key map for SD1.5/SDXL, re-stated for tests that run without ComfyUI.

ComfyUI (`comfy.lora.model_lora_keys_unet` / `model_lora_keys_clip`) accepts, per adaptable weight:
`lora_unet_<LDM module path, dots → _>` and `lora_unet_<diffusers module path, dots → _>` for the
UNet, `lora_te_` / `lora_te1_` (first text encoder) and `lora_te2_` (SDXL's second) followed by
`text_model_encoder_layers_<i>_<self_attn_{q,k,v,out}_proj | mlp_fc1 | mlp_fc2>`. A key outside the
map is what ComfyUI logs as "lora key not loaded". The scale is alpha / rank, 1 without alpha.
The real ComfyUI run is tests/test_comfyui_e2e.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from spo_studio.backend.ldm_names import canonical_clip_name, unet_name_map
from spo_studio.backend.lora import LoraModule

CLIP_KEY = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn_[qkv]_proj|self_attn_out_proj|mlp_fc[12])$")
TE_PREFIXES = {"lora_te_": 0, "lora_te1_": 0, "lora_te2_": 1}


def unet_key_map(unet) -> dict[str, str]:
    """ComfyUI's UNet entries: underscored LDM and diffusers module names → the diffusers module name."""
    names = unet_name_map(unet.config)
    table = {}
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            table["lora_unet_" + name.replace(".", "_")] = name
            table["lora_unet_" + names.to_ldm(name).replace(".", "_")] = name
    return table


@dataclass
class ComfyPatches:
    layers: list[tuple[torch.nn.Module, LoraModule]]

    @torch.no_grad()
    def apply(self, scale: float = 1.0) -> None:
        for module, lm in self.layers:
            module.weight += lm.delta(scale).to(module.weight.dtype)


def comfy_patches(tensors: dict[str, torch.Tensor], unet, text_encoders: list, family: str) -> ComfyPatches:
    """The patches ComfyUI would make of a webui file's tensors; raises KeyError for a key it would not load."""
    unet_map = unet_key_map(unet)
    encoders = [{canonical_clip_name(n): m for n, m in te.named_modules()} for te in text_encoders]
    layers = []
    for key in sorted(k[: -len(".lora_down.weight")] for k in tensors if k.endswith(".lora_down.weight")):
        prefix = next((p for p in ("lora_unet_", *TE_PREFIXES) if key.startswith(p)), None)
        if prefix == "lora_unet_" and key in unet_map:
            module = dict(unet.named_modules())[unet_map[key]]
        elif prefix in TE_PREFIXES and (m := CLIP_KEY.match(key[len(prefix):])) and \
                (prefix != "lora_te2_" or family == "sdxl"):
            layer, part = int(m.group(1)), m.group(2).replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            module = encoders[TE_PREFIXES[prefix]][f"text_model.encoder.layers.{layer}.{part}"]
        else:
            raise KeyError(f"lora key not loaded: {key}")
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        alpha = float(tensors[f"{key}.alpha"]) if f"{key}.alpha" in tensors else float(down.shape[0])
        layers.append((module, LoraModule(down, up, alpha)))
    return ComfyPatches(layers)
