"""The one training loop, on accelerate: CPU, one GPU, many GPUs and nodes (DDP).

    spo train --config configs/pocket_spo.yaml [key=value …]
    accelerate launch --num_processes 4 -m spo_studio.backend.cli train --config configs/sd15_spo.yaml

What it does for every method (SPO online; Diffusion-DPO / -RPO offline):
  * LoRA on the UNet (peft), the reference = the same UNet with adapters disabled, under no_grad;
  * AdamW on the LoRA parameters, gradient accumulation, clipping that really clips;
  * pairs gathered across ranks, permuted with a shared seed and split evenly; a rank short of a
    full micro-batch gets zero-weight padding, so every rank runs the same number of steps (no hang);
  * a checkpoint every N optimizer steps (LoRA, optimizer, counters and the pairs still pending in
    the current round), so a resumed run ends with the same LoRA as an uninterrupted one;
  * metrics to `metrics.jsonl` + TensorBoard, events to `events.jsonl`, a console progress bar;
  * a stop request (a `STOP` file in the run folder, or SIGINT/SIGTERM) ends the current optimizer
    step, writes a final checkpoint and exits cleanly;
  * the LoRA in diffusers/peft and webui/kohya formats under `lora/`, and per-epoch sample images.
Randomness comes from generators seeded by (seed, round) or (seed, epoch), never from global state.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import time
from pathlib import Path

import torch

from ..config import config_hash, save_config
from ..runs import RunLogger, load_checkpoint, resume_checkpoint, save_checkpoint
from .method import Method

logger = logging.getLogger(__name__)


# Keys a resumed run may change: its length, how often it writes, how it computes (precision, memory), its
# sample prompts — not what it learns from or how.
RESUMABLE_CHANGES = frozenset({"max_steps", "max_minutes", "epochs", "checkpoint_every", "log_every", "resume",
                               "mixed_precision", "gradient_checkpointing", "sample_prompts"})


class StopRequested(Exception):
    pass


class StopFlag:
    """Set by SIGINT/SIGTERM or by a `STOP` file in the run folder (the job store writes it)."""

    def __init__(self, run_dir: Path):
        self.file = run_dir / "STOP"
        self.signalled = False
        self._old = {}

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    def _handler(self, signum, frame) -> None:
        logger.warning("stop requested (signal %d): finishing the current step, then a final checkpoint", signum)
        self.signalled = True

    def restore(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)

    def __bool__(self) -> bool:
        return self.signalled or self.file.exists()


def attach_trainable_lora(unet, family: str, rank: int, alpha: float, targets: list[str], seed: int) -> list:
    """Add the LoRA to train (gaussian init: B = 0, so the policy starts as the base); fp32 parameters."""
    from .. import lora as lora_io

    torch.manual_seed(seed)
    unet.requires_grad_(False)
    lora_io.attach_lora(unet, family=family, rank=rank, alpha=alpha, target_modules=list(targets), init="gaussian")
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    if not params:
        raise ValueError(f"no UNet module matched the LoRA targets {targets}")
    for p in params:
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def lora_state(unet) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in unet.named_parameters() if "lora_" in n}


def load_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    params = dict(unet.named_parameters())
    missing = [k for k in state if k not in params]
    if missing:
        raise ValueError(f"checkpoint LoRA keys do not match this UNet: {missing[:3]}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def share_pairs(accelerator, pairs, seed: int, round_index: int, micro_batch: int):
    """Gather every rank's pairs, permute them with a shared seed, and give each rank an equal share.

    Returns (this rank's pairs, weights [n] with 0 for padding). Ranks may hold different counts:
    counts are gathered first, tensors are padded to the largest count, so no collective hangs.
    """
    world = accelerator.num_processes
    if world == 1:
        n = len(pairs)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + round_index))
        shuffled = pairs.index(perm) if n else pairs
        return shuffled, torch.ones(n)
    from accelerate.utils import gather_object

    everyone = gather_object([pairs.to_state()])
    cls = type(pairs)
    union = cls.cat([cls.from_state(s) for s in everyone if len(s["prompts"])]) if any(
        len(s["prompts"]) for s in everyone) else pairs
    n = len(union)
    perm = (
        torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + round_index))
        if n
        else torch.zeros(0, dtype=torch.long)
    )
    per_rank = -(-n // world)  # ceil
    per_rank = -(-per_rank // micro_batch) * micro_batch if n else 0
    idx = perm[accelerator.process_index * per_rank : (accelerator.process_index + 1) * per_rank]
    weight = torch.ones(len(idx))
    if len(idx) < per_rank:  # pad with zero-weight copies so every rank runs the same number of steps
        pad = per_rank - len(idx)
        filler = perm[:pad] if n >= pad else perm.repeat(pad // max(n, 1) + 1)[:pad]
        idx = torch.cat([idx, filler])
        weight = torch.cat([weight, torch.zeros(pad)])
    return union.index(idx) if n else union, weight


def ranks_in_sync(accelerator, unet) -> bool:
    """True when every process holds bit-identical LoRA weights (DDP must keep them so)."""
    if accelerator.num_processes == 1:
        return True
    import hashlib

    from accelerate.utils import gather_object

    digest = hashlib.sha256()
    for name, tensor in sorted(lora_state(unet).items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    digests = gather_object([digest.hexdigest()])
    return len(set(digests)) == 1


def save_lora_files(unet, run_dir: Path, name: str, family: str, provenance: dict) -> dict[str, str]:
    """Write the LoRA in diffusers/peft and webui/kohya formats (fp16); returns their paths."""
    from .. import lora as lora_io

    weights = lora_io.extract_lora(unet, family=family)
    out = {}
    for fmt in ("webui", "diffusers"):  # the official layout (diffusers-legacy) is written on request only
        path = run_dir / "lora" / f"{name}_{fmt}.safetensors"
        out[fmt] = str(lora_io.save_lora(weights, path, format=fmt, provenance=provenance))
    return out


@torch.no_grad()
def sample_images(model, unet, prompts: list[str], out_png: Path, seed: int = 1234, num_steps: int = 20,
                  cfg_scale: float = 5.0) -> None:
    """A row of samples (DDIM, η = 0, fixed seeds) with the current policy, written atomically."""
    import numpy as np
    from PIL import Image

    from .. import diffusion

    latents = torch.cat([diffusion.initial_latents(model, 1, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(prompts))])
    traj = diffusion.sample(model, prompts, num_steps=num_steps, cfg_scale=cfg_scale, eta=0.0, latents=latents,
                            unet=unet, record=False)
    images = model.decode(traj.latents)
    row = torch.cat(list(images), dim=-1).permute(1, 2, 0).float().cpu().numpy()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    Image.fromarray((row * 255).round().astype(np.uint8)).save(tmp)
    tmp.replace(out_png)


def train(cfg, method_cls: type[Method], run_stop: StopFlag | None = None) -> dict:
    """Run (or resume) LoRA fine-tuning with `method_cls`; returns a summary (status, steps, LoRA paths)."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from ..models import load_model

    cfg.validate()
    name = method_cls.name
    run_dir = Path(cfg.output_dir)
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum,
                              cpu=not torch.cuda.is_available())
    main = accelerator.is_main_process
    log = RunLogger(run_dir, enabled=main)
    ckpt = resume_checkpoint(cfg, run_dir, name, RESUMABLE_CHANGES)
    if main:
        save_config(cfg, run_dir / "config.yaml", method=name)
    stop = run_stop or StopFlag(run_dir)
    stop.install()

    weight_dtype = {"no": None, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.mixed_precision]
    model = load_model(cfg.base_model, device=accelerator.device, dtype=weight_dtype)
    method = method_cls(cfg, model, accelerator)
    if cfg.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    params = attach_trainable_lora(model.unet, model.family, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    sample_prompts = list(cfg.sample_prompts) or method.sample_prompts()

    step, round_index, micro, pending = 0, 0, 0, None
    if ckpt is not None:
        state = load_checkpoint(ckpt)
        load_lora_state(model.unet, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        step, round_index, micro = state["step"], state["round"], state["micro"]
        pending = state.get("pending")
        logger.info("resumed from %s at step %d (round %d, micro-step %d)", ckpt, step, round_index, micro)
        log.event("resumed", step=step, checkpoint=str(ckpt))
    unet, optimizer = accelerator.prepare(model.unet, optimizer)
    raw_unet = accelerator.unwrap_model(unet)

    rounds_per_epoch = method.rounds_per_epoch()
    total_rounds = rounds_per_epoch * cfg.epochs
    est_steps = total_rounds * max(1, method.pairs_per_round_estimate() // (cfg.train_batch_size * cfg.grad_accum))
    total = cfg.max_steps or est_steps
    log.event("started", step=step, total=total, rounds=total_rounds, method=name)
    bar = tqdm(total=total, initial=step, disable=not main, desc=name, unit="step")
    started = time.time()
    status = "finished"

    def checkpoint():
        """Save where the run stands: mid-round (the round's remaining pairs go along) or between rounds."""
        accelerator.wait_for_everyone()
        if main:
            done = pending is None or micro >= -(-len(pending["pairs"]["prompts"]) // cfg.train_batch_size)
            state = {"lora": lora_state(raw_unet), "optimizer": optimizer.state_dict(), "step": step,
                     "round": round_index + 1 if pending is not None and done else round_index,
                     "micro": 0 if done else micro, "pending": None if done else pending,
                     "config": dataclasses.asdict(cfg)}
            path = save_checkpoint(run_dir, step, state)
            log.event("checkpoint", step=step, path=str(path))

    def out_of_budget() -> bool:
        if cfg.max_steps and step >= cfg.max_steps:
            return True
        return bool(cfg.max_minutes) and (time.time() - started) / 60 >= cfg.max_minutes

    halt = False
    try:
        while round_index < total_rounds and not out_of_budget():
            epoch = round_index // rounds_per_epoch
            if pending is None:
                raw_unet.eval()
                items, rstats = method.make_round(round_index, epoch, raw_unet)
                items, weight = share_pairs(accelerator, items, cfg.seed, round_index, cfg.train_batch_size)
                pending = {"pairs": items.to_state(), "weight": weight, "stats": rstats}
                micro = 0
            items, weight, rstats = method.items.from_state(pending["pairs"]), pending["weight"], pending["stats"]
            n_micro = -(-len(items) // cfg.train_batch_size)
            raw_unet.train()
            while micro < n_micro:
                sl = slice(micro * cfg.train_batch_size, (micro + 1) * cfg.train_batch_size)
                batch = items.index(range(len(items))[sl])
                w = weight[sl].to(accelerator.device)
                if cfg.lr_warmup_steps:
                    for group in optimizer.param_groups:
                        group["lr"] = cfg.lr * min(1.0, (step + 1) / cfg.lr_warmup_steps)
                with accelerator.accumulate(unet):
                    loss, lstats = method.loss(unet, raw_unet, batch, w)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients and cfg.grad_clip > 0:
                        grad_norm = accelerator.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                micro += 1
                if accelerator.sync_gradients:
                    step += 1
                    bar.update(1)
                    if step % cfg.log_every == 0:
                        log.metrics(step, {"loss": accelerator.reduce(loss.detach(), "mean").item(), **lstats,
                                           **{k: v for k, v in rstats.items() if k != "pairs"},
                                           "pairs_in_round": rstats["pairs"], "lr": optimizer.param_groups[0]["lr"],
                                           "grad_norm": None if grad_norm is None else float(grad_norm),
                                           "round": round_index, "epoch": epoch})
                        bar.set_postfix(loss=f"{loss.item():.4f}")
                    if step % cfg.checkpoint_every == 0:
                        checkpoint()
                    if stop or out_of_budget():
                        halt = True
                        break
            if micro < n_micro:  # stopped mid-round: the checkpoint keeps the round's remaining pairs
                raise StopRequested
            if n_micro == 0 and main:
                log.metrics(step, {**{k: v for k, v in rstats.items() if k != "pairs"}, "round": round_index,
                                   "pairs_in_round": 0})
            round_index += 1
            pending, micro = None, 0
            if round_index % rounds_per_epoch == 0 and main:
                png = run_dir / "samples" / f"epoch-{round_index // rounds_per_epoch:03d}.png"
                raw_unet.eval()
                sample_images(model, raw_unet, sample_prompts, png)
                log.event("sample", step=step, epoch=round_index // rounds_per_epoch, path=str(png))
            if halt or stop:  # the round (and an epoch's sample) is complete before the run stops
                raise StopRequested
    except StopRequested:
        status = "stopped" if stop else "finished"
    finally:
        stop.restore()
        bar.close()
    checkpoint()
    in_sync = ranks_in_sync(accelerator, raw_unet)
    if accelerator.num_processes > 1:
        log.event("ranks", in_sync=in_sync, processes=accelerator.num_processes)
        if not in_sync:
            raise RuntimeError(f"{run_dir}: the LoRA weights differ between processes after training")
    files = {}
    if main:
        provenance = {
            "base_model": cfg.base_model, "method": name, "config_hash": config_hash(cfg), "steps": str(step)
        }
        files = save_lora_files(raw_unet, run_dir, f"{name}_lora", model.family, provenance)
        log.event(status, step=step, lora=files)
    log.close()
    accelerator.wait_for_everyone()
    return {"status": status, "step": step, "lora": files, "run_dir": str(run_dir)}

