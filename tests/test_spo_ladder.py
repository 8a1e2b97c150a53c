"""The SPO learning ladder, rung (a), and the step scorers it stands on.

Rung (a): with a trivially learnable reward as the step scorer (`spm: reward:brightness`, the mean
pixel value of each candidate's decoded x̂0), SPO must move the brightness of the final images
(DDIM η = 0 on held-aside seeds) in the direction of the reward's sign, for both signs, by at least
three standard errors of the paired difference. Both signs are required so that a drift the LoRA
would make anyway cannot pass. The heavier rungs are `bench/spo_ladder.py`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from spo_studio.backend import diffusion, lora
from spo_studio.backend.cli import main
from spo_studio.backend.config import load_config
from spo_studio.backend.evaluation import EvalSettings, sample_images
from spo_studio.backend.models import load_model
from spo_studio.backend.rewards import RewardStepScorer, check_reward_paths, parse_reward
from spo_studio.backend.train.spo import SPOConfig, train_spo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import spo_conditions  # noqa: E402
import spo_ladder  # noqa: E402

PROMPTS = ["a red circle", "a blue square", "a green circle", "a photo of a cat"]


def _run(tiny_dirs, prompts_file, out, spm, **over):
    values = {"base_model": str(tiny_dirs["sd15"]), "spm": spm, "reward_mode": "x0", "prompts": str(prompts_file),
              "output_dir": str(out), "num_steps": 8, "divert_start_step": 2, "pool_size": 4, "threshold": 0.0,
              "prompts_per_round": 4, "train_batch_size": 8, "max_steps": 10, "epochs": 1000, "lr": 1e-2,
              "checkpoint_every": 1000, "sample_prompts": "a red circle"}
    values.update(over)
    result = train_spo(load_config(SPOConfig, None, [f"{k}={v}" for k, v in values.items()]))
    assert result["status"] == "finished" and result["step"] == values["max_steps"]
    return out / "lora" / "spo_lora_diffusers.safetensors"


def _brightness_change(tiny_dirs, lora_file) -> tuple[float, float]:
    """Paired difference of final-image brightness, LoRA − base, over 32 (prompt, seed) pairs: (mean, SE)."""
    model = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    prompts = PROMPTS * 8
    seeds = [1000 + i for i in range(len(prompts))]  # seeds no training rollout used
    settings = EvalSettings(num_steps=8, cfg_scale=5.0, eta=0.0, batch=32)
    base = sample_images(model, prompts, seeds, settings).mean(dim=(1, 2, 3))
    lora.load_lora(model, lora_file)
    diff = (sample_images(model, prompts, seeds, settings).mean(dim=(1, 2, 3)) - base).double()
    return diff.mean().item(), diff.std().item() / math.sqrt(len(diff))


@pytest.mark.parametrize("sign", [1, -1])
def test_rung_a_a_learnable_reward_moves_with_its_sign(tiny_dirs, prompts_file, tmp_path, sign):
    spm = "reward:brightness" if sign > 0 else "reward:-brightness"
    mean, se = _brightness_change(tiny_dirs, _run(tiny_dirs, prompts_file, tmp_path / "run", spm))
    z = mean / se
    assert sign * z >= 3, f"{spm}: brightness change {mean:+.2e} ± {se:.1e} (z = {z:+.1f})"


def test_complete_mode_scores_the_deterministic_continuation(tiny_dirs):
    """Φ(x) of mode `complete` is DDIM η = 0 over the rest of the grid: from x_T it is the plain η = 0 sample."""
    model = load_model(tiny_dirs["sd15"], device="cpu", dtype="fp32")
    grid = diffusion.timesteps(model.scheduler, 6)
    prev = [diffusion.prev_timestep(model.scheduler, t, 6) for t in grid]
    x = diffusion.initial_latents(model, 2, generator=torch.Generator().manual_seed(3))
    cond, negative = model.encode_prompts(PROMPTS[:2]), model.encode_negative(2)
    with torch.no_grad():
        pred = diffusion.predict(model, x, grid[0], prev[0], cond, negative, 5.0)
        finished = diffusion.complete(model, pred, cond, negative, 5.0, grid, prev, 0)
        reference = diffusion.sample(model, PROMPTS[:2], num_steps=6, cfg_scale=5.0, eta=0.0, latents=x,
                                     record=False).latents
    assert (finished - reference).abs().max().item() < 1e-5
    scorer = RewardStepScorer("reward:-brightness", model, mode="complete")
    images = model.decode(finished)
    assert scorer.needs_completion
    assert torch.allclose(scorer.score_latents(finished, PROMPTS[:2]), -images.float().mean(dim=(1, 2, 3)))


def test_reward_specs_are_checked_before_anything_runs(tiny_dirs, prompts_file, tmp_path, capsys):
    assert parse_reward("reward:-pocket-aesthetic").sign == -1
    assert str(parse_reward("reward:laion-aesthetic=/a.pth,/clip")) == "reward:laion-aesthetic=/a.pth,/clip"
    for spec, message in (("reward:sharpness", "unknown reward 'sharpness'"),
                          ("reward:pickscore", "takes one path"),
                          ("reward:brightness=/x", "takes no path")):
        with pytest.raises(ValueError, match=message):
            parse_reward(spec)
    with pytest.raises(ValueError, match="nowhere: no such file or folder"):
        check_reward_paths("reward:pickscore=/nowhere")
    base = ["train", "--method", "spo", f"base_model={tiny_dirs['sd15']}", f"prompts={prompts_file}",
            f"output_dir={tmp_path / 'run'}"]
    assert main([*base, "spm=reward:sharpness"]) == 2
    assert "unknown reward 'sharpness'" in capsys.readouterr().err
    assert main([*base, "spm=reward:brightness", "reward_mode=final"]) == 2
    assert "reward_mode must be one of" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_the_job_store_resolves_reward_paths(tmp_path, tiny_spm):
    from spo_studio.backend.jobs import JobError, JobStore

    store = JobStore(tmp_path / "runs", devices=["cpu"])
    with pytest.raises(JobError, match="nowhere: no such file or folder"):
        store.submit("spo", {"spm": "reward:pickscore=/nowhere"}, start=False)
    job = store.submit("spo", {"spm": f"reward:-pickscore={tiny_spm}"}, start=False)
    config = (tmp_path / "runs" / job.run_dir.split("/")[-1] / "job.yaml").read_text()
    assert f"reward:-pickscore={tiny_spm.resolve()}" in config


def test_the_ladder_resumes_a_run_only_with_its_own_settings(tmp_path):
    """`bench/spo_ladder.py --resume DIR` takes the training time DIR reached from its last record, and refuses a
    folder it has no record of or a call whose rung, seed or overrides differ."""
    run = str(tmp_path / "b_s0_1")
    values = {**spo_ladder.RUNGS["b"], "output_dir": run, "seed": 0, "epochs": 1000}
    config = {k: str(v) for k, v in values.items()}
    with open(tmp_path / "ladder.jsonl", "w") as f:
        for seconds in (900.5, 1840.8):
            f.write(json.dumps({"config": config, "overrides": ["trunk=ddim"], "train_seconds": seconds}) + "\n")
    assert spo_ladder.resumed_seconds(tmp_path, values, ["trunk=ddim"]) == 1840.8
    with pytest.raises(SystemExit, match="give the same rung, seed and overrides"):
        spo_ladder.resumed_seconds(tmp_path, values, [])
    with pytest.raises(SystemExit, match="no record of that run"):
        spo_ladder.resumed_seconds(tmp_path, {**values, "output_dir": str(tmp_path / "other")}, ["trunk=ddim"])


def test_lever_minus_control_pools_paired_differences_over_seeds():
    """`bench/spo_conditions.py --compare`: lever − control per image, pooled over the pairs, by hand."""
    def record(path, aesthetic):
        return {"lora": path, "per_image": {"held-out eta=0": {"aesthetic": aesthetic, "alignment": [0.0, 0.0]}}}

    records = [record("runs/x/lever_s0/a.safetensors", [0.3, 0.1]), record("runs/x/ctl_s0/a.safetensors", [0.1, 0.1]),
               record("runs/x/lever_s1/a.safetensors", [0.2, 0.0]), record("runs/x/ctl_s1/a.safetensors", [0.0, 0.2])]
    out = spo_conditions.lever_minus_control(records, [("lever_s0", "ctl_s0"), ("lever_s1", "ctl_s1")])
    d = out["held-out eta=0"]["aesthetic"]  # differences 0.2, 0.0, 0.2, −0.2: mean 0.05, sd √(0.11/3)
    assert d["n"] == 4 and d["diff"] == pytest.approx(0.05) and d["se"] == pytest.approx(math.sqrt(0.11 / 3) / 2)
    with pytest.raises(SystemExit, match="matches 2 judged LoRAs"):
        spo_conditions.lever_minus_control(records, [("lever", "ctl_s0")])


def test_compare_pools_the_records_of_several_files(tmp_path, capsys):
    """`--compare A B`: a lever judged in one run and its control in another pair up; a bad line names its file."""
    def record(path, aesthetic):
        return json.dumps({"lora": path, "per_image": {"held-out eta=0": {"aesthetic": aesthetic,
                                                                          "alignment": [0.0, 0.0]}}})

    (tmp_path / "a.jsonl").write_text(record("runs/lever/l.safetensors", [0.3, 0.2]) + "\n")
    (tmp_path / "b.jsonl").write_text(record("runs/ctl/l.safetensors", [0.1, 0.1]) + "\n\n")
    assert spo_conditions.main(["--compare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"),
                                "--pair", "lever=ctl"]) == 0
    assert "aesthetic +0.150 ± 0.050" in capsys.readouterr().out
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(SystemExit, match=r"c\.jsonl, line 1 is not JSON"):
        spo_conditions.main(["--compare", str(tmp_path / "c.jsonl"), "--pair", "lever=ctl"])
