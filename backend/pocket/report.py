"""How good is the pocket world? Prompt following and aesthetics of base samples, SPM accuracy, a grid.

    spo pocket build --stage report      # writes backend/pocket/report.json, pocket_grid.png, spm_eval.*

Prompt following is measured with the paper's evaluation sampler: DDIM 20 steps (η = 0), CFG 5, the alignment judge
on every (prompt, seed), separately for training and held-out prompt combinations, with n.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import torch

from ..config import atomic_write_text
from . import judges, world

logger = logging.getLogger(__name__)

POCKET_ROOT = Path(__file__).resolve().parent
GRID_PROMPTS = [
    "a red circle on a blue background",
    "a yellow star on a purple background",
    "a white square on a green background",
    "a blue triangle on a yellow background",
    "a green cross on a white background",
    "a purple circle on a yellow background",
    "a small red square at the left on a white background",
    "a large blue star on a green background",
    "a yellow circle at the top on a red background",
    "a white triangle in the center on a blue background",
    "a green star at the right on a purple background",
    "a red cross on a yellow background",
]


def _mean_se(values: list[float]) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    n = len(arr)
    return {
        "mean": float(arr.mean()),
        "stderr": float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan"),
        "n": n,
    }


@torch.no_grad()
def sample_uint8(model, prompts: list[str], seeds: list[int], num_steps=20, cfg_scale=5.0, eta=0.0, unet=None,
                 batch: int = 64) -> list[np.ndarray]:
    from .. import diffusion

    out = []
    for i in range(0, len(prompts), batch):
        ps, ss = prompts[i : i + batch], seeds[i : i + batch]
        latents = torch.cat(
            [diffusion.initial_latents(model, 1, generator=torch.Generator().manual_seed(s)) for s in ss]
        )
        traj = diffusion.sample(model, ps, num_steps=num_steps, cfg_scale=cfg_scale, eta=eta, latents=latents,
                                generator=torch.Generator().manual_seed(ss[0] + 1), unet=unet, record=False)
        out += list((model.decode(traj.latents).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8))
    return out


def prompt_following(model, seeds_per_prompt: int = 3) -> dict:
    """Alignment pass rates (all of shape, fg and bg right) on training and held-out prompts."""
    split = world.prompt_split()
    result = {}
    for name in ("train", "held_out"):
        prompts = [p for p in split.prompts(name) for _ in range(seeds_per_prompt)]
        seeds = [1000 + i for i in range(len(prompts))]
        images = sample_uint8(model, prompts, seeds)
        verdicts = judges.alignment_batch(images, prompts)
        aesthetic = judges.aesthetic_batch(images)
        truth = [world.render(world.parse_prompt(p), s).image for p, s in zip(prompts, seeds)]
        result[name] = {
            "n": len(prompts),
            "alignment_pass_rate": float(np.mean([v["all_ok"] for v in verdicts])),
            "shape_ok": float(np.mean([v["shape_ok"] for v in verdicts])),
            "fg_ok": float(np.mean([v["fg_ok"] for v in verdicts])),
            "bg_ok": float(np.mean([v["bg_ok"] for v in verdicts])),
            "aesthetic_samples": _mean_se(aesthetic),
            "aesthetic_ground_truth": _mean_se(judges.aesthetic_batch(truth)),
        }
        logger.info("%s prompts: alignment %.3f (n=%d), aesthetic %.3f vs ground truth %.3f", name,
                    result[name]["alignment_pass_rate"], len(prompts), result[name]["aesthetic_samples"]["mean"],
                    result[name]["aesthetic_ground_truth"]["mean"])
    return result


def sample_grid(model, out_png: Path, prompts: list[str] = GRID_PROMPTS, seeds: int = 4, scale: int = 2) -> None:
    """A grid: one row per prompt, `seeds` samples each, upscaled (nearest) for viewing."""
    from PIL import Image, ImageDraw

    images = sample_uint8(
        model, [p for p in prompts for _ in range(seeds)], [7 + i % seeds for i in range(len(prompts) * seeds)]
    )
    size = images[0].shape[0] * scale
    label_w = 330
    sheet = Image.new("RGB", (label_w + seeds * size, len(prompts) * size), "white")
    draw = ImageDraw.Draw(sheet)
    for r, prompt in enumerate(prompts):
        draw.text((6, r * size + size // 2 - 6), prompt, fill="black")
        for c in range(seeds):
            tile = Image.fromarray(images[r * seeds + c]).resize((size, size), Image.NEAREST)
            sheet.paste(tile, (label_w + c * size, r * size))
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(out_png)


def stage_report() -> dict:
    from ..models import load_model
    from ..preference.evaluate import eval_spm, write_eval
    from ..sources import POCKET_SCORER_DIR, POCKET_SPM_DIR
    from .preference_data import HELD_OUT_PAIRS, TRAIN_PAIRS

    model = load_model("pocket", device="cpu")
    report: dict = {"prompt_following": prompt_following(model)}
    sample_grid(model, POCKET_ROOT / "pocket_grid.png")
    if (POCKET_SPM_DIR / "spm.json").exists():
        spm_eval = eval_spm(POCKET_SPM_DIR, POCKET_SCORER_DIR, model, HELD_OUT_PAIRS, train_data=TRAIN_PAIRS)
        write_eval(spm_eval, POCKET_ROOT)
        report["spm_eval"] = spm_eval["buckets"]
    build_log = POCKET_ROOT / "build_log.json"
    if build_log.exists() and "data" in json.loads(build_log.read_text()):
        report["preference_data"] = json.loads(build_log.read_text())["data"]
    report["files_mb"] = {
        p.name: round(sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6, 2)
        for p in (POCKET_ROOT / "model", POCKET_ROOT / "scorer", POCKET_ROOT / "spm", TRAIN_PAIRS.parent) if p.exists()
    }
    atomic_write_text(POCKET_ROOT / "report.json", json.dumps(report, indent=2))
    return report
