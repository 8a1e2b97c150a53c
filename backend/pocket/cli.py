"""`spo pocket …`: build the pocket world's shipped files, and sample from the pocket model."""

from __future__ import annotations

import argparse
from pathlib import Path


def args_pocket(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="pocket_command", metavar="ACTION", required=True)
    b = sub.add_parser("build", help="rebuild the pocket model, preference data, scorer and SPMs (seeded, "
                                     "deterministic)")
    b.add_argument("--stage", action="append", default=None,
                   help="base, refine, data, encoder, scorer, spm, lspm or report "
                        "(repeatable; default: all, in that order)")
    b.add_argument("--out", default=None, help="base model folder (default: backend/pocket/model)")
    b.add_argument("--unet-steps", type=int, default=None, help="override the UNet training steps (default 2800)")
    b.add_argument("--vae-steps", type=int, default=None, help="override the VAE training steps (default 1500)")
    b.add_argument("--refine-steps", type=int, default=None, help="override the refine steps (default 3000)")
    b.add_argument("--block-order", choices=("pocket", "sd15"), default=None,
                   help="where the UNet's cross-attention sits: 'pocket' (8×8 level, default) or 'sd15' (16×16 "
                        "level, none at the lowest, as SD1.5). `--stage refine` on a folder of the other order "
                        "transplants its UNet first (new attention starts as the identity)")
    s = sub.add_parser("sample", help="sample an image from the pocket model")
    s.add_argument("prompt", help='e.g. "a red circle on a blue background"')
    s.add_argument("--out", default="pocket.png", help="output PNG")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    s.add_argument("--cfg", type=float, default=5.0, help="guidance scale (default 5)")
    s.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default 0: deterministic)")
    s.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the 64 px image (default 4)")


def cmd_pocket(args) -> int:
    if args.pocket_command == "build":
        import json

        from .base_model import PocketModelConfig
        from .build import DEFAULT_OUT, STAGES, build

        cfg = PocketModelConfig()
        if args.unet_steps is not None:
            cfg.unet_steps = args.unet_steps
        if args.vae_steps is not None:
            cfg.vae_steps = args.vae_steps
        if args.refine_steps is not None:
            cfg.refine_steps = args.refine_steps
        if args.block_order is not None:
            cfg.block_order = args.block_order
        results = build(tuple(args.stage or STAGES), cfg, Path(args.out) if args.out else DEFAULT_OUT)
        print(json.dumps(results, indent=2, default=str))
        return 0

    import torch
    from PIL import Image

    from .. import diffusion
    from ..models import load_model
    from . import world

    world.parse_prompt(args.prompt)  # a clear error for words outside the grammar
    model = load_model("pocket")
    traj = diffusion.sample(model, [args.prompt], num_steps=args.steps, cfg_scale=args.cfg, eta=args.eta,
                            generator=torch.Generator().manual_seed(args.seed), record=False)
    image = model.decode(traj.latents)[0]
    array = (image.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    pil = Image.fromarray(array)
    if args.scale > 1:
        pil = pil.resize((pil.width * args.scale, pil.height * args.scale), Image.NEAREST)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    pil.save(tmp, format="PNG")
    tmp.replace(out)
    print(f"wrote {out}")
    return 0
