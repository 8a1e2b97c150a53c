"""The latent SPM: trained by `spo train-spm kind=latent`, it judges noisy latents with no VAE decode."""

from __future__ import annotations

import pytest
import torch
from spo_studio.backend.config import load_config
from spo_studio.backend.models import load_model
from spo_studio.backend.preference.data import write_pickapic
from spo_studio.backend.preference.evaluate import bucket_verdicts, eval_spm, load_pairs, paired_difference
from spo_studio.backend.preference.latent_spm import LatentPreferenceModel, LatentScorer
from spo_studio.backend.preference.scoring import Scorer
from spo_studio.backend.preference.train import SPMTrainConfig, train_spm
from spo_studio.backend.train.spo import SPOConfig, rollout
from test_spm import _pair_rows


def write_pairs(path):
    write_pickapic(path, _pair_rows(12))
    return path


@pytest.fixture(scope="module")
def tiny_lspm(tiny_dirs, tmp_path_factory):
    model = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    return LatentPreferenceModel.from_base(model, head_dim=16).save(tmp_path_factory.mktemp("lspm") / "lspm")


def _cfg(tiny_dirs, data, out, **over):
    values = {"kind": "latent", "base_model": str(tiny_dirs["sd15"]), "init": "base", "train_data": str(data),
              "output_dir": str(out), "lr": 1e-3, "warmup_steps": 1, "lr_schedule": "constant", "max_steps": 4,
              "batch_size": 2,
              "checkpoint_every": 2, "log_every": 1, "shuffle_buffer": 8}
    values.update(over)
    return load_config(SPMTrainConfig, None, [f"{k}={v}" for k, v in values.items()])


def test_resumed_latent_training_equals_uninterrupted(tiny_dirs, tmp_path):
    data = write_pairs(tmp_path / "pairs.parquet")
    full = LatentPreferenceModel.load(train_spm(_cfg(tiny_dirs, data, tmp_path / "full")))
    train_spm(_cfg(tiny_dirs, data, tmp_path / "cut", max_steps=2))
    cut = LatentPreferenceModel.load(train_spm(_cfg(tiny_dirs, data, tmp_path / "cut")))
    a, b = full.state_dict(), cut.state_dict()
    assert a.keys() == b.keys() and not any(k.startswith("unet.up_blocks") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    start = LatentPreferenceModel.from_base(load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")).state_dict()
    assert max((a[k] - start[k]).abs().max().item() for k in a if k in start and "head" not in k) > 0, "it trained"


def test_scores_never_decode_and_ignore_a_vae_swap(tiny_dirs, tiny_lspm):
    model = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    other = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    with torch.no_grad():
        for p in other.vae.parameters():
            p.add_(torch.randn_like(p))
    z = torch.randn(3, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square", "a photo of a cat"]
    a = Scorer.from_path(tiny_lspm, model).score_latents(z, prompts, 500)
    b = Scorer.from_path(tiny_lspm, other).score_latents(z, prompts, 500)
    assert torch.equal(a, b) and a.std() > 0

    def no_decode(*args, **kwargs):
        raise AssertionError("the latent SPM path decoded a latent")

    model.decode = no_decode
    model.vae.decode = no_decode
    cfg = load_config(SPOConfig, None, ["num_steps=6", "divert_start_step=2", "pool_size=3", "threshold=0"])
    pairs, stats = rollout(model, model.unet, Scorer.from_path(tiny_lspm, model), prompts[:2], cfg,
                           torch.Generator().manual_seed(1))
    assert len(pairs) == 2 * 4 and stats["pair_yield"] == 1.0


def test_an_sdxl_latent_spm_reads_pooled_embeds_and_time_ids(tiny_dirs, tmp_path):
    """SDXL: built from the SDXL UNet's encoder under both text encoders; its score depends on the pooled text
    embedding and the time ids (through the added embedding), it trains, saves and loads to the same scores."""
    import dataclasses

    sdxl = load_model(tiny_dirs["sdxl"], device="cpu", dtype="fp32")
    data = write_pairs(tmp_path / "pairs.parquet")
    path = train_spm(_cfg(tiny_dirs, data, tmp_path / "run", base_model=str(tiny_dirs["sdxl"]), max_steps=2))
    lspm = LatentPreferenceModel.load(path)
    assert lspm.family == "sdxl" and len(lspm.text.text_encoders) == 2
    scorer = Scorer.from_path(path, sdxl)
    z = torch.randn(2, sdxl.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    prompts = ["a red circle", "a blue square"]
    scores = scorer.score_latents(z, prompts, 500, family="sdxl")
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    cond = lspm.conditioning(prompts)
    assert cond.pooled is not None and cond.time_ids is not None
    t = torch.full((2,), 500)
    with torch.no_grad():
        same = lspm(z, cond, t)
        no_pooled = lspm(z, dataclasses.replace(cond, pooled=torch.zeros_like(cond.pooled)), t)
        other_size = lspm(z, dataclasses.replace(cond, time_ids=cond.time_ids * 2), t)
    assert torch.allclose(same, scores, atol=1e-5)
    assert (same - no_pooled).abs().max() > 1e-6 and (same - other_size).abs().max() > 1e-6
    with pytest.raises(ValueError, match="reads SDXL latents, but the latents are SD1.5's"):
        scorer.score_latents(z, prompts, 0, family="sd15")


def test_wrong_family_latents_are_a_clear_error(tiny_dirs, tiny_lspm):
    sdxl = load_model(tiny_dirs["sdxl"], device="cpu", dtype="fp32")
    with pytest.raises(ValueError, match="reads SD1.5 latents, but the model is SDXL"):
        Scorer.from_path(tiny_lspm, sdxl)
    scorer = Scorer.from_path(tiny_lspm)
    with pytest.raises(ValueError, match="reads sd15 latents with 4 channels"):
        scorer.score_latents(torch.randn(1, 16, 8, 8), ["a red circle"], 0)
    with pytest.raises(ValueError, match="reads SD1.5 latents, but the latents are SDXL's"):
        scorer.score_latents(torch.randn(1, 4, 8, 8), ["a red circle"], 0, family="sdxl")


def test_eval_hands_the_latent_spm_the_same_noisy_latents(tiny_dirs, tiny_lspm, tmp_path):
    """bucket_verdicts scores a latent SPM on z_t and leaves the pixel scorers' numbers as they were."""
    model = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    data = write_pairs(tmp_path / "pairs.parquet")
    pairs = load_pairs(data)
    assert pairs
    latent = Scorer.from_path(tiny_lspm, model)
    both = bucket_verdicts({"lspm": (latent, True)}, model, pairs, buckets=(0, 500), batch_size=4)
    again = bucket_verdicts({"lspm": (latent, True)}, model, pairs, buckets=(0, 500), batch_size=4)
    assert both == again and set(both) == {"clean", "0", "500"} and len(both["500"]["lspm"]) == len(pairs)
    assert isinstance(latent, LatentScorer)


def test_paired_difference_by_hand():
    """A − B per pair: d = (0, 1, −1, 1), mean 0.25, SE = sd(d)/√n = √((2.75/3)/4)."""
    d = paired_difference([True, True, False, True], [True, False, True, False])
    assert d["difference"] == pytest.approx(0.25) and d["stderr"] == pytest.approx(((2.75 / 3) / 4) ** 0.5)
    assert (d["n"], d["a_only"], d["b_only"]) == (4, 2, 1)
    with pytest.raises(ValueError, match="not the same pairs"):
        paired_difference([True], [True, False])


def test_eval_against_another_spm_pairs_the_verdicts(tiny_dirs, tiny_lspm, tiny_spm, tmp_path):
    """`spo eval-spm --against`: a latent SPM against a pixel one on the same pairs; the against column is what
    the other SPM scores as the main one, and the difference is paired per pair."""
    model = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    data = write_pairs(tmp_path / "pairs.parquet")
    both = eval_spm(tiny_lspm, tiny_spm, model, data, buckets=(0, 500), batch_size=4, against=tiny_spm)
    alone = eval_spm(tiny_spm, tiny_spm, model, data, buckets=(0, 500), batch_size=4)
    verdicts = bucket_verdicts({"l": (Scorer.from_path(tiny_lspm, model), True),
                                "p": (Scorer.from_path(tiny_spm, model), True)}, model, load_pairs(data),
                               buckets=(0, 500), batch_size=4)
    for key, row in [("clean", both["clean"]), ("0", both["buckets"]["0"]), ("500", both["buckets"]["500"])]:
        same = alone["clean"] if key == "clean" else alone["buckets"][key]
        assert row["against"] == same["spm"]
        assert row["difference"] == paired_difference(verdicts[key]["l"], verdicts[key]["p"])
        assert row["difference"]["difference"] == pytest.approx(row["spm"]["accuracy"] - row["against"]["accuracy"])
    assert both["against"] == str(tiny_spm)


def test_the_shipped_pocket_latent_spm(tmp_path):
    """`pocket-latent` names the shipped pocket latent SPM, for the trainer, the scorers and the job store."""
    from spo_studio.backend.jobs import JobStore

    model = load_model("pocket", device="cpu", dtype="fp32")
    scorer = Scorer.from_path("pocket-latent", model)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    scores = scorer.score_latents(z, ["a red circle on a blue background"] * 2, 500)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    job = JobStore(tmp_path / "runs", devices=["cpu"]).submit("spo", {"spm": "pocket-latent"}, start=False)
    assert "spm: pocket-latent" in (tmp_path / "runs" / job.run_dir.split("/")[-1] / "job.yaml").read_text()
