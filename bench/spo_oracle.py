"""Diagnostic: the SPO machinery with an oracle step scorer, on the pocket model.

    python bench/spo_oracle.py [--minutes 5] [--out runs/spo_oracle] [key=value …]

Separates "does our SPO loop optimise what its scorer prefers?" from "is the pocket SPM a good
enough scorer?". The step scorer is replaced by the pocket *aesthetic judge* applied to the decoded
one-step x̂0 of each candidate (scaled ×`--scale` to logit units, so the 0.3 softmax-gap threshold
means an aesthetic gap of 0.62/scale). Everything else is `configs/pocket_spo.yaml`. The judge is
then also the evaluation metric, so this run is a test of the machinery, never a result: it must
raise the aesthetic judge, or the loop is broken.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class OracleScorer:
    """score_latents(latents, prompts, t) = scale · aesthetic(decode(latents)) (pocket judge)."""

    def __init__(self, model, scale: float):
        self.model, self.scale = model, scale

    @torch.no_grad()
    def score_latents(self, latents, prompts, t=None):
        from spo_studio.backend.pocket import judges

        images = (self.model.decode(latents).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
        return torch.tensor(judges.aesthetic_batch(list(images))) * self.scale


def main(argv=None) -> int:
    from spo_studio.backend.config import load_config
    from spo_studio.backend.evaluation import EvalSettings, evaluate, format_table, load_eval_prompts
    from spo_studio.backend.models import load_model
    from spo_studio.backend.preference import scoring
    from spo_studio.backend.train.loop import train
    from spo_studio.backend.train.spo import SPOConfig, SPOMethod

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--scale", type=float, default=10.0, help="judge → logit units")
    p.add_argument("--out", default="runs/spo_oracle")
    p.add_argument("overrides", nargs="*", help="key=value overrides of configs/pocket_spo.yaml")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    cfg = load_config(SPOConfig, Path(__file__).resolve().parents[1] / "configs" / "pocket_spo.yaml",
                      [f"output_dir={args.out}/train", f"max_minutes={args.minutes}", "epochs=1000", "max_steps=0",
                       "resume=false", *args.overrides])
    original = scoring.Scorer.from_path
    scoring.Scorer.from_path = classmethod(
        lambda cls, path, base_model=None, **kw: OracleScorer(base_model, args.scale)
    )
    try:
        run = train(cfg, SPOMethod)
    finally:
        scoring.Scorer.from_path = original
    report = evaluate(load_model("pocket"), {"spo_oracle": run["lora"]["diffusers"]},
                      load_eval_prompts("pocket-held-out"),
                      EvalSettings(seeds=[0, 1, 2, 3]), Path(args.out) / "eval", prompts_source="pocket-held-out")
    print(format_table(report))
    print(json.dumps({"steps": run["step"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
