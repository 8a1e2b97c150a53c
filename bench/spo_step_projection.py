"""Benchmark: the SPO round at real size (SD1.5 UNet + CLIP-H shapes, random weights), projected from its parts.

    python bench/spo_step_projection.py                       # SD1.5 shapes, CPU, 2 threads
    python bench/spo_step_projection.py --model random:sdxl --pool 2

`bench/spo_step.py` times whole rounds, which at real size needs a GPU. This one measures each part of
a round once, on whatever device there is, both as FLOPs (`torch.utils.flop_counter`, counted as it
runs) and as seconds, and adds them up the way one round of SPO's rollout and training uses them
(k candidates, N DDIM steps, the first `divert` steps a single trajectory, every pool giving a pair,
as in `spo_step.py` with threshold 0). Per prompt and round:

  pixel SPM   UNet (CFG) passes:  divert + 1 + (N − divert − 1)·k   (the k-candidate pass also serves the
              next step's prediction);  decode + SPM:  (N − divert)·k
  latent SPM  UNet (CFG) passes:  N                                   (only the continuing candidate);
              latent SPM passes:  (N − divert)·k                      (no decode, no CLIP)
  official    the pixel SPM's rollout with its scorer (fp32, prompt re-encoded on every call)
  training    (N − divert) pairs; ours: one policy pass with gradients and one reference pass per pair
              (winner and loser share x_t); the official pattern: each of them twice (winner and loser
              separately), i.e. exactly twice ours

FLOP ratios are what a GPU that runs every part at the same efficiency would show; the seconds are
this device's. Batch effects are not in it (every part is measured at one image, the UNet at one
CFG pair), which is why the GPU figure still needs `spo_step.py` on a GPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

from spo_step import (  # noqa: E402
    OfficialScorer,
    _sync,
    device_name,
    random_h14_spm,
    random_model,
    resolve_dtype,
    train_pairs,
)


def measure(fn, device, repeats: int) -> dict:
    """FLOPs of one call (counted while it runs, after a warm-up call that fills caches and optimizer state)
    and its median seconds over `repeats` calls after it."""
    fn()
    with FlopCounterMode(display=False) as counter:
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"gflops": counter.get_total_flops() / 1e9, "seconds": statistics.median(times)}


def pass_counts(steps: int, divert: int, k: int) -> dict:
    """Per prompt and round, how many times each side runs each part (the module docstring's counts)."""
    pooled = steps - divert
    pixel_unet = divert + 1 + (pooled - 1) * k
    return {
        "official": {"unet_cfg": pixel_unet, "score_official": pooled * k, "train_pair": 2 * pooled},
        "pixel": {"unet_cfg": pixel_unet, "score_pixel": pooled * k, "train_pair": pooled},
        "latent": {"unet_cfg": steps, "score_latent": pooled * k, "train_pair": pooled},
    }


def project(parts: dict, steps: int, divert: int, k: int) -> dict:
    """Per prompt and round: each side's rollout, training and whole round, in GFLOPs and seconds."""
    out = {}
    for unit in ("gflops", "seconds"):
        sides = {}
        for side, counts in pass_counts(steps, divert, k).items():
            cost = {name: n * parts[name][unit] for name, n in counts.items()}
            train = cost.pop("train_pair")
            sides[side] = {"rollout": sum(cost.values()), "train": train, "round": sum(cost.values()) + train}
        sides["ratios"] = {
            "latent_vs_pixel_rollout": sides["pixel"]["rollout"] / sides["latent"]["rollout"],
            "latent_vs_pixel_round": sides["pixel"]["round"] / sides["latent"]["round"],
            "pixel_vs_official_round": sides["official"]["round"] / sides["pixel"]["round"],
            "latent_vs_official_round": sides["official"]["round"] / sides["latent"]["round"],
        }
        out[unit] = sides
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="random:sd15",
                   help="random:sd15 or random:sdxl (the shipped configs, random weights)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--pool", type=int, default=4, help="k candidates per step")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--divert", type=int, default=4, help="single-trajectory steps before the pools")
    p.add_argument("--repeats", type=int, default=1, help="timed calls of each part after the counted one")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    if not args.model.startswith("random:"):
        raise SystemExit(f"--model must be random:sd15 or random:sdxl; got {args.model!r}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)

    from spo_studio.backend import diffusion
    from spo_studio.backend.preference.latent_spm import LatentPreferenceModel, LatentScorer
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.train.loop import attach_trainable_lora
    from spo_studio.backend.train.spo import Pairs, SPOConfig

    torch.manual_seed(0)
    model = random_model(args.model.split(":", 1)[1], device, dtype)
    prompt = ["a beautiful lake at sunset"]
    cond, negative = model.encode_prompts(prompt), model.encode_negative(1)
    x = diffusion.initial_latents(model, 1, generator=torch.Generator().manual_seed(0))
    t = 500
    parts = {}

    def scoring(make_scorer) -> dict:  # the scorer lives only here, so each is freed before the next is built
        scorer = make_scorer()
        return measure(lambda: scorer.score_latents(x, prompt, t), device, args.repeats)

    def h14():
        torch.manual_seed(1)
        return random_h14_spm(model.tokenizers[0])

    with torch.no_grad():
        parts["unet_cfg"] = measure(lambda: diffusion.cfg_unet(model.unet, x, t, cond, negative, 5.0), device,
                                    args.repeats)
        parts["score_pixel"] = scoring(lambda: Scorer(h14(), model))
        gc.collect()
        parts["score_official"] = scoring(lambda: OfficialScorer(h14(), model))
        gc.collect()
        parts["score_latent"] = scoring(
            lambda: LatentScorer(LatentPreferenceModel.from_base(model, seed=1).to(device, dtype), model))
        gc.collect()
    cfg = SPOConfig(pool_size=args.pool, threshold=0.0, prompts_per_round=1, train_batch_size=1,
                    num_steps=args.steps, mixed_precision="no" if dtype == torch.float32 else "bf16")
    params = attach_trainable_lora(model.unet, model.family, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    noise = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(2)).to(x)
    pair = Pairs(x_t=x.float().cpu(), x_w=(x + 0.1 * noise[:1]).float().cpu(), x_l=(x + 0.1 * noise[1:]).float().cpu(),
                 t=torch.tensor([t]), t_prev=torch.tensor([t - 50]), prompts=prompt)
    autocast = (lambda: torch.autocast(device_type=device.type, dtype=dtype)) if dtype != torch.float32 \
        else torch.enable_grad
    model.unet.train()
    parts["train_pair"] = measure(lambda: train_pairs(model, model.unet, model.unet, None, pair, cfg, optimizer,
                                                      False, autocast), device, args.repeats)
    result = {"settings": {**vars(args), "dtype": str(dtype)}, "device_name": device_name(device),
              "torch": torch.__version__,
              "parts": {name: {k: round(v, 3) for k, v in part.items()} for name, part in parts.items()},
              "per_prompt_round": project(parts, args.steps, args.divert, args.pool)}
    print(json.dumps(result, indent=2))
    for unit in ("gflops", "seconds"):
        r = result["per_prompt_round"][unit]["ratios"]
        print(f"by {unit}: latent / pixel SPM: rollout {r['latent_vs_pixel_rollout']:.2f}x, whole round "
              f"{r['latent_vs_pixel_round']:.2f}x; ours pixel / official {r['pixel_vs_official_round']:.2f}x; "
              f"latent / official {r['latent_vs_official_round']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
