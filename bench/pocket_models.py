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
    from spo_ladder import eval_grid, judge_samples, paired

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", help="a pocket model folder (or 'pocket')")
    parser.add_argument("--against", default="pocket", help="the model to compare with (default: the shipped one)")
    parser.add_argument("--eval-seeds", type=int, default=4)
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    ps, seeds = eval_grid(args.eval_seeds)
    judged = {name: judge_samples(name, ps, seeds) for name in (args.model, args.against)}
    print(f"{args.model} − {args.against} on {len(ps)} held-out samples (same noise):")
    for key, values in judged[args.model].items():
        r = paired(values, judged[args.against][key])
        print(f"  {key:10s} {r['diff']:+.4f} ± {r['se']:.4f}   ({args.model}: {values.mean():.4f}, "
              f"{args.against}: {judged[args.against][key].mean():.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
