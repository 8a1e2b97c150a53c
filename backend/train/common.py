"""What every fine-tuning method shares: the base config fields (LoRA, optimizer, budget, run folder).

Each method's config (`SPOConfig`, `DPOConfig`, `RPOConfig`) subclasses `TrainConfig` and overrides
defaults where its paper differs; the CLI, the YAML presets and the studio page all read the same
dataclass, so a field's help text is written once.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import option


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
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16; got {self.mixed_precision!r}")
        for name in ("lora_rank", "train_batch_size", "grad_accum", "epochs", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1; got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0; got {self.lr}")
