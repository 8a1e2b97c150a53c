"""Scoring ComfyUI's one-step predictions with a step-aware preference model (SPM).

Nothing here imports ComfyUI; the ComfyUI objects (VAE, the sampled model) are used through the
few attributes ComfyUI's own samplers use:

    vae.decode(latent) -> images [B, H, W, 3] in [0, 1]       (comfy.sd.VAE)
    base.process_latent_out(x)                                  scaled → VAE latent (÷ 0.18215 for SD1.5)
    base.model_sampling.timestep(sigma)                         σ → the discrete timestep t (argmin over log σ)

where `base` is the `BaseModel` (`model_patcher.model`, or `guider.inner_model` inside a sampler).
The SPM scores the decoded x̂0 at the timestep of the σ it was predicted from (SPO §4.1), exactly
as `backend.preference.evaluate.score_trajectory` does: full VAE decode, the SPM resizes. A latent
SPM (`reads_noisy_latents`) scores the sampler's own noisy latent instead, with no decode: ComfyUI's
x = x0 + σ·ε in the scaled space is diffusers' x_t = x/√(1+σ²) at t(σ).
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)


class LatentJudge:
    """Scores x̂0 latents (ComfyUI's scaled space) against one prompt with a preference `Scorer`.

    Args:
        scorer (`backend.preference.scoring.Scorer`): the loaded SPM (the SPO_PREFERENCE value).
        vae: a ComfyUI VAE (anything with `decode(latent) -> [B, H, W, 3]`).
        prompt (`str`): the text the SPM judges the images against.
        base_model (*optional*): the ComfyUI `BaseModel`; the SPO samplers bind it at sample time.
    """

    def __init__(self, scorer, vae, prompt: str, base_model=None):
        if scorer is None:
            raise ValueError("no preference model connected: load one with the SPO Preference Model Loader")
        if vae is None:
            raise ValueError("no VAE connected: the preference model scores decoded images")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("the preference model needs the prompt text: fill in `spm_prompt` "
                             "(usually the same words as the positive prompt)")
        self.scorer = scorer
        self.vae = vae
        self.prompt = prompt.strip()
        self.reads_noisy_latents = bool(getattr(scorer, "reads_noisy_latents", False))
        self.base = None
        if base_model is not None:
            self.bind(base_model)

    def bind(self, base_model) -> "LatentJudge":
        for attr in ("process_latent_out", "model_sampling"):
            if not hasattr(base_model, attr):
                raise TypeError(f"{type(base_model).__name__} has no `{attr}`: not a ComfyUI diffusion model")
        self.base = base_model
        return self

    def _need_base(self):
        if self.base is None:
            raise RuntimeError("LatentJudge is not bound to a model; call bind(model.model) first")
        return self.base

    def timestep(self, sigma) -> int:
        """The discrete timestep t of a noise level σ (ComfyUI's own σ → t map)."""
        ms = self._need_base().model_sampling
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(1)
        return int(ms.timestep(sigma.to(ms.sigmas.device if hasattr(ms, "sigmas") else "cpu")).item())

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Scaled x̂0 latents [B, C, H, W] → images [B, 3, H, W] in [0, 1] (float32, CPU); with the SPM's fast
        decode, of the latent shrunk to the SPM's input size."""
        size = self.scorer.spm.image_size if getattr(self.scorer, "latent_decode", False) else 0
        if size:
            from ..backend.preference.scoring import shrink_latents

            ratio = getattr(self.vae, "downscale_ratio", None)
            if not isinstance(ratio, int):
                raise ValueError(f"the fast decode needs a VAE with an integer downscale ratio (SD1.5/SDXL); "
                                 f"this VAE has {ratio!r}: load the preference model with decode = full")
            x0 = shrink_latents(x0, size, ratio)
        latent = self._need_base().process_latent_out(x0)
        images = self.vae.decode(latent)
        return images.movedim(-1, 1).float().cpu()

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, t) -> torch.Tensor:
        """Scores [B] of images [B, 3, H, W] judged at timestep t (an int, or one per row as a [B] tensor)."""
        t = t if isinstance(t, torch.Tensor) else int(t)
        return self.scorer.score_images(images, [self.prompt] * images.shape[0], t).float().cpu()

    @torch.no_grad()
    def score_noisy(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """A latent SPM's scores [B] of the sampler's latents x at σ (or one σ per row, a [B] tensor)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1).cpu()
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        t = torch.tensor([0 if float(s) == 0.0 else self.timestep(s) for s in sigma], dtype=torch.long)
        x_t = x.float().cpu() / torch.sqrt(1 + sigma**2).view(-1, 1, 1, 1)
        return self.scorer.score_latents(x_t, [self.prompt] * x.shape[0], t).float().cpu()

    @torch.no_grad()
    def __call__(self, x0: torch.Tensor, sigma, x: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] of x̂0 predicted at σ: decoded, judged at t(σ); a clean image (σ = 0) at t = 0.
        A latent SPM judges `x`, the latents at σ themselves (x̂0 when σ = 0)."""
        if self.reads_noisy_latents:
            return self.score_noisy(x0 if x is None or float(sigma) == 0.0 else x, sigma)
        t = 0 if float(sigma) == 0.0 else self.timestep(sigma)
        return self.score_images(self.decode(x0), t)


def fit_latent_rgb(latents: torch.Tensor, images: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """The linear map M [C + 1, 3] with RGB ≈ [z, 1]·M per latent pixel, fitted by ridge least squares to
    decoded `images` [B, 3, H, W] of `latents` [B, C, h, w] (each image area-averaged to h × w). It is the
    Latent2RGB preview ComfyUI shows while sampling, fitted to this run's VAE instead of fixed factors."""
    target = F.interpolate(images.float(), size=latents.shape[-2:], mode="area")
    z = latents.float().movedim(1, -1).reshape(-1, latents.shape[1])
    x = torch.cat([z, torch.ones(len(z), 1)], 1)
    y = target.movedim(1, -1).reshape(-1, 3)
    gram = x.T @ x
    gram = gram + ridge * gram.diagonal().mean() * torch.eye(len(gram))
    return torch.linalg.solve(gram, x.T @ y)


def latent_rgb(latents: torch.Tensor, mapping: torch.Tensor, size: int) -> torch.Tensor:
    """Latents [B, C, h, w] → previews [B, 3, h', w'] in [0, 1] through `fit_latent_rgb`'s map, the longer side
    `size` (bilinear)."""
    rgb = (torch.cat([latents.float(), torch.ones_like(latents[:, :1].float())], 1).movedim(1, -1) @ mapping)
    out = F.interpolate(rgb.movedim(-1, 1), size=longer_side(rgb.shape[1:3], size), mode="bilinear",
                        align_corners=False)
    return out.clamp(0, 1)


def longer_side(hw, size: int) -> tuple[int, int]:
    """(h, w) scaled so that the longer side is `size`, each at least 1."""
    h, w = hw
    scale = size / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def thumbnails(images: torch.Tensor, size: int) -> torch.Tensor:
    """Images [B, 3, H, W] → the same with the longer side `size` (antialiased), float32 in [0, 1]."""
    if size >= max(images.shape[-2:]):
        return images.clone()
    out = F.interpolate(images, size=longer_side(images.shape[-2:], size), mode="bilinear", align_corners=False,
                        antialias=True)
    return out.clamp(0, 1)


# ----------------------------------------------------------------------------------------------
# The SPO_TRACE value
# ----------------------------------------------------------------------------------------------


@dataclass
class StepTrace:
    """Per-step preference scores of one sampling run (the SPO_TRACE output).

    scores[i][b] is batch row b's score of the x̂0 predicted at step i (noise level sigmas[i],
    timestep timesteps[i]); thumbnails is [steps, B, 3, h, w] in [0, 1].
    """

    prompt: str
    seed: int
    sampler: str
    scheduler: str
    cfg: float
    sigmas: list[float] = field(default_factory=list)
    timesteps: list[int] = field(default_factory=list)
    scores: list[list[float]] = field(default_factory=list)
    thumbnails: torch.Tensor | None = None
    seconds: float = 0.0

    def as_dict(self) -> dict:
        """JSON-able summary (no tensors): what the node shows in its UI output and /history."""
        return {"prompt": self.prompt, "seed": self.seed, "sampler": self.sampler, "scheduler": self.scheduler,
                "cfg": self.cfg, "sigmas": self.sigmas, "timesteps": self.timesteps, "scores": self.scores,
                "seconds": round(self.seconds, 4)}


@dataclass
class StepResult:
    step: int
    t: int
    scores: list[float]
    thumbs: torch.Tensor | None  # [B, 3, h, w]; None for a latent SPM until `StepRecorder.trace` previews x0
    x0: torch.Tensor | None = None  # the step's x̂0 latents [B, C, h, w], kept where no decode was made


class StepRecorder:
    """The sampler callback of the Step Scorer: decodes and scores every step's x̂0 (a latent SPM: scores every
    step's noisy latent, and decodes one x̂0 only, for the strip's Latent2RGB map).

    `recorder(step, x0, x, total)` has the signature of ComfyUI's sampler callbacks. With
    `overlap=True` the decode and the SPM run on one worker thread, in order, while the sampler
    computes the next steps (used on a CPU, where a core is otherwise idle during the UNet pass);
    the worker takes the steps `chunk` at a time and scores them as one batch (one VAE decode and
    one SPM pass, each x̂0 at its own timestep), which costs less Python time per step and so
    competes less with the sampling thread. `drain()` returns results finished since the last
    call, `finish()` waits for all of them.
    """

    def __init__(self, judge: LatentJudge, sigmas, thumb_size: int = 64, overlap: bool = False, chunk: int = 1):
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        self.judge = judge
        self.sigmas = [float(s) for s in sigmas]
        self.thumb_size = thumb_size
        self.overlap = overlap
        self.chunk = chunk
        self._done: list[StepResult] = []
        self._new: "queue.SimpleQueue[StepResult]" = queue.SimpleQueue()
        # a latent SPM's Latent2RGB map is fitted to the x̂0 of the second-to-last step, on the scoring thread
        # while the sampler takes its last step, so that its one decode is not left for after the sampler ends
        self.fit_step = max(0, len(self.sigmas) - 3)
        self._mapping: torch.Tensor | None = None
        self._error: BaseException | None = None
        if overlap:
            self._jobs: "queue.SimpleQueue" = queue.SimpleQueue()
            self._worker = threading.Thread(target=self._run, name="spo-step-scorer", daemon=True)
            self._worker.start()

    def _score(self, jobs: list[tuple]) -> list[StepResult]:
        """Scores the x̂0 of several steps in one batch; each row judged at its own step's t (a latent SPM:
        the step's noisy latent x, with no decode; its x̂0 is kept for the strip's Latent2RGB preview)."""
        ts = [self.judge.timestep(self.sigmas[job[0]]) for job in jobs]
        sizes = [job[1].shape[0] for job in jobs]
        x0 = torch.cat([job[1] for job in jobs])
        if self.judge.reads_noisy_latents:  # no decode at all: the x̂0 strip is previewed from the latents in trace()
            sig = torch.tensor([self.sigmas[job[0]] for job in jobs for _ in range(job[1].shape[0])])
            scores = self.judge.score_noisy(torch.cat([job[2] for job in jobs]), sig)
            thumbs, kept = None, x0.float().cpu()
            for job in jobs:
                if job[0] == self.fit_step:
                    self._mapping = self._fit_map(job[1])
        else:
            images = self.judge.decode(x0)
            t_rows = torch.tensor([t for t, n in zip(ts, sizes) for _ in range(n)], dtype=torch.long)
            scores = self.judge.score_images(images, t_rows)
            thumbs, kept = thumbnails(images, self.thumb_size), None
        out, start = [], 0
        for (step, *_), t, n in zip(jobs, ts, sizes):
            rows = slice(start, start + n)
            out.append(StepResult(step, t, [float(s) for s in scores[rows]], None if thumbs is None else thumbs[rows],
                                  None if kept is None else kept[rows]))
            start += n
        return out

    def _run(self) -> None:
        pending: list = []
        while True:
            job = self._jobs.get()
            if job is not None:
                pending.append(job)
                # the last `chunk` steps one at a time, so that little is left to score after the sampler ends
                if len(pending) < self.chunk and job[0] < len(self.sigmas) - 1 - self.chunk:
                    continue
            if pending and self._error is None:
                try:
                    for result in self._score(pending):
                        self._new.put(result)
                except BaseException as exc:  # re-raised on the sampling thread by drain()/finish()
                    self._error = exc
            pending = []
            if job is None:
                return

    def __call__(self, step: int, x0: torch.Tensor, x: torch.Tensor, total: int) -> None:
        if step >= len(self.sigmas) - 1:
            raise IndexError(f"step {step} is outside the {len(self.sigmas) - 1}-step schedule")
        if self.overlap:
            self._jobs.put((step, x0.detach().clone(), x.detach().clone()))
        else:
            for result in self._score([(step, x0.detach(), x.detach())]):
                self._new.put(result)

    def drain(self) -> list[StepResult]:
        if self._error is not None:
            raise self._error
        out = []
        while True:
            try:
                out.append(self._new.get_nowait())
            except queue.Empty:
                break
        self._done += out
        return out

    def finish(self) -> list[StepResult]:
        """Wait for every submitted step; returns the results not yet drained."""
        if self.overlap:
            self._jobs.put(None)
            self._worker.join()
        return self.drain()

    def close(self) -> None:
        """Stop the worker without waiting for results (after a failed or interrupted run)."""
        if self.overlap and self._worker.is_alive():
            self._error = self._error or RuntimeError("stopped")
            self._jobs.put(None)

    def _fit_map(self, x0: torch.Tensor) -> torch.Tensor:
        """`fit_latent_rgb` to ONE decode of `x0`, shrunk to half the thumbnail size first where the VAE's
        downscale ratio is known."""
        from ..backend.preference.scoring import shrink_latents

        ratio = getattr(self.judge.vae, "downscale_ratio", None)
        if isinstance(ratio, int):
            x0 = shrink_latents(x0, max(1, self.thumb_size // 2), ratio)
        return fit_latent_rgb(x0, self.judge.decode(x0))

    def trace(self, **meta) -> StepTrace:
        """The run's StepTrace. With a latent SPM the thumbnails are Latent2RGB previews of every step's x̂0
        through a linear map fitted to the run's ONE decode, of the second-to-last step's x̂0 (`fit_step`; of
        the last step's where the sampler reported fewer steps)."""
        done = sorted(self._done, key=lambda r: r.step)
        if done and done[0].thumbs is None:
            mapping = self._mapping if self._mapping is not None else self._fit_map(done[-1].x0)
            for r in done:
                r.thumbs = latent_rgb(r.x0, mapping, self.thumb_size)
        thumbs = torch.stack([r.thumbs for r in done]) if done else None
        return StepTrace(sigmas=[self.sigmas[r.step] for r in done], timesteps=[r.t for r in done],
                         scores=[r.scores for r in done], thumbnails=thumbs, **meta)
