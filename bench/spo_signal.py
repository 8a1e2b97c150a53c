"""Diagnostic: does the SPM's step-wise winner lead to a better *final* image? (pocket world)

    python bench/spo_signal.py [--prompts 48 --seeds 2 --steps 4,8,12,16,19 --lora FILE]

SPO trains on pairs (x_w, x_l) drawn from one shared x_t and ranked by the step-aware preference
model at t−1. SPO can only raise the final-image judges if, more often than not, the SPM's winner
leads to a better final image than its loser. This script measures exactly that, with the pocket
judges (evaluation-only signals):

1. Roll out the pocket model (or base + `--lora`) with SPO's settings (DDIM 20, η = 1, CFG 5,
   divert at step 4, k = 4), continuing from a random candidate as SPO does.
2. At each step in `--steps`, take the SPM's argmax / argmin candidates and finish BOTH to t = 0
   with the same later noises (so the only difference is the step's choice).
3. Judge both final images (aesthetic, alignment, and the pocket crowd's utility) and report,
   over the pairs SPO would keep (gap > threshold) and over all pairs, how often the winner's
   final image is better (ties are left out), with a binomial standard error.

A rate near 0.5 means the SPM's step-wise choice carries no information about the final image,
and SPO's gradient is then a directed random walk away from the base model.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rate(wins: list[float]) -> dict:
    """Share of pairs where the winner's final image is better, ties (equal judge values) left out."""
    decided = [w for w in wins if w != 0.5]
    n = len(decided)
    p = sum(decided) / n if n else float("nan")
    return {"rate": p, "stderr": math.sqrt(p * (1 - p) / n) if n else float("nan"), "n": n, "ties": len(wins) - n}


@torch.no_grad()
def finish(model, x, start, grid, prev, cond, negative, cfg, noises):
    """Run steps start..end from x with the given per-step noises; returns the clean latent."""
    from spo_studio.backend import diffusion

    for i in range(start, len(grid)):
        pred = diffusion.predict(model, x, grid[i], prev[i], cond, negative, cfg.cfg_scale)
        x = diffusion.draw(pred, noises[i], cfg.eta)
    return x


@torch.no_grad()
def main(argv=None) -> int:
    from spo_studio.backend import diffusion
    from spo_studio.backend.models import load_model
    from spo_studio.backend.pocket.preference_data import crowd_utility
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.sources import prompts as load_prompts
    from spo_studio.backend.train.spo import SPOConfig, select_pairs

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=48, help="training prompts used (first N of a fixed shuffle)")
    p.add_argument("--seeds", type=int, default=2, help="rollouts per prompt")
    p.add_argument("--steps", default="4,8,12,16,19", help="step indices (0-based, ≥ divert step) to test")
    p.add_argument("--lora", default=None, help="a diffusers LoRA applied to the policy (default: base model)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = SPOConfig()
    model = load_model("pocket")
    if args.lora:
        from spo_studio.backend.lora import load_lora

        load_lora(model, args.lora, adapter_name="policy")
    scorer = Scorer.from_path("pocket", model)
    all_prompts = load_prompts("pocket")
    order = torch.randperm(len(all_prompts), generator=torch.Generator().manual_seed(0)).tolist()
    prompts = [all_prompts[i] for i in order[: args.prompts]] * args.seeds
    test_steps = sorted(int(s) for s in args.steps.split(","))
    b, k = len(prompts), cfg.pool_size
    gen = torch.Generator().manual_seed(1234)

    grid = diffusion.timesteps(model.scheduler, cfg.num_steps)
    prev = [diffusion.prev_timestep(model.scheduler, t, cfg.num_steps) for t in grid]
    cond, negative = model.encode_prompts(prompts), model.encode_negative(b)
    cond2, negative2 = cond.repeat_interleave(2), negative.repeat_interleave(2)
    noises = [torch.randn((b, *model_latent_shape(model)), generator=gen) for _ in grid]
    x = diffusion.initial_latents(model, b, generator=gen)
    results = {}
    for i, (t, t_prev) in enumerate(zip(grid, prev)):
        pred = diffusion.predict(model, x, t, t_prev, cond, negative, cfg.cfg_scale)
        if i < cfg.divert_start_step:
            x = diffusion.draw(pred, noises[i], cfg.eta)
            continue
        pool = diffusion.sample_pool(pred, k, cfg.eta, gen)
        if i in test_steps:
            flat = pool.candidates.reshape(b * k, *x.shape[1:])
            prompts_k = [q for q in prompts for _ in range(k)]
            if t_prev >= 0:
                nxt = diffusion.predict(model, flat, grid[i + 1], prev[i + 1], cond.repeat_interleave(k),
                                        negative.repeat_interleave(k), cfg.cfg_scale)
                scores = scorer.score_latents(nxt.x0_hat, prompts_k, grid[i + 1]).view(b, k)
            else:
                scores = scorer.score_latents(flat, prompts_k, 0).view(b, k)
            win, lose, keep = select_pairs(scores, cfg.threshold)
            rows = torch.arange(b)
            pair = torch.stack(
                [pool.candidates[rows, win], pool.candidates[rows, lose]], 1
            ).reshape(2 * b, *x.shape[1:])
            later = [n.repeat_interleave(2, 0) for n in noises]
            final = finish(model, pair, i + 1, grid, prev, cond2, negative2, cfg, later)
            images = (model.decode(final).permute(0, 2, 3, 1).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            judged = [crowd_utility(img, q) for img, q in zip(images, [q for q in prompts for _ in range(2)])]
            per = {}
            for key in ("aesthetic", "alignment", "utility"):
                w = np.array([judged[2 * j][key] for j in range(b)])
                l_ = np.array([judged[2 * j + 1][key] for j in range(b)])
                wins = [1.0 if a > c else 0.0 if a < c else 0.5 for a, c in zip(w, l_)]
                kept = [v for v, kk in zip(wins, keep.tolist()) if kk]
                per[key] = {"kept": rate(kept), "all": rate(wins),
                            "mean_diff_kept": float((w - l_)[keep.numpy()].mean()) if keep.any() else float("nan")}
            results[f"step {i} (t={t}→{t_prev})"] = {"kept_pairs": int(keep.sum()), "pairs": b, **per}
            print(f"step {i:2d} t={t:4d}: kept {int(keep.sum()):3d}/{b}  " + "  ".join(
                f"{key} win-rate kept {per[key]['kept']['rate']:.3f}±{per[key]['kept']['stderr']:.3f} "
                f"all {per[key]['all']['rate']:.3f}" for key in ("aesthetic", "alignment", "utility")), flush=True)
        pick = torch.randint(0, k, (b,), generator=gen)
        x = pool.candidates[torch.arange(b), pick]
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


def model_latent_shape(model) -> tuple[int, int, int]:
    size = model.default_resolution // model.vae_scale_factor
    return (model.latent_channels, size, size)


if __name__ == "__main__":
    raise SystemExit(main())
