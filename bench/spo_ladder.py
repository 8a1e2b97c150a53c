"""The SPO learning ladder on the pocket model: does SPO move what its step scorer rewards?

    python bench/spo_ladder.py --rung a+ [--steps 64 | --steps 16,32,64 | --minutes 15,30,60] [--seed 0]
                               [--out runs/ladder] [--tag NAME] [key=value …]

Rungs (everything else is `configs/pocket_spo.yaml`, overridable with key=value):
  a+ / a-    spm: reward:±brightness, mode x0 — a trivially learnable reward must move both ways
  b          spm: reward:pocket-aesthetic, mode complete — a step-aware oracle (a check of the machinery,
             never a result: the judge it optimises is the judge it is evaluated by)
  b'         the same judge in mode x0 — what step-unawareness costs
  c          the pocket SPM (the real thing)
  c-latent   the pocket latent SPM (judges the candidates' noisy latents, no decode)
  control    spm: reward:random — pairs chosen by noise: what training alone does to the images
Each run trains, then samples the 22 held-out prompts × `--eval-seeds` seeds with DDIM η = 0 (base and
LoRA from the same noise; with a comma list of budgets, after every stage: a learning curve) and prints
steps, pairs, wall time and the paired differences (LoRA − base)
of the aesthetic judge, the alignment judge and brightness, each with its standard error. One JSON
line per run is appended to `<out>/ladder.jsonl`. Run one at a time: two trainings share 2 cores badly.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

RUNGS = {
    "a+": {"spm": "reward:brightness", "reward_mode": "x0", "reward_scale": 100.0},
    "a-": {"spm": "reward:-brightness", "reward_mode": "x0", "reward_scale": 100.0},
    "b": {"spm": "reward:pocket-aesthetic", "reward_mode": "complete", "reward_scale": 10.0},
    "b'": {"spm": "reward:pocket-aesthetic", "reward_mode": "x0", "reward_scale": 10.0},
    "c": {"spm": "pocket"},
    "c-latent": {"spm": "pocket-latent"},
    "control": {"spm": "reward:random", "reward_mode": "x0", "reward_scale": 10.0},
}


def paired(after: np.ndarray, before: np.ndarray) -> dict:
    d = after.astype(np.float64) - before.astype(np.float64)
    return {"diff": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(len(d))), "n": int(len(d))}


def metrics(images: torch.Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
    from spo_studio.backend.evaluation import pocket_judges

    out = {name: np.asarray(judge(images, prompts)) for name, judge in pocket_judges().items()}
    return {**out, "brightness": images.float().mean(dim=(1, 2, 3)).numpy()}


def eval_grid(eval_seeds: int) -> tuple[list[str], list[int]]:
    """The held-out evaluation grid: the 22 held-out prompts × `eval_seeds` seeds (10000, 10001, …)."""
    from spo_studio.backend.evaluation import load_eval_prompts

    grid = [(p, 10_000 + s) for p in load_eval_prompts("pocket-held-out") for s in range(eval_seeds)]
    return [p for p, _ in grid], [s for _, s in grid]


def judge_samples(base_model: str, prompts: list[str], seeds: list[int], lora_path: Path | None = None,
                  num_steps: int = 20, cfg_scale: float = 5.0) -> dict[str, np.ndarray]:
    """Sample the grid from `base_model` (with a LoRA if given; DDIM η = 0, fp32) and judge every image."""
    from spo_studio.backend import lora
    from spo_studio.backend.models import load_model

    model = load_model(base_model, device="cpu", dtype="fp32")
    if lora_path is not None:
        lora.load_lora(model, lora_path)
    return judge_model(model, prompts, seeds, num_steps=num_steps, cfg_scale=cfg_scale)


def judge_model(model, prompts: list[str], seeds: list[int], eta: float = 0.0, num_steps: int = 20,
                cfg_scale: float = 5.0) -> dict[str, np.ndarray]:
    """Sample the grid from a loaded model (DDIM with this η; at η > 0 the step noise comes from each batch's
    first seed, so two models sampled alike share it) and judge every image."""
    from spo_studio.backend.evaluation import EvalSettings, sample_images

    settings = EvalSettings(num_steps=num_steps, cfg_scale=cfg_scale, eta=eta, batch=32)
    return metrics(sample_images(model, prompts, seeds, settings), prompts)


def resumed_seconds(out: Path, values: dict, overrides: list[str]) -> float:
    """The training seconds an earlier ladder run reached, from its last record in `<out>/ladder.jsonl`;
    a clear error if the folder has no record there or was run with other settings."""
    log = out / "ladder.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    mine = [r for r in records if r["config"].get("output_dir") == values["output_dir"]]
    if not mine:
        raise SystemExit(f"--resume {values['output_dir']}: no record of that run in {log}")
    last = mine[-1]
    if last["config"] != {k: str(v) for k, v in values.items()} or last["overrides"] != list(overrides):
        raise SystemExit(f"--resume {values['output_dir']}: it ran with {last['config']} and overrides "
                         f"{last['overrides']}; give the same rung, seed and overrides")
    return float(last["train_seconds"])


def main(argv=None) -> int:
    from spo_studio.backend.config import load_config
    from spo_studio.backend.train.spo import SPOConfig, train_spo

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rung", choices=sorted(RUNGS), required=True)
    parser.add_argument("--steps", default="64",
                        help="optimizer steps; a comma list (16,32,64) trains in stages and evaluates after each, "
                             "resuming the same run in between (a resumed run equals an uninterrupted one)")
    parser.add_argument("--minutes", default="",
                        help="instead of --steps: cumulative wall-clock budgets in minutes, a comma list (10,20,40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-seeds", type=int, default=4)
    parser.add_argument("--out", default="runs/ladder")
    parser.add_argument("--tag", default="", help="a label stored with the result (e.g. the lever tried)")
    parser.add_argument("--resume", default="",
                        help="a run folder of an earlier ladder run in --out: continue it to further --minutes / "
                             "--steps (its rung, seed and overrides must be given again, unchanged)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the SPO config")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    out = Path(args.out)
    by_minutes = bool(args.minutes)
    budgets = [float(v) for v in (args.minutes or args.steps).split(",")]
    if any(b <= 0 for b in budgets) or budgets != sorted(budgets):
        parser.error("--steps / --minutes: positive budgets in increasing order")
    fresh = out / f"{args.rung.replace(chr(39), 'p')}_s{args.seed}_{int(time.time())}"
    run_dir = Path(args.resume) if args.resume else fresh
    values = {**RUNGS[args.rung], "output_dir": str(run_dir), "seed": args.seed, "epochs": 1000}
    preset = Path(__file__).resolve().parents[1] / "configs" / "pocket_spo.yaml"

    trained_s = resumed_seconds(out, values, args.overrides) if args.resume else 0.0
    spent_min = trained_s / 60
    if by_minutes and budgets[0] <= spent_min:
        parser.error(f"--minutes: {args.resume} has trained {spent_min:.1f} minutes already; give larger budgets")
    ps, seeds = eval_grid(args.eval_seeds)
    before = None
    for budget in budgets:
        # a stage resumes the run (max_steps / max_minutes are resumable changes) up to its budget
        stage = {"max_steps": 0, "max_minutes": budget - spent_min} if by_minutes else {"max_steps": int(budget)}
        overrides = [f"{k}={v}" for k, v in {**values, **stage}.items()] + list(args.overrides)
        cfg = load_config(SPOConfig, preset, overrides)
        start = time.time()
        result = train_spo(cfg)
        trained_s += time.time() - start
        spent_min = trained_s / 60
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        rounds = {(r.get("epoch"), r.get("round")): r.get("pairs_in_round", 0) for r in rows}
        pairs = int(sum(rounds.values()))  # pairs the rollouts kept

        steps = {"num_steps": cfg.num_steps, "cfg_scale": cfg.cfg_scale}
        if before is None:  # the model the run trained on
            before = judge_samples(cfg.base_model, ps, seeds, **steps)
        after = judge_samples(cfg.base_model, ps, seeds, run_dir / "lora" / "spo_lora_diffusers.safetensors", **steps)
        report = {"rung": args.rung, "seed": args.seed, "tag": args.tag, "steps": result["step"], "pairs": pairs,
                  "train_seconds": round(trained_s, 1), "base_model": cfg.base_model,
                  "config": {k: str(v) for k, v in values.items()},
                  "overrides": args.overrides, **{k: paired(after[k], before[k]) for k in before}}
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "ladder.jsonl", "a") as f:
            f.write(json.dumps(report) + "\n")
        print(f"rung {args.rung} seed {args.seed} {args.tag}: {report['steps']} steps, {pairs} pairs, "
              f"{trained_s:.0f} s", flush=True)
        for key in ("aesthetic", "alignment", "brightness"):
            r = report[key]
            z = f"{r['diff'] / r['se']:+.1f}" if r["se"] > 0 else "–"
            print(f"  {key:10s} {r['diff']:+.4f} ± {r['se']:.4f}  (z = {z}, n = {r['n']})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
