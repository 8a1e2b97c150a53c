"""The SPM's training loss: PickScore's two-image cross-entropy with ties (Kirstain et al. 2023, §3).

For one pair with scores s = (s₀, s₁) (exp(τ)·cos, see `spm.py`) and crowd labels (ℓ₀, ℓ₁)
(1/0, 0/1, or 0.5/0.5 for a tie):

    L = ℓ₀·CE(s, 0) + ℓ₁·CE(s, 1) + 𝟙[tie]·log ½,     CE(s, i) = −log softmax(s)_i

The tie term is a constant that makes the minimum of a tie's loss 0 (as in the official PickScore
and SPM criteria); it changes no gradient. The batch loss is the mean over pairs.
"""

from __future__ import annotations

import math

import torch


def preference_loss(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor) -> torch.Tensor:
    """Mean PickScore loss over a batch of pairs; all arguments are [B]."""
    if not (s0.shape == s1.shape == label0.shape == label1.shape):
        raise ValueError(f"shape mismatch: s0 {tuple(s0.shape)}, s1 {tuple(s1.shape)}, "
                         f"label0 {tuple(label0.shape)}, label1 {tuple(label1.shape)}")
    logp = torch.log_softmax(torch.stack([s0, s1], dim=-1).float(), dim=-1)
    l0, l1 = label0.float(), label1.float()
    tie = (l0 == l1).float()
    per_pair = -(l0 * logp[:, 0] + l1 * logp[:, 1]) + tie * math.log(0.5)
    return per_pair.mean()


def pair_accuracy(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor) -> torch.Tensor:
    """Fraction of non-tied pairs whose higher score is the crowd's choice (ties excluded)."""
    decided = label0 != label1
    if not decided.any():
        return torch.tensor(float("nan"))
    correct = (s0 > s1) == (label0 > label1)
    return correct[decided].float().mean()
