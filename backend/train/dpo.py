"""Diffusion-DPO (Wallace et al., arXiv 2311.12908), the offline baseline, on the shared loop.

    spo train --config configs/pocket_dpo.yaml [key=value …]

Offline Pick-a-Pic pairs (ties dropped, winner first); winner and loser share ONE t and ONE noise ε
(`offline.py`). With the denoising error e(x, θ) = ‖ε − ε_θ(x_t, t, c)‖² (mean over C·H·W):

    Δ_θ   = e(x^w, θ)   − e(x^l, θ)          (policy: UNet with its LoRA)
    Δ_ref = e(x^w, ref) − e(x^l, ref)        (reference: the same UNet, adapters disabled, no_grad)
    L = −log σ(−β/2 · (Δ_θ − Δ_ref))                                   (paper eq. 14, official scaling)

The paper's T·ω(λ_t) factor is dropped, as in the official code; β = 5000 there (diffusers' β = 2500
without the 1/2 is the same loss). Implicit accuracy = the fraction of pairs with −β/2·(Δ_θ − Δ_ref) > 0.
Defaults are the official SD1.5 launcher's: effective batch 2048 pairs, lr 1e-8 × 2048 = 2.048e-5,
constant with 500 warm-up steps, 2000 optimizer steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import sources
from ..config import option
from .common import TrainConfig
from .method import Method, reference_pass
from .offline import LatentPairs, OfflineSource, denoising_errors, make_latent_pairs

logger = logging.getLogger(__name__)


@dataclass
class DPOConfig(TrainConfig):
    """Diffusion-DPO with LoRA; defaults are the official SD1.5 launcher's (`launchers/sd15.sh`)."""

    output_dir: str = option("runs/dpo", "run folder: config, metrics, checkpoints, LoRA files, samples")
    train_data: str = option("pocket", "Pick-a-Pic parquet of preference pairs ('pocket': the pocket world's pairs)")
    beta: float = option(5000.0, "β of L = −log σ(−β/2·(Δ_θ − Δ_ref)) (official scaling: 5000 for SD1.5 and SDXL)")
    lr: float = option(2.048e-5, "AdamW learning rate (official: 1e-8 scaled by the 2048-pair batch)")
    lr_warmup_steps: int = option(500, "linear warm-up steps, then constant (official: 500 SD1.5, 200 SDXL)")
    weight_decay: float = option(1e-2, "AdamW weight decay (official: 1e-2)")
    train_batch_size: int = option(8, "pairs per micro-step per process")
    grad_accum: int = option(256, "micro-steps per optimizer step (8 × 256 = the official 2048 pairs)")
    pairs_per_round: int = option(2048, "pairs read (and VAE-encoded) per process per round")
    max_steps: int = option(2000, "stop after this many optimizer steps (official: 2000; 0: no limit)")
    shuffle_buffer: int = option(1024, "rows in the seeded shuffle buffer of the parquet stream")

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")
        for name in ("pairs_per_round", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


def dpo_logits(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor,
               beta: float) -> torch.Tensor:
    """Per pair −β/2·((e_w − e_l)_θ − (e_w − e_l)_ref): the argument of log σ in Diffusion-DPO."""
    return -0.5 * beta * ((err_w - err_l) - (ref_err_w - ref_err_l))


def weighted_mean(per_pair: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return per_pair.mean()
    return (per_pair * weight).sum() / weight.sum().clamp(min=1)


def dpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float,
             weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L = mean over pairs of −log σ(−β/2·(Δ_θ − Δ_ref)); `weight` masks padding pairs."""
    inside = dpo_logits(err_w, err_l, ref_err_w, ref_err_l, beta)
    loss = weighted_mean(-F.logsigmoid(inside), weight)
    w = torch.ones_like(inside) if weight is None else weight
    stats = {"implicit_acc": float(((inside > 0).float() * w).sum() / w.sum().clamp(min=1)),
             "mse_w": float(err_w.detach().mean()), "mse_l": float(err_l.detach().mean()),
             "ref_mse_w": float(ref_err_w.mean()), "ref_mse_l": float(ref_err_l.mean())}
    return loss, stats


def first_captions(path, n: int = 4) -> list[str]:
    """The first `n` distinct captions of a preference file (per-epoch sample prompts)."""
    from ..preference.data import open_parquet

    captions = open_parquet(path).read_row_group(0, columns=["caption"]).column("caption").to_pylist()
    return list(dict.fromkeys(c for c in captions if isinstance(c, str) and c.strip()))[:n]


class DPOMethod(Method):
    """Diffusion-DPO in the shared loop: a round = the next `pairs_per_round` offline pairs per process."""

    name = "dpo"
    items = LatentPairs
    uses_embeddings = False

    def __init__(self, cfg: DPOConfig, model, accelerator):
        super().__init__(cfg, model, accelerator)
        self.path = sources.train_pairs(cfg.train_data)
        self.source = OfflineSource(self.path, cfg.pairs_per_round, accelerator.process_index,
                                    accelerator.num_processes, cfg.seed, cfg.shuffle_buffer)
        self.embedder = self.make_embedder() if self.uses_embeddings else None

    def make_embedder(self):
        return None

    def rounds_per_epoch(self) -> int:
        return self.source.rounds_per_epoch()

    def pairs_per_round_estimate(self) -> int:
        return min(self.cfg.pairs_per_round, self.source.good)

    def sample_prompts(self) -> list[str]:
        return first_captions(self.path)

    def make_round(self, round_index: int, epoch: int, policy_unet) -> tuple[LatentPairs, dict]:
        rows = self.source.take(epoch, round_index % self.rounds_per_epoch())
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + round_index * self.source.world
                                            + self.source.rank)
        pairs = make_latent_pairs(self.model, rows, gen, scorer=self.embedder)
        return pairs, {"pairs": len(pairs)}

    def errors(self, unet, raw_unet, batch: LatentPairs):
        cond = self.encode(batch.prompts)
        with self.accelerator.autocast():
            err_w, err_l = denoising_errors(self.model, unet, batch, cond)
            ref_w, ref_l = reference_pass(raw_unet, lambda: denoising_errors(self.model, raw_unet, batch, cond))
        return err_w, err_l, ref_w, ref_l

    def loss(self, unet, raw_unet, batch: LatentPairs, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return dpo_loss(*self.errors(unet, raw_unet, batch), self.cfg.beta, weight)
