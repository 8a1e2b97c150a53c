"""Diffusion-DPO and Diffusion-RPO: losses against the official formula and by hand, RPO → DPO for
one-hot weights, and both methods end to end on the shared loop (with exact resume)."""

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from spo_studio.backend.config import load_config
from spo_studio.backend.runs import read_jsonl
from spo_studio.backend.train.dpo import DPOConfig, DPOMethod, dpo_loss
from spo_studio.backend.train.loop import train
from spo_studio.backend.train.rpo import RPOConfig, RPOMethod, rpo_loss, similarity_weights


def official_dpo(model_losses_w, model_losses_l, ref_losses_w, ref_losses_l, beta):
    """The official train.py computation, transcribed: model_diff, ref_diff, inside, −logsigmoid, mean."""
    model_diff = model_losses_w - model_losses_l
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -1 * beta * 0.5 * (model_diff - ref_diff)
    return -1 * F.logsigmoid(inside_term).mean(), (inside_term > 0).float().mean()


def test_dpo_loss_by_hand():
    # Δθ = 0.10 − 0.12 = −0.02, Δref = 0 → inside = −β/2·(−0.02) = 1.0 with β = 100
    loss, stats = dpo_loss(
        torch.tensor([0.10]), torch.tensor([0.12]), torch.tensor([0.11]), torch.tensor([0.11]), 100.0
    )
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1.0)), abs=1e-7)  # 0.3132617
    assert stats["implicit_acc"] == 1.0


def test_dpo_loss_matches_the_official_formula():
    g = torch.Generator().manual_seed(0)
    errs = [torch.rand(16, generator=g) * 0.2 for _ in range(4)]
    ours, stats = dpo_loss(*errs, beta=5000.0)
    theirs, acc = official_dpo(*errs, beta=5000.0)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert stats["implicit_acc"] == pytest.approx(acc.item())


def test_dpo_padding_weights_drop_pairs():
    g = torch.Generator().manual_seed(1)
    errs = [torch.rand(6, generator=g) * 0.1 for _ in range(4)]
    weight = torch.tensor([1.0, 1, 1, 1, 0, 0])
    masked, _ = dpo_loss(*errs, beta=500.0, weight=weight)
    first4, _ = dpo_loss(*(e[:4] for e in errs), beta=500.0)
    assert masked.item() == pytest.approx(first4.item(), rel=1e-6)


def test_rpo_reduces_to_dpo_with_one_hot_weights():
    g = torch.Generator().manual_seed(2)
    errs = [torch.rand(8, generator=g) * 0.2 for _ in range(4)]
    rpo, _ = rpo_loss(*errs, beta=5000.0, omega=torch.eye(8))
    dpo, _ = dpo_loss(*errs, beta=5000.0)
    assert rpo.item() == pytest.approx(dpo.item(), rel=1e-6)


def test_rpo_by_hand_two_pairs():
    # Δw = θ − ref of winners, Δl of losers; z_ij = −β/2·(Δw_i − Δl_j) with β = 2
    err_w, ref_w = torch.tensor([0.3, 0.1]), torch.tensor([0.2, 0.2])  # Δw = [0.1, −0.1]
    err_l, ref_l = torch.tensor([0.5, 0.2]), torch.tensor([0.2, 0.4])  # Δl = [0.3, −0.2]
    omega = torch.tensor([[0.75, 0.25], [0.5, 0.5]])
    z = [[-(0.1 - 0.3), -(0.1 + 0.2)], [-(-0.1 - 0.3), -(-0.1 + 0.2)]]
    nls = lambda x: math.log(1 + math.exp(-x))  # noqa: E731  (−log σ)
    expected = ((0.75 * nls(z[0][0]) + 0.25 * nls(z[0][1])) + (0.5 * nls(z[1][0]) + 0.5 * nls(z[1][1]))) / 2
    loss, _ = rpo_loss(err_w, err_l, ref_w, ref_l, 2.0, omega)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_similarity_weights_by_hand():
    emb = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    w = similarity_weights(emb, tau=0.5)
    # row 0: cos = [1, 0, 1] → logits [0, −2, 0] → softmax
    e = math.exp(-2.0)
    assert w[0].tolist() == pytest.approx([1 / (2 + e), e / (2 + e), 1 / (2 + e)], rel=1e-6)
    masked = similarity_weights(emb, tau=0.5, valid=torch.tensor([1.0, 1.0, 0.0]))
    assert masked[0].tolist() == pytest.approx([1 / (1 + e), e / (1 + e), 0.0], rel=1e-6)


# ------------------------------------------------------------------------------------------------
# End to end on a tiny SD1.5-shaped model with a tiny Pick-a-Pic parquet
# ------------------------------------------------------------------------------------------------


def _jpeg(rgb, noisy: bool, seed: int) -> bytes:
    from PIL import Image

    img = np.zeros((40, 48, 3), np.uint8) + np.array(rgb, np.uint8)
    if noisy:
        img = np.clip(img + np.random.default_rng(seed).integers(-60, 60, img.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    from spo_studio.backend.preference.data import write_pickapic

    rows = []
    captions = ["a red circle", "a blue square", "a green circle", "a photo of a cat"]
    colours = [(200, 30, 30), (30, 30, 200), (30, 200, 30), (120, 120, 120)]
    for i in range(26):
        c = i % 4
        clean_first = i % 3 != 0
        label0 = 0.5 if i % 13 == 5 else (1.0 if clean_first else 0.0)  # two ties, dropped
        rows.append({"caption": captions[c], "jpg_0": _jpeg(colours[c], not clean_first, i),
                     "jpg_1": _jpeg(colours[c], clean_first, i + 100), "label_0": label0, "label_1": 1 - label0})
    path = tmp_path_factory.mktemp("pairs") / "pairs.parquet"
    write_pickapic(path, rows)
    return path


def _cfg(cls, tiny_dirs, data, out, **over):
    base = {"base_model": str(tiny_dirs["sd15"]), "train_data": str(data), "output_dir": str(out),
            "pairs_per_round": 10, "train_batch_size": 4, "grad_accum": 1, "epochs": 2, "lr": 1e-3,
            "lr_warmup_steps": 2, "beta": 500.0, "max_steps": 0, "checkpoint_every": 100,
            "shuffle_buffer": 8, "sample_prompts": ["a red circle"]}
    base.update(over)
    return load_config(cls, None, [f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in base.items()])


def _lora(run, name):
    from safetensors.torch import load_file

    return load_file(run / "lora" / f"{name}_lora_diffusers.safetensors")


def test_dpo_run_and_exact_resume(tiny_dirs, pairs_file, tmp_path):
    full = train(_cfg(DPOConfig, tiny_dirs, pairs_file, tmp_path / "full"), DPOMethod)
    # 24 non-tie pairs, 10 per round → 3 rounds per epoch (10, 10, 4 pairs → 3 + 3 + 1 micro-steps)
    assert full["status"] == "finished" and full["step"] == 14
    metrics = read_jsonl(tmp_path / "full" / "metrics.jsonl")
    assert {"loss", "implicit_acc", "mse_w", "mse_l", "lr", "grad_norm"} <= set(metrics[-1])
    assert metrics[0]["lr"] == pytest.approx(0.5e-3) and metrics[1]["lr"] == pytest.approx(1e-3)  # warm-up
    assert (tmp_path / "full" / "samples" / "epoch-002.png").exists()

    cut = train(_cfg(DPOConfig, tiny_dirs, pairs_file, tmp_path / "cut", max_steps=5), DPOMethod)
    assert cut["step"] == 5  # mid-round (round 1 of epoch 0)
    rest = train(_cfg(DPOConfig, tiny_dirs, pairs_file, tmp_path / "cut"), DPOMethod)
    assert rest["step"] == 14
    a, b = _lora(tmp_path / "full", "dpo"), _lora(tmp_path / "cut", "dpo")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6


def test_rpo_run(tiny_dirs, tiny_spm, pairs_file, tmp_path):
    result = train(_cfg(RPOConfig, tiny_dirs, pairs_file, tmp_path / "rpo", embedding_model=str(tiny_spm),
                        epochs=1), RPOMethod)
    assert result["status"] == "finished" and result["step"] == 7
    metrics = read_jsonl(tmp_path / "rpo" / "metrics.jsonl")
    assert all(0 < m["omega_diag"] <= 1 for m in metrics if "omega_diag" in m)
    assert (tmp_path / "rpo" / "lora" / "rpo_lora_webui.safetensors").exists()


def test_bad_training_data_is_named(tiny_dirs, tmp_path):
    bad = tmp_path / "notes.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ValueError, match="notes.parquet"):
        train(_cfg(DPOConfig, tiny_dirs, bad, tmp_path / "bad"), DPOMethod)
