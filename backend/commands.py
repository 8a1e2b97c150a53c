"""Handlers of the general `spo` subcommands (argument definitions are light; torch loads on run)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default="pocket",
                   help="diffusers folder, single .safetensors checkpoint, or 'pocket' (default)")
    p.add_argument("--family", choices=["sd15", "sdxl"], default=None, help="expected family (default: detect)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, fp16 or bf16 (default: bf16/fp16 on GPU, fp32 on CPU)")
    p.add_argument("--config-dir", default=None, help="diffusers-layout configs for a single-file checkpoint "
                   "(default: the shipped SD1.5/SDXL configs)")


def _load(args):
    from .models import load_model

    return load_model(args.model, family=args.family, device=args.device, dtype=args.dtype,
                      config_dir=args.config_dir)


def args_info(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def cmd_info(args) -> int:
    model = _load(args)

    def count(m) -> int:
        return sum(t.numel() for t in m.parameters())

    info = {
        "source": model.source,
        "family": model.family,
        "device": str(model.device),
        "dtype": str(model.dtype).replace("torch.", ""),
        "resolution": model.default_resolution,
        "latent": [model.latent_channels, model.default_resolution // model.vae_scale_factor],
        "parameters": {
            "unet": count(model.unet),
            "vae": count(model.vae),
            **{
                f"text_encoder{'' if i == 0 else '_' + str(i + 1)}": count(te)
                for i, te in enumerate(model.text_encoders)
            },
        },
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            if isinstance(value, dict):
                for k, v in value.items():
                    print(f"{key + '.' + k:24s} {v / 1e6:.2f} M")
            else:
                print(f"{key:24s} {value}")
    return 0


def args_sample(p: argparse.ArgumentParser) -> None:
    _model_arguments(p)
    p.add_argument("--prompt", action="append", required=True, help="prompt (repeat for a batch)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--cfg", type=float, default=5.0, help="classifier-free guidance scale (default 5)")
    p.add_argument("--eta", type=float, default=1.0, help="DDIM eta: 0 deterministic, 1 DDPM-like (default 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=None, help="image size in pixels (default: the model's)")
    p.add_argument("--out", default="sample.png", help="output PNG; a batch is written side by side")


def cmd_sample(args) -> int:
    import torch
    from PIL import Image

    from . import diffusion

    model = _load(args)
    gen = torch.Generator().manual_seed(args.seed)
    traj = diffusion.sample(model, args.prompt, num_steps=args.steps, cfg_scale=args.cfg, eta=args.eta,
                            generator=gen, height=args.size, width=args.size, record=False)
    images = model.decode(traj.latents)
    grid = torch.cat(list(images), dim=-1)  # side by side
    array = (grid.permute(1, 2, 0).cpu().numpy() * 255).round().astype("uint8")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    Image.fromarray(array).save(tmp, format="PNG")
    tmp.replace(out)
    print(
        f"wrote {out} ({len(args.prompt)} image(s), {args.steps} steps, "
        f"cfg {args.cfg}, eta {args.eta}, seed {args.seed})"
    )
    return 0
