"""The SPM's training loss: PickScore's two-image cross-entropy with ties (Kirstain et al. 2023, §3).

For one pair with scores s = (s₀, s₁) (exp(τ)·cos, see `spm.py`) and crowd labels (ℓ₀, ℓ₁)
(1/0, 0/1, or 0.5/0.5 for a tie):

    L = ℓ₀·CE(s, 0) + ℓ₁·CE(s, 1) + 𝟙[tie]·log ½,     CE(s, i) = −log softmax(s)_i

The tie term is a constant that makes the minimum of a tie's loss 0 (as in the official PickScore
and SPM criteria); it changes no gradient. The batch loss is the mean over pairs.

Any target distribution (q₀, q₁), q₀ + q₁ = 1, is taken the same way, with the constant
q₀·log q₀ + q₁·log q₁ (0 for 1/0, log ½ for a tie): the loss is then KL(q ‖ softmax(s)), whose
minimum is 0. `distillation_targets` builds such targets from the crowd labels and a teacher's scores.
"""

from __future__ import annotations

import torch


def preference_loss(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor) -> torch.Tensor:
    """Mean PickScore loss over a batch of pairs; all arguments are [B], labels in [0, 1] summing to 1 per pair."""
    if not (s0.shape == s1.shape == label0.shape == label1.shape):
        raise ValueError(f"shape mismatch: s0 {tuple(s0.shape)}, s1 {tuple(s1.shape)}, "
                         f"label0 {tuple(label0.shape)}, label1 {tuple(label1.shape)}")
    logp = torch.log_softmax(torch.stack([s0, s1], dim=-1).float(), dim=-1)
    q = torch.stack([label0, label1], dim=-1).float()
    per_pair = (torch.xlogy(q, q) - q * logp).sum(-1)
    return per_pair.mean()


def distillation_targets(label0: torch.Tensor, label1: torch.Tensor, teacher_s0: torch.Tensor,
                         teacher_s1: torch.Tensor, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets q = (1 − λ)·ℓ + λ·softmax(s_teacher) for `preference_loss`, λ = `weight` (all tensors [B]).

    The teacher is the clean-image scorer the SPM starts from, scoring the pair's clean images: its
    probability is a soft label on every pair, ties included, for the SPM's noisy x̂0 inputs to match
    (knowledge distillation, Hinton et al. 2015, with the teacher's own temperature exp(τ)).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"distillation weight must be in [0, 1]; got {weight}")
    p_teacher = torch.softmax(torch.stack([teacher_s0, teacher_s1], dim=-1).float(), dim=-1)
    q0 = (1 - weight) * label0.float() + weight * p_teacher[:, 0]
    q1 = (1 - weight) * label1.float() + weight * p_teacher[:, 1]
    return q0, q1


def pair_accuracy(s0: torch.Tensor, s1: torch.Tensor, label0: torch.Tensor, label1: torch.Tensor) -> torch.Tensor:
    """Fraction of non-tied pairs whose higher score is the crowd's choice (ties excluded)."""
    decided = label0 != label1
    if not decided.any():
        return torch.tensor(float("nan"))
    correct = (s0 > s1) == (label0 > label1)
    return correct[decided].float().mean()
