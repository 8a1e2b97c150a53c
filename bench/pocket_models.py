"""Two pocket model folders side by side: the judges on the same held-out grid, paired by noise.

    python bench/pocket_models.py runs/pocket_sd15/model [--against pocket] [--eval-seeds 4]

Samples the 22 held-out prompts × `--eval-seeds` seeds with DDIM η = 0 (the ladder's grid and settings)
from both models with the same initial noise, and prints the paired difference (model − against) of the
aesthetic judge, the alignment judge and brightness, each with its standard error. Used to report a rebuilt
pocket model's base quality beside what a LoRA does on it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    from spo_ladder import metrics, paired
    from spo_studio.backend.config import load_config
    from spo_studio.backend.evaluation import EvalSettings, load_eval_prompts, sample_images
    from spo_studio.backend.models import load_model
    from spo_studio.backend.train.spo import SPOConfig

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a pocket model folder (or 'pocket')")
    parser.add_argument("--against", default="pocket", help="the model to compare with (default: the shipped one)")
    parser.add_argument("--eval-seeds", type=int, default=4)
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    cfg = load_config(SPOConfig, Path(__file__).resolve().parents[1] / "configs" / "pocket_spo.yaml", [])
    settings = EvalSettings(num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale, eta=0.0, batch=32)
    prompts = load_eval_prompts("pocket-held-out")
    grid = [(p, 10_000 + s) for p in prompts for s in range(args.eval_seeds)]
    ps, seeds = [p for p, _ in grid], [s for _, s in grid]
    judged = {}
    for name in (args.model, args.against):
        judged[name] = metrics(sample_images(load_model(name, device="cpu", dtype="fp32"), ps, seeds, settings), ps)
    print(f"{args.model} − {args.against} on {len(ps)} held-out samples (same noise):")
    for key, values in judged[args.model].items():
        r = paired(values, judged[args.against][key])
        print(f"  {key:10s} {r['diff']:+.4f} ± {r['se']:.4f}   ({args.model}: {values.mean():.4f}, "
              f"{args.against}: {judged[args.against][key].mean():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
