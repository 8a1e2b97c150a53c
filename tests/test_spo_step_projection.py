"""`bench/spo_step_projection.py` adds up a round's parts by a count of UNet and scorer passes; those counts
must be the ones SPO's rollout really makes, for the pixel SPM (a UNet pass on all k candidates) and for the
latent SPM (a UNet pass on the continuing candidate only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from spo_studio.backend.models import load_model
from spo_studio.backend.train.spo import SPOConfig, rollout

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import spo_step_projection  # noqa: E402


class CountingScorer:
    def __init__(self, reads_noisy_latents: bool):
        self.reads_noisy_latents = reads_noisy_latents
        self.rows = 0

    def score_latents(self, latents, prompts, t=None):
        self.rows += latents.shape[0]
        return torch.randn(latents.shape[0])


@pytest.mark.parametrize("side", ["pixel", "latent"])
def test_projection_counts_the_passes_the_rollout_makes(tiny_dirs, side):
    model = load_model(tiny_dirs["sd15"], device="cpu")
    unet_rows = []
    hook = model.unet.register_forward_hook(lambda _m, args, _out: unet_rows.append(args[0].shape[0]))
    steps, divert, k = 7, 2, 3
    cfg = SPOConfig(pool_size=k, num_steps=steps, divert_start_step=divert, threshold=0.0)
    scorer = CountingScorer(side == "latent")
    try:
        pairs, _ = rollout(model, model.unet, scorer, ["a red circle"], cfg, torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    counts = spo_step_projection.pass_counts(steps, divert, k)[side]
    assert counts["unet_cfg"] == sum(unet_rows) // 2  # CFG: both halves in one call, 2 rows per image
    assert counts["unet_cfg"] == (steps if side == "latent" else divert + 1 + (steps - divert - 1) * k)
    assert counts[f"score_{side}"] == scorer.rows == (steps - divert) * k
    assert counts["train_pair"] == len(pairs) == steps - divert  # threshold 0: every pool gives a pair


def test_projection_adds_the_parts_by_those_counts():
    parts = {"unet_cfg": {"gflops": 10.0, "seconds": 1.0}, "score_pixel": {"gflops": 30.0, "seconds": 2.0},
             "score_official": {"gflops": 30.0, "seconds": 3.0}, "score_latent": {"gflops": 2.0, "seconds": 0.5},
             "train_pair": {"gflops": 40.0, "seconds": 4.0}}
    got = spo_step_projection.project(parts, steps=20, divert=4, k=4)
    # pixel: 65 UNet passes, 64 scores, 16 pairs; latent: 20 UNet passes, 64 scores, 16 pairs
    assert got["gflops"]["pixel"] == {"rollout": 65 * 10 + 64 * 30, "train": 16 * 40, "round": 2570 + 640}
    assert got["gflops"]["latent"] == {"rollout": 20 * 10 + 64 * 2, "train": 16 * 40, "round": 328 + 640}
    assert got["seconds"]["official"]["train"] == 2 * 16 * 4.0
    assert got["gflops"]["ratios"]["latent_vs_pixel_round"] == pytest.approx(3210 / 968)
