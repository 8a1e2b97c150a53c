"""Image rewards as SPO's step scorer: `spm: reward:NAME` in place of a step-aware preference model.

SPO needs, at every pooled step, a score for each candidate x_{t−1}. The paper's SPM judges the
candidate's one-step prediction x̂0 at its timestep (SPO §4.1). Any image reward R(image, prompt) can
play that part in two modes (`reward_mode`):

  x0        R(D(x̂0(x_{t−1}))): the reward on the decoded one-step prediction. Cheap (one decode), but
            step-unaware: a blurry x̂0 is not the image the candidate leads to, and a policy can learn to
            please R on x̂0 while the final image gets worse.
  complete  R(D(Φ(x_{t−1}))): Φ finishes the candidate with deterministic DDIM (η = 0, SPO eq. 12 with
            σ_t = 0) under the current policy over the whole remaining grid, and R judges the final
            image. A step-aware value of the candidate, at about (remaining steps) × the UNet work.
            A coarser completion (fewer steps than the grid) is itself a proxy and gets exploited too.

Rewards (a leading `-` flips the sign, e.g. `reward:-brightness`):

  brightness          mean pixel value in [0, 1]: trivially learnable, for tests of the machinery
  random              uniform noise, seeded: the control (what noise alone does to the images)
  pocket-aesthetic    the pocket world's aesthetic judge
  pocket-alignment    the pocket world's alignment judge (1 if shape and colours are right)
  pickscore=DIR       a PickScore / CLIP folder: exp(τ)·cos(image, prompt)
  clip=DIR            CLIP score: 100·max(cos, 0)
  laion-aesthetic=MLP,DIR   the LAION aesthetic MLP (.pth) on a CLIP ViT-L/14 folder
  hpsv2=FILE          an HPS_v2*.pt (needs the optional `hpsv2` package)
  imagereward=FILE    an ImageReward.pt (needs the optional `image-reward` package)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

PREFIX = "reward:"
MODES = ("x0", "complete")
# name → number of local paths it takes
REWARDS = {"brightness": 0, "random": 0, "pocket-aesthetic": 0, "pocket-alignment": 0, "pickscore": 1, "clip": 1,
           "laion-aesthetic": 2, "hpsv2": 1, "imagereward": 1}


@dataclass(frozen=True)
class RewardSpec:
    name: str
    sign: float
    paths: tuple[str, ...]

    def __str__(self) -> str:
        value = ("-" if self.sign < 0 else "") + self.name
        return PREFIX + value + (("=" + ",".join(self.paths)) if self.paths else "")


def is_reward(spec) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_reward(spec: str, field: str = "spm") -> RewardSpec:
    """`reward:[-]NAME[=PATH[,PATH]]` → RewardSpec; a bad name or path count is a clear error."""
    if not is_reward(spec):
        raise ValueError(f"{field}: {spec!r} is not a reward (expected '{PREFIX}NAME')")
    body = spec[len(PREFIX):].strip()
    sign = -1.0 if body.startswith("-") else 1.0
    name, _, paths = body.lstrip("-").partition("=")
    if name not in REWARDS:
        raise ValueError(f"{field}: unknown reward {name!r}; known: {', '.join(REWARDS)}")
    parts = tuple(p.strip() for p in paths.split(",")) if paths else ()
    if len(parts) != REWARDS[name] or any(not p for p in parts):
        need = {0: "no path", 1: "one path (=PATH)", 2: "two paths (=MLP.pth,CLIP_FOLDER)"}[REWARDS[name]]
        raise ValueError(f"{field}: reward {name!r} takes {need}; got {spec!r}")
    return RewardSpec(name, sign, parts)


def check_reward_paths(spec: str, field: str = "spm") -> str:
    """The spec with its paths made absolute, after checking that each exists (before a job is queued)."""
    parsed = parse_reward(spec, field)
    paths = []
    for p in parsed.paths:
        path = Path(p).expanduser()
        if not path.exists():
            raise ValueError(f"{field}: {p}: no such file or folder (for the {parsed.name} reward)")
        paths.append(str(path.resolve()))
    return str(RewardSpec(parsed.name, parsed.sign, tuple(paths)))


def reward_function(spec: RewardSpec, device=None, seed: int = 0):
    """The reward as a callable (images [B, 3, H, W] in [0, 1], prompts) → scores [B] (float32, CPU)."""
    from . import evaluation as ev

    device = device or "cpu"
    name = spec.name
    if name == "brightness":
        return lambda images, prompts: images.float().mean(dim=(1, 2, 3)).cpu()
    if name == "random":
        generator = torch.Generator().manual_seed(seed)
        return lambda images, prompts: torch.rand(images.shape[0], generator=generator)
    if name.startswith("pocket-"):
        judge = ev.pocket_judges()[name.removeprefix("pocket-")]
        return lambda images, prompts: torch.tensor(judge(images, prompts), dtype=torch.float32)
    builders = {"pickscore": ev.pickscore_metric, "clip": ev.clip_score_metric, "hpsv2": ev.hpsv2_metric,
                "imagereward": ev.image_reward_metric, "laion-aesthetic": ev.laion_aesthetic_metric}
    metric = builders[name](*spec.paths, device)
    return lambda images, prompts: torch.as_tensor(metric(images, prompts), dtype=torch.float32).flatten().cpu()


class RewardStepScorer:
    """An image reward in SPO's step-scorer role (`score_latents`, like the SPM's `Scorer`).

    `needs_completion` tells the rollout to hand over each candidate's completed final latent (mode
    `complete`) instead of its one-step x̂0 (mode `x0`); the timestep argument is ignored either way.
    """

    def __init__(self, spec: str | RewardSpec, base_model, mode: str = "complete", scale: float = 1.0, device=None,
                 seed: int = 0):
        if mode not in MODES:
            raise ValueError(f"reward_mode must be one of {MODES}; got {mode!r}")
        self.spec = parse_reward(spec) if isinstance(spec, str) else spec
        self.base_model = base_model
        self.mode = mode
        self.needs_completion = mode == "complete"
        self.scale = self.spec.sign * scale
        self.reward = reward_function(self.spec, device or getattr(base_model, "device", None), seed)

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str], t=None) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        return self.scale * self.reward(images, prompts).float()

    @torch.no_grad()
    def score_latents(self, latents: torch.Tensor, prompts: list[str], t=None) -> torch.Tensor:
        return self.score_images(self.base_model.decode(latents), prompts, t)


def step_scorer(spm: str, base_model, reward_mode: str = "complete", reward_scale: float = 1.0,
                clip_folder: str | None = None, seed: int = 0, **scorer_kwargs):
    """SPO's step scorer for a config's `spm` value: a `RewardStepScorer` for `reward:…`, else the SPM's `Scorer`."""
    if is_reward(spm):
        return RewardStepScorer(spm, base_model, reward_mode, reward_scale, seed=seed)
    from .preference.scoring import Scorer

    return Scorer.from_path(spm, base_model, clip_folder=clip_folder, **scorer_kwargs)
