"""`spo train-spm`, `spo eval-spm`, `spo score`: the preference-model commands."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def args_train_spm(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML preset, e.g. configs/pocket_spm.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config (see --list-keys)")
    p.add_argument("--list-keys", action="store_true", help="list the config keys with defaults and help")


def cmd_train_spm(args) -> int:
    from ..config import help_texts, load_config
    from .train import SPMTrainConfig, train_spm

    if args.list_keys:
        defaults = SPMTrainConfig()
        for key, text in help_texts(SPMTrainConfig).items():
            print(f"{key} = {getattr(defaults, key)!r}\n    {text}")
        return 0
    cfg = load_config(SPMTrainConfig, args.config, args.overrides)
    out = train_spm(cfg)
    print(f"SPM written to {out}")
    return 0


def add_spm_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--spm", default="pocket",
                   help="'pocket', an SPM folder, or an official SPO checkpoint file (.bin / .safetensors)")
    p.add_argument("--spm-clip", default=None,
                   help="for an official SPM file: the CLIP folder it was initialised from (PickScore_v1 config + "
                        "CLIP-ViT-H-14 tokenizer); default: found beside the file")


def args_eval_spm(p: argparse.ArgumentParser) -> None:
    add_spm_arguments(p)
    p.add_argument("--base-scorer", default=None, help="base scorer folder (default: the pocket scorer)")
    p.add_argument("--model", default="pocket", help="base diffusion model for the one-step x̂0")
    p.add_argument("--data", default=None, help="held-out Pick-a-Pic parquet (default: the pocket held-out pairs)")
    p.add_argument("--train-data", default=None,
                   help="training parquet: also report accuracy on held-out pairs whose caption it lacks "
                        "(default with the pocket held-out pairs: the pocket training pairs)")
    p.add_argument("--max-pairs", type=int, default=0, help="read at most this many rows (0: all; ties are skipped)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="evaluate on the validation split of --data (default then: the pocket training pairs) "
                        "that a run trained with the same val_fraction held aside")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--latent-decode", action="store_true",
                   help="score the fast preview decode (x̂0 latent shrunk to the SPM's input size, then decoded)")
    p.add_argument("--against", default=None,
                   help="another step-aware SPM ('pocket', 'pocket-latent' or a folder) judged on the same inputs: "
                        "each row adds its accuracy and the paired difference SPM − it, with its standard error")
    p.add_argument("--out", default="runs/spm_eval", help="output folder for spm_eval.json and spm_eval.png")


def cmd_eval_spm(args) -> int:
    from ..models import load_model
    from ..sources import POCKET_HELD_OUT_PAIRS, POCKET_SCORER_DIR, POCKET_TRAIN_PAIRS
    from .evaluate import BUCKETS, eval_spm, write_eval

    data, train_data = args.data, args.train_data
    if data is None:
        if args.val_fraction > 0:
            data = POCKET_TRAIN_PAIRS
        else:
            data, train_data = POCKET_HELD_OUT_PAIRS, train_data or POCKET_TRAIN_PAIRS
    model = load_model(args.model)
    result = eval_spm(args.spm, args.base_scorer or POCKET_SCORER_DIR, model, data, BUCKETS, args.max_pairs,
                      seed=args.seed, latent_decode=args.latent_decode, train_data=train_data,
                      val_fraction=args.val_fraction, spm_clip=args.spm_clip, against=args.against)
    write_eval(result, Path(args.out))
    clean = result["clean"]
    print(f"clean   SPM {clean['spm']['accuracy']:.3f} ± {clean['spm']['stderr']:.3f}   "
          f"base {clean['base']['accuracy']:.3f} ± {clean['base']['stderr']:.3f}   (no VAE round trip)")
    for t, row in result["buckets"].items():
        print(f"t={t:>4}  SPM {row['spm']['accuracy']:.3f} ± {row['spm']['stderr']:.3f}   "
              f"base {row['base']['accuracy']:.3f} ± {row['base']['stderr']:.3f}   n={row['spm']['n']}")
    if args.against:
        print(f"SPM − {args.against}, paired on the same pairs:")
        for t, row in [("clean", clean), *result["buckets"].items()]:
            d = row["difference"]
            print(f"{t:>7}  against {row['against']['accuracy']:.3f}   difference {d['difference']:+.3f} ± "
                  f"{d['stderr']:.3f}   (SPM alone right {d['a_only']}, against alone right {d['b_only']})")
    for t, row in [("clean", clean), *result["buckets"].items()]:
        if "unseen_prompts" in row:
            u = row["unseen_prompts"]
            print(f"unseen captions only, {t:>5}: SPM {u['spm']['accuracy']:.3f}   base {u['base']['accuracy']:.3f}"
                  f"   n={u['spm']['n']}")
    print(f"wrote {args.out}/spm_eval.json and spm_eval.png")
    return 0


def args_score(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="pocket", help="base model: 'pocket', a folder or a .safetensors file")
    add_spm_arguments(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=5.0)
    p.add_argument("--eta", type=float, default=1.0)
    p.add_argument("--out", default="runs/score", help="output folder")


def cmd_score(args) -> int:
    from ..models import load_model
    from .evaluate import score_trajectory, write_score_outputs
    from .scoring import Scorer

    model = load_model(args.model)
    scorer = Scorer.from_path(args.spm, model, clip_folder=args.spm_clip)
    result = score_trajectory(model, scorer, args.prompt, args.seed, args.steps, args.cfg, args.eta)
    meta = write_score_outputs(result, Path(args.out))
    print(json.dumps({"timesteps": meta["timesteps"], "scores": [round(s, 3) for s in meta["scores"]]}))
    print(f"wrote {args.out}/scores.json, scores.png, x0_strip.png")
    return 0


def args_spm(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="spm_command", metavar="ACTION", required=True)
    i = sub.add_parser("import", help="convert an official SPO preference model file into an SPM folder, once")
    i.add_argument("file", help="the official checkpoint, e.g. sd-v1-5_step-aware_preference_model.bin")
    i.add_argument("out", help="the SPM folder to write")
    i.add_argument("--clip", default=None,
                   help="the CLIP folder it was initialised from (PickScore_v1 config + CLIP-ViT-H-14 tokenizer); "
                        "default: found beside the file")


def cmd_spm(args) -> int:
    from .official_spm import import_official_spm

    out = import_official_spm(args.file, args.out, args.clip)
    print(f"wrote {out} (use it as spm: {out})")
    return 0
