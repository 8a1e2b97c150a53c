"""`spo lora …`: convert LoRA files between webui and diffusers form, inspect them, merge them into a base model.

    spo lora info my_lora.safetensors                     # format, family, rank, alpha, targets, metadata
    spo lora convert my_lora.safetensors out.safetensors --to diffusers
    spo lora merge --base path/to/sd15 --lora my_lora.safetensors --scale 0.8 merged.safetensors
    spo lora merge --base pocket --lora my_lora.safetensors merged_folder/   # a diffusers folder

Heavy imports happen inside the handlers, so `spo --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

DTYPES = ("fp16", "fp32", "bf16")


def args_lora(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="lora_command", metavar="ACTION", required=True)

    i = sub.add_parser("info", help="show a LoRA file's format, family, rank, alpha, targets and metadata")
    i.add_argument("file", help="LoRA .safetensors (webui/kohya or diffusers/peft)")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")

    c = sub.add_parser("convert", help="rewrite a LoRA file (any layout) in webui (ComfyUI/A1111), diffusers or "
                                        "diffusers-legacy form")
    c.add_argument("input", help="LoRA .safetensors in any layout (webui/kohya, diffusers/peft, legacy, "
                                        "attn-processor)")
    c.add_argument("output", help="output .safetensors")
    c.add_argument("--to", choices=["webui", "diffusers", "diffusers-legacy"], required=True,
                   help="output format: webui (ComfyUI/A1111/kohya), diffusers (peft, keeps alpha), or "
                        "diffusers-legacy (the official SPO LoRAs' layout: lora.down/lora.up, alpha folded in)")
    c.add_argument("--family", choices=["sd15", "sdxl"], default=None,
                   help="the LoRA's family, when the file does not say (default: from metadata and layer names)")
    c.add_argument("--dtype", choices=[*DTYPES, "keep"], default="keep",
                   help="dtype of the written up/down weights (default: keep the input's)")
    c.add_argument("--unet-config", default=None,
                   help="UNet config.json (or a diffusers model folder) for a non-standard UNet "
                        "(default: the shipped SD1.5/SDXL config)")

    m = sub.add_parser("merge", help="fold a LoRA into a base model; write a diffusers folder or one .safetensors")
    m.add_argument("output", help="a .safetensors path (single LDM/SGM file) or a folder (diffusers layout)")
    m.add_argument("--base", required=True, help="diffusers folder, single .safetensors checkpoint, or 'pocket'")
    m.add_argument("--lora", required=True, help="LoRA .safetensors, either format")
    m.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    m.add_argument("--save-dtype", choices=DTYPES, default="fp16", help="dtype of the written model (default fp16)")
    m.add_argument("--config-dir", default=None,
                   help="diffusers-layout configs for a single-file base (default: the shipped SD1.5/SDXL configs)")


def _torch_dtype(name: str | None):
    import torch

    return {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16, "keep": None, None: None}[name]


def _read_unet_config(value: str | None) -> dict | None:
    if value is None:
        return None
    path = Path(value)
    if path.is_dir():
        path = path / "unet" / "config.json" if (path / "unet").is_dir() else path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no UNet config.json there")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: unreadable JSON ({exc})") from exc


def _print_info(info: dict) -> None:
    for key in ("path", "layout", "family", "family_evidence", "layers", "rank", "alpha"):
        print(f"{key:16s} {info[key]}")
    for component, count in info["components"].items():
        print(f"{component:16s} {count} layers: {', '.join(info['targets'][component])}")
    if info["metadata"]:
        print("metadata:")
        for key, value in sorted(info["metadata"].items()):
            text = value if len(value) <= 100 else value[:97] + "..."
            print(f"  {key} = {text}")


def _save_folder(model, out: Path, dtype) -> None:
    """A diffusers pipeline folder, written next to `out` and renamed into place."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = model.components()
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(**parts, force_zeros_for_empty_prompt=True)
    else:
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.to(dtype=dtype)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def cmd_lora(args) -> int:
    from . import lora

    if args.lora_command == "info":
        info = lora.lora_info(args.file)
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            _print_info(info)
        return 0

    if args.lora_command == "convert":
        out = lora.convert_lora(args.input, args.output, to=args.to, family=args.family,
                                unet_config=_read_unet_config(args.unet_config), dtype=_torch_dtype(args.dtype))
        print(f"wrote {out} ({args.to} format)")
        return 0

    # merge
    from .checkpoint_io import save_single_file
    from .models import load_model

    out = Path(args.output)
    as_file = out.suffix.lower() == ".safetensors"
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"{out}: already exists; choose a new output path")
    weights = lora.read_lora(args.lora)  # fail on a bad LoRA before loading the base model
    model = load_model(args.base, device="cpu", dtype="fp32", config_dir=args.config_dir)
    lora.merge_lora(model, weights, scale=args.scale)
    dtype = _torch_dtype(args.save_dtype)
    provenance = {"spo.merged_lora": str(Path(args.lora).name), "spo.merge_scale": str(args.scale),
                  "spo.base_model": str(args.base)}
    if as_file:
        save_single_file(model.unet, model.vae, model.text_encoders, model.family, out, dtype=dtype,
                         metadata=provenance)
    else:
        if out.is_dir():
            out.rmdir()  # empty, checked above
        _save_folder(model, out, dtype)
    print(f"wrote {out} ({model.family} base {args.base} + {args.lora} at scale {args.scale:g})")
    return 0
