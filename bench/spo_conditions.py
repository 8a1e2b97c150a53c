"""Where does an SPO LoRA move the judges? Held-out vs training prompts, DDIM η = 0 vs the rollout's η = 1.

    python bench/spo_conditions.py runs/…/lora/spo_lora_diffusers.safetensors [more LoRAs …]
                                   [--base-model pocket] [--eval-seeds 4] [--json FILE]
    python bench/spo_conditions.py --compare FILE [FILE …] --pair LEVER=CONTROL [--pair LEVER=CONTROL …]

The ladder (`bench/spo_ladder.py`) judges a LoRA on the 22 held-out prompts with DDIM η = 0. SPO trains on
the training prompts with η = 1 rollouts. This bench judges each LoRA under all four combinations, each
paired with the base model from the same noise (η = 1: the same per-step noise too):

  held-out η=0   the ladder's grid (22 held-out prompts × seeds 10000…)
  held-out η=1   the same prompts and seeds, sampled as the rollouts are
  train η=0      22 training prompts (a fixed draw, seed 123) × seeds 20000…
  train η=1      the same, sampled as the rollouts are

It is a diagnosis, not a verdict: the ladder's rungs keep their held-out η = 0 evaluation.

`--compare` reads the per-image differences one or more `--json` runs stored and prints lever − control, paired
per image and pooled over the given pairs (each LEVER / CONTROL: a unique part of a judged LoRA's path, among
the records of all the files).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spo_ladder import eval_grid, judge_model, paired  # noqa: E402

JUDGES = ("aesthetic", "alignment")


def train_grid(eval_seeds: int, n_prompts: int = 22) -> tuple[list[str], list[int]]:
    """`n_prompts` of the pocket training prompts (a fixed draw) × `eval_seeds` seeds (20000, 20001, …)."""
    from spo_studio.backend import sources

    chosen = random.Random(123).sample(sources.prompts("pocket"), n_prompts)
    return [p for p in chosen for _ in range(eval_seeds)], [20_000 + s for _ in chosen for s in range(eval_seeds)]


def lever_minus_control(records: list[dict], pairs: list[tuple[str, str]]) -> dict:
    """{condition: {judge: paired(lever, control)}} pooled over `pairs` of (lever, control) path parts."""
    def find(part: str) -> dict:
        hits = [r for r in records if part in r["lora"]]
        if len(hits) != 1:
            raise SystemExit(f"--pair: {part!r} matches {len(hits)} judged LoRAs (needs exactly one)")
        return hits[0]

    chosen = [(find(lever), find(control)) for lever, control in pairs]
    out = {}
    for cond in chosen[0][0]["per_image"]:
        out[cond] = {j: paired(np.concatenate([np.asarray(lv["per_image"][cond][j]) for lv, _ in chosen]),
                               np.concatenate([np.asarray(ct["per_image"][cond][j]) for _, ct in chosen]))
                     for j in JUDGES}
    return out


def read_records(path: str) -> list[dict]:
    """The records of one `--json` file (a JSON object per line); a clear error names the file and the line."""
    if not Path(path).is_file():
        raise SystemExit(f"--compare: {path} is not a file")
    records = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SystemExit(f"--compare: {path}, line {number} is not JSON ({exc.msg})") from None
    return records


def main(argv=None) -> int:
    from spo_studio.backend import lora
    from spo_studio.backend.models import load_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("loras", nargs="*", help="LoRA files to judge")
    parser.add_argument("--base-model", default="pocket")
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--json", default=None,
                        help="also append one JSON line per LoRA here (with the per-image LoRA − base differences)")
    parser.add_argument("--compare", nargs="+", default=None,
                        help="--json files of judged LoRAs (their records pooled): print lever − control")
    parser.add_argument("--pair", action="append", default=[], metavar="LEVER=CONTROL",
                        help="with --compare: a lever and its control (unique parts of their LoRA paths)")
    args = parser.parse_args(argv)
    if args.compare:
        if not args.pair or any("=" not in p for p in args.pair):
            parser.error("--compare needs one or more --pair LEVER=CONTROL")
        records = [record for path in args.compare for record in read_records(path)]
        result = lever_minus_control(records, [tuple(p.split("=", 1)) for p in args.pair])
        for cond, diffs in result.items():
            print(f"  {cond:14s} " + "  ".join(f"{j} {d['diff']:+.3f} ± {d['se']:.3f}" for j, d in diffs.items()))
        return 0
    if not args.loras:
        parser.error("give LoRA files to judge, or --compare")
    torch.set_num_threads(2)
    for path in args.loras:
        if not Path(path).is_file():
            raise SystemExit(f"{path}: no such LoRA file")

    grids = {"held-out": eval_grid(args.eval_seeds), "train": train_grid(args.eval_seeds)}
    conditions = [(split, eta) for split in grids for eta in (0.0, 1.0)]

    def judged(model) -> dict:
        return {(split, eta): judge_model(model, *grids[split], eta=eta) for split, eta in conditions}

    base = judged(load_model(args.base_model, device="cpu", dtype="fp32"))
    for path in args.loras:
        model = load_model(args.base_model, device="cpu", dtype="fp32")
        lora.load_lora(model, path)
        tuned = judged(model)
        result = {"lora": str(path), "base_model": args.base_model, "conditions": {}}
        print(path)
        for split, eta in conditions:
            key = f"{split} eta={eta:g}"
            diffs = {j: paired(tuned[(split, eta)][j], base[(split, eta)][j]) for j in JUDGES}
            result["conditions"][key] = diffs
            # per image (LoRA − base), so that two LoRAs judged here compare paired: lever − control
            result.setdefault("per_image", {})[key] = {
                j: (tuned[(split, eta)][j] - base[(split, eta)][j]).astype(float).round(5).tolist() for j in JUDGES}
            print(f"  {key:14s} " + "  ".join(f"{j} {d['diff']:+.3f} ± {d['se']:.3f}" for j, d in diffs.items()))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
