"""What the sampling nodes do, given a runtime (`runtime.ComfyRuntime` inside ComfyUI).

    run_step_scorer   sample like KSampler and score every step's x̂0          (SPO Step Scorer)
    run_pool_preview  k candidates from the shared x_t at one step, scored     (SPO Pool Preview)
    run_guided        keep the SPM's best of k candidates at every step        (SPO Guided KSampler)
    guided_sampler    the same as a SAMPLER for SamplerCustom                  (SPO Guided Sampler)

The node classes in `nodes.py` only declare inputs and outputs and call these.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from . import render, sampling
from .scoring import LatentJudge, StepRecorder, StepResult, StepTrace, thumbnails

logger = logging.getLogger(__name__)


@dataclass
class Prepared:
    samples: torch.Tensor
    noise: torch.Tensor
    sigmas: torch.Tensor


def _prepare(runtime, model, latent: dict, seed: int, steps: int, scheduler: str, denoise: float = 1.0) -> Prepared:
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    samples = runtime.prepare_latent(model, latent)
    noise = runtime.noise(samples, seed, latent.get("batch_index"))
    sigmas = runtime.sigmas(model, scheduler, steps, denoise)
    if len(sigmas) < 2:
        raise ValueError(f"the {scheduler!r} schedule with {steps} steps and denoise {denoise} has no step")
    return Prepared(samples, noise, sigmas)


def _out_latent(latent: dict, samples: torch.Tensor) -> dict:
    out = latent.copy()
    out.pop("noise_mask", None)
    out["samples"] = samples
    return out


# ----------------------------------------------------------------------------------------------
# SPO Step Scorer
# ----------------------------------------------------------------------------------------------


PREVIEW_INTERVAL_S = 0.25  # the Step Scorer's live score-curve preview: at most 4 redraws per second
SCORE_CHUNK = 4  # steps the scoring thread decodes and scores as one batch (bench/RESULTS.md: 1.18x -> 1.09x)


def run_step_scorer(runtime, model, positive, negative, latent: dict, vae, spm, prompt: str, seed: int, steps: int,
                    cfg: float, sampler_name: str, scheduler: str, denoise: float = 1.0, node_id=None,
                    overlap: bool | None = None, chunk: int = SCORE_CHUNK):
    """Sample like KSampler and score every step's x̂0 with the SPM at that step's timestep.

    Returns (LATENT, score plot IMAGE, x̂0 strip IMAGE, StepTrace). Live: a progress bar over the
    scored steps (with the score curve so far as its preview) and one `spo.step` message per step.
    """
    prep = _prepare(runtime, model, latent, seed, steps, scheduler, denoise)
    judge = LatentJudge(spm, vae, prompt, base_model=runtime.base_model(model))
    total = len(prep.sigmas) - 1
    overlap = runtime.scoring_overlaps() if overlap is None else overlap
    recorder = StepRecorder(judge, prep.sigmas, overlap=overlap, chunk=chunk)
    bar = runtime.progress(total, node_id)

    seen: list[StepResult] = []

    last_preview = [float("-inf")]

    def report(results: list[StepResult]) -> None:
        for i, r in enumerate(results):
            seen.append(r)
            runtime.send("spo.step", {"node": node_id, "step": r.step, "steps": total, "t": r.t, "scores": r.scores})
            if len(seen) == total:  # the final plot is the last preview
                continue
            # the node's live preview: the score curve so far (no front-end extension needed); drawing it
            # costs ~2 ms, so it is redrawn at most every PREVIEW_INTERVAL_S
            now = time.perf_counter()
            if i == len(results) - 1 and now - last_preview[0] >= PREVIEW_INTERVAL_S:
                last_preview[0] = now
                curve = render.score_plot_picture([s.t for s in seen], [s.scores for s in seen], width=320,
                                                  height=180)
                bar.update_absolute(len(seen), total, ("JPEG", curve, 320))
            else:
                bar.update_absolute(len(seen), total)

    def callback(step, x0, x, total_steps):
        recorder(step, x0, x, total_steps)
        report(recorder.drain())

    start = time.perf_counter()
    try:
        sampler = runtime.sampler(sampler_name)
        samples = runtime.sample(model, prep.noise, cfg, sampler, prep.sigmas, positive, negative, prep.samples,
                                 latent.get("noise_mask"), callback, seed)
        report(recorder.finish())
    finally:
        recorder.close()
    trace = recorder.trace(prompt=judge.prompt, seed=seed, sampler=sampler_name, scheduler=scheduler, cfg=cfg,
                           seconds=time.perf_counter() - start)
    if len(trace.scores) != total:
        raise RuntimeError(f"the {sampler_name!r} sampler reported {len(trace.scores)} of {total} steps; "
                           f"it cannot be scored step by step")
    picture = render.score_plot_picture(trace.timesteps, trace.scores, title=judge.prompt)
    bar.update_absolute(total, total, ("JPEG", picture, 320))
    plot = render.to_image_tensor(picture)
    strip = render.x0_strip(trace.thumbnails, trace.timesteps, trace.scores)
    return _out_latent(latent, samples), plot, strip, trace


# ----------------------------------------------------------------------------------------------
# SPO Pool Preview
# ----------------------------------------------------------------------------------------------


@dataclass
class PoolReport:
    """The SPO_POOL value: one step's pool, its scores, winner and loser (per batch row)."""

    prompt: str
    seed: int
    step: int  # the step whose x_t the candidates share
    t: int  # the timestep the candidates are judged at (of σ_{step+1})
    sigma: float
    sigma_next: float
    scores: torch.Tensor  # [B, k]
    candidates: torch.Tensor  # [B, k, C, H, W] VAE latents of the candidates at σ_{step+1}
    images: torch.Tensor  # [B, k, 3, H, W] decoded one-step x̂0 of every candidate

    @property
    def winner(self) -> list[int]:
        return self.scores.argmax(dim=1).tolist()

    @property
    def loser(self) -> list[int]:
        return self.scores.argmin(dim=1).tolist()

    def as_dict(self) -> dict:
        return {"prompt": self.prompt, "seed": self.seed, "step": self.step, "t": self.t, "sigma": self.sigma,
                "sigma_next": self.sigma_next, "scores": self.scores.tolist(), "winner": self.winner,
                "loser": self.loser}


def run_pool_preview(runtime, model, positive, negative, latent: dict, vae, spm, prompt: str, seed: int, steps: int,
                     cfg: float, scheduler: str, pool_step: int, k: int, eta: float = 1.0, node_id=None):
    """Sample with SPO's DDIM-η to `pool_step`, draw k candidates from the shared x_t, judge each.

    Returns (grid IMAGE, LATENT with the k candidates (B·k rows, at the next step's noise level;
    continue them with KSamplerAdvanced from step pool_step+1, add_noise off), PoolReport).
    """
    if not 0 <= pool_step < steps - 1:
        raise ValueError(f"pool_step must be in 0 … {steps - 2} for {steps} steps (the candidates of the last "
                         f"step are one clean image); got {pool_step}")
    if k < 2:
        raise ValueError(f"a pool needs k >= 2 candidates, got {k}")
    prep = _prepare(runtime, model, latent, seed, steps, scheduler)
    judge = LatentJudge(spm, vae, prompt)
    pool = sampling.PoolResult()
    sampler = runtime.ksampler(sampling.spo_pool, eta=eta, k=k, judge=judge, pool=pool)
    sigmas = prep.sigmas[: pool_step + 2]
    bar = runtime.progress(pool_step + 1, node_id)
    runtime.sample(model, prep.noise, cfg, sampler, sigmas, positive, negative, prep.samples, None,
                   lambda i, x0, x, total: bar.update_absolute(i + 1, pool_step + 1), seed)
    if pool.scores is None:
        raise RuntimeError("the pool sampler did not reach the pool step")
    b = pool.scores.shape[0]
    t = judge.timestep(pool.sigma_next)
    images = judge.decode(pool.denoised.reshape(b * k, *pool.denoised.shape[2:]))
    images = images.view(b, k, *images.shape[1:])
    report = PoolReport(prompt=judge.prompt, seed=seed, step=pool.step, t=t, sigma=pool.sigma,
                        sigma_next=pool.sigma_next, scores=pool.scores,
                        candidates=runtime.latent_out(model, pool.candidates.flatten(0, 1)).view_as(pool.candidates),
                        images=images)
    runtime.send("spo.pool", {"node": node_id, **report.as_dict()})
    grid = render.pool_grid(images, pool.scores, t)
    out = _out_latent(latent, report.candidates.reshape(b * k, *report.candidates.shape[2:]))
    out.pop("batch_index", None)
    return grid, out, report


# ----------------------------------------------------------------------------------------------
# SPO Guided Sampler
# ----------------------------------------------------------------------------------------------


def guided_sampler(runtime, vae, spm, prompt: str, k: int, eta: float = 1.0, record=None):
    """A SAMPLER (for SamplerCustom) that keeps the SPM's best of k candidates at every step."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    judge = LatentJudge(spm, vae, prompt)
    return runtime.ksampler(sampling.spo_guided, eta=eta, k=k, judge=judge, record=record)


def run_guided(runtime, model, positive, negative, latent: dict, vae, spm, prompt: str, seed: int, steps: int,
               cfg: float, scheduler: str, k: int, eta: float = 1.0, denoise: float = 1.0, node_id=None):
    """One-node guided sampling: returns (LATENT, StepTrace of the kept candidates' scores)."""
    prep = _prepare(runtime, model, latent, seed, steps, scheduler, denoise)
    record = sampling.GuidedRecord()
    sampler = guided_sampler(runtime, vae, spm, prompt, k, eta, record)
    judge = sampler.extra_options["judge"]
    total = len(prep.sigmas) - 1
    bar = runtime.progress(total, node_id)
    start = time.perf_counter()

    def callback(step, x0, x, total_steps):
        bar.update_absolute(step + 1, total)
        if record.steps:
            last = record.steps[-1]
            runtime.send("spo.guided", {"node": node_id, "step": last.step, "steps": total,
                                        "scores": last.scores.tolist(), "chosen": last.chosen.tolist()})

    samples = runtime.sample(model, prep.noise, cfg, sampler, prep.sigmas, positive, negative, prep.samples,
                             latent.get("noise_mask"), callback, seed)
    trace = StepTrace(prompt=judge.prompt, seed=seed, sampler=f"spo_guided(k={k}, eta={eta:g})", scheduler=scheduler,
                      cfg=cfg, seconds=time.perf_counter() - start)
    for s in record.steps:
        trace.sigmas.append(s.sigma_next)
        trace.timesteps.append(judge.timestep(s.sigma_next))
        trace.scores.append(s.scores.gather(1, s.chosen[:, None]).squeeze(1).tolist())
    return _out_latent(latent, samples), trace


__all__ = ["run_step_scorer", "run_pool_preview", "run_guided", "guided_sampler", "PoolReport", "thumbnails"]
