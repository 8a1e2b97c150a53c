"""`spo pocket build`: rebuild the pocket world's shipped files, seeded and deterministic.

    spo pocket build [--out backend/pocket/model] [--stage base]

Stages: `base` — world images → VAE → UNet + text encoder → a diffusers folder (≈ 20 min on
2 CPU cores). Every stage is seeded; the build log and timings land in `pocket_build.json` beside
the weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import world
from .base_model import PocketModelConfig, build_base_model

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "model"


def world_dataset(n: int, seed: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """`n` training-split world images as a float tensor [n, 3, H, W] in [0, 1], and their prompts."""
    samples = world.samples(n, seed, split="train", image_size=image_size)
    images = np.stack([s.image for s in samples])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return tensor, [s.prompt for s in samples]


def pocket_tokenizer(max_tokens: int):
    from ..word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(world.VOCABULARY, model_max_length=max_tokens)


def build(out_dir: Path = DEFAULT_OUT, cfg: PocketModelConfig | None = None) -> dict:
    cfg = cfg or PocketModelConfig()
    torch.manual_seed(cfg.seed)
    logger.info("rendering %d world images (%d px)", cfg.train_images, cfg.image_size)
    images, prompts = world_dataset(cfg.train_images, cfg.seed, cfg.image_size)
    tokenizer = pocket_tokenizer(cfg.max_tokens)
    stats = build_base_model(cfg, images, prompts, tokenizer, Path(out_dir))
    logger.info("pocket base model written to %s in %.0f s", out_dir, stats["seconds_total"])
    return stats
