"""Generic preference data for the pocket world: Pick-a-Pic-schema pairs labelled by a simulated crowd.

Like Pick-a-Pic, the pairs are two samples of the *model itself* for the same prompt, and the crowd's
vote blends several things, of which aesthetics is only one:

    u(x) = 0.45·A(x, prompt) + 0.35·Q(x) + 0.20·L(x)                 the crowd's utility
    P(x⁰ ≻ x¹) = σ((u⁰ − u¹) / 0.05)                                  Bradley–Terry with noise
    tie (0.5/0.5) when |u⁰ − u¹| < 0.02, else a seeded Bernoulli draw

A = the alignment judge's score (fraction of shape / foreground / background right), Q = the
aesthetic judge (`judges.aesthetic`), L = *layout taste*: the crowd likes the object near the
centre and large, L = ½·(1 − d/d_max) + ½·min(1, area/0.12) (d = distance of the object's centroid
to the image centre). Labels are therefore noisy, partly about prompt following and partly about
layout — a generic signal, from which SPO has to extract the aesthetic part, as on Pick-a-Pic.

Images are the pocket model's DDIM samples (20 steps, η = 1, CFG 5: SPO's rollout settings) for
training-split prompts (`world.sample_attributes`, with random layout words); each prompt has
`per_prompt` samples and every pair of them is a row. The held-out file uses other prompts and seeds.
Images repeat across rows; parquet's dictionary encoding stores each once. The training file is made of
chunks (`train_split_seeds`), each a self-contained draw of prompts, seeds and votes.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ..sources import POCKET_DATA_DIR, POCKET_HELD_OUT_PAIRS, POCKET_TRAIN_PAIRS
from . import judges, world

logger = logging.getLogger(__name__)

DATA_DIR = POCKET_DATA_DIR
TRAIN_PAIRS = POCKET_TRAIN_PAIRS
HELD_OUT_PAIRS = POCKET_HELD_OUT_PAIRS

CROWD_WEIGHTS = {"alignment": 0.45, "aesthetic": 0.35, "layout": 0.20}
CROWD_TEMPERATURE = 0.05
CROWD_TIE_MARGIN = 0.02
HELD_OUT_SPLIT_SEED = 2


@dataclass
class PreferenceDataConfig:
    train_prompts: int = 400  # per chunk
    # One chunk of `train_prompts` prompts per seed. Two chunks (1, 3: 6,400 images) were tried and not shipped:
    # encoder, scorer and SPM rebuilt on them scored no better on the held-out pairs (README, "What else was tried").
    train_split_seeds: tuple[int, ...] = (1,)
    held_out_prompts: int = 60
    per_prompt: int = 8
    num_steps: int = 20
    cfg_scale: float = 5.0
    eta: float = 1.0
    batch: int = 64
    seed: int = 0


def layout_taste(image: np.ndarray) -> float:
    """The crowd's layout taste L in [0, 1]: centred and large objects are liked (0 without an object)."""
    a = judges.analyse(image, classify_shape=False)
    if not a.has_object:
        return 0.0
    h, w = a.mask.shape
    ys, xs = np.nonzero(a.mask)
    d = math.hypot(xs.mean() - (w - 1) / 2, ys.mean() - (h - 1) / 2)
    d_max = math.hypot(w / 2, h / 2)
    area = a.mask.mean()
    return 0.5 * (1 - d / d_max) + 0.5 * min(1.0, area / 0.12)


def crowd_utility(image: np.ndarray, prompt: str) -> dict[str, float]:
    terms = {
        "alignment": float(judges.alignment(image, prompt)["score"]),
        "aesthetic": float(judges.aesthetic(image)),
        "layout": layout_taste(image),
    }
    terms["utility"] = sum(CROWD_WEIGHTS[k] * terms[k] for k in CROWD_WEIGHTS)
    return terms


def crowd_vote(u0: float, u1: float, rng: np.random.Generator) -> tuple[float, float]:
    """(label_0, label_1): a tie when the crowd cannot tell, else a noisy Bradley–Terry vote."""
    if abs(u0 - u1) < CROWD_TIE_MARGIN:
        return 0.5, 0.5
    p0 = 1.0 / (1.0 + math.exp(-(u0 - u1) / CROWD_TEMPERATURE))
    return (1.0, 0.0) if rng.uniform() < p0 else (0.0, 1.0)


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


@torch.no_grad()
def sample_images(model, prompts: list[str], seeds: list[int], cfg: PreferenceDataConfig) -> list[np.ndarray]:
    """Pocket-model samples (uint8 HxWx3), one per (prompt, seed), batched."""
    from .. import diffusion

    out: list[np.ndarray] = []
    for i in range(0, len(prompts), cfg.batch):
        ps, ss = prompts[i : i + cfg.batch], seeds[i : i + cfg.batch]
        latents = torch.cat(
            [diffusion.initial_latents(model, 1, generator=torch.Generator().manual_seed(s)) for s in ss]
        )
        traj = diffusion.sample(model, ps, num_steps=cfg.num_steps, cfg_scale=cfg.cfg_scale, eta=cfg.eta,
                                generator=torch.Generator().manual_seed(ss[0] + 17), latents=latents, record=False)
        images = model.decode(traj.latents)
        out += list((images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
        logger.info("sampled %d/%d images", len(out), len(prompts))
    return out


def build_pairs(model, n_prompts: int, split_seeds: tuple[int, ...], cfg: PreferenceDataConfig
                ) -> tuple[list[dict], dict]:
    """Rows of one file and a summary (crowd/aesthetic agreement, tie rate, utility terms).

    The file is made of chunks of `n_prompts` prompts, one per split seed; each chunk draws its prompts,
    sampling seeds and votes from its own generators, so adding a chunk leaves the others' rows unchanged.
    """
    rows, all_terms, agree, decided, ties = [], [], 0, 0, 0
    for split_seed in split_seeds:
        rng = np.random.default_rng([cfg.seed, split_seed])
        prompts = [world.sample_attributes(rng, "train").prompt() for _ in range(n_prompts)]
        flat_prompts = [p for p in prompts for _ in range(cfg.per_prompt)]
        seeds = [int(s) for s in rng.integers(0, 2**31 - 1, len(flat_prompts))]
        images = sample_images(model, flat_prompts, seeds, cfg)
        terms = [crowd_utility(im, p) for im, p in zip(images, flat_prompts)]
        all_terms += terms
        blobs = [png_bytes(im) for im in images]
        vote_rng = np.random.default_rng([cfg.seed, split_seed, 7])
        for j, prompt in enumerate(prompts):
            base = j * cfg.per_prompt
            for a, b in itertools.combinations(range(base, base + cfg.per_prompt), 2):
                l0, l1 = crowd_vote(terms[a]["utility"], terms[b]["utility"], vote_rng)
                if l0 == l1:
                    ties += 1
                elif terms[a]["aesthetic"] != terms[b]["aesthetic"]:
                    decided += 1
                    agree += (l0 > l1) == (terms[a]["aesthetic"] > terms[b]["aesthetic"])
                rows.append({
                    "caption": prompt, "jpg_0": blobs[a], "jpg_1": blobs[b], "label_0": l0, "label_1": l1,
                    "image_0_uid": f"{split_seed}-{a}", "image_1_uid": f"{split_seed}-{b}",
                    "model_0": "pocket", "model_1": "pocket", "has_label": True, "are_different": True,
                    "num_example_per_prompt": cfg.per_prompt * (cfg.per_prompt - 1) // 2,
                })
    summary = {
        "pairs": len(rows), "prompts": n_prompts * len(split_seeds), "images": len(all_terms),
        "tie_rate": ties / len(rows),
        "crowd_agrees_with_aesthetic_judge": agree / max(1, decided),
        "mean_terms": {k: float(np.mean([t[k] for t in all_terms]))
                       for k in ("alignment", "aesthetic", "layout", "utility")},
    }
    return rows, summary


def build_preference_data(model, cfg: PreferenceDataConfig | None = None) -> dict:
    from ..preference.data import write_pickapic

    cfg = cfg or PreferenceDataConfig()
    rows, train_summary = build_pairs(model, cfg.train_prompts, cfg.train_split_seeds, cfg)
    write_pickapic(TRAIN_PAIRS, rows)
    rows, held_summary = build_pairs(model, cfg.held_out_prompts, (HELD_OUT_SPLIT_SEED,), cfg)
    write_pickapic(HELD_OUT_PAIRS, rows)
    return {"train": train_summary, "held_out": held_summary, "weights": CROWD_WEIGHTS,
            "temperature": CROWD_TEMPERATURE, "tie_margin": CROWD_TIE_MARGIN}
