"""What every fine-tuning method shares: the base config fields (LoRA, optimizer, budget, run folder).

Each method's config (`SPOConfig`, `DPOConfig`, `RPOConfig`) subclasses `TrainConfig` and overrides
defaults where its paper differs; the CLI, the YAML presets and the studio page all read the same
dataclass, so a field's help text is written once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import option

MAX_LORA_RANK = 1024  # above any layer width of SD1.5 / SDXL attention; the model check is exact


@dataclass
class TrainConfig:
    """Fields shared by every method (defaults: SPO's SD1.5 settings; methods override)."""

    base_model: str = option("pocket", "base model: 'pocket', a diffusers folder or a single .safetensors file")
    output_dir: str = option("runs/train", "run folder: config, metrics, checkpoints, LoRA files, samples")
    lora_rank: int = option(4, "LoRA rank r (paper: 4 SD1.5, 64 SDXL)")
    lora_alpha: float = option(4.0, "LoRA alpha (paper: alpha = r)")
    lora_targets: list[str] = option(["to_q", "to_k", "to_v", "to_out.0"], "UNet modules that get LoRA")
    lr: float = option(6e-5, "AdamW learning rate")
    lr_warmup_steps: int = option(0, "linear learning-rate warm-up over this many optimizer steps, then constant")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    grad_clip: float = option(1.0, "gradient-norm clipping, applied for real (0: off)")
    train_batch_size: int = option(10, "pairs per optimizer micro-step (per process)")
    grad_accum: int = option(1, "gradient accumulation micro-steps per optimizer step")
    epochs: int = option(10, "passes over the prompts / preference pairs")
    max_steps: int = option(0, "stop after this many optimizer steps (0: no limit)")
    max_minutes: float = option(0.0, "stop after this much wall-clock time, with a final checkpoint (0: no limit)")
    mixed_precision: str = option("no", "no, fp16 or bf16 (accelerate)")
    gradient_checkpointing: bool = option(False, "trade compute for memory in the UNet")
    checkpoint_every: int = option(50, "save a resumable checkpoint every N optimizer steps")
    log_every: int = option(1, "log metrics every N optimizer steps")
    sample_prompts: list[str] = option([], "prompts for the per-epoch sample images (default: the first 4 prompts)")
    seed: int = option(0, "seed of data order, sampling and LoRA init")
    resume: bool = option(True, "resume from the latest checkpoint in output_dir if there is one")

    def validate(self) -> None:
        for f in dataclasses.fields(self):  # NaN and inf pass every comparison below: refuse them first
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number; got {value}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        for name in ("lora_rank", "train_batch_size", "grad_accum", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        for name in ("lr", "lora_alpha"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0; got {getattr(self, name)}")
        for name in ("lr_warmup_steps", "weight_decay", "grad_clip", "max_steps", "max_minutes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0: off); got {getattr(self, name)}")
        if self.lora_rank > MAX_LORA_RANK:
            raise ValueError(f"lora_rank must be <= {MAX_LORA_RANK}; got {self.lora_rank}")
        if not self.lora_targets or not all(isinstance(t, str) and t.strip() for t in self.lora_targets):
            raise ValueError(f"lora_targets must name at least one UNet module (e.g. to_q); got {self.lora_targets}")

    def check_model(self) -> None:
        """What only the base model can tell: every `lora_targets` entry names one of its UNet layers, and
        `lora_rank` fits the narrowest of them. Reads the UNet config, loads no weights."""
        from ..models import unet_linear_shapes

        shapes = unet_linear_shapes(self.base_model)
        widths = []
        for target in self.lora_targets:
            hits = [min(s) for n, s in shapes.items() if n == target or n.endswith("." + target)]
            if not hits:
                raise ValueError(f"lora_targets: {target!r} names no Linear or Conv layer of the UNet of "
                                 f"{self.base_model!r} (e.g. to_q, to_k, to_v, to_out.0, proj_in, ff.net.2)")
            widths += hits
        if self.lora_rank > min(widths):
            raise ValueError(f"lora_rank must be <= {min(widths)}, the narrowest layer in lora_targets of "
                             f"{self.base_model!r}; got {self.lora_rank}")
