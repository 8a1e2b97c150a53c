"""What the job store refuses before a job is queued, what it says when it cannot delete, how it names a
killed trainer, and a queue that moves on with no reader after a supervisor is killed.

Values go through the entry points a user takes: `spo train --config FILE` (the CLI) and the store (what
the page and scripts call); both refuse a value with the same message naming the field."""

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import test_jobs
import yaml
from spo_studio.backend import cli, jobs
from spo_studio.backend.jobs import JobError
from test_jobs import tiny_values, wait_for

job_spm, pocket_prompts, worker_env, store = (test_jobs.job_spm, test_jobs.pocket_prompts, test_jobs.worker_env,
                                              test_jobs.store)  # shared fixtures

# (method, values, the field the message names, what the message says)
REFUSED = [
    ("spo", {"prompts_per_round": 0}, "prompts_per_round", "must be >= 1; got 0"),
    ("spo", {"prompts_per_round": -3}, "prompts_per_round", "must be >= 1; got -3"),
    ("spo", {"max_steps": -1}, "max_steps", "must be >= 0"),
    ("spo", {"max_minutes": -5}, "max_minutes", "must be >= 0"),
    ("spo", {"lr": float("nan")}, "lr", "must be a finite number; got nan"),
    ("spo", {"lr": float("inf")}, "lr", "must be a finite number; got inf"),
    ("spo", {"lora_alpha": -4}, "lora_alpha", "must be > 0; got -4.0"),
    ("spo", {"weight_decay": -1}, "weight_decay", "must be >= 0"),
    ("spo", {"decode_size": -1}, "decode_size", "must be >= 0"),
    ("spo", {"cfg_scale": float("nan")}, "cfg_scale", "must be a finite number"),
    ("spo", {"beta": float("nan")}, "beta", "must be a finite number"),
    ("dpo", {"beta": float("nan")}, "beta", "must be a finite number"),
    ("spo", {"pool_size": 100000}, "pool_size", "must lie in [2, 64]"),
    ("spo", {"lora_rank": 100000}, "lora_rank", "must be <= 1024"),
    ("spo", {"lora_rank": 100}, "lora_rank", "must be <= 64, the narrowest layer in lora_targets of 'pocket'"),
    ("spo", {"lora_targets": ["no_such_module"]}, "lora_targets", "'no_such_module' names no Linear or Conv layer"),
    ("spo", {"lora_targets": ["to_q", "to_qq"]}, "lora_targets", "'to_qq' names no Linear or Conv layer"),
    ("spo", {"lora_targets": []}, "lora_targets", "must name at least one UNet module"),
    ("spo", {"config_version": 99}, "config_version", "99 is newer than this SPO Studio"),
    ("dpo", {"shuffle_buffer": 0}, "shuffle_buffer", "must be >= 1"),
]


@pytest.mark.parametrize("method,values,field,says", REFUSED, ids=[f"{m}-{k}" for m, v, k, _ in REFUSED
                                                                    for k in [next(iter(v)) + "=" + str(v[k])]])
def test_values_that_cannot_train_are_refused_by_cli_and_store_alike(store, tmp_path, capsys, method, values, field,
                                                                      says):
    with pytest.raises(JobError) as refused:
        store.submit(method, values, name="bad", start=False)
    message = str(refused.value)
    assert field in message and says in message
    assert store.list() == [] and [p for p in store.runs_dir.iterdir() if p.is_dir()] == []  # nothing queued

    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"method": method, "output_dir": str(tmp_path / "run"), **values}))
    assert cli.main(["train", "--config", str(preset)]) == 2
    err = capsys.readouterr().err
    assert err.strip().endswith(message.split(": ", 1)[-1] if message.startswith(f"{method} config: ") else message)
    assert not (tmp_path / "run").exists()  # refused before a run folder was written


def test_values_at_the_edges_are_still_accepted(store):
    job = store.submit("spo", {"max_steps": 0, "max_minutes": 0, "weight_decay": 0, "decode_size": 0,
                               "lora_targets": ["to_q", "to_out.0"], "lora_rank": 64, "pool_size": 64,
                               "config_version": 1}, name="edges", start=False)
    cfg = yaml.safe_load((Path(job.run_dir) / "job.yaml").read_text())
    assert cfg["lora_targets"] == ["to_q", "to_out.0"] and cfg["lora_rank"] == 64 and cfg["config_version"] == 1


def test_job_names_are_bounded_and_free_of_control_characters(store):
    with pytest.raises(JobError, match="name: at most 100 characters; got 5000"):
        store.submit("spo", {}, name="x" * 5000, start=False)
    for bad in ("a\x00b", "line\nbreak", "bell\x07", "rtl\u202eoverride"):
        with pytest.raises(JobError, match="name: control character"):
            store.submit("spo", {}, name=bad, start=False)
    assert store.list() == []
    job = store.submit("spo", {}, name="  <b>bold</b> **pocket** ✓ ", start=False)
    assert job.name == "<b>bold</b> **pocket** ✓"  # stored as typed (the page shows it as plain text)


# -- delete -------------------------------------------------------------------------------------------------


def _make_undeletable(path: Path) -> bool:
    """A file even root cannot unlink (the immutable attribute), or a read-only folder for anyone else."""
    if os.geteuid() != 0:
        path.parent.chmod(0o500)
        return True
    if shutil.which("chattr") is None:
        return False
    return subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0


def _make_deletable(path: Path) -> None:
    if os.geteuid() != 0:
        path.parent.chmod(0o700)
    else:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


def test_delete_says_what_it_could_not_remove(store, tmp_path):
    job = store.submit("spo", {}, name="stuck", start=False)
    store.stop(job.id)
    pinned = Path(job.run_dir) / "checkpoints" / "pinned.bin"
    pinned.parent.mkdir()
    pinned.write_bytes(b"x")
    refusal = pytest.MonkeyPatch()  # its own patcher: undoing it leaves the store's environment alone
    if not _make_undeletable(pinned):  # no real way here (root without chattr): the removal itself fails
        real_unlink = os.unlink

        def refuse_pinned(path, *args, **kwargs):
            if str(path).endswith("pinned.bin"):
                raise PermissionError(1, "Operation not permitted", str(path))
            return real_unlink(path, *args, **kwargs)

        refusal.setattr(os, "unlink", refuse_pinned)
    try:
        with pytest.raises(JobError, match=r"could not remove \d+ item\(s\) of its run folder \(first: .*pinned.bin"):
            store.delete(job.id)
        assert store.get(job.id).status == "stopped"  # kept: it can be deleted again
    finally:
        _make_deletable(pinned)
        refusal.undo()
    assert store.delete(job.id) is None  # everything went
    assert not Path(job.run_dir).exists()
    with pytest.raises(JobError, match=f"no job {job.id}"):
        store.get(job.id)

    other = store.submit("spo", {}, name="elsewhere", start=False)
    store.stop(other.id)
    outside = tmp_path / "precious"
    outside.mkdir()
    store._update(other.id, run_dir=str(outside))
    note = store.delete(other.id)
    assert note == f"its run folder {outside} lies outside the runs folder {store.runs_dir}: left in place"
    assert outside.exists()


# -- processes ----------------------------------------------------------------------------------------------


def test_a_sigkilled_trainer_is_named_as_such(store, job_spm, pocket_prompts):
    job = store.submit("spo", tiny_values(job_spm, pocket_prompts, num_steps=400), name="oom")
    running = wait_for(lambda: (j := store.get(job.id)).status == "running" and j.trainer_pid and j,
                       what="the trainer to start")
    os.kill(running.trainer_pid, signal.SIGKILL)  # what the out-of-memory killer does
    ended = wait_for(lambda: (j := store.get(job.id)).status not in jobs.ACTIVE and j, timeout=30,
                     what="the supervisor to report")
    assert ended.status == "failed"
    assert ended.message.startswith("the trainer was killed by SIGKILL"), ended.message
    assert "out-of-memory killer" in ended.message and "code -9" not in ended.message


def test_killed_supervisor_with_no_reader_the_next_job_starts(store, job_spm, pocket_prompts):
    a = store.submit("spo", tiny_values(job_spm, pocket_prompts, num_steps=400), name="A")
    b = store.submit("spo", tiny_values(job_spm, pocket_prompts, num_steps=400), name="B")
    running = wait_for(lambda: (j := store.get(a.id)).status == "running" and j.trainer_pid and j,
                       what="job A to start")
    assert store.get(b.id).status == "queued"

    os.kill(running.pid, signal.SIGKILL)  # the supervisor dies; from now on nobody lists or reconciles
    killed = time.time()
    # `get` reads one row and reconciles nothing: only the queue's own processes can move it on
    started = wait_for(lambda: (j := store.get(b.id)).status in ("starting", "running") and j, timeout=60,
                       interval=0.2, what="job B to start with no reader")
    waited = time.time() - killed
    assert waited < 30, f"the next job started {waited:.1f} s after the supervisor died"
    after = store.get(a.id)
    assert after.status == "failed" and "ended without reporting" in after.message
    assert started.started >= killed
