"""The SPO loop end to end on a tiny model: pairs, metrics, LoRA files, exact resume, stop flag."""

import json

import pytest
import torch
from spo_studio.backend.config import load_config
from spo_studio.backend.runs import read_jsonl
from spo_studio.backend.train.spo import SPOConfig, train_spo


def _cfg(tiny_dirs, tiny_spm, prompts_file, out, **over):
    base = {"base_model": str(tiny_dirs["sd15"]), "spm": str(tiny_spm), "prompts": str(prompts_file),
            "output_dir": str(out), "num_steps": 6, "divert_start_step": 2, "pool_size": 3, "threshold": 0.0,
            "prompts_per_round": 2, "train_batch_size": 3, "epochs": 2, "lr": 1e-3, "checkpoint_every": 100,
            "sample_prompts": ["a red circle"]}
    base.update(over)
    return load_config(
        SPOConfig, None, [f"{k}={v if not isinstance(v, list) else ','.join(v)}" for k, v in base.items()]
    )


def _lora(run):
    from safetensors.torch import load_file

    return load_file(run / "lora" / "spo_lora_diffusers.safetensors")


def test_spo_run_writes_metrics_lora_and_samples(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    result = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "run"))
    assert result["status"] == "finished" and result["step"] > 0
    metrics = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert metrics and {
        "loss", "ratio_w", "ratio_l", "pair_yield", "score_mean", "score_std", "lr", "grad_norm"
    } <= set(metrics[-1])
    assert all(m["pair_yield"] == 1.0 for m in metrics if "pair_yield" in m)  # threshold 0: every pool gives a pair
    assert (tmp_path / "run" / "samples" / "epoch-001.png").exists()
    events = [e["event"] for e in read_jsonl(tmp_path / "run" / "events.jsonl")]
    assert events[0] == "started" and events[-1] == "finished" and "sample" in events
    lora = _lora(tmp_path / "run")
    assert any(
        v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k or "lora.up" in k
    ), "the LoRA learned something"
    assert (tmp_path / "run" / "lora" / "spo_lora_webui.safetensors").exists()


# every lever of spo_levers.py at once: group pools must resume mid-round like pairs do
LEVERS = {"pair_mode": "group", "timestep_balance": True, "kl_coef": 0.5, "fp32_candidates": True, "trunk": "ddim"}


@pytest.mark.parametrize("levers", [{}, LEVERS], ids=["paper", "levers"])
def test_resume_mid_round_equals_uninterrupted(tiny_dirs, tiny_spm, prompts_file, tmp_path, levers):
    full = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "full", **levers))
    total = full["step"]
    assert total >= 6
    cut = total // 2 + 1  # lands inside a round (rounds have several micro-steps)
    first = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "cut", max_steps=cut, **levers))
    assert first["step"] == cut
    state = torch.load(next((tmp_path / "cut" / "checkpoints").glob("step-*")) / "state.pt", weights_only=False)
    second = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, tmp_path / "cut", **levers))
    assert second["step"] == total
    a, b = _lora(tmp_path / "full"), _lora(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    assert state["pending"] is not None or state["micro"] == 0


def test_stop_file_ends_with_a_checkpoint(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    run = tmp_path / "stopped"
    run.mkdir()
    (run / "STOP").write_text("")
    result = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, run))
    assert result["status"] == "stopped" and result["step"] == 1
    assert list((run / "checkpoints").glob("step-00000001"))
    assert json.loads((run / "events.jsonl").read_text().splitlines()[-1])["event"] == "stopped"


def test_resume_refuses_a_changed_recipe(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    import pytest

    run = tmp_path / "run"
    run.mkdir()
    (run / "STOP").write_text("")
    assert train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, run))["step"] == 1  # one step, one checkpoint
    (run / "STOP").unlink()
    with pytest.raises(ValueError, match=r"config.yaml: the checkpoints .* another config \(lr: 0.001 → 0.0005; "
                                         r"threshold: 0.0 → 0.2\)"):
        train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, run, lr=5e-4, threshold=0.2))
    resumed = train_spo(
        _cfg(tiny_dirs, tiny_spm, prompts_file, run, max_steps=2, checkpoint_every=1)
    )  # length may change
    assert resumed["step"] == 2
    assert [e["step"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "resumed"] == [1]


def test_two_process_gloo_run_keeps_ranks_identical(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    """torchrun with 2 CPU processes (gloo): pairs are shared, gradients all-reduced, ranks stay equal."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run = tmp_path / "ddp"
    overrides = {"base_model": tiny_dirs["sd15"], "spm": tiny_spm, "prompts": prompts_file, "output_dir": run,
                 "num_steps": 6, "divert_start_step": 2, "pool_size": 3, "threshold": 0.0, "prompts_per_round": 1,
                 "train_batch_size": 2, "epochs": 1, "lr": 1e-3, "sample_prompts": "a red circle"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "spo_studio.backend.cli", "train", "--method", "spo",
           *[f"{k}={v}" for k, v in overrides.items()]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    events = read_jsonl(run / "events.jsonl")
    ranks = [e for e in events if e["event"] == "ranks"]
    assert ranks and ranks[-1]["in_sync"] is True and ranks[-1]["processes"] == 2
    finished = [e for e in events if e["event"] == "finished"]
    assert finished and finished[-1]["step"] > 0
    assert (run / "lora" / "spo_lora_webui.safetensors").exists()


def test_fast_decode_option_scores_the_pool_from_shrunk_latents(tiny_dirs, tiny_spm, prompts_file, tmp_path):
    """`fast_decode=true` reaches the trainer's scorer: same rollout noise, other pool scores."""
    runs = {}
    for fast in (False, True):
        out = tmp_path / f"run_{fast}"
        result = train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, out, epochs=1, fast_decode=str(fast).lower()))
        assert result["status"] == "finished"
        assert f"fast_decode: {str(fast).lower()}" in (out / "config.yaml").read_text()
        runs[fast] = [m["score_mean"] for m in read_jsonl(out / "metrics.jsonl") if "score_mean" in m]
    assert runs[False] and len(runs[False]) == len(runs[True])
    assert runs[False][0] != runs[True][0]


def test_gradient_clipping_really_clips(tiny_dirs, tiny_spm, prompts_file, tmp_path, monkeypatch):
    """The official code's clip is a no-op (exhausted iterator); ours must bound what AdamW sees."""
    seen: list[float] = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        grads = [p.grad.norm() for group in self.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            seen.append(float(torch.linalg.vector_norm(torch.stack(grads))))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = tmp_path / "run"
    assert train_spo(_cfg(tiny_dirs, tiny_spm, prompts_file, out, epochs=1, grad_clip=1e-4))["status"] == "finished"
    logged = [m["grad_norm"] for m in read_jsonl(out / "metrics.jsonl") if m.get("grad_norm") is not None]
    assert seen and logged and max(logged) > 1e-4, (
        "the unclipped norms must exceed the bound for the test to mean anything"
    )
    assert max(seen) <= 1e-4 * (1 + 1e-3)
