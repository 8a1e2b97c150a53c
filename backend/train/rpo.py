"""Diffusion-RPO (Gu et al., arXiv 2406.06382), the relative baseline, on the shared loop.

    spo train --config configs/pocket_rpo.yaml [key=value …]

No official code exists (the authors' repository holds only a README), so this is our reading of the
paper, written down here. With Diffusion-DPO's per-pair terms Δ^w_i = e(x^w_i, θ) − e(x^w_i, ref) and
Δ^l_j = e(x^l_j, θ) − e(x^l_j, ref) (denoising errors, `dpo.py`), every winner i of a micro-batch is
contrasted with every loser j:

    z_ij = −β/2 · (Δ^w_i − Δ^l_j)                                        (the DPO logit of pair (i, j))
    ω_ij = softmax_j(−(1 − cos(e_i, e_j)) / τ)                           (τ = 0.5, as in the authors' RPO)
    L    = mean_i Σ_j ω_ij · (−log σ(z_ij))

e_i is the joint CLIP embedding of winner image i and its prompt (`Scorer.joint_embedding`), so a
pair mostly borrows contrast from pairs with similar prompts and images. Two choices of ours: ω sits
outside log σ (a weighted mixture of DPO terms) rather than inside it as in the authors' LLM code,
so that with one-hot weights (ω = I) the loss is exactly Diffusion-DPO's; and the contrast spans the
micro-batch of one process (padding pairs get no weight and are never contrasted).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..config import option
from .dpo import DPOConfig, DPOMethod


@dataclass
class RPOConfig(DPOConfig):
    """Diffusion-RPO with LoRA; shares Diffusion-DPO's defaults, plus the similarity weighting."""

    output_dir: str = option("runs/rpo", "run folder: config, metrics, checkpoints, LoRA files, samples")
    distance_temperature: float = option(0.5, "τ of the similarity weights softmax_j(−(1 − cos(e_i, e_j))/τ)")
    embedding_model: str = option("pocket", "CLIP (or SPM) folder for the joint image+prompt embeddings "
                                            "('pocket': the pocket scorer)")

    def validate(self) -> None:
        super().validate()
        if self.distance_temperature <= 0:
            raise ValueError(f"distance_temperature must be > 0; got {self.distance_temperature}")


def similarity_weights(emb: torch.Tensor, tau: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ω [M, M]: row-wise softmax of −(1 − cos(e_i, e_j))/τ over the valid j (weight > 0)."""
    e = F.normalize(emb.float(), dim=-1)
    logits = -(1 - e @ e.T) / tau
    if valid is not None:
        logits = logits.masked_fill(~valid.bool()[None, :], float("-inf"))
    return logits.softmax(dim=1)


def rpo_loss(err_w: torch.Tensor, err_l: torch.Tensor, ref_err_w: torch.Tensor, ref_err_l: torch.Tensor, beta: float,
             omega: torch.Tensor, weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L = mean_i Σ_j ω_ij·(−log σ(−β/2·(Δ^w_i − Δ^l_j))) with Δ = e_θ − e_ref; `weight` masks rows."""
    delta_w = err_w - ref_err_w
    delta_l = err_l - ref_err_l
    z = -0.5 * beta * (delta_w[:, None] - delta_l[None, :])  # [M, M]
    per_row = (omega * -F.logsigmoid(z)).sum(dim=1)
    w = torch.ones_like(per_row) if weight is None else weight
    loss = (per_row * w).sum() / w.sum().clamp(min=1)
    diag = z.diagonal().detach()
    stats = {"implicit_acc": float(((diag > 0).float() * w).sum() / w.sum().clamp(min=1)),
             "omega_diag": float((omega.diagonal().detach() * w).sum() / w.sum().clamp(min=1)),
             "mse_w": float(err_w.detach().mean()), "mse_l": float(err_l.detach().mean())}
    return loss, stats


class RPOMethod(DPOMethod):
    name = "rpo"
    uses_embeddings = True

    def make_embedder(self):
        from .. import sources
        from ..preference.scoring import Scorer

        return Scorer.from_path(sources.scorer(self.cfg.embedding_model), self.model)

    def loss(self, unet, raw_unet, batch, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        omega = similarity_weights(batch.emb.to(weight.device), self.cfg.distance_temperature, weight > 0)
        return rpo_loss(*self.errors(unet, raw_unet, batch), self.cfg.beta, omega, weight)
