"""The contract between the training loop and a fine-tuning method.

`loop.train` drives any `Method` subclass (`spo.SPOMethod`, `dpo.DPOMethod`, `rpo.RPOMethod`): it asks
for rounds of training items, cuts them into micro-batches and calls `loss`. `reference_pass` is how
a method evaluates the frozen reference model: the same UNet with its LoRA adapters disabled.
"""

from __future__ import annotations

import torch


class Method:
    """What a fine-tuning method plugs into the loop (see `spo.SPOMethod`, `dpo.DPOMethod`, `rpo.RPOMethod`).

    A *round* produces training items (pairs) for this process: SPO rolls out the current policy,
    Diffusion-DPO/-RPO read the next slice of offline pairs. Items are gathered across ranks and cut
    into micro-batches; `loss` returns the method's loss for one micro-batch.
    """

    name = "method"
    items: type  # a pairs class with __len__, index, cat, to_state, from_state

    def __init__(self, cfg, model, accelerator):
        self.cfg, self.model, self.accelerator = cfg, model, accelerator

    def rounds_per_epoch(self) -> int:
        raise NotImplementedError

    def make_round(self, round_index: int, epoch: int, policy_unet) -> tuple[object, dict]:
        raise NotImplementedError

    def loss(self, unet, raw_unet, batch, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def pairs_per_round_estimate(self) -> int:
        raise NotImplementedError

    def sample_prompts(self) -> list[str]:
        raise NotImplementedError

    def encode(self, prompts: list[str]):
        """Text conditioning of `prompts`, cached per prompt (a prompt is encoded once per run)."""
        from ..models import TextConditioning

        cache = self.__dict__.setdefault("_cond_cache", {})
        for p in dict.fromkeys(prompts):
            if p not in cache:  # one at a time: a batch's composition must not change the numbers (resume)
                cache[p] = self.model.encode_prompts([p])
        return TextConditioning.cat([cache[p] for p in prompts])


def reference_pass(raw_unet, fn):
    """Run `fn()` with the LoRA adapters disabled, under no_grad: the frozen reference model."""
    with torch.no_grad():
        raw_unet.disable_adapters()
        try:
            return fn()
        finally:
            raw_unet.enable_adapters()
