"""Diagnostic: how far an SPO policy has moved from its reference, per timestep.

    python bench/spo_ratios.py RUN_DIR [--checkpoint step-00000637] [--prompts 20]

Loads the run's config and LoRA checkpoint (the newest one unless named), rolls out pools on the
pocket training prompts with the policy, keeps every pair (threshold 0) and computes
log r = log p_θ − log p_ref of winner and loser (the mean-over-elements log-probabilities of the
loss). On-policy, E[log r] ≈ mean(δ²)/(2σ_t²) where δ = μ_θ − μ_ref: the size of the drift in
units of the step's noise. Prints, per timestep, the mean and std of log r, the RMS drift δ it
implies, and the share of samples outside the clamp [log(1−ε), log(1+ε)], where the loss passes
no gradient.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_dir", help="an SPO run folder (config.yaml, checkpoints/)")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder name (default: the newest)")
    p.add_argument("--prompts", type=int, default=20, help="pocket training prompts rolled out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from spo_studio.backend import diffusion
    from spo_studio.backend.config import load_config
    from spo_studio.backend.models import load_model
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.runs import latest_checkpoint, load_checkpoint
    from spo_studio.backend.sources import prompts as load_prompts
    from spo_studio.backend.train.loop import attach_trainable_lora, load_lora_state
    from spo_studio.backend.train.method import reference_pass
    from spo_studio.backend.train.spo import SPOConfig, pair_log_probs, rollout

    run = Path(args.run_dir)
    cfg = load_config(SPOConfig, run / "config.yaml", ["threshold=0.0"])
    ckpt = run / "checkpoints" / args.checkpoint if args.checkpoint else latest_checkpoint(run)
    if ckpt is None:
        raise SystemExit(f"{run}: no checkpoint")
    model = load_model(cfg.base_model, device="cpu")
    attach_trainable_lora(model.unet, model.family, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)
    load_lora_state(model.unet, load_checkpoint(ckpt)["lora"])
    model.unet.eval()
    scorer = Scorer.from_path(cfg.spm, model)
    prompts = load_prompts(cfg.prompts)[:args.prompts]
    with torch.no_grad():
        pairs, _ = rollout(model, model.unet, scorer, prompts, cfg, torch.Generator().manual_seed(args.seed))
        cond, negative = model.encode_prompts(pairs.prompts), model.encode_negative(len(pairs))
        lp_w, lp_l = pair_log_probs(model, model.unet, pairs, cond, negative, cfg)
        ref_w, ref_l = reference_pass(
            model.unet, lambda: pair_log_probs(model, model.unet, pairs, cond, negative, cfg)
        )
    log_r = torch.cat([lp_w - ref_w, lp_l - ref_l])
    t_all = torch.cat([pairs.t, pairs.t])
    lo, hi = math.log(1 - cfg.clip_range), math.log(1 + cfg.clip_range)
    print(f"{ckpt}: {len(pairs)} pairs, clamp [{lo:.4f}, {hi:.4f}]")
    print("   t     n   mean log r   std   RMS drift δ   δ/σ_t   outside clamp")
    for t in sorted(set(pairs.t.tolist()), reverse=True):
        sel = log_r[t_all == t]
        t_prev = diffusion.prev_timestep(model.scheduler, t, cfg.num_steps)
        sigma = diffusion.ddim_sigma(diffusion.alpha_bar(model.scheduler, t),
                                     diffusion.alpha_bar(model.scheduler, t_prev), cfg.eta)
        ratio = math.sqrt(max(2 * float(sel.mean()), 0.0))
        print(f"{t:4d} {len(sel):5d} {float(sel.mean()):11.4f} {float(sel.std()):7.4f} {ratio * sigma:12.4f}"
              f" {ratio:8.3f} {float(((sel < lo) | (sel > hi)).float().mean()):12.2f}")
    print(f"all: outside the clamp {float(((log_r < lo) | (log_r > hi)).float().mean()):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
