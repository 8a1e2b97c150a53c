"""Choose the SPM's WiSE-FT α on a validation split, never on the held-out pairs.

    python bench/spm_wise_ft.py --start runs/val_scorer/spm --tuned runs/val_spm/spm --val-fraction 0.1
    python bench/spm_wise_ft.py --start runs/val_scorer/spm --tuned runs/val_spm/spm runs/val_spm_s1/spm \
        --val-fraction 0.1 --alphas 1.0

WiSE-FT (Wortsman et al. 2022) interpolates every weight between the scorer fine-tuning started from
(α = 0: the base scorer with identity time conditioning) and the fine-tuned SPM (α = 1):
θ_α = (1 − α)·θ_start + α·θ_tuned. Each α's SPM, and the base scorer with no time conditioning,
judge the same decided pairs at every timestep bucket (the `spo eval-spm` pipeline: noise to t, the
base UNet's one-step x̂0 at CFG 5, VAE decode). With `--val-fraction` the pairs are the validation
split of `--data` (default: the pocket training pairs) that a scorer and SPM trained with the same
`val_fraction` never saw; the α to ship is the one with the best t = 0 accuracy there among those that
beat the base scorer at every t ≥ 500. Several `--tuned` SPMs (fine-tuned from the same start with
other seeds) are first averaged uniformly, a model soup (Wortsman et al. 2022, "Model soups"); each
alone is also scored, as a reference row. Prints one row per model and writes the table as JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

logger = logging.getLogger("bench.spm_wise_ft")


def main() -> None:
    from spo_studio.backend.models import load_model
    from spo_studio.backend.preference.evaluate import BUCKETS, accuracy_of, bucket_verdicts, load_pairs
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.preference.spm import StepAwarePreferenceModel, average_weights, interpolate_weights

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--start", required=True, help="the scorer the SPM was fine-tuned from (folder)")
    parser.add_argument("--tuned", required=True, nargs="+",
                        help="the fine-tuned SPM(s), trained weights (wise_alpha = 1); several: their uniform soup")
    parser.add_argument("--data", default=None, help="Pick-a-Pic parquet (default: the pocket training pairs)")
    parser.add_argument("--val-fraction", type=float, default=0.0,
                        help="evaluate the validation split of --data held aside with this val_fraction (0: all)")
    parser.add_argument("--alphas", default="0.5,0.6,0.7,0.8,0.9,1.0", help="comma-separated α values")
    parser.add_argument("--model", default="pocket", help="base diffusion model for the one-step x̂0")
    parser.add_argument("--max-pairs", type=int, default=0, help="read at most this many rows (0: all)")
    parser.add_argument("--out", default="runs/spm_wise_ft.json", help="JSON table")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")

    data = args.data
    if data is None:
        from spo_studio.backend.pocket.preference_data import TRAIN_PAIRS

        data = TRAIN_PAIRS
    alphas = [float(a) for a in args.alphas.split(",")]
    model = load_model(args.model)
    start = StepAwarePreferenceModel.load(args.start)
    singles = [StepAwarePreferenceModel.load(path) for path in args.tuned]
    tuned = average_weights(singles, [1 / len(singles)] * len(singles))  # one model: a copy of it
    scorers = {"base": (Scorer(start, model), False)}
    if len(singles) > 1:
        for i, single in enumerate(singles):
            scorers[f"tuned {i}"] = (Scorer(single, model), True)
    for alpha in alphas:
        scorers[f"{alpha:g}"] = (Scorer(interpolate_weights(start, tuned, alpha), model), True)
    pairs = load_pairs(data, args.max_pairs, args.val_fraction)
    logger.info("%d decided pairs from %s (val_fraction %g)", len(pairs), data, args.val_fraction)
    verdicts = bucket_verdicts(scorers, model, pairs, BUCKETS)

    table = {row: {name: accuracy_of(v) for name, v in by_name.items()} for row, by_name in verdicts.items()}
    rows = list(table)
    print(f"{'':>8}" + "".join(f"{r:>8}" for r in rows))
    for name in scorers:
        label = name if name == "base" or name.startswith("tuned") else f"α={name}"
        print(f"{label:>8}" + "".join(f"{table[r][name]['accuracy']:8.3f}" for r in rows))

    def beats_base(name: str, t: int) -> bool:
        return table[str(t)][name]["accuracy"] > table[str(t)]["base"]["accuracy"]

    eligible = [a for a in alphas if all(beats_base(f"{a:g}", t) for t in (500, 750, 950))]
    choice = max(eligible, key=lambda a: (table["0"][f"{a:g}"]["accuracy"], a)) if eligible else None
    print(f"n = {len(pairs)} pairs; best t = 0 among the α that beat the base at every t ≥ 500: {choice}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"start": args.start, "tuned": args.tuned, "data": str(data),
                               "val_fraction": args.val_fraction, "n": len(pairs), "choice": choice,
                               "accuracy": table}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
