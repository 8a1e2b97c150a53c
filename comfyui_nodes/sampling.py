"""SPO's DDIM-η step and step-wise preference selection, written as ComfyUI (k-diffusion) samplers.

Pure torch; nothing here imports ComfyUI. The functions have the k-diffusion signature that
`comfy.samplers.KSAMPLER` wraps:

    fn(model, x, sigmas, extra_args=None, callback=None, disable=None, **options) -> x

Spaces (the k-diffusion parameterisation of Karras et al. 2022, as ComfyUI uses it). The sampler state is
x = x0 + σ·ε in the *scaled* latent space (after `process_latent_in`), and `model(x, σ)` returns
the CFG-combined one-step prediction x̂0 ("denoised"). The DDPM/diffusers state of the same point
is x_t = x / √(1+σ²) with ᾱ_t = 1 / (1+σ²), and ε̂ = (x − x̂0) / σ. So one DDIM-η step from σ to
σ' (DDIM eq. 12 and 16, as `backend/diffusion.py`):

    ᾱ, ᾱ'  = 1/(1+σ²), 1/(1+σ'²)                       (σ' = 0 gives ᾱ' = 1: the clean image)
    s_η    = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')
    x'_t   = √ᾱ'·x̂0 + √(1−ᾱ'−s_η²)·ε̂ + s_η·z
    x'     = x'_t·√(1+σ'²)

With η = 1 this is the DDPM posterior, i.e. ComfyUI's "ddpm" sampler; SPO rolls out with it.

Noise stream. `spo_ddim` and the guided sampler draw their step noise from ONE generator seeded
with the run's seed, whose first draw is the initial noise (what `comfy.sample.prepare_noise`
draws) — the same stream as `backend.diffusion.sample(generator=torch.Generator().manual_seed(seed))`.
With ComfyUI's `ddim_uniform` schedule (SD's "leading" DDIM grid, t = 951, 901, …, 1 for 20 steps)
and an empty latent, a seed therefore gives the same x_t at every step in ComfyUI and in
`spo sample` / `spo score`; only the very last step differs (ComfyUI ends at σ = 0, diffusers at
ᾱ_0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

# ----------------------------------------------------------------------------------------------
# Space conversions
# ----------------------------------------------------------------------------------------------


def alpha_bar_of_sigma(sigma: float) -> float:
    """ᾱ = 1 / (1 + σ²) (σ = 0 → 1)."""
    return 1.0 / (1.0 + float(sigma) ** 2)


def to_vp(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """ComfyUI's x at σ → the DDPM/diffusers latent x_t = x / √(1+σ²)."""
    return x / math.sqrt(1.0 + float(sigma) ** 2)


def from_vp(x_t: torch.Tensor, sigma: float) -> torch.Tensor:
    """The DDPM latent x_t → ComfyUI's x = x_t·√(1+σ²)."""
    return x_t * math.sqrt(1.0 + float(sigma) ** 2)


def ddim_sigma(alpha: float, alpha_next: float, eta: float) -> float:
    """s_η = η·√((1−ᾱ')/(1−ᾱ))·√(1−ᾱ/ᾱ')  (DDIM eq. 16); 0 when the step ends clean (ᾱ' = 1)."""
    if alpha_next >= 1.0:
        return 0.0
    return eta * math.sqrt((1 - alpha_next) / (1 - alpha)) * math.sqrt(max(1 - alpha / alpha_next, 0.0))


def ddim_mean(x: torch.Tensor, denoised: torch.Tensor, sigma: float, sigma_next: float, eta: float):
    """(μ in ComfyUI's space at σ', s_η in the same space) of one DDIM-η step from (x, σ) with x̂0 = denoised.

    The candidates of the step are μ + s·z for z ~ N(0, I); `s` is s_η·√(1+σ'²).
    """
    sigma, sigma_next = float(sigma), float(sigma_next)
    a, a_next = alpha_bar_of_sigma(sigma), alpha_bar_of_sigma(sigma_next)
    s_eta = ddim_sigma(a, a_next, eta)
    eps = (x - denoised) / sigma
    mean_t = math.sqrt(a_next) * denoised + math.sqrt(max(1 - a_next - s_eta**2, 0.0)) * eps
    scale = math.sqrt(1.0 + sigma_next**2)
    return mean_t * scale, s_eta * scale


class NoiseStream:
    """One seeded generator for a whole run; its first draw (the initial noise) is skipped.

    `torch.Generator().manual_seed(seed)` on the CPU, as `comfy.sample.prepare_noise` and
    `backend.diffusion.sample` use, so step noise is reproducible across devices.
    """

    def __init__(self, seed: int | None, like: torch.Tensor):
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(int(seed))
            torch.randn(like.shape, generator=self.generator)  # the initial noise, drawn by ComfyUI

    def draw(self, shape, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=torch.float32).to(like.device, like.dtype)


# ----------------------------------------------------------------------------------------------
# Starting from pure noise
# ----------------------------------------------------------------------------------------------


class SPOSamplerMixin:
    """For a `KSAMPLER` running the samplers here.

    1. An empty latent (text-to-image) starts from pure noise, x = noise·√(1+σ₀²).

    ComfyUI scales the initial noise by σ₀ unless σ₀ is the model's σ_max; DDIM (and SPO's rollout)
    starts the "leading" grid at t = 951 < 999 from x_T = noise in x_t space, i.e. √(1+σ₀²) here.
    Only an all-zero latent is treated so; img2img keeps ComfyUI's noise·σ₀ + latent.
    2. A judge among the sampler's options is bound to the model being sampled (for its latent
    format and σ → timestep map), so a SAMPLER made without a MODEL input can score.
    """

    _pure_noise = False  # set by each `sample` call (ComfyUI runs one prompt at a time)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self._pure_noise = latent_image is None or not bool(torch.any(latent_image))
        judge = self.extra_options.get("judge")
        if judge is not None:
            judge.bind(model_wrap.inner_model)
        return super().sample(model_wrap, sigmas, extra_args, callback, noise, latent_image=latent_image,
                              denoise_mask=denoise_mask, disable_pbar=disable_pbar)

    def max_denoise(self, model_wrap, sigmas):
        return self._pure_noise or super().max_denoise(model_wrap, sigmas)


# ----------------------------------------------------------------------------------------------
# Samplers
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def spo_ddim(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0):
    """DDIM-η with one seeded noise stream (η = 1: SPO's rollout sampler). See the module docstring."""
    extra_args = {} if extra_args is None else extra_args
    noise = NoiseStream(extra_args.get("seed"), x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        mean, scale = ddim_mean(x, denoised, sigmas[i], sigmas[i + 1], eta)
        x = mean + scale * noise.draw(x.shape, x) if scale > 0 else mean
    return x


@dataclass
class GuidedStep:
    """One selection step of the guided sampler: the scores of the k candidates, per batch row."""

    step: int
    sigma_next: float  # the candidates' noise level (they are judged at its timestep)
    scores: torch.Tensor  # [B, k], float32, on the CPU
    chosen: torch.Tensor  # [B] index of the candidate kept


@dataclass
class GuidedRecord:
    """What a guided run did, filled in as it goes (the sampler's output is only the latent)."""

    steps: list[GuidedStep] = field(default_factory=list)


@torch.no_grad()
def spo_guided(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0, k: int = 4,
               judge=None, record: GuidedRecord | None = None):
    """Inference-time step-wise preference selection: at every step draw k candidates, keep the best.

    At step i (σ_i → σ_{i+1} > 0): from the shared x, k candidates x'_j = μ + s·z_j (no UNet call);
    ONE batched model call on all k gives each candidate's x̂0 at σ_{i+1}; `judge(x0, sigma)`
    scores them (the step-aware preference model at t_{i+1}); the sampler continues from the
    argmax, whose x̂0 then serves the next step — so a run costs 1 + k·(N−1) single-sample UNet
    passes. The last step (σ' = 0) is deterministic: x = x̂0. With k = 1 this is `spo_ddim`
    exactly, same seed, same result.

    `judge(denoised [B·k, C, H, W], sigma, candidates) -> scores [B·k]`; rows are (batch row, candidate)
    in that order (a latent SPM's judge reads the candidates themselves). `record` collects the per-step scores.
    """
    if k < 1:
        raise ValueError(f"k (candidates per step) must be >= 1, got {k}")
    if k > 1 and judge is None:
        raise ValueError("the guided sampler needs a judge (the preference model) when k > 1")
    extra_args = {} if extra_args is None else extra_args
    if extra_args.get("denoise_mask") is not None and k > 1:
        raise ValueError("SPO guided sampling does not support inpainting masks (noise_mask); "
                         "remove the mask or use k = 1")
    noise = NoiseStream(extra_args.get("seed"), x)
    b = x.shape[0]
    denoised = model(x, sigmas[0] * x.new_ones([b]), **extra_args)
    for i in range(len(sigmas) - 1):
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        mean, scale = ddim_mean(x, denoised, sigmas[i], sigmas[i + 1], eta)
        if scale == 0:  # the last step: a clean image, nothing to choose between
            x = mean
            break
        z = noise.draw((b, k, *x.shape[1:]), x)
        candidates = (mean[:, None] + scale * z).reshape(b * k, *x.shape[1:])
        cand_denoised = model(candidates, sigmas[i + 1] * candidates.new_ones([b * k]), **extra_args)
        if k == 1:
            chosen = torch.zeros(b, dtype=torch.long)
        else:
            scores = judge(cand_denoised, sigmas[i + 1], candidates).float().cpu().view(b, k)
            chosen = scores.argmax(dim=1)
            if record is not None:
                record.steps.append(GuidedStep(step=i, sigma_next=float(sigmas[i + 1]), scores=scores, chosen=chosen))
        rows = torch.arange(b) * k + chosen
        x = candidates[rows.to(candidates.device)]
        denoised = cand_denoised[rows.to(cand_denoised.device)]
    return x


@dataclass
class PoolResult:
    """The pool drawn at one step (filled in by `spo_pool`)."""

    step: int = -1
    sigma: float = 0.0
    sigma_next: float = 0.0
    x: torch.Tensor | None = None  # [B, C, H, W] shared x at σ (scaled latent space)
    candidates: torch.Tensor | None = None  # [B, k, C, H, W] x' at σ'
    denoised: torch.Tensor | None = None  # [B, k, C, H, W] x̂0 of every candidate at σ' (or the candidate if σ' = 0)
    scores: torch.Tensor | None = None  # [B, k]


@torch.no_grad()
def spo_pool(model, x, sigmas, extra_args=None, callback=None, disable=None, eta: float = 1.0, k: int = 4,
             judge=None, pool: PoolResult | None = None):
    """Sample with `spo_ddim` up to the last step of `sigmas`, and there draw a pool of k candidates.

    `sigmas` must end at the pool's step: σ_s (where x is shared) → σ_{s+1} (the candidates).
    Each candidate is judged on its own one-step x̂0 at σ_{s+1} (one batched model call), or as it
    is when σ_{s+1} = 0. Returns the best candidate (so the output is a normal latent); the whole
    pool lands in `pool`.
    """
    if pool is None:
        raise ValueError("spo_pool needs a PoolResult to fill")
    if len(sigmas) < 2:
        raise ValueError("spo_pool needs at least one step")
    extra_args = {} if extra_args is None else extra_args
    noise = NoiseStream(extra_args.get("seed"), x)
    b = x.shape[0]
    last = len(sigmas) - 2
    for i in range(last + 1):
        denoised = model(x, sigmas[i] * x.new_ones([b]), **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        mean, scale = ddim_mean(x, denoised, sigmas[i], sigmas[i + 1], eta)
        if i < last:
            x = mean + scale * noise.draw(x.shape, x) if scale > 0 else mean
            continue
        if scale == 0:
            raise ValueError("the pool step ends at sigma 0, where every candidate is the same image; "
                             "choose an earlier step")
        z = noise.draw((b, k, *x.shape[1:]), x)
        candidates = (mean[:, None] + scale * z).reshape(b * k, *x.shape[1:])
        sigma_next = sigmas[i + 1]
        cand_denoised = model(candidates, sigma_next * candidates.new_ones([b * k]), **extra_args)
        scores = judge(cand_denoised, sigma_next, candidates).float().cpu().view(b, k)
        pool.step, pool.sigma, pool.sigma_next = i, float(sigmas[i]), float(sigma_next)
        pool.x = x.detach().cpu()
        pool.candidates = candidates.view(b, k, *x.shape[1:]).detach().cpu()
        pool.denoised = cand_denoised.view(b, k, *x.shape[1:]).detach().cpu()
        pool.scores = scores
        best = scores.argmax(dim=1)
        return candidates[(torch.arange(b) * k + best).to(candidates.device)]
    return x
