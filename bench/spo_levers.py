"""SPO's signal and stability levers, each against a random-scorer control, on the pocket model.

    python bench/spo_levers.py [--rung c-latent] [--minutes 2.5] [--seeds 0,1] [--settings paper,group,…]
                               [--out runs/levers]

For every setting (a lever of `SPOConfig` switched on, everything else `configs/pocket_spo.yaml`) and
seed, two runs train for the same wall-clock budget: the rung's step scorer, and the random-scorer
control with the same settings (`spm: reward:random`: pairs chosen by noise, what training alone does
to the images). Each LoRA samples the 22 held-out prompts × `--eval-seeds` seeds with DDIM η = 0 from
the same noise as base. Per run, the per-image judge scores go to `<out>/levers.jsonl` (a finished run
is skipped when the command is rerun: the bench resumes run by run). The summary prints, per setting
over all its seeds, the paired differences lever − control and lever − base (mean ± SE over images).
The rule that decides is written in bench/RESULTS.md before the run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from spo_ladder import RUNGS, eval_grid, judge_samples, paired  # noqa: E402

SETTINGS = {
    "paper": [],
    "group": ["pair_mode=group"],
    "balance": ["timestep_balance=true"],
    "kl": ["kl_coef=10"],
    "accum": ["grad_accum=4"],
    "lr": ["lr=3e-4"],
    "kl+accum": ["kl_coef=10", "grad_accum=4"],  # the two leads of the first screen, combined (confirmation)
    "kl+eta": ["kl_coef=10", "eta=0.5"],  # rollouts nearer the η = 0 sampler the ladder evaluates with
}
JUDGES = ("aesthetic", "alignment")


def load_results(path: Path) -> dict[tuple, dict]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["setting"], r["seed"], r["side"], r["rung"], r["minutes"]): r for r in rows}


def summary(results: dict[tuple, dict], base: dict, rung: str, minutes: float, settings: list[str]) -> list[dict]:
    """Per setting: lever − control and lever − base, pooled over seeds (paired per image)."""
    out = []
    for name in settings:
        seeds = sorted({k[1] for k in results if k[0] == name and k[3] == rung and k[4] == minutes})
        both = [s for s in seeds if all((name, s, side, rung, minutes) in results for side in ("lever", "control"))]
        if not both:
            continue
        row = {"setting": name, "seeds": both,
               "steps": [results[(name, s, "lever", rung, minutes)]["steps"] for s in both]}
        for judge in JUDGES:
            lever = np.concatenate([results[(name, s, "lever", rung, minutes)][judge] for s in both])
            control = np.concatenate([results[(name, s, "control", rung, minutes)][judge] for s in both])
            b = np.concatenate([base[judge] for _ in both])
            row[f"{judge}_vs_control"] = paired(lever, control)
            row[f"{judge}_vs_base"] = paired(lever, b)
            row[f"{judge}_control_vs_base"] = paired(control, b)
        out.append(row)
    return out


def main(argv=None) -> int:
    from spo_studio.backend.config import load_config
    from spo_studio.backend.train.spo import SPOConfig, train_spo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rung", default="c-latent", choices=sorted(RUNGS))
    parser.add_argument("--minutes", type=float, default=2.5, help="training wall clock per run")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--out", default="runs/levers")
    args = parser.parse_args(argv)
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")

    torch.set_num_threads(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "levers.jsonl"
    ps, seeds = eval_grid(args.eval_seeds)
    preset = Path(__file__).resolve().parents[1] / "configs" / "pocket_spo.yaml"
    base = {k: v.tolist() for k, v in judge_samples("pocket", ps, seeds).items()}

    for name in settings:
        for seed in [int(s) for s in args.seeds.split(",")]:
            for side, scorer in (("lever", RUNGS[args.rung]), ("control", RUNGS["control"])):
                key = (name, seed, side, args.rung, args.minutes)
                if key in load_results(results_file):
                    continue
                run_dir = out / f"{name}_{side}_s{seed}_{int(time.time())}"
                values = {**scorer, "output_dir": str(run_dir), "seed": seed, "epochs": 1000, "max_steps": 0,
                          "max_minutes": args.minutes}
                cfg = load_config(SPOConfig, preset, [f"{k}={v}" for k, v in values.items()] + SETTINGS[name])
                start = time.time()
                result = train_spo(cfg)
                seconds = time.time() - start
                after = judge_samples("pocket", ps, seeds, run_dir / "lora" / "spo_lora_diffusers.safetensors")
                row = {"setting": name, "seed": seed, "side": side, "rung": args.rung, "minutes": args.minutes,
                       "steps": result["step"], "train_seconds": round(seconds, 1),
                       **{j: after[j].tolist() for j in JUDGES}}
                with open(results_file, "a") as f:
                    f.write(json.dumps(row) + "\n")
                d = paired(after["aesthetic"], np.asarray(base["aesthetic"]))
                print(f"{name} {side} seed {seed}: {result['step']} steps, aesthetic − base "
                      f"{d['diff']:+.4f} ± {d['se']:.4f}", flush=True)

    rows = summary(load_results(results_file), {j: np.asarray(base[j]) for j in JUDGES}, args.rung, args.minutes,
                   settings)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    print("setting   seeds  steps        aesthetic vs control   vs base            alignment vs control  vs base")
    for r in rows:
        cells = [f"{r[f'{j}_vs_{w}']['diff']:+.4f} ± {r[f'{j}_vs_{w}']['se']:.4f}" for j in JUDGES
                 for w in ("control", "base")]
        print(f"{r['setting']:9s} {len(r['seeds'])}      {str(r['steps']):12s} " + "  ".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
