"""Step-aware preference optimization (SPO, Liang et al., arXiv 2406.04314, CVPR 2025).

    spo train --config configs/pocket_spo.yaml [key=value …]
    accelerate launch -m spo_studio.backend.cli train --config configs/sd15_spo.yaml

One *round* (SPO §4.2, Alg. 1):
  1. Sample with the current policy (the UNet with its LoRA), DDIM-η (η = 1), CFG 5. The first
     `divert_start_step` steps are one trajectory per prompt, so the layout forms first.
  2. At every later step, from the shared x_t draw a pool of k candidates x_{t−1} = μ_θ + σ_t·z
     (one UNet pass served them all). One UNet pass on the k candidates gives their one-step x̂0 at
     t−1 (the same pass then serves the next step), and the step-aware preference model scores
     them at t−1 (the last step's candidates are clean images, scored at t = 0).
  3. Winner = argmax, loser = argmin of the scores; the pair is kept when the softmax gap
     p_w − p_l = tanh((s_w − s_l)/2) exceeds `threshold`. The next step continues from a
     uniformly random candidate, whatever its score.
  4. Train on the round's pairs. Winner and loser share x_t, so ONE policy pass (with grad) and ONE
     reference pass (adapters disabled, no grad) at x_t give both μ_θ and μ_ref:

        log p(x_{t−1} | x_t) = mean over C·H·W of log N(x_{t−1}; μ(x_t), σ_t²I)   (DDIM eq. 12, 16)
        r = clamp(p_θ / p_ref, 1 − ε, 1 + ε)                                      (SPO eq. 9)
        L = −log σ(β · (log r_w − log r_l))                                        (SPO eq. 10)

Notation: β `beta` (10), ε `clip_range` (0.1), k `pool_size` (4 SD1.5 / 2 SDXL), threshold 0.3 /
0.4. The clamp zeroes a pair's gradient once its ratio leaves [1−ε, 1+ε] (no PPO-style min), as
in the official code. Gradient clipping is applied for real (the official code's is a no-op).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from .. import diffusion, sources
from ..config import option
from ..models import DiffusionModel, TextConditioning
from ..rewards import MODES as REWARD_MODES
from ..rewards import is_reward, parse_reward
from .common import TrainConfig
from .method import Method, reference_pass
from .spo_levers import (
    PAIR_MODES,
    TRUNKS,
    Groups,
    PoolItems,
    advantage_loss,
    balance_reference,
    gradient_scale,
    group_advantages,
    masked_mean,
    transition_kl,
)

logger = logging.getLogger(__name__)

MAX_POOL_SIZE = 64  # k candidates share one UNet pass per step: memory grows with prompts_per_round · k


@dataclass
class SPOConfig(TrainConfig):
    """SPO fine-tuning; defaults are the paper's SD1.5 settings (official `basic_config.py`)."""

    output_dir: str = option("runs/spo", "run folder: config, metrics, checkpoints, LoRA files, samples")
    spm: str = option("pocket", "step scorer: 'pocket', an SPM folder, an official SPO checkpoint file "
                                "(.bin / .safetensors), or an image reward 'reward:NAME' (brightness, random, "
                                "pocket-aesthetic, pocket-alignment, pickscore=DIR, clip=DIR, "
                                "laion-aesthetic=MLP,DIR, hpsv2=FILE, imagereward=FILE; '-NAME' flips it)")
    reward_mode: str = option("complete", "for spm: reward:…, what the reward judges: 'x0' (each candidate's "
                                          "decoded one-step x̂0: cheap, step-unaware) or 'complete' (the final "
                                          "image of the candidate finished by DDIM η=0 under the current policy: "
                                          "step-aware, about (remaining steps)x the UNet work)")
    reward_scale: float = option(1.0, "for spm: reward:…, the reward is multiplied by this before pairs are chosen, "
                                      "so the threshold reads in its units (p_w − p_l = tanh(scale·ΔR/2))")
    spm_clip: str = option("", "for an official SPM checkpoint file: the CLIP folder it was initialised from "
                               "(PickScore_v1 config + CLIP-ViT-H-14 tokenizer); empty: found beside the file")
    prompts: str = option("pocket", "training prompts: 'pocket' (the pocket training prompts) or a .txt "
                                    "(one per line) / .json (list of strings) / .parquet (a `caption` or "
                                    "`prompt` column) file")
    num_steps: int = option(20, "DDIM sampling steps of a rollout")
    eta: float = option(1.0, "DDIM η of the rollout (1: σ_t is the DDPM posterior std)")
    cfg_scale: float = option(5.0, "classifier-free guidance scale of rollout and loss")
    divert_start_step: int = option(4, "the first N steps are a single trajectory before pools are drawn")
    pool_size: int = option(4, "k candidates per step (paper: 4 SD1.5, 2 SDXL)")
    threshold: float = option(0.3, "keep a pair when p_w − p_l exceeds this (paper: 0.3 SD1.5, 0.4 SDXL)")
    beta: float = option(10.0, "β of the loss −log σ(β·(log r_w − log r_l))")
    clip_range: float = option(0.1, "ε: ratios are clamped to [1−ε, 1+ε]")
    lr: float = option(6e-5, "AdamW learning rate (paper: 6e-5 SD1.5, 1e-5 SDXL)")
    prompts_per_round: int = option(10, "prompts rolled out per process per round")
    decode_size: int = option(0, "decode x̂0 at this size for the SPM (0: the model's size)")
    fast_decode: bool = option(False, "score the pool from x̂0 latents shrunk to the SPM's input size before the "
                                      "VAE (about 3x less decode work on the pocket model, 5x for SD1.5 + "
                                      "PickScore; the official code decodes at full size)")
    # the signal and stability levers (spo_levers.py); defaults are the paper's behaviour
    pair_mode: str = option("best-worst", "which candidates of a pool train: 'best-worst' (the paper: argmax "
                                          "against argmin, eq. 10) or 'group' (all k, each weighted by its "
                                          "group-relative advantage A_i = (s_i − mean)/std over the pool)")
    timestep_balance: bool = option(False, "multiply each pair's loss by ḡ/g_t, g_t = |∂μ/∂ε̂|/σ_t, so the last "
                                           "steps (g up to 8x the mean) no longer dominate the gradient (paper: off)")
    kl_coef: float = option(0.0, "λ of a trust region at every t: adds λ·KL(p_θ(·|x_t) ‖ p_ref(·|x_t)) = "
                                 "λ·mean (μ_θ − μ_ref)²/(2σ_t²) per pair (paper: 0, the clamp only)")
    trunk: str = option("candidate", "what a rollout continues from after each pool: 'candidate' (the paper: a "
                                     "uniformly random candidate, so pairs are drawn at the η sampler's states) or "
                                     "'ddim' (the DDIM η=0 step from x_t, so pairs are drawn at the states of the "
                                     "deterministic sampler; one more UNet pass per step unless the scorer reads "
                                     "latents)")
    fp32_candidates: bool = option(False, "keep trajectories and pools in fp32 when the UNet runs in fp16/bf16, so "
                                          "the training targets x_{t−1} carry no rounding (paper: model dtype)")

    def validate(self) -> None:
        super().validate()
        if not 2 <= self.pool_size <= MAX_POOL_SIZE:
            raise ValueError(f"pool_size must lie in [2, {MAX_POOL_SIZE}] (a pair needs two candidates); "
                             f"got {self.pool_size}")
        if self.prompts_per_round < 1:
            raise ValueError(f"prompts_per_round must be >= 1; got {self.prompts_per_round}")
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1; got {self.num_steps}")
        if self.decode_size < 0:
            raise ValueError(f"decode_size must be >= 0 (0: the model's size); got {self.decode_size}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0; got {self.cfg_scale}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0; got {self.beta}")
        if not 0 <= self.divert_start_step < self.num_steps:
            raise ValueError(f"divert_start_step must lie in [0, num_steps); got {self.divert_start_step}")
        if self.eta <= 0:
            raise ValueError(
                f"SPO needs eta > 0 (stochastic steps give the pool and the log-probabilities); got {self.eta}"
            )
        if not 0 < self.clip_range < 1:
            raise ValueError(f"clip_range must lie in (0, 1); got {self.clip_range}")
        if self.reward_mode not in REWARD_MODES:
            raise ValueError(f"reward_mode must be one of {REWARD_MODES}; got {self.reward_mode!r}")
        if is_reward(self.spm):
            parse_reward(self.spm)
        if not (math.isfinite(self.reward_scale) and self.reward_scale > 0):
            raise ValueError(f"reward_scale must be a finite number > 0; got {self.reward_scale}")
        if not 0 <= self.threshold < 1:
            raise ValueError(f"threshold must lie in [0, 1); got {self.threshold}")
        if self.pair_mode not in PAIR_MODES:
            raise ValueError(f"pair_mode must be one of {PAIR_MODES}; got {self.pair_mode!r}")
        if self.trunk not in TRUNKS:
            raise ValueError(f"trunk must be one of {TRUNKS}; got {self.trunk!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0 (0: off); got {self.kl_coef}")


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def spo_loss(logp_w: torch.Tensor, logp_l: torch.Tensor, ref_logp_w: torch.Tensor, ref_logp_l: torch.Tensor,
             beta: float, clip_range: float, weight: torch.Tensor | None = None,
             scale: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """SPO eq. 9–10: L = −log σ(β·(log clamp(r_w) − log clamp(r_l))), mean over (weighted) pairs.

    log r = log p_θ − log p_ref, and clamp(r, 1−ε, 1+ε) in log space is clamp(log r, log(1−ε), log(1+ε)).
    `weight` [N] (0 or 1) masks padding pairs without changing the graph (multi-process balance); `scale` [N]
    multiplies each pair's loss (per-timestep balance). Stats: the mean clamped ratios and `clamped`, the share
    of pairs whose r_w or r_l left [1−ε, 1+ε] (no gradient through them): how much the trust region binds.
    """
    adv = torch.tensor([1.0, -1.0]).to(logp_w).expand(len(logp_w), 2)
    return advantage_loss(torch.stack([logp_w, logp_l], 1), torch.stack([ref_logp_w, ref_logp_l], 1), adv, beta,
                          clip_range, weight, scale)


def select_pairs(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scores [B, k] → (winner index [B], loser index [B], keep [B]): argmax / argmin, kept when the
    softmax of (s_w, s_l) gives p_w − p_l = tanh((s_w − s_l)/2) > threshold."""
    win = scores.argmax(dim=1)
    lose = scores.argmin(dim=1)
    s_w = scores.gather(1, win[:, None]).squeeze(1)
    s_l = scores.gather(1, lose[:, None]).squeeze(1)
    gap = torch.tanh((s_w - s_l).float() / 2)
    return win, lose, gap > threshold


# ----------------------------------------------------------------------------------------------
# Rollout
# ----------------------------------------------------------------------------------------------


@dataclass
class Pairs(PoolItems):
    """Training pairs of a round: winner and loser share x_t and the prompt."""

    x_t: torch.Tensor  # [N, C, H, W]
    x_w: torch.Tensor
    x_l: torch.Tensor
    t: torch.Tensor  # [N] long
    t_prev: torch.Tensor  # [N] long
    prompts: list[str]

    def targets(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The candidates [N, 2, C, H, W] and their advantages (+1, −1), as `Groups` gives them."""
        return torch.stack([self.x_w, self.x_l], 1), torch.tensor([1.0, -1.0]).expand(len(self), 2)


def items_class(cfg: SPOConfig) -> type[PoolItems]:
    """What a round's kept pools become: `Pairs` (the paper's best-worst pair) or `Groups` (all k, with advantages)."""
    return Groups if cfg.pair_mode == "group" else Pairs


@torch.no_grad()
def rollout(model: DiffusionModel, policy_unet, scorer, prompts: list[str], cfg: SPOConfig,
            generator: torch.Generator) -> tuple[Pairs, dict]:
    """One round of pooled sampling with the current policy; returns the kept pairs and statistics."""
    b, k = len(prompts), cfg.pool_size
    cond = model.encode_prompts(prompts)
    negative = model.encode_negative(b)
    cond_k, negative_k = cond.repeat_interleave(k), negative.repeat_interleave(k)
    prompts_k = [p for p in prompts for _ in range(k)]
    grid = diffusion.timesteps(model.scheduler, cfg.num_steps)
    prev = [diffusion.prev_timestep(model.scheduler, t, cfg.num_steps) for t in grid]
    x = diffusion.initial_latents(model, b, generator=generator)
    if cfg.fp32_candidates:  # the UNet gets its dtype at its input (diffusion.predict); all else stays fp32
        x = x.float()
    items = items_class(cfg)
    group = items is Groups
    deterministic_trunk = cfg.trunk == "ddim"

    pred = None
    kept: list[Pairs] = []
    scores_seen, pairs_possible = [], 0
    for i, (t, t_prev) in enumerate(zip(grid, prev)):
        if pred is None:
            pred = diffusion.predict(model, x, t, t_prev, cond, negative, cfg.cfg_scale, unet=policy_unet)
        if i < cfg.divert_start_step:  # a single trajectory: along DDIM η = 0 (trunk 'ddim') or drawn at η
            if deterministic_trunk:
                x = diffusion.draw(pred, None, 0.0)
            else:
                x = diffusion.draw(pred, torch.randn(x.shape, generator=generator).to(x.device, x.dtype), cfg.eta)
            pred = None
            continue
        pool = diffusion.sample_pool(pred, k, cfg.eta, generator)  # [b, k, C, H, W], no UNet call
        flat = pool.candidates.reshape(b * k, *x.shape[1:])
        if getattr(scorer, "reads_noisy_latents", False):  # a latent SPM judges the candidates x_{t−1} themselves:
            nxt = None                                    # no UNet pass on all k, no decode
            scores = scorer.score_latents(flat, prompts_k, max(t_prev, 0))
        elif t_prev >= 0:
            nxt_t = grid[i + 1]
            nxt_prev = prev[i + 1]
            nxt = diffusion.predict(model, flat, nxt_t, nxt_prev, cond_k, negative_k, cfg.cfg_scale, unet=policy_unet)
            if getattr(scorer, "needs_completion", False):  # a reward on the image each candidate leads to
                final = diffusion.complete(model, nxt, cond_k, negative_k, cfg.cfg_scale, grid, prev, i + 1,
                                           unet=policy_unet)
                scores = scorer.score_latents(final, prompts_k, 0)
            else:
                scores = scorer.score_latents(nxt.x0_hat, prompts_k, nxt_t)
        else:  # the last step's candidates are clean: score them as they are, at t = 0
            nxt = None
            scores = scorer.score_latents(flat, prompts_k, 0)
        scores = scores.view(b, k)
        scores_seen.append(scores.float().cpu())
        win, lose, keep = select_pairs(scores, cfg.threshold)
        pairs_possible += b
        rows = torch.nonzero(keep).flatten()
        if len(rows):
            common = {"x_t": x[rows].detach().float().cpu(), "t": torch.full((len(rows),), t, dtype=torch.long),
                      "t_prev": torch.full((len(rows),), t_prev, dtype=torch.long),
                      "prompts": [prompts[r] for r in rows.tolist()]}
            if group:  # every candidate of the pool, with its group-relative advantage
                kept.append(Groups(x=pool.candidates[rows].float().cpu(), adv=group_advantages(scores[rows]).cpu(),
                                   **common))
            else:
                kept.append(Pairs(x_w=pool.candidates[rows, win[rows]].float().cpu(),
                                  x_l=pool.candidates[rows, lose[rows]].float().cpu(), **common))
        pred = None  # without a cached prediction the next step predicts at x only
        if deterministic_trunk:  # along DDIM η = 0 from x_t: no candidate is this point, nothing is cached
            x = diffusion.draw(pool.prediction, None, 0.0)
            continue
        # continue from a uniformly random candidate, whatever its score; its prediction is cached
        pick = torch.randint(0, k, (b,), generator=generator)
        x = pool.candidates[torch.arange(b), pick]
        if nxt is not None:
            sel = torch.arange(b) * k + pick
            pred = diffusion.StepPrediction(x_t=x, eps=nxt.eps[sel], x0_hat=nxt.x0_hat[sel], t=nxt.t,
                                            t_prev=nxt.t_prev, alpha_t=nxt.alpha_t, alpha_prev=nxt.alpha_prev)
    all_scores = torch.cat(scores_seen) if scores_seen else torch.zeros(0)
    pairs = items.cat(kept) if kept else items.empty()
    stats = {"pairs": len(pairs), "pair_yield": len(pairs) / max(1, pairs_possible),
             "score_mean": all_scores.mean().item() if all_scores.numel() else float("nan"),
             "score_std": all_scores.std().item() if all_scores.numel() > 1 else float("nan")}
    return pairs, stats


# ----------------------------------------------------------------------------------------------
# Log-probabilities of a pair batch under the policy and the reference
# ----------------------------------------------------------------------------------------------


def step_means(model: DiffusionModel, unet, batch: PoolItems, cond: TextConditioning, negative: TextConditioning,
               cfg: SPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """μ(x_t) of DDIM eq. 12 (fp32, [N, C, H, W]) and σ_t [N] under `unet`, from ONE UNet pass at x_t (CFG batched)."""
    device = model.device
    x_t = batch.x_t.to(device, model.dtype)
    a_t = diffusion.alpha_bar_tensor(model.scheduler, batch.t)
    a_prev = diffusion.alpha_bar_tensor(model.scheduler, batch.t_prev)
    sigma = diffusion.ddim_sigma_tensor(a_t, a_prev, cfg.eta)
    eps = diffusion.cfg_unet(unet, x_t, batch.t.to(device), cond, negative, cfg.cfg_scale).float()
    a_t_ = a_t.view(-1, 1, 1, 1).to(device, torch.float32)
    x0_hat = (batch.x_t.to(device).float() - (1 - a_t_).sqrt() * eps) / a_t_.sqrt()
    return diffusion.ddim_mean_tensor(x0_hat, eps, a_prev, sigma), sigma


def candidate_log_probs(candidates: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """[N, m, C, H, W] candidates → [N, m] log p(x_{t−1} | x_t), mean over elements (DDIM eq. 12, 16)."""
    x = candidates.to(mean.device)
    return torch.stack([diffusion.transition_log_prob_tensor(x[:, i], mean, sigma) for i in range(x.shape[1])], 1)


def pair_log_probs(model: DiffusionModel, unet, batch: Pairs, cond: TextConditioning, negative: TextConditioning,
                   cfg: SPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(x_w | x_t) and log p(x_l | x_t) under `unet`, from ONE UNet pass at x_t (CFG batched)."""
    mean, sigma = step_means(model, unet, batch, cond, negative, cfg)
    lp = candidate_log_probs(batch.targets()[0], mean, sigma)
    return lp[:, 0], lp[:, 1]


# ----------------------------------------------------------------------------------------------
# The method, as the loop sees it
# ----------------------------------------------------------------------------------------------


class SPOMethod(Method):
    """SPO in the shared loop: a round = on-policy rollouts of `prompts_per_round` prompts per process."""

    name = "spo"
    items = Pairs  # Groups with pair_mode: group (set per instance)

    def __init__(self, cfg: SPOConfig, model: DiffusionModel, accelerator):
        from ..rewards import step_scorer

        super().__init__(cfg, model, accelerator)
        self.scorer = step_scorer(cfg.spm, model, cfg.reward_mode, cfg.reward_scale, clip_folder=cfg.spm_clip,
                                  seed=cfg.seed, decode_size=cfg.decode_size, latent_decode=cfg.fast_decode)
        self.prompts = sources.prompts(cfg.prompts)
        self.world = accelerator.num_processes
        self.per_round = cfg.prompts_per_round * self.world
        self.items = items_class(cfg)
        self.g_bar = (balance_reference(model.scheduler, cfg.num_steps, cfg.divert_start_step, cfg.eta)
                      if cfg.timestep_balance else None)

    def rounds_per_epoch(self) -> int:
        return -(-len(self.prompts) // self.per_round)

    def pairs_per_round_estimate(self) -> int:
        return self.cfg.prompts_per_round * (self.cfg.num_steps - self.cfg.divert_start_step) // 2

    def sample_prompts(self) -> list[str]:
        return self.prompts[:4]

    def make_round(self, round_index: int, epoch: int, policy_unet) -> tuple[Pairs, dict]:
        cfg, rank = self.cfg, self.accelerator.process_index
        order = torch.randperm(len(self.prompts), generator=torch.Generator().manual_seed(cfg.seed * 1009 + epoch))
        r = round_index % self.rounds_per_epoch()
        mine = [self.prompts[i] for i in order[r * self.per_round: (r + 1) * self.per_round].tolist()]
        mine = mine[rank::self.world] or [self.prompts[order[0].item()]]
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + round_index * self.world + rank)
        return rollout(self.model, policy_unet, self.scorer, mine, cfg, gen)

    def loss(self, unet, raw_unet, batch: PoolItems, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
        cfg, model = self.cfg, self.model
        cond = self.encode(batch.prompts)
        negative = model.encode_negative(len(batch))
        candidates, adv = batch.targets()
        scale = None
        if self.g_bar is not None:  # per-timestep balance: ḡ / g_t
            scale = self.g_bar / gradient_scale(model.scheduler, batch.t, batch.t_prev, cfg.eta)
        with self.accelerator.autocast():
            mean, sigma = step_means(model, unet, batch, cond, negative, cfg)
            ref_mean, _ = reference_pass(raw_unet, lambda: step_means(model, raw_unet, batch, cond, negative, cfg))
            logp = candidate_log_probs(candidates, mean, sigma)
            ref_logp = candidate_log_probs(candidates, ref_mean, sigma)
            loss, stats = advantage_loss(logp, ref_logp, adv.to(logp), cfg.beta, cfg.clip_range, weight, scale)
            if cfg.kl_coef > 0:  # the trust region at every t
                kl = transition_kl(mean, ref_mean, sigma)
                kl_mean = masked_mean(kl, weight)
                loss = loss + cfg.kl_coef * kl_mean
                stats["kl"] = kl_mean.item()
        return loss, stats


def train_spo(cfg: SPOConfig, run_stop=None) -> dict:
    """`loop.train` with SPO: run (or resume) SPO fine-tuning as `cfg` says; returns the run summary."""
    from .loop import train

    return train(cfg, SPOMethod, run_stop)
