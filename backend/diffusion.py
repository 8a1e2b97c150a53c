"""The DDIM-η step core shared by SPO, the preference model, the evaluators and the UIs.

One denoising step is split in two, so a pool of candidates costs one UNet pass:

    pred = predict(model, x_t, t, cond, cfg_scale)          # one UNet call (CFG batched)
    x_prev = draw(pred, noise, eta)                         # any number of noises, no UNet call

Math from the DDIM paper (Song et al. 2021, arXiv 2010.02502). Notation
(<variable> -> <paper>):
  - alpha_t, alpha_prev -> ᾱ_t, ᾱ_{t-1} (the paper's α_t is the cumulative product)
  - eps                  -> ε_θ(x_t, t), here the classifier-free-guidance combination
                            ε̂ = ε_u + w·(ε_c − ε_u) (Ho & Salimans 2022, eq. 6)
  - x0_hat               -> f_θ(x_t, t) = (x_t − √(1−ᾱ_t)·ε̂) / √ᾱ_t          (DDIM eq. 9)
  - sigma                -> σ_t(η) = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1})  (DDIM eq. 16)
  - mean                 -> μ = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ_t²)·ε̂            (DDIM eq. 12)
  - x_prev               -> x_{t−1} = μ + σ_t·z, z ~ N(0, I)                    (DDIM eq. 12)

η = 0 is the deterministic DDIM sampler; η = 1 makes σ_t the DDPM posterior standard deviation,
which is what SPO samples with (SPO paper §4). The transition log-probability is the
Gaussian log-density of x_{t−1} under N(μ, σ_t²I), averaged over the C·H·W elements (a mean, not
a sum, as in SPO's official code), giving one number per sample.

The step grid follows the model's scheduler (`DDIMScheduler.set_timesteps`): for SD's "leading"
spacing and 20 steps, t = 951, 901, …, 1, and t_{prev} = t − 1000/steps (ᾱ of a negative t is
`final_alpha_cumprod`, i.e. ᾱ_0 with `set_alpha_to_one=False`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .models import DiffusionModel, TextConditioning

# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------


def timesteps(scheduler, num_steps: int) -> list[int]:
    """The descending timestep grid the model's DDIM scheduler uses for `num_steps` steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    scheduler.set_timesteps(num_steps)
    return [int(t) for t in scheduler.timesteps]


def prev_timestep(scheduler, t: int, num_steps: int) -> int:
    """t_{prev} for a step from t (may be negative at the last step: then ᾱ_{prev} = final ᾱ)."""
    return t - scheduler.config.num_train_timesteps // num_steps


def alpha_bar(scheduler, t: int) -> float:
    """ᾱ_t, with ᾱ of a negative t = the scheduler's final_alpha_cumprod."""
    if t < 0:
        return float(scheduler.final_alpha_cumprod)
    return float(scheduler.alphas_cumprod[t])


def ddim_sigma(alpha_t: float, alpha_prev: float, eta: float) -> float:
    """σ_t(η) = η·√((1−ᾱ_{t−1})/(1−ᾱ_t))·√(1−ᾱ_t/ᾱ_{t−1})  (DDIM eq. 16)."""
    return eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t)) * math.sqrt(1 - alpha_t / alpha_prev)


def alpha_bar_tensor(scheduler, t: torch.Tensor) -> torch.Tensor:
    """ᾱ_t for a tensor of timesteps (negative t → final_alpha_cumprod), float64 [N]."""
    alphas = scheduler.alphas_cumprod.to(torch.float64)
    final = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float64)
    t = t.to("cpu").long()
    return torch.where(t >= 0, alphas[t.clamp(min=0)], final)


def ddim_sigma_tensor(alpha_t: torch.Tensor, alpha_prev: torch.Tensor, eta: float) -> torch.Tensor:
    """σ_t(η) of DDIM eq. 16 for tensors of ᾱ (per-sample timesteps)."""
    return eta * ((1 - alpha_prev) / (1 - alpha_t)).sqrt() * (1 - alpha_t / alpha_prev).sqrt()


def ddim_mean_tensor(
    x0_hat: torch.Tensor, eps: torch.Tensor, alpha_prev: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """μ of DDIM eq. 12 with per-sample ᾱ_{t−1} and σ_t (tensors [N], broadcast over C, H, W)."""
    shape = (-1,) + (1,) * (x0_hat.ndim - 1)
    a_prev = alpha_prev.view(shape).to(x0_hat.device, x0_hat.dtype)
    direction = (1 - alpha_prev - sigma**2).clamp(min=0).sqrt().view(shape).to(x0_hat.device, x0_hat.dtype)
    return a_prev.sqrt() * x0_hat + direction * eps


def transition_log_prob_tensor(x_prev: torch.Tensor, mean: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample-σ version of `transition_log_prob`: mean over elements of log N(x_{t−1}; μ, σ²I) → [N]."""
    if (sigma <= 0).any():
        raise ValueError("the transition log-probability needs sigma_t > 0 (eta > 0) for every sample")
    s = sigma.to(x_prev.device, torch.float32).view((-1,) + (1,) * (x_prev.ndim - 1))
    diff = (x_prev.float() - mean.float()) ** 2
    log_p = -diff / (2 * s**2) - s.log() - 0.5 * math.log(2 * math.pi)
    return log_p.flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# One step: predict, then draw
# ----------------------------------------------------------------------------------------------


@dataclass
class StepPrediction:
    """Everything one UNet pass at (x_t, t) gives; enough to draw any number of x_{t-1}.

    x_t, eps, x0_hat (`torch.Tensor` [B, C, H, W]); t, t_prev (`int`); alpha_t, alpha_prev (`float`).
    """

    x_t: torch.Tensor
    eps: torch.Tensor
    x0_hat: torch.Tensor
    t: int
    t_prev: int
    alpha_t: float
    alpha_prev: float

    def sigma(self, eta: float) -> float:
        return ddim_sigma(self.alpha_t, self.alpha_prev, eta)

    def mean(self, eta: float) -> torch.Tensor:
        """μ = √ᾱ_{t−1}·x̂0 + √(1−ᾱ_{t−1}−σ_t²)·ε̂  (DDIM eq. 12)."""
        sigma = self.sigma(eta)
        direction = math.sqrt(max(1 - self.alpha_prev - sigma**2, 0.0))
        return math.sqrt(self.alpha_prev) * self.x0_hat + direction * self.eps


def cfg_unet(unet, x: torch.Tensor, t: int | torch.Tensor, cond: TextConditioning,
             negative: TextConditioning | None, cfg_scale: float) -> torch.Tensor:
    """ε̂ = ε_u + w·(ε_c − ε_u), with both halves in ONE batched UNet call (w = cfg_scale).

    `t` is one timestep for the batch or a tensor [B] of per-sample timesteps. With
    `negative=None` or w = 1 the UNet runs once on the conditional half only.
    """
    if negative is None or cfg_scale == 1.0:
        return unet(x, t, **cond.unet_kwargs(), return_dict=False)[0]
    both = TextConditioning.cat([negative, cond])
    t2 = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.ndim == 1 else t
    eps_u, eps_c = unet(torch.cat([x, x]), t2, **both.unet_kwargs(), return_dict=False)[0].chunk(2)
    return eps_u + cfg_scale * (eps_c - eps_u)


def predict(
    model: DiffusionModel,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    cond: TextConditioning,
    negative: TextConditioning | None,
    cfg_scale: float,
    unet=None,
) -> StepPrediction:
    """One UNet pass at (x_t, t): the CFG-combined ε̂ and x̂0 = (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (DDIM eq. 9).

    `unet` overrides `model.unet` (e.g. a LoRA-wrapped policy); gradients flow if enabled. The UNet sees x_t in
    the model's dtype; ε̂, x̂0 (and so the step's mean) keep x_t's dtype (fp32 trajectories of a bf16 model).
    """
    unet = unet if unet is not None else model.unet
    a_t = alpha_bar(model.scheduler, t)
    a_prev = alpha_bar(model.scheduler, t_prev)
    eps = cfg_unet(unet, x_t.to(model.dtype), t, cond, negative, cfg_scale).to(x_t.dtype)
    x0_hat = (x_t - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    return StepPrediction(x_t=x_t, eps=eps, x0_hat=x0_hat, t=t, t_prev=t_prev, alpha_t=a_t, alpha_prev=a_prev)


def draw(pred: StepPrediction, noise: torch.Tensor | None, eta: float) -> torch.Tensor:
    """x_{t−1} = μ + σ_t·z for the given z (DDIM eq. 12); `noise=None` only with σ_t = 0."""
    sigma = pred.sigma(eta)
    mean = pred.mean(eta)
    if sigma == 0.0:
        return mean
    if noise is None:
        raise ValueError(f"eta={eta} gives sigma_t={sigma:.4g} > 0: a noise tensor is required")
    return mean + sigma * noise


def complete(model: DiffusionModel, pred: StepPrediction, cond: TextConditioning, negative: TextConditioning | None,
             cfg_scale: float, grid: list[int], prev: list[int], start: int, unet=None) -> torch.Tensor:
    """Finish latents deterministically: from `pred` (the prediction at grid[start]) run DDIM with η = 0
    (eq. 12 with σ_t = 0) over the rest of the grid; returns the final latents x_0."""
    x = draw(pred, None, 0.0)
    for t, t_prev in zip(grid[start + 1:], prev[start + 1:]):
        x = draw(predict(model, x, t, t_prev, cond, negative, cfg_scale, unet=unet), None, 0.0)
    return x


def transition_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x_{t−1}; μ, σ_t²I), averaged over all non-batch elements → [B].

    Per element: −(x−μ)²/(2σ²) − log σ − ½·log(2π). A mean over C·H·W, not a sum, as SPO's official code
    takes it: the log p_θ(x_{t−1} | x_t) of SPO eq. 9, whose scale does not grow with the latent's size.
    """
    if sigma <= 0:
        raise ValueError(f"the transition log-probability needs sigma_t > 0 (eta > 0); got sigma={sigma}")
    diff = (x_prev.float() - mean.float()) ** 2
    log_p = -diff / (2 * sigma**2) - math.log(sigma) - 0.5 * math.log(2 * math.pi)
    return log_p.flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------------------------
# Pools: k candidates from one shared x_t
# ----------------------------------------------------------------------------------------------


@dataclass
class Pool:
    """k candidates x_{t−1} per sample, all drawn from the same prediction at x_t.

    candidates (`torch.Tensor` [B, k, C, H, W]) = mean[:, None] + sigma · noise.
    """

    prediction: StepPrediction
    mean: torch.Tensor
    sigma: float
    noise: torch.Tensor
    candidates: torch.Tensor

    @property
    def k(self) -> int:
        return self.candidates.shape[1]

    def log_prob(self) -> torch.Tensor:
        """[B, k] transition log-probabilities of every candidate under the policy that drew it."""
        b, k = self.candidates.shape[:2]
        mean = self.mean[:, None].expand_as(self.candidates).reshape(b * k, *self.mean.shape[1:])
        return transition_log_prob(self.candidates.reshape(b * k, *self.mean.shape[1:]), mean, self.sigma).view(b, k)


def sample_pool(pred: StepPrediction, k: int, eta: float, generator: torch.Generator | None = None) -> Pool:
    """Draw k candidates from one prediction: they share μ exactly and differ only by σ_t·z."""
    if k < 1:
        raise ValueError(f"pool size k must be >= 1, got {k}")
    sigma = pred.sigma(eta)
    if sigma == 0.0:
        raise ValueError("a pool needs eta > 0: with sigma_t = 0 every candidate is the same point")
    mean = pred.mean(eta)
    shape = (mean.shape[0], k, *mean.shape[1:])
    noise = torch.randn(shape, generator=generator, device="cpu", dtype=torch.float32).to(mean.device, mean.dtype)
    candidates = mean[:, None] + sigma * noise
    return Pool(prediction=pred, mean=mean, sigma=sigma, noise=noise, candidates=candidates)


# ----------------------------------------------------------------------------------------------
# Trajectories
# ----------------------------------------------------------------------------------------------


@dataclass
class StepRecord:
    """One step of a trajectory: x_t, the one-step x̂0 at t, ε̂, and the drawn x_{t−1}."""

    t: int
    t_prev: int
    x_t: torch.Tensor
    x0_hat: torch.Tensor
    eps: torch.Tensor
    x_prev: torch.Tensor
    sigma: float


@dataclass
class Trajectory:
    """A sampling run: every step's record and the final latent (scaled, as the UNet sees it)."""

    steps: list[StepRecord] = field(default_factory=list)
    latents: torch.Tensor | None = None

    @property
    def timesteps(self) -> list[int]:
        return [s.t for s in self.steps]


def initial_latents(model: DiffusionModel, batch: int, height: int | None = None, width: int | None = None,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """x_T ~ N(0, I) (DDIM's init_noise_sigma is 1), drawn on the CPU so seeds match across devices."""
    h = (height or model.default_resolution) // model.vae_scale_factor
    w = (width or model.default_resolution) // model.vae_scale_factor
    x = torch.randn((batch, model.latent_channels, h, w), generator=generator, dtype=torch.float32)
    return x.to(model.device, model.dtype)


@torch.no_grad()
def sample(
    model: DiffusionModel,
    prompts: list[str],
    num_steps: int = 20,
    cfg_scale: float = 5.0,
    eta: float = 1.0,
    generator: torch.Generator | None = None,
    latents: torch.Tensor | None = None,
    height: int | None = None,
    width: int | None = None,
    unet=None,
    record: bool = True,
    callback=None,
) -> Trajectory:
    """Sample with DDIM-η and CFG, recording (x_t, x̂0, ε̂, x_{t−1}, t) at every step.

    Defaults are SPO's rollout settings (20 steps, CFG 5, η = 1). With η = 0 and the same initial
    latents, this reproduces diffusers' StableDiffusion(XL)Pipeline with a DDIMScheduler.
    `callback(i, record)` is called after each step.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    cond = model.encode_prompts(prompts, height, width)
    negative = model.encode_negative(len(prompts), height, width) if cfg_scale != 1.0 else None
    x = latents if latents is not None else initial_latents(model, len(prompts), height, width, generator)
    x = x.to(model.device, model.dtype)
    traj = Trajectory()
    for i, t in enumerate(timesteps(model.scheduler, num_steps)):
        pred = predict(model, x, t, prev_timestep(model.scheduler, t, num_steps), cond, negative, cfg_scale, unet)
        sigma = pred.sigma(eta)
        noise = None
        if sigma > 0:
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device, x.dtype)
        x_prev = draw(pred, noise, eta)
        rec = StepRecord(t=t, t_prev=pred.t_prev, x_t=x, x0_hat=pred.x0_hat, eps=pred.eps, x_prev=x_prev, sigma=sigma)
        if record:
            traj.steps.append(rec)
        if callback is not None:
            callback(i, rec)
        x = x_prev
    traj.latents = x
    return traj
