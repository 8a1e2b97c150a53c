"""`spo eval` and `spo demo`."""

from __future__ import annotations

import argparse
import json


def args_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="pocket", help="base model: 'pocket', a diffusers folder or a .safetensors file")
    p.add_argument("--lora", action="append", default=[], metavar="[NAME=]FILE",
                   help="a LoRA to compare with the base (repeatable; either format)")
    p.add_argument("--prompts", default="pocket-held-out",
                   help="'pocket-held-out', 'pocket-train', or a .txt / .json / .parquet prompts file")
    p.add_argument("--out", required=True, help="output folder for report.json and grid.png")
    p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default 4)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--cfg", type=float, default=5.0, help="guidance scale (default 5)")
    p.add_argument("--batch", type=int, default=32, help="images per sampling batch")
    p.add_argument("--pickscore", default=None, help="PickScore_v1 (CLIP) folder")
    p.add_argument("--clip-score", default=None, help="CLIP folder for CLIP score")
    p.add_argument("--laion-aesthetic", nargs=2, default=None, metavar=("MLP_PTH", "CLIP_L14_DIR"),
                   help="improved-aesthetic-predictor .pth and its CLIP ViT-L/14 folder")
    p.add_argument("--hpsv2", default=None, help="HPS_v2(.1)_compressed.pt (needs the optional hpsv2 package)")
    p.add_argument("--image-reward", default=None, help="ImageReward.pt (needs the optional image-reward package)")


def cmd_eval(args) -> int:
    from pathlib import Path

    from .evaluation import EvalSettings, evaluate, format_table, load_eval_prompts
    from .models import load_model

    loras = {}
    for item in args.lora:
        name, _, path = item.rpartition("=") if "=" in item else (Path(item).stem, "", item)
        if not Path(path).exists():
            raise FileNotFoundError(f"{path}: no such LoRA file")
        if name in loras or name == "base":
            raise ValueError(f"LoRA name {name!r} is used twice (or is 'base'); name them NAME=FILE")
        loras[name] = path
    model = load_model(args.model)
    prompts = load_eval_prompts(args.prompts)
    settings = EvalSettings(num_steps=args.steps, cfg_scale=args.cfg, seeds=list(range(args.seeds)), batch=args.batch)
    metric_paths = {"pickscore": args.pickscore, "clip_score": args.clip_score, "hpsv2": args.hpsv2,
                    "laion_aesthetic": args.laion_aesthetic, "image_reward": args.image_reward}
    report = evaluate(model, loras, prompts, settings, args.out, metric_paths, prompts_source=args.prompts)
    print(format_table(report))
    print(f"wrote {Path(args.out) / 'report.json'} and {Path(args.out) / 'grid.png'}")
    return 0


def args_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--minutes", type=float, default=5.0, help="wall-clock training budget per method (default 5)")
    p.add_argument("--seeds", type=int, default=4, help="evaluation seeds per held-out prompt (default 4)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing demo in --out")
    p.add_argument("--spo", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of configs/pocket_spo.yaml for the SPO run, e.g. --spo lr=3e-4")
    p.add_argument("--dpo", nargs="*", default=[], metavar="KEY=VALUE",
                   help="overrides of configs/pocket_dpo.yaml for the Diffusion-DPO run")


def cmd_demo(args) -> int:
    from .demo import run_demo

    report = run_demo(args.out, minutes=args.minutes, seeds=args.seeds, overwrite=args.overwrite,
                      spo_overrides=args.spo, dpo_overrides=args.dpo)
    print(report["table"])
    print(json.dumps(report["demo"], indent=2))
    print(f"wrote {args.out}/report.json, {args.out}/grid.png, and the LoRAs under {args.out}/spo/lora, "
          f"{args.out}/dpo/lora")
    return 0
