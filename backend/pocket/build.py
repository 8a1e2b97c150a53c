"""`spo pocket build`: rebuild the pocket world's shipped files, seeded and deterministic.

    spo pocket build [--stage base|refine|data|encoder|scorer|spm|lspm|report ...]   (no --stage: all)

Stages (each reads what the previous ones wrote):
  base    world images → VAE → UNet + text encoder → `model/` (a diffusers SD1.5-class folder)
  refine  a second, warm-started UNet + text-encoder phase on fresh world images → `model/`
  data    pocket samples labelled by the simulated crowd → `data/pairs_{train,held_out}.parquet`
  encoder the VAE encoder refit to its decoder on the model's own samples (the training pairs' images);
          decoder and UNet untouched, so sampling is unchanged → `model/vae/`. It starts from the
          encoder it finds: run it once after `base` (a second run refits the refit encoder)
  scorer  the pocket "PickScore": a small CLIP trained on clean pairs → `scorer/`
  spm     the pocket step-aware preference model, from the scorer, on noisy x̂0 → `spm/`
  lspm    the pocket latent SPM, from the pocket UNet's encoder, on the noisy latents → `lspm/`
  report  alignment/aesthetic of base-model samples on training and held-out prompts, SPM accuracy
          per timestep, a sample grid → `report.json`, `pocket_grid.png`, `spm_eval.png`
Timings and settings land in `build_log.json`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .. import sources
from ..config import atomic_write_text
from . import world
from .base_model import PocketModelConfig, build_base_model

logger = logging.getLogger(__name__)

POCKET_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = POCKET_ROOT / "model"
STAGES = ("base", "refine", "data", "encoder", "scorer", "spm", "lspm", "report")


def world_dataset(n: int, seed: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """`n` training-split world images as a float tensor [n, 3, H, W] in [0, 1], and their prompts."""
    samples = world.samples(n, seed, split="train", image_size=image_size)
    images = np.stack([s.image for s in samples])
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    return tensor, [s.prompt for s in samples]


def pocket_tokenizer(max_tokens: int):
    from ..word_tokenizer import build_word_tokenizer

    return build_word_tokenizer(world.VOCABULARY, model_max_length=max_tokens)


def _log_stage(name: str, seconds: float, info: dict, path: Path) -> None:
    log = json.loads(path.read_text()) if path.exists() else {}
    log[name] = {"seconds": round(seconds, 1), "threads": torch.get_num_threads(), **info}
    atomic_write_text(path, json.dumps(log, indent=2, default=str))


def stage_base(cfg: PocketModelConfig | None = None, out_dir: Path = DEFAULT_OUT) -> dict:
    cfg = cfg or PocketModelConfig()
    torch.manual_seed(cfg.seed)
    logger.info("rendering %d world images (%d px)", cfg.train_images, cfg.image_size)
    images, prompts = world_dataset(cfg.train_images, cfg.seed, cfg.image_size)
    stats = build_base_model(cfg, images, prompts, pocket_tokenizer(cfg.max_tokens), Path(out_dir))
    logger.info("pocket base model written to %s in %.0f s", out_dir, stats["seconds_total"])
    return stats


def stage_refine(cfg: PocketModelConfig | None = None, out_dir: Path = DEFAULT_OUT) -> dict:
    from .base_model import refine_base_model

    cfg = cfg or PocketModelConfig()
    images, prompts = world_dataset(cfg.train_images, cfg.seed + 1, cfg.image_size)
    return refine_base_model(cfg, images, prompts, Path(out_dir))


def stage_data() -> dict:
    from ..models import load_model
    from .preference_data import build_preference_data

    return build_preference_data(load_model("pocket", device="cpu"))


def _train_preset(preset: str, dest: Path, steps: int) -> dict:
    """Train a scorer preset (`configs/<preset>.yaml`) on the pocket training pairs and ship it at `dest`."""
    from ..config import load_config
    from ..preference.train import SPMTrainConfig, train_spm

    cfg = load_config(SPMTrainConfig, POCKET_ROOT.parents[1] / "configs" / f"{preset}.yaml",
                      [f"train_data={sources.POCKET_TRAIN_PAIRS}", f"max_steps={steps}"])
    _clear_run(Path(cfg.output_dir))
    _replace_dir(train_spm(cfg), dest)
    return {"steps": steps, "run": cfg.output_dir}


def stage_scorer(steps: int = 1500) -> dict:
    return _train_preset("pocket_scorer", sources.POCKET_SCORER_DIR, steps)


def stage_spm(steps: int = 1500) -> dict:
    return _train_preset("pocket_spm", sources.POCKET_SPM_DIR, steps)


def stage_lspm(steps: int = 1500) -> dict:
    return _train_preset("pocket_lspm", sources.POCKET_LSPM_DIR, steps)


def stage_encoder(cfg: PocketModelConfig | None = None, model_dir: Path = DEFAULT_OUT) -> dict:
    from diffusers import AutoencoderKL

    from ..preference.data import PickAPicStream
    from ..preference.train import images_tensor
    from .base_model import refit_encoder
    from .preference_data import TRAIN_PAIRS

    cfg = cfg or PocketModelConfig()
    unique: dict[bytes, np.ndarray] = {}
    for pair in PickAPicStream(TRAIN_PAIRS).iter_epoch(0):
        for image in (pair.image0, pair.image1):
            unique.setdefault(image.tobytes(), image)
    samples = images_tensor(list(unique.values()), cfg.image_size)
    renders, _ = world_dataset(len(samples), cfg.seed + 2, cfg.image_size)
    vae = AutoencoderKL.from_pretrained(Path(model_dir) / "vae")
    info = refit_encoder(cfg, vae, samples, renders)
    staged = Path(model_dir) / "vae.tmp"
    if staged.exists():
        shutil.rmtree(staged)
    vae.save_pretrained(staged)
    _swap_in(staged, Path(model_dir) / "vae")
    logger.info("VAE encoder refit on %d samples: round-trip L1 %.4f → %.4f", len(samples),
                info["round_trip_l1_before"], info["round_trip_l1_after"])
    return {"samples": len(samples), **info}


def _clear_run(run_dir: Path) -> None:
    """A build stage trains from scratch: a previous run in its folder (the trainer would resume it, though the
    data or the scorer it started from may have changed since) is removed first."""
    if run_dir.exists():
        logger.warning("removing the previous build run %s (a build stage starts from scratch)", run_dir)
        shutil.rmtree(run_dir)


def _replace_dir(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(src, tmp)
    _swap_in(tmp, dst)


def _swap_in(tmp: Path, dst: Path) -> None:
    """Put a fully written folder `tmp` in the place of `dst`."""
    if dst.exists():
        shutil.rmtree(dst)
    tmp.replace(dst)


def build(stages: tuple[str, ...] = STAGES, cfg: PocketModelConfig | None = None, out_dir: Path = DEFAULT_OUT) -> dict:
    results = {}
    for name in stages:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; stages: {', '.join(STAGES)}")
        start = time.time()
        if name == "base":
            info = stage_base(cfg, out_dir)
        elif name == "refine":
            info = stage_refine(cfg, out_dir)
        elif name == "data":
            info = stage_data()
        elif name == "scorer":
            info = stage_scorer()
        elif name == "spm":
            info = stage_spm()
        elif name == "lspm":
            info = stage_lspm()
        elif name == "encoder":
            info = stage_encoder(cfg, out_dir)
        else:
            from .report import stage_report

            info = stage_report()
        # the log sits beside the model folder (backend/pocket/build_log.json for the shipped one)
        _log_stage(name, time.time() - start, info, Path(out_dir).parent / "build_log.json")
        results[name] = info
        logger.info("stage %s done in %.0f s", name, time.time() - start)
    return results
