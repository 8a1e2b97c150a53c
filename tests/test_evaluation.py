"""`spo eval`: base vs LoRA on a prompt set, paired differences, scorer metrics from local weights,
the LAION aesthetic head, the grid, and clear errors."""

import json

import numpy as np
import pytest
import torch
from spo_studio.backend.evaluation import (
    EvalSettings,
    LaionAestheticMLP,
    evaluate,
    format_table,
    laion_aesthetic_metric,
    mean_se,
)


@pytest.fixture(scope="module")
def tiny_lora(tiny_dirs, tmp_path_factory):
    from spo_studio.backend import lora
    from spo_studio.backend.models import load_model

    model = load_model(str(tiny_dirs["sd15"]), device="cpu")
    lora.attach_lora(model.unet, rank=2)
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    path = tmp_path_factory.mktemp("lora") / "style.safetensors"
    lora.save_lora(lora.extract_lora(model.unet), path, format="webui")
    return path


def test_mean_se_by_hand():
    r = mean_se([1.0, 2.0, 4.0])
    # mean 7/3; sample std = sqrt(((−4/3)² + (−1/3)² + (5/3)²)/2) = sqrt(7/3)
    assert r["mean"] == pytest.approx(7 / 3) and r["stderr"] == pytest.approx((7 / 3) ** 0.5 / 3 ** 0.5)
    assert r["n"] == 3


def test_eval_base_vs_lora_with_scorer_metrics(tiny_dirs, tiny_spm, tiny_lora, tmp_path):
    from spo_studio.backend.models import load_model

    model = load_model(str(tiny_dirs["sd15"]), device="cpu")
    prompts = ["a red circle", "a photo of a cat", "a blue square"]
    report = evaluate(model, {"style": tiny_lora}, prompts, EvalSettings(num_steps=4, seeds=[0, 1]), tmp_path,
                      {"pickscore": tiny_spm, "clip_score": tiny_spm}, prompts_source="inline")
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["metrics"].keys() == {"base", "style"}
    assert saved["metrics"]["base"]["pickscore"]["n"] == 6 and saved["seeds"] == [0, 1]
    assert saved["sampler"] == {"name": "ddim", "num_steps": 4, "eta": 0.0, "cfg_scale": 5.0}
    for m in ("pickscore", "clip_score"):  # paired difference = difference of means
        diff = saved["metrics"]["style"][m]["mean"] - saved["metrics"]["base"][m]["mean"]
        assert saved["vs_base"]["style"][m]["mean"] == pytest.approx(diff, abs=1e-9)
    assert saved["vs_base"]["style"]["pickscore"]["mean"] != 0  # the LoRA changes the images
    assert (tmp_path / "grid.png").exists()
    assert "style−base" in format_table(report)


def test_eval_is_deterministic_for_the_base(tiny_dirs, tiny_spm, tmp_path):
    from spo_studio.backend.models import load_model

    model = load_model(str(tiny_dirs["sd15"]), device="cpu")
    runs = [evaluate(model, {}, ["a red circle"], EvalSettings(num_steps=3, seeds=[5]), tmp_path / str(i),
                     {"pickscore": tiny_spm})["metrics"]["base"]["pickscore"]["mean"] for i in range(2)]
    assert runs[0] == runs[1]


def test_laion_aesthetic_head_matches_a_hand_forward(tiny_spm, tmp_path):
    torch.manual_seed(0)
    mlp = LaionAestheticMLP(64)
    path = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(mlp.state_dict(), path)
    score = laion_aesthetic_metric(path, tiny_spm, torch.device("cpu"))
    images = torch.rand(2, 3, 16, 16)
    from spo_studio.backend.preference.scoring import Scorer

    scorer = Scorer.from_path(tiny_spm)
    emb = scorer.spm.image_features(scorer.spm.preprocess(images), None)
    emb = emb / emb.norm(dim=-1, keepdim=True)
    h = emb
    for layer in (mlp.layers[0], mlp.layers[2], mlp.layers[4], mlp.layers[6], mlp.layers[7]):
        h = layer(h)  # the head has no activations between its linear layers
    assert np.allclose(score(images, ["x", "y"]), h.squeeze(-1).tolist(), atol=1e-5)


def test_eval_errors(tiny_dirs, tmp_path):
    from spo_studio.backend.models import load_model

    model = load_model(str(tiny_dirs["sd15"]), device="cpu")
    with pytest.raises(ValueError, match="no metric"):
        evaluate(model, {}, ["a photo of a cat"], EvalSettings(num_steps=2, seeds=[0]), tmp_path)
    bad = tmp_path / "aes.pth"
    bad.write_text("nope")
    with pytest.raises(ValueError, match="aes.pth"):
        laion_aesthetic_metric(bad, tmp_path, torch.device("cpu"))
    from spo_studio.backend.cli import main

    assert main(["eval", "--lora", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "o")]) == 2


def test_demo_verdict_by_hand():
    from spo_studio.backend.demo import verdict

    report = {"vs_base": {"spo": {"aesthetic": {"mean": 0.06, "stderr": 0.015}, "alignment": {"mean": -0.01}},
                          "dpo": {"aesthetic": {"mean": 0.02, "stderr": 0.01}, "alignment": {"mean": 0.0}}}}
    v = verdict(report)
    assert v["spo_aesthetic_gain_in_se"] == pytest.approx(4.0) and v["spo_minus_dpo_aesthetic"] == pytest.approx(0.04)
    assert v["passes"]
    report["vs_base"]["spo"]["alignment"]["mean"] = -0.03  # alignment dropped more than 0.02
    assert not verdict(report)["passes"]
    report["vs_base"]["spo"]["alignment"]["mean"] = 0.0
    report["vs_base"]["spo"]["aesthetic"]["mean"] = 0.04  # 2.7 standard errors only
    assert not verdict(report)["passes"]


@pytest.mark.slow
def test_demo_end_to_end_on_the_pocket_model_with_overrides(tmp_path, capsys):
    """`spo demo` with a seconds-long budget: both methods train, the table and report.json are written."""
    from spo_studio.backend.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--minutes", "0.02", "--seeds", "1",
                 "--spo", "prompts_per_round=2", "train_batch_size=2", "checkpoint_every=1000", "threshold=0",
                 "--dpo", "pairs_per_round=8", "train_batch_size=4", "checkpoint_every=1000"]) == 0
    printed = capsys.readouterr().out
    assert "spo−base" in printed and "dpo−base" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["metrics"]) == {"base", "dpo", "spo"} and report["metrics"]["base"]["aesthetic"]["n"] == 22
    assert report["demo"]["steps"]["spo"] >= 1 and report["demo"]["steps"]["dpo"] >= 1
    assert set(report["demo"]["verdict"]) >= {"passes", "spo_aesthetic_gain_in_se"}
    for method in ("spo", "dpo"):
        config = (out / method / "config.yaml").read_text()
        assert "train_batch_size: 2" in config if method == "spo" else "train_batch_size: 4" in config
        assert (out / method / "lora" / f"{method}_lora_webui.safetensors").exists()
    assert (out / "grid.png").exists()
    assert main(["demo", "--out", str(out), "--minutes", "0.02"]) != 0  # never overwrites silently
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "report.json").exists()
