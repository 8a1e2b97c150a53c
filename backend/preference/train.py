"""Train the step-aware preference model (or a plain PickScore-style scorer) on Pick-a-Pic pairs.

    spo train-spm --config configs/pocket_spm.yaml [key=value …]
    accelerate launch -m spo_studio.backend.cli train-spm --config configs/sd15_spm.yaml

One step (SPO §4.1 and the official SPM trainer): for each pair (x⁰, x¹, caption, labels),
  1. draw t ~ U{t_min … t_max} and ONE noise ε for both images;
  2. z^i = VAE(x^i)·scale, z^i_t = √ᾱ_t·z^i + √(1−ᾱ_t)·ε;
  3. the frozen base UNet's one-step prediction with CFG: x̂0^i = (z^i_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t;
  4. decode x̂0^i (optionally at a lower resolution), score s^i = SPM(decode(x̂0^i), caption, t);
  5. PickScore's loss with ties on (s⁰, s¹) (`loss.py`); with `distill_weight` λ > 0 the target mixes the
     crowd label with the starting scorer's preference on the clean pair (`loss.distillation_targets`).
With `step_aware=false` the images are scored clean with no time conditioning: that trains the
base scorer itself (the pocket world's "PickScore"), by the same code.

Randomness per step comes from a generator seeded by (seed, step), and the data order from
(seed, epoch), so a run resumed from a checkpoint ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import sources
from ..config import option, save_config
from ..runs import RunLogger, load_checkpoint, resume_checkpoint, save_checkpoint
from .data import PickAPicStream
from .loss import distillation_targets, pair_accuracy, preference_loss
from .spm import interpolate_weights

logger = logging.getLogger(__name__)


@dataclass
class SPMTrainConfig:
    """Training the step-aware preference model; defaults are the paper's SD1.5 settings."""

    kind: str = option("pixel", "'pixel': CLIP on the decoded one-step x̂0 (the paper's SPM); 'latent': the base "
                                "model's own UNet encoder on the noisy latent x_t, no decode (LPO's latent reward "
                                "model; backend/preference/latent_spm.py)")
    base_model: str = option("pocket", "base diffusion model whose one-step x̂0 the SPM learns to judge: "
                                       "'pocket', a diffusers folder or a .safetensors file")
    init: str = option("pocket", "scorer to start from: 'pocket' (the shipped pocket scorer), "
                                 "'scratch:pocket' (a new small CLIP), a CLIP/PickScore folder, or an SPM folder; "
                                 "for kind=latent: 'base' (the base model's UNet encoder) or a latent SPM folder")
    train_data: str = option("", "Pick-a-Pic-schema parquet of preference pairs")
    output_dir: str = option("runs/spm", "run folder (config, metrics, checkpoints, the final SPM in spm/)")
    step_aware: bool = option(True, "condition on t and train on noisy one-step x̂0; false trains a plain "
                                    "scorer on clean images")
    lr: float = option(3e-6, "AdamW learning rate (paper: 3e-6 SD1.5, 1e-6 SDXL)")
    weight_decay: float = option(0.3, "AdamW weight decay (PickScore/SPM: 0.3)")
    warmup_steps: int = option(500, "linear warm-up steps, then `lr_schedule`")
    lr_schedule: str = option("linear", "after warm-up: 'linear' decay to 0 at max_steps (the official trainer's "
                                        "WarmupDecayLR), 'cosine' decay to 0, or 'constant'")
    hflip: bool = option(False, "mirror each image left-right with probability 1/2 (augmentation; only where the "
                                "labels do not depend on left/right, e.g. the pocket crowd, not Pick-a-Pic)")
    rot90: bool = option(False, "rotate each pair by the same random multiple of 90° (augmentation; only where the "
                                "labels do not depend on orientation, e.g. the pocket crowd, not Pick-a-Pic)")
    max_steps: int = option(8000, "optimizer steps (paper: 8000 SD1.5, 7000 SDXL)")
    batch_size: int = option(16, "pairs per optimizer step per process")
    grad_accum: int = option(1, "gradient accumulation steps")
    cfg_scale: float = option(5.0, "CFG scale of the base UNet's one-step prediction")
    t_min: int = option(0, "smallest timestep drawn")
    t_max: int = option(999, "largest timestep drawn")
    decode_size: int = option(0, "decode x̂0 then resize to this many pixels before scoring (0: model size)")
    mixed_precision: str = option("no", "accelerate mixed precision: no, fp16 or bf16")
    grad_clip: float = option(1.0, "gradient-norm clipping (0: off)")
    wise_alpha: float = option(1.0, "WiSE-FT: the saved SPM's weights are (1−α)·start + α·trained, interpolated "
                                    "between the scorer training started from and the trained one (the "
                                    "checkpoints keep the trained weights); 1 saves the trained weights")
    val_fraction: float = option(0.0, "hold aside this share of the training file's captions, with all their pairs, "
                                      "as a validation split never trained on (a stable hash of the caption picks "
                                      "them); `spo eval-spm --val-fraction` evaluates on it")
    distill_weight: float = option(0.0, "λ: train toward (1−λ)·crowd label + λ·the starting scorer's preference "
                                        "on the clean pair (a frozen copy; knowledge distillation, not in the "
                                        "paper); 0 is the paper's loss")
    shuffle_buffer: int = option(1024, "rows in the seeded shuffle buffer of the parquet stream")
    seed: int = option(0, "seed of data order, timesteps and noise")
    checkpoint_every: int = option(500, "save a resumable checkpoint every N steps")
    log_every: int = option(10, "log metrics every N steps")
    resume: bool = option(True, "resume from the latest checkpoint in output_dir if there is one")

    def validate(self) -> None:
        if self.kind not in ("pixel", "latent"):
            raise ValueError(f"kind must be 'pixel' or 'latent'; got {self.kind!r}")
        if self.kind == "latent" and (not self.step_aware or self.distill_weight > 0 or self.wise_alpha < 1
                                      or self.decode_size):
            raise ValueError("kind=latent reads noisy latents: it needs step_aware=true and supports neither "
                             "distill_weight, wise_alpha < 1 nor decode_size")
        if not 0 <= self.t_min <= self.t_max <= 999:
            raise ValueError(f"need 0 <= t_min <= t_max <= 999; got t_min={self.t_min}, t_max={self.t_max}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        if not 0.0 <= self.wise_alpha <= 1.0:
            raise ValueError(f"wise_alpha must be in [0, 1]; got {self.wise_alpha}")
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1]; got {self.distill_weight}")
        if self.distill_weight > 0 and not (self.step_aware and self.init != "scratch:pocket"):
            raise ValueError("distill_weight > 0 needs step_aware=true and a trained init to be the teacher; "
                             f"got step_aware={self.step_aware}, init={self.init!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1); got {self.val_fraction}")
        if self.lr_schedule not in ("linear", "cosine", "constant"):
            raise ValueError(f"lr_schedule must be linear, cosine or constant; got {self.lr_schedule!r}")
        for name in ("batch_size", "grad_accum", "max_steps", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")


# ----------------------------------------------------------------------------------------------


def build_latent_scorer(init: str, base_model):
    """The latent SPM to train: a new one from the base model's UNet encoder, or a latent SPM folder."""
    from .latent_spm import LatentPreferenceModel, is_latent_spm

    if init == "base":
        return LatentPreferenceModel.from_base(base_model)
    if not is_latent_spm(init):
        raise ValueError(f"init: {init}: kind=latent starts from 'base' or a latent SPM folder (lspm.json)")
    return LatentPreferenceModel.load(init, device=base_model.device)


def build_scorer(init: str, base_model=None):
    """The scorer to train: the shipped pocket scorer, a new pocket CLIP, or a local folder."""
    from .spm import StepAwarePreferenceModel, pocket_clip_config

    if sources.is_named(init):
        return StepAwarePreferenceModel.load(sources.scorer(init))
    if init == "scratch:pocket":
        from transformers import CLIPModel

        if base_model is None:
            raise ValueError("init 'scratch:pocket' needs the base model (for its tokenizer)")
        tok = base_model.tokenizers[0]
        cfg = pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                 tok.model_max_length)
        return StepAwarePreferenceModel(CLIPModel(cfg), tok)
    return StepAwarePreferenceModel.load(init)


def images_tensor(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """uint8 [H, W, 3] arrays → float [B, 3, size, size] in [0, 1] (bicubic resize when needed)."""
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    return x


@torch.no_grad()
def noisy_latents(model, images: torch.Tensor, t: torch.Tensor, noise_gen: torch.Generator,
                  pair_shared_noise: bool = True) -> torch.Tensor:
    """Images [2B, 3, H, W] (pairs as rows i and B+i) → z_t = √ᾱ_t·z + √(1−ᾱ_t)·ε at per-row timesteps t [2B],
    z the VAE latent. The two images of a pair share t and ε (`pair_shared_noise`), as in the official trainer."""
    z = model.encode_images(images, generator=noise_gen).to(model.dtype)
    b2 = z.shape[0]
    if pair_shared_noise:
        half = torch.randn((b2 // 2, *z.shape[1:]), generator=noise_gen)
        eps = torch.cat([half, half])
    else:
        eps = torch.randn(z.shape, generator=noise_gen)
    eps = eps.to(z.device, z.dtype)
    a = model.scheduler.alphas_cumprod.to(z.device)[t.to(z.device)].view(-1, 1, 1, 1).to(z.dtype)
    return a.sqrt() * z + (1 - a).sqrt() * eps


@torch.no_grad()
def one_step_x0_images(model, images: torch.Tensor, prompts: list[str], t: torch.Tensor, noise_gen: torch.Generator,
                       cfg_scale: float, pair_shared_noise: bool = True, decode_size: int = 0,
                       decode=None, z_t: torch.Tensor | None = None) -> torch.Tensor:
    """Images [2B, 3, H, W] (pairs as rows i and B+i) → decoded one-step x̂0 at per-row timesteps t [2B], from
    `noisy_latents` (or the given `z_t`). `decode` (latents → images) replaces the full VAE decode, e.g. a
    `Scorer.decode` with `latent_decode`.
    """
    from ..diffusion import cfg_unet

    if z_t is None:
        z_t = noisy_latents(model, images, t, noise_gen, pair_shared_noise)
    a = model.scheduler.alphas_cumprod.to(z_t.device)[t.to(z_t.device)].view(-1, 1, 1, 1).to(z_t.dtype)
    cond = model.encode_prompts(prompts)
    negative = model.encode_negative(len(prompts)) if cfg_scale != 1.0 else None
    eps_hat = cfg_unet(model.unet, z_t, t.to(z_t.device), cond, negative, cfg_scale)
    x0 = (z_t - (1 - a).sqrt() * eps_hat) / a.sqrt()
    if decode is not None:
        return decode(x0)
    out = model.decode(x0)
    if decode_size:
        out = F.interpolate(out, size=(decode_size, decode_size), mode="bicubic", align_corners=False,
                            antialias=True).clamp(0, 1)
    return out


def _lr_factor(step: int, warmup: int, schedule: str, total: int) -> float:
    """Linear warm-up over `warmup` steps, times a decay from 1 at step 0 to 0 at `total`: linear, cosine or none."""
    factor = min(1.0, (step + 1) / max(1, warmup))
    progress = min(step, total) / total
    if schedule == "linear":
        factor *= 1 - progress
    elif schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def mirror_pairs(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [2B, 3, H, W] (pairs as rows i and B+i) → each pair mirrored left-right with probability 1/2."""
    half = images.shape[0] // 2
    flip = (torch.rand(half, generator=generator) < 0.5).repeat(2).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def rotate_pairs(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [2B, 3, S, S] (pairs as rows i and B+i) → each pair rotated by the same k·90°, k ~ U{0, 1, 2, 3}."""
    half = images.shape[0] // 2
    k = torch.randint(0, 4, (half,), generator=generator).repeat(2)
    out = images.clone()
    for r in (1, 2, 3):
        rows = k == r
        out[rows] = torch.rot90(images[rows], r, dims=(-2, -1))
    return out


# Keys a resumed run may change: how long it runs and how often it writes, not what it learns.
RESUMABLE_CHANGES = frozenset({"max_steps", "checkpoint_every", "log_every", "resume", "wise_alpha"})


def train_spm(cfg: SPMTrainConfig) -> Path:
    """Run (or resume) SPM training; returns the folder of the final SPM."""
    from accelerate import Accelerator

    from ..models import load_model

    cfg.validate()
    if not cfg.train_data:
        raise ValueError("train_data is required: a Pick-a-Pic-schema parquet file")
    run_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    rank, world = accelerator.process_index, accelerator.num_processes
    log = RunLogger(run_dir, enabled=accelerator.is_main_process)
    ckpt = resume_checkpoint(cfg, run_dir, "spm", RESUMABLE_CHANGES)
    if accelerator.is_main_process:
        save_config(cfg, run_dir / "config.yaml", method="spm")

    needs_base = cfg.step_aware or cfg.init == "scratch:pocket"
    base = load_model(cfg.base_model, device=accelerator.device) if needs_base else None
    torch.manual_seed(cfg.seed)  # a new scorer's random init is seeded too
    latent = cfg.kind == "latent"
    spm = build_latent_scorer(cfg.init, base) if latent else build_scorer(cfg.init, base)
    spm.train()
    teacher = None
    if cfg.distill_weight > 0:  # the scorer training starts from, frozen, judging the clean images
        teacher = build_scorer(cfg.init, base).to(accelerator.device).eval().requires_grad_(False)
    params = [p for p in spm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(s, cfg.warmup_steps, cfg.lr_schedule, cfg.max_steps))

    step, epoch, position = 0, 0, 0
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        spm.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, position = state["step"], state["epoch"], state["position"]
        logger.info("resumed from %s (step %d, epoch %d, pair %d)", ckpt, step, epoch, position)
        log.event("resumed", step=step, checkpoint=str(ckpt))
    spm, optimizer, scheduler = accelerator.prepare(spm, optimizer, scheduler)
    raw = accelerator.unwrap_model(spm)
    size = base.default_resolution if (latent or cfg.step_aware) and base else raw.image_size
    stream = PickAPicStream(cfg.train_data, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
                            split="train" if cfg.val_fraction > 0 else "all", val_fraction=cfg.val_fraction)
    log.event("started", step=step, total=cfg.max_steps)

    per_step = cfg.batch_size * world  # pairs consumed per optimizer micro-step, all ranks together
    started = time.time()
    while step < cfg.max_steps:
        batch: list = []
        yielded = 0
        for pair in stream.iter_epoch(epoch, start=position):
            yielded += 1
            batch.append(pair)
            if len(batch) < per_step:
                continue
            mine = batch[rank::world]
            batch = []
            position += per_step
            step_gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            with accelerator.accumulate(spm):
                images = images_tensor([p.image0 for p in mine] + [p.image1 for p in mine], size)
                if cfg.hflip:
                    images = mirror_pairs(images, step_gen)
                if cfg.rot90:
                    images = rotate_pairs(images, step_gen)
                prompts = [p.caption for p in mine]
                ids = raw.conditioning(prompts * 2) if latent else raw.tokenize(prompts * 2).to(accelerator.device)
                l0 = torch.tensor([p.label0 for p in mine], device=accelerator.device)
                l1 = torch.tensor([p.label1 for p in mine], device=accelerator.device)
                q0, q1 = l0, l1
                if teacher is not None:
                    with torch.no_grad():
                        ts0, ts1 = teacher(images.to(accelerator.device), ids, None).float().chunk(2)
                    q0, q1 = distillation_targets(l0, l1, ts0, ts1, cfg.distill_weight)
                if latent:  # the noisy latents themselves (SPO §4.1's noising; no UNet pass, no decode)
                    t_half = torch.randint(cfg.t_min, cfg.t_max + 1, (len(mine),), generator=step_gen)
                    t = torch.cat([t_half, t_half])
                    images = noisy_latents(base, images.to(accelerator.device), t, step_gen)
                    t = t.to(accelerator.device)
                elif cfg.step_aware:
                    t_half = torch.randint(cfg.t_min, cfg.t_max + 1, (len(mine),), generator=step_gen)
                    t = torch.cat([t_half, t_half])
                    images = one_step_x0_images(base, images.to(accelerator.device), prompts * 2, t, step_gen,
                                                cfg.cfg_scale, decode_size=cfg.decode_size)
                    t = t.to(accelerator.device)
                else:
                    t = None
                scores = spm(images.to(accelerator.device), ids, t)
                s0, s1 = scores.float().chunk(2)
                loss = preference_loss(s0, s1, q0, q1)
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and cfg.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step += 1
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                acc = pair_accuracy(s0.detach(), s1.detach(), l0, l1)
                log.metrics(step, {
                    "loss": accelerator.reduce(loss.detach(), "mean").item(),
                    "accuracy": acc.item(), "lr": scheduler.get_last_lr()[0],
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "epoch": epoch, "skipped_rows": sum(v for k, v in stream.stats.items() if k != "ok"),
                })
                logger.info("spm step %d/%d loss %.4f acc %.3f (%.0f s)", step, cfg.max_steps, loss.item(),
                            acc.item(), time.time() - started)
            if step % cfg.checkpoint_every == 0 or step == cfg.max_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    state = {"model": raw.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "step": step, "epoch": epoch,
                             "position": position, "config": dataclasses.asdict(cfg)}
                    path = save_checkpoint(run_dir, step, state)
                    log.event("checkpoint", step=step, path=str(path))
            if step >= cfg.max_steps:
                break
        else:
            if yielded == 0 and position == 0:
                raise ValueError(f"{cfg.train_data}: no usable pairs ({dict(stream.stats)})")
            epoch, position = epoch + 1, 0
            continue
        break

    out = run_dir / "spm"
    if accelerator.is_main_process:
        final = raw
        if cfg.wise_alpha < 1.0:
            torch.manual_seed(cfg.seed)  # the same start as above (a new scorer's init is seeded)
            final = interpolate_weights(build_scorer(cfg.init, base).to(accelerator.device), raw, cfg.wise_alpha)
            logger.info("WiSE-FT: saving (1 - %.2f)·start + %.2f·trained", cfg.wise_alpha, cfg.wise_alpha)
        final.save(out, extra={"base_model": cfg.base_model, "step_aware": cfg.step_aware, "steps": step,
                               "wise_alpha": cfg.wise_alpha, "kind": cfg.kind})
        log.event("finished", step=step, spm=str(out), skipped=dict(stream.stats))
        if stream.stats:
            logger.info("data: %s", dict(stream.stats))
    log.close()
    accelerator.wait_for_everyone()
    return out
