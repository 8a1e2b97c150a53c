"""SPO's signal and stability levers: what can be changed about how a round's pools become gradient.

Each lever is a field of `SPOConfig` whose default is the paper's behaviour (Liang et al., arXiv
2406.04314); `bench/spo_ladder.py` measures each against a random-scorer control (bench/RESULTS.md).

* **Group-relative advantages** (`pair_mode: group`). The paper trains on one pair per pool, argmax
  against argmin. With all k candidates x^1…x^k of a pool and their scores s_i, each gets the
  advantage A_i = (s_i − mean_j s_j) / std_j s_j (population std over the pool, as GRPO does per
  trajectory), and the pool's loss is

      L = −log σ(β · Σ_i A_i · log r̃_i),    r̃_i = clamp(p_θ(x^i|x_t) / p_ref(x^i|x_t), 1−ε, 1+ε)

  For k = 2 the advantages are +1 and −1, so L is SPO eq. 10 exactly; for k > 2 every candidate
  adds its share of the pool's ranking.
* **Per-timestep balance** (`timestep_balance`). The gradient of log p(x_{t−1}|x_t) with respect to
  ε̂ is z·c_t/σ_t with c_t = ∂μ/∂ε̂ = √(1−ᾱ_{t−1}−σ_t²) − √ᾱ_{t−1}·√(1−ᾱ_t)/√ᾱ_t (DDIM eq. 12 with
  x̂0 of eq. 9). On a 20-step grid |c_t|/σ_t is ≈ 0.6 at t ≥ 250 and 5 at t = 51, so the last steps,
  whose candidates differ least, dominate the update. Balance multiplies a pair's loss by
  g̅ / g_t, g_t = |c_t|/σ_t, g̅ its mean over the grid's pooled steps.
* **A trust region at every t** (`kl_coef` λ). The clamp of eq. 9 only stops a pair's gradient once
  its ratio has left [1−ε, 1+ε], which at large σ_t takes a big drift of μ. The penalty
  λ · KL(p_θ(·|x_t) ‖ p_ref(·|x_t)) = λ · mean over C·H·W of (μ_θ − μ_ref)² / (2σ_t²) holds the
  policy's step mean near the reference's at every t (the same per-element scale as the log-probabilities).
* **fp32 candidates** (`fp32_candidates`): the trajectory and the pool are kept in fp32 while the
  UNet runs in fp16/bf16, so the training targets x_{t−1} carry no rounding of the model's dtype.
* **The trunk the pools hang on** (`trunk`). The paper continues each rollout from a uniformly random
  candidate, so the states x_t at which pairs are drawn follow the η = 1 sampler. With `trunk: ddim`
  the rollout continues along the deterministic DDIM step x_{t−1} = μ_{η=0}(x_t) (eq. 12 with σ_t = 0)
  instead; the pools are still drawn at η from each x_t, and their log-probabilities are unchanged.
  Pairs are then drawn at the states of the η = 0 sampler that users (and the ladder's evaluation)
  sample with. It costs one UNet pass per step on the trunk, unless the step scorer reads latents.
* More pairs per optimizer step (`grad_accum`, `pool_size`) and the learning rate (`lr`) are fields of
  every method already.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import diffusion

PAIR_MODES = ("best-worst", "group")
TRUNKS = ("candidate", "ddim")


@dataclass
class PoolItems:
    """Training items of a round whose tensors share their first dimension; subclasses list the tensor fields
    before `prompts`. Index, concatenate and (de)serialise generically (the loop's `items` contract)."""

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def tensor_fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "prompts")

    def index(self, idx):
        idx_list = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        sel = torch.as_tensor(idx_list, dtype=torch.long)
        return type(self)(*(getattr(self, f)[sel] for f in self.tensor_fields()),
                          [self.prompts[i] for i in idx_list])

    @classmethod
    def cat(cls, parts: list):
        return cls(*(torch.cat([getattr(p, f) for p in parts]) for f in cls.tensor_fields()),
                   [s for p in parts for s in p.prompts])

    def to_state(self) -> dict:
        return {**{f: getattr(self, f).cpu() for f in self.tensor_fields()}, "prompts": list(self.prompts)}

    @classmethod
    def from_state(cls, state: dict):
        return cls(*(state[f] for f in cls.tensor_fields()), state["prompts"])

    @classmethod
    def empty(cls):
        return cls(*(torch.zeros(0, dtype=torch.long if f in ("t", "t_prev") else torch.float32)
                     for f in cls.tensor_fields()), [])


@dataclass
class Groups(PoolItems):
    """Training pools of a round (`pair_mode: group`): all k candidates of a pool with their advantages."""

    x_t: torch.Tensor  # [N, C, H, W]
    x: torch.Tensor  # [N, k, C, H, W] the candidates x_{t−1}
    adv: torch.Tensor  # [N, k] A_i, population-standardised scores of the pool
    t: torch.Tensor  # [N] long
    t_prev: torch.Tensor  # [N] long
    prompts: list[str]

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.adv


def group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """[B, k] scores → A_i = (s_i − mean) / std over each pool (population std; 0 for a pool of equal scores)."""
    s = scores.float()
    centred = s - s.mean(dim=1, keepdim=True)
    std = s.std(dim=1, unbiased=False, keepdim=True)
    return torch.where(std > 0, centred / std.clamp(min=1e-12), torch.zeros_like(centred))


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ w·v / max(1, Σ w) over [N]: the mean over the real (w = 1) items, padding (w = 0) left out."""
    return (values * weight).sum() / weight.sum().clamp(min=1)


def advantage_loss(logp: torch.Tensor, ref_logp: torch.Tensor, adv: torch.Tensor, beta: float, clip_range: float,
                   weight: torch.Tensor | None = None, scale: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict]:
    """L = −log σ(β · Σ_i A_i · log clamp(r_i, 1−ε, 1+ε)), averaged over the (weighted) pools.

    logp, ref_logp, adv: [N, m]. With m = 2 and A = (+1, −1) this is SPO eq. 9–10. `weight` [N] (0 or 1)
    masks padding; `scale` [N] multiplies each pool's loss (per-timestep balance) without changing the mean's
    denominator.
    """
    lo, hi = math.log(1 - clip_range), math.log(1 + clip_range)
    raw = logp - ref_logp
    log_r = raw.clamp(lo, hi)
    per_pool = -F.logsigmoid(beta * (adv * log_r).sum(dim=1))
    if weight is None:
        weight = torch.ones_like(per_pool)
    loss = masked_mean(per_pool if scale is None else per_pool * scale.to(per_pool), weight)
    outside = (raw != log_r).any(dim=1).detach().float()
    ratio = log_r.detach().exp()
    up, down = (adv > 0).float(), (adv < 0).float()
    stats = {"ratio_w": ((ratio * up).sum(1) / up.sum(1).clamp(min=1)).mean().item(),
             "ratio_l": ((ratio * down).sum(1) / down.sum(1).clamp(min=1)).mean().item(),
             "clamped": masked_mean(outside, weight.detach()).item()}
    return loss, stats


def gradient_scale(scheduler, t: torch.Tensor, t_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """g_t = |∂μ/∂ε̂| / σ_t per sample: how strongly a pair at (t, t_prev) moves ε̂ (module docstring)."""
    a_t = diffusion.alpha_bar_tensor(scheduler, t).double()
    a_prev = diffusion.alpha_bar_tensor(scheduler, t_prev).double()
    sigma = diffusion.ddim_sigma_tensor(a_t, a_prev, eta)
    c = (1 - a_prev - sigma**2).clamp(min=0).sqrt() - a_prev.sqrt() * (1 - a_t).sqrt() / a_t.sqrt()
    return (c.abs() / sigma).float()


def balance_reference(scheduler, num_steps: int, divert_start_step: int, eta: float) -> float:
    """g̅: the mean of g_t over the grid's pooled steps (those a pair can come from)."""
    grid = diffusion.timesteps(scheduler, num_steps)[divert_start_step:]
    prev = [diffusion.prev_timestep(scheduler, t, num_steps) for t in grid]
    return gradient_scale(scheduler, torch.tensor(grid), torch.tensor(prev), eta).mean().item()


def transition_kl(mean: torch.Tensor, ref_mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) averaged over C·H·W → [N]: mean (μ_θ − μ_ref)² / (2σ_t²)."""
    s = sigma.to(mean.device, torch.float32).view((-1,) + (1,) * (mean.ndim - 1))
    return ((mean.float() - ref_mean.float()) ** 2 / (2 * s**2)).flatten(1).mean(dim=1)
