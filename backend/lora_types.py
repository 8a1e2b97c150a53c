"""The format-independent LoRA: what every LoRA file layout is read into and written from.

A LoRA adapts a layer with weight W by ΔW = s · α / r · B A (Hu et al. 2021, "LoRA", eq. 3 with
the α / r scaling of §4.1), where A = `down` ∈ ℝ^{r×in} (or r×in×kh×kw for a convolution),
B = `up` ∈ ℝ^{out×r} (or out×r×1×1), r the rank, α the alpha and s the strength chosen at load time.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

FAMILIES = ("sd15", "sdxl")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}


class LoraError(ValueError):
    """A LoRA file or model that cannot be used; the message names the file and the problem."""


@dataclass
class LoraModule:
    """One adapted layer: ΔW = alpha / rank · up @ down (times the strength)."""

    down: torch.Tensor  # peft lora_A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # peft lora_B: [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The weight update ΔW, in float32, shaped like the adapted layer's weight."""
        up = self.up.float().reshape(self.up.shape[0], self.up.shape[1])
        return torch.einsum("or,r...->o...", up, self.down.float()) * (scale * self.alpha / self.rank)


@dataclass
class LoraWeights:
    """A LoRA as `{component: {module name: LoraModule}}`.

    Module names are diffusers names for the UNet and transformers names *with* the `text_model.`
    level for text encoders (`canonical_clip_name`). Read from a webui file, names stay unresolved
    (`resolved=False`: the underscored key after the prefix) until matched against a model or a
    reference UNet config (`resolve_names`).
    """

    modules: dict[str, dict[str, LoraModule]]
    family: str | None = None
    family_evidence: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"
    format: str | None = None
    resolved: bool = True
    unet_config: dict | None = None  # of the UNet the names were taken from or matched to, if known

    def items(self):
        for component in COMPONENTS:
            for name, module in self.modules.get(component, {}).items():
                yield component, name, module

    def __len__(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def ranks(self) -> collections.Counter:
        return collections.Counter(m.rank for _, _, m in self.items())

    def alphas(self) -> collections.Counter:
        return collections.Counter(m.alpha for _, _, m in self.items())


def most_common(counter: collections.Counter):
    return counter.most_common(1)[0][0]


def family_of_unet(unet_or_config) -> str:
    """`sdxl` for a UNet with SDXL's text_time added conditioning, else `sd15`."""
    config = getattr(unet_or_config, "config", unet_or_config)
    return "sdxl" if dict(config).get("addition_embed_type") == "text_time" else "sd15"
