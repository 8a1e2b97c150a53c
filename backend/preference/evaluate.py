"""Evaluate a preference model on noisy steps, and score a sampling trajectory step by step.

    spo eval-spm --spm DIR --base-scorer DIR --data held_out.parquet --out DIR
    spo score --model pocket --prompt "…" --seed N --out DIR

`eval_spm` measures pairwise accuracy against held-out crowd labels per timestep bucket
(t = 0, 250, 500, 750, 950): each pair is noised to t with one shared noise, the base UNet's
one-step x̂0 (CFG 5) is decoded, and both the SPM (conditioned on t) and the base scorer (no time
conditioning) score the *same* decoded images. Ties are excluded from accuracy. `bucket_verdicts`
does the same for any number of scorers at once (e.g. to choose a recipe on a validation split,
`bench/spm_wise_ft.py`). Given the training file, each row also reports `unseen_prompts`: the
accuracies on the pairs whose caption is not in it (held-out images are always new; a short prompt
grammar makes some held-out captions recur in training).
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path

import torch

from ..config import atomic_write_text
from ..evaluation import mean_se
from .data import PickAPicStream, captions
from .scoring import Scorer
from .train import images_tensor, noisy_latents, one_step_x0_images

logger = logging.getLogger(__name__)

BUCKETS = (0, 250, 500, 750, 950)


def accuracy_of(correct: list[bool]) -> dict:
    n = len(correct)
    acc = sum(correct) / n if n else float("nan")
    se = math.sqrt(acc * (1 - acc) / n) if n else float("nan")
    return {"accuracy": acc, "stderr": se, "n": n}


def paired_difference(a_ok: list[bool], b_ok: list[bool]) -> dict:
    """Accuracy of scorer A minus scorer B on the same pairs, with the standard error of the paired
    difference: d_i = [A right on pair i] − [B right on pair i] ∈ {−1, 0, 1}, SE = sd(d) / √n. Pairs both get
    right or both get wrong add nothing to the difference and little to the error, so it is smaller than
    either accuracy's own SE when the two scorers agree often. `a_only` / `b_only`: the discordant pairs."""
    if len(a_ok) != len(b_ok):
        raise ValueError(f"paired difference of {len(a_ok)} and {len(b_ok)} verdicts: not the same pairs")
    d = [int(a) - int(b) for a, b in zip(a_ok, b_ok)]
    m = mean_se(d)
    return {"difference": m["mean"], "stderr": m["stderr"], "n": m["n"],
            "a_only": sum(x == 1 for x in d), "b_only": sum(x == -1 for x in d)}


def _batches(pairs: list, size: int, batch_size: int):
    """Yield (images [2B, 3, size, size] with pairs as rows i and B+i, their prompts, whether image 0 won)."""
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        images = images_tensor([p.image0 for p in chunk] + [p.image1 for p in chunk], size)
        yield images, [p.caption for p in chunk] * 2, [p.label0 > p.label1 for p in chunk]


def _verdicts(scores: torch.Tensor, truth: list[bool]) -> list[bool]:
    """Scores [2B] (pairs as rows i and B+i) → whether each pair's higher score is the crowd's choice."""
    s0, s1 = scores.chunk(2)
    return [bool(a > b) == w for a, b, w in zip(s0, s1, truth)]


def load_pairs(data_path, max_pairs: int = 0, val_fraction: float = 0.0) -> list:
    """The decided (non-tie) pairs of a Pick-a-Pic file, or with `val_fraction` > 0 of its validation split;
    `max_pairs`: read at most this many rows of them (0: all)."""
    split = "val" if val_fraction > 0 else "all"
    stream = PickAPicStream(data_path, split=split, val_fraction=val_fraction)
    rows = itertools.islice(stream.iter_epoch(0), max_pairs if max_pairs > 0 else None)
    return [p for p in rows if p.label0 != p.label1]


@torch.no_grad()
def bucket_verdicts(scorers: dict, base_model, pairs: list, buckets=BUCKETS, batch_size: int = 32,
                    cfg_scale: float = 5.0, seed: int = 0, decode=None) -> dict[str, dict[str, list[bool]]]:
    """Per-pair verdicts (higher score = the crowd's choice) of several scorers on the *same* inputs:
    `scorers` maps a name to (Scorer, step_aware); a step-aware one is told t, the others score with
    no time conditioning. Rows: "clean" (the images themselves, t = 0) and one per bucket (noised to t
    with one shared noise, the base UNet's one-step x̂0 at `cfg_scale`, decoded by `decode` or the VAE).
    A latent scorer (`reads_noisy_latents`) is handed the same noisy latents z_t instead (the clean row: the
    images' latents at t = 0)."""
    size = base_model.default_resolution
    latent = {name for name, (scorer, _) in scorers.items() if getattr(scorer, "reads_noisy_latents", False)}
    pixel = [name for name in scorers if name not in latent]
    out: dict[str, dict[str, list[bool]]] = {"clean": {name: [] for name in scorers}}
    gen = torch.Generator().manual_seed(seed * 1_000_003 + 1000)
    for images, prompts, truth in _batches(pairs, size, batch_size):
        z = base_model.encode_images(images.to(base_model.device), generator=gen) if latent else None
        for name, (scorer, step_aware) in scorers.items():
            if name in latent:  # every latent scorer judges the same latents
                out["clean"][name] += _verdicts(scorer.score_latents(z, prompts, 0), truth)
            else:
                out["clean"][name] += _verdicts(scorer.score_images(images, prompts, 0 if step_aware else None),
                                                truth)
    for t_value in buckets:
        row = out[str(t_value)] = {name: [] for name in scorers}
        gen = torch.Generator().manual_seed(seed * 1_000_003 + t_value)
        for images, prompts, truth in _batches(pairs, size, batch_size):
            t = torch.full((len(prompts),), t_value, dtype=torch.long)
            z_t = noisy_latents(base_model, images.to(base_model.device), t, gen)
            for name in latent:
                row[name] += _verdicts(scorers[name][0].score_latents(z_t, prompts, t_value), truth)
            if not pixel:
                continue
            x0 = one_step_x0_images(base_model, None, prompts, t, gen, cfg_scale, decode=decode, z_t=z_t)
            for name in pixel:
                scorer, step_aware = scorers[name]
                row[name] += _verdicts(scorer.score_images(x0, prompts, t_value if step_aware else None), truth)
        logger.info("t=%d  %s", t_value, "  ".join(f"{name} {sum(v) / len(v):.3f}" for name, v in row.items()))
    return out


def eval_spm(spm_path, base_scorer_path, base_model, data_path, buckets=BUCKETS, max_pairs: int = 0,
             batch_size: int = 32, cfg_scale: float = 5.0, seed: int = 0, latent_decode: bool = False,
             train_data=None, val_fraction: float = 0.0, spm_clip=None, against=None) -> dict:
    """Pairwise accuracy of the SPM (at t) and the base scorer (no t) on the same one-step x̂0 images;
    also on the clean images themselves (`clean`: SPM at t = 0, as SPO scores its final candidates, with
    no VAE encode/decode round trip in between). `max_pairs`: read at most this many rows (0: all);
    `latent_decode`: both see the fast preview decode (`Scorer(latent_decode=True)`) instead of the full one.
    `train_data`: the training file; adds `unseen_prompts` (pairs whose caption it lacks) to every row.
    `val_fraction` > 0: evaluate on the validation split of `data_path` (a training file trained with the
    same `val_fraction`) instead of the whole file. `spm_clip`: the CLIP folder of an official SPM file.
    `against`: another step-aware SPM (pixel or latent) judged on the same inputs; every row then also has
    `against` (its accuracy) and `difference` (SPM − against, paired per pair, `paired_difference`)."""
    spm = Scorer.from_path(spm_path, base_model, clip_folder=spm_clip, latent_decode=latent_decode)
    base = Scorer.from_path(base_scorer_path, base_model, latent_decode=latent_decode)
    pairs = load_pairs(data_path, max_pairs, val_fraction)
    result: dict = {"spm": str(spm_path), "base_scorer": str(base_scorer_path), "data": str(data_path),
                    "cfg_scale": cfg_scale, "seed": seed, "latent_decode": latent_decode, "buckets": {}}
    if val_fraction > 0:
        result["val_fraction"] = val_fraction
    scorers = {"spm": (spm, True), "base": (base, False)}
    if against is not None:
        scorers["against"] = (Scorer.from_path(against, base_model, latent_decode=latent_decode), True)
        result["against"] = str(against)
    verdicts = bucket_verdicts(scorers, base_model, pairs, buckets, batch_size, cfg_scale, seed,
                               decode=spm.decode if latent_decode else None)
    unseen = None
    if train_data is not None:
        seen = captions(train_data)
        unseen = [p.caption not in seen for p in pairs]
        result["train_data"] = str(train_data)

    def row(by_name: dict[str, list[bool]]) -> dict:
        out = {name: accuracy_of(ok) for name, ok in by_name.items()}
        if against is not None:
            out["difference"] = paired_difference(by_name["spm"], by_name["against"])
        if unseen is not None:
            out["unseen_prompts"] = {name: accuracy_of([v for v, u in zip(ok, unseen) if u])
                                     for name, ok in by_name.items()}
        return out

    result["clean"] = row(verdicts["clean"])
    for t_value in buckets:
        result["buckets"][str(t_value)] = row(verdicts[str(t_value)])
    return result


def plot_buckets(result: dict, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = [int(t) for t in result["buckets"]]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=120)
    curves = (("spm", "step-aware PM"), ("base", "base scorer"))
    if "against" in result:
        curves += (("against", f"against: {Path(result['against']).name}"),)
    for key, label in curves:
        acc = [result["buckets"][str(t)][key]["accuracy"] for t in ts]
        err = [result["buckets"][str(t)][key]["stderr"] for t in ts]
        ax.errorbar(ts, acc, yerr=err, marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("pairwise accuracy vs crowd")
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out_png)


def write_eval(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "spm_eval.json", json.dumps(result, indent=2))
    plot_buckets(result, out_dir / "spm_eval.png")


# ----------------------------------------------------------------------------------------------
# Per-step scores of one trajectory
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def score_trajectory(model, scorer: Scorer, prompt: str, seed: int = 0, num_steps: int = 20, cfg_scale: float = 5.0,
                     eta: float = 1.0, unet=None) -> dict:
    """Sample one trajectory and score every step's x̂0 at its timestep (a latent SPM: the step's x_t itself);
    returns scores and thumbnails."""
    from .. import diffusion

    traj = diffusion.sample(model, [prompt], num_steps=num_steps, cfg_scale=cfg_scale, eta=eta,
                            generator=torch.Generator().manual_seed(seed), unet=unet)
    x0 = torch.cat([s.x0_hat for s in traj.steps])
    ts = torch.tensor(traj.timesteps)
    if getattr(scorer, "reads_noisy_latents", False):
        scores = scorer.score_latents(torch.cat([s.x_t for s in traj.steps]), [prompt] * len(ts), ts)
    else:
        images = scorer.decode(x0) if scorer.decode_size or scorer.latent_decode else model.decode(x0)
        scores = scorer.score_images(images, [prompt] * len(ts), ts)
    final = model.decode(traj.latents)
    return {"prompt": prompt, "seed": seed, "steps": num_steps, "cfg_scale": cfg_scale, "eta": eta,
            "timesteps": ts.tolist(), "scores": scores.tolist(), "thumbnails": model.decode(x0).cpu(),
            "final": final.cpu()}


def write_score_outputs(result: dict, out_dir: Path) -> dict:
    """scores.json, scores.png (score vs step) and x0_strip.png (x̂0 thumbnails) in out_dir."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from PIL import Image

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in result.items() if k not in ("thumbnails", "final")}
    atomic_write_text(out_dir / "scores.json", json.dumps(meta, indent=2))

    fig, ax = plt.subplots(figsize=(5, 3), dpi=120)
    ax.plot(range(len(meta["scores"])), meta["scores"], marker="o")
    ax.set_xticks(range(len(meta["timesteps"])))
    ax.set_xticklabels(meta["timesteps"], rotation=90, fontsize=6)
    ax.set_xlabel("timestep of x̂0")
    ax.set_ylabel("preference score")
    ax.set_title(meta["prompt"][:60], fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "scores.png")
    plt.close(fig)

    strip = torch.cat(list(result["thumbnails"]), dim=-1)
    array = (strip.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(array).save(out_dir / "x0_strip.png")
    return meta
