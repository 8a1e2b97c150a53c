"""The job store on the pocket model: validation before queueing, FIFO on one CPU slot, a killed runner
ends `failed` with its log, stop escalates flag → SIGINT → kill, start-up reconciliation, delete.

Jobs here are tiny (4 DDIM steps, 2 prompts, one thread) so each trains in seconds."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from spo_studio.backend import jobs
from spo_studio.backend.jobs import JobError, JobStore

POCKET_PROMPTS = ["a red circle on a blue background", "a green square on a yellow background"]


# -- helpers shared with the web UI tests ---------------------------------------------------------------


def wait_for(predicate, timeout: float = 90.0, interval: float = 0.25, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail with `what` after `timeout` seconds."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def tiny_values(spm, prompts, **over) -> dict:
    """An SPO config on the shipped pocket model that trains in seconds on one CPU thread."""
    values = {"base_model": "pocket", "spm": str(spm), "prompts": str(prompts), "num_steps": 4,
              "divert_start_step": 1, "pool_size": 2, "threshold": 0.0, "prompts_per_round": 2,
              "train_batch_size": 2, "epochs": 2, "lr": 1e-3, "checkpoint_every": 2, "log_every": 1,
              "sample_prompts": [POCKET_PROMPTS[0]]}
    values.update(over)
    return values


@pytest.fixture(scope="session")
def job_spm(tiny_spm):
    """The pocket SPM when it is built, else a small random SPM (the jobs only need scores)."""
    from spo_studio.backend.sources import POCKET_SPM_DIR

    return "pocket" if (POCKET_SPM_DIR / "spm.json").exists() else str(tiny_spm)


@pytest.fixture(scope="session")
def pocket_prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("pocket_prompts") / "prompts.txt"
    path.write_text("\n".join(POCKET_PROMPTS) + "\n")
    return path


@pytest.fixture
def worker_env(monkeypatch):
    """Workers inherit this: one thread each (the box has 2 cores), offline, CPU."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SPO_STUDIO_DEVICES", "cpu")
    monkeypatch.setenv("TQDM_DISABLE", "1")


@pytest.fixture
def store(tmp_path, worker_env):
    s = JobStore(tmp_path / "runs", devices=["cpu"])
    yield s
    for job in s.list(reconcile=False):  # cancel what waits: the queue's watchdog would start it
        if job.status == "queued":
            s.stop(job.id)
    for job in s.list(reconcile=False):  # leave no runner behind
        if job.active:
            jobs._signal_group(job.trainer_pid, signal.SIGKILL)
            if job.pid:
                try:
                    os.kill(job.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


# -- validation: nothing is queued unless it can run --------------------------------------------------------


def test_submit_validates_config_and_uploads_before_queueing(store, tmp_path, job_spm, pocket_prompts):
    with pytest.raises(JobError, match="unknown method 'ppo'"):
        store.submit("ppo", {})
    with pytest.raises(JobError, match="unknown key.*'pool_sise'"):
        store.submit("spo", {"pool_sise": 4})
    with pytest.raises(JobError, match=r"pool_size must lie in \[2, 64\]"):
        store.submit("spo", {"pool_size": 1})
    with pytest.raises(JobError, match="base_model: .*nowhere: no such folder or file"):
        store.submit("spo", {"base_model": str(tmp_path / "nowhere")})
    with pytest.raises(JobError, match="no GPU"):
        store.submit("spo", tiny_values(job_spm, pocket_prompts), gpus=2)

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"not": "a list"}')
    with pytest.raises(JobError, match="bad.json: expected a JSON list of strings"):
        store.submit("spo", {}, uploads={"prompts": bad_json})
    wrong = tmp_path / "prompts.csv"
    wrong.write_text("a,b\n")
    with pytest.raises(JobError, match=r"prompts.csv: prompts must be a \.txt"):
        store.submit("spo", {}, uploads={"prompts": wrong})
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(JobError, match="empty.txt: no prompts"):
        store.submit("spo", {}, uploads={"prompts": empty})
    big = tmp_path / "big.txt"
    big.write_text("a red circle on a blue background\n" * 1000)
    with pytest.raises(JobError, match="big.txt: .* MB is over the .* MB limit"):
        jobs.read_prompt_list(big, max_bytes=1000)

    import pyarrow as pa
    import pyarrow.parquet as pq

    no_caption = tmp_path / "pairs.parquet"
    pq.write_table(pa.table({"text": ["x"]}), no_caption)
    with pytest.raises(JobError, match="pairs.parquet: needs a 'caption' or 'prompt' column"):
        store.submit("spo", {}, uploads={"prompts": no_caption})
    with pytest.raises(JobError, match=r"pairs.parquet: not in Pick-a-Pic schema; missing column\(s\)"):
        store.submit("dpo", {}, uploads={"train_data": no_caption})
    not_parquet = tmp_path / "fake.parquet"
    not_parquet.write_text("hello")
    with pytest.raises(JobError, match="fake.parquet: not a readable parquet file"):
        jobs.check_pickapic(not_parquet)

    assert store.list() == []
    assert [p.name for p in store.runs_dir.iterdir() if p.is_dir()] == []


def test_uploads_are_validated_copied_and_converted(store, tmp_path, job_spm):
    import pyarrow as pa
    import pyarrow.parquet as pq
    import yaml

    prompts = tmp_path / "captions.parquet"
    pq.write_table(pa.table({"caption": POCKET_PROMPTS + [None]}), prompts)
    job = store.submit("spo", tiny_values(job_spm, "pocket"), name="From parquet", uploads={"prompts": prompts},
                       start=False)
    assert job.status == "queued" and job.queue_position == 1
    run = Path(job.run_dir)
    assert run.name == f"{job.id:04d}-spo-from-parquet" and run.parent == store.runs_dir
    cfg = yaml.safe_load((run / "job.yaml").read_text())
    assert cfg["method"] == "spo" and cfg["output_dir"] == str(run) and cfg["resume"] is True
    assert json.loads(Path(cfg["prompts"]).read_text()) == POCKET_PROMPTS  # the trainer reads .json
    assert Path(cfg["spm"]).is_absolute() or cfg["spm"] == "pocket"

    listed = JobStore(store.runs_dir).list()  # a second store (another page) sees the same job
    assert [(j.id, j.status, j.queue_position) for j in listed] == [(job.id, "queued", 1)]
    store.stop(job.id)  # cancel before it started
    assert JobStore(store.runs_dir).get(job.id).status == "stopped"
    store.delete(job.id)
    assert not run.exists() and store.list() == []


# -- running jobs -----------------------------------------------------------------------------------------


def test_fifo_one_at_a_time_and_a_killed_runner_ends_failed(store, job_spm, pocket_prompts):
    a = store.submit("spo", tiny_values(job_spm, pocket_prompts, epochs=50), name="A")
    b = store.submit("spo", tiny_values(job_spm, pocket_prompts), name="B")
    assert store.get(b.id).status == "queued" and store.get(b.id).queue_position == 1  # one CPU slot
    running = wait_for(lambda: (j := store.get(a.id)).status == "running" and j.trainer_pid and j.total and j,
                       what="job A to train")
    assert store.get(b.id).status == "queued"

    os.kill(running.pid, signal.SIGKILL)  # the runner dies (OOM killer, power loss): no one writes "failed"
    wait_for(lambda: not jobs.process_alive(running.trainer_pid), timeout=20, what="the trainer to die with it")
    listed = {j.id: j for j in store.list()}  # any reader reconciles, then starts the next job
    assert listed[a.id].status == "failed"
    assert "ended without reporting" in listed[a.id].message
    assert listed[a.id].error_tail and "job %d:" % a.id in listed[a.id].error_tail  # its last log lines
    assert listed[b.id].status in ("starting", "running")

    done = wait_for(lambda: (j := store.get(b.id)).status in ("finished", "failed") and j, what="job B to finish")
    assert done.status == "finished", store.log(b.id)
    assert done.started >= listed[a.id].ended - 1  # B started only after A's slot was free
    assert set(done.lora_files) == {"webui", "diffusers"}
    assert all(Path(p).is_file() for p in done.lora_files.values())
    keys = {r["key"] for r in store.metrics(b.id)}
    assert {"loss", "ratio_w", "ratio_l", "pair_yield", "score_mean"} <= keys
    assert [im["epoch"] for im in store.images(b.id)] == [1, 2]
    assert done.step == max(r["step"] for r in store.metrics(b.id))


def test_stop_escalates_flag_then_sigint_then_kill(store, job_spm, pocket_prompts):
    # a long rollout: the trainer looks at the STOP flag only between steps, so the grace period runs out
    job = store.submit("spo", tiny_values(job_spm, pocket_prompts, num_steps=400, prompts_per_round=2),
                       name="slow", grace=3.0)
    wait_for(lambda: store.get(job.id).total, what="the trainer to start")
    assert store.stop(job.id).status == "stopping"
    assert (Path(job.run_dir) / "STOP").exists()
    ended = wait_for(lambda: (j := store.get(job.id)).status not in jobs.ACTIVE and j, timeout=30,
                     what="the stop to end the job")
    assert ended.status == "stopped" and "killed after the 3 s grace period" in ended.message
    log = (Path(job.run_dir) / "log.txt").read_text()
    assert "sending SIGINT" in log and "stop requested (signal 2)" in log  # the trainer got the SIGINT
    assert "killing the trainer" in log
    assert not (Path(job.run_dir) / "STOP").exists()  # a resume starts clean
    with pytest.raises(JobError, match="only queued or running jobs can be stopped"):
        store.stop(job.id)


# -- start-up reconciliation and deletion -------------------------------------------------------------------


def test_startup_marks_dead_jobs_failed_with_their_log(tmp_path, worker_env):
    store = JobStore(tmp_path / "runs", devices=["cpu"])
    job = store.submit("spo", {}, name="ghost", start=False)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    log = "loading\n  3%|▎ | 3/100\r 40%|████ | 40/100\nRuntimeError: CUDA out of memory\n"
    (Path(job.run_dir) / "log.txt").write_text(log)
    store._update(job.id, status="running", pid=gone.pid, pid_started=time.time() - 50, started=time.time() - 60)

    from spo_studio.webui.app import Studio  # what `python -m webui` does at start-up

    Studio(runs_dir=tmp_path / "runs", devices=["cpu"])
    after = JobStore(tmp_path / "runs").get(job.id)
    assert after.status == "failed"
    assert after.error_tail.splitlines() == ["loading", " 40%|████ | 40/100", "RuntimeError: CUDA out of memory"]
    assert "last log line: RuntimeError: CUDA out of memory" in after.message


def test_delete_refuses_running_jobs_and_folders_outside_runs(tmp_path, worker_env):
    store = JobStore(tmp_path / "runs", devices=["cpu"])
    job = store.submit("spo", {}, start=False)
    store._update(job.id, status="running", pid=os.getpid(), pid_started=jobs._process_started(os.getpid()))
    with pytest.raises(JobError, match="stop it before deleting it"):
        store.delete(job.id)
    outside = tmp_path / "precious"
    outside.mkdir()
    store._update(job.id, status="failed", run_dir=str(outside))
    store.delete(job.id)
    assert outside.exists()  # never removes anything outside the runs folder
    with pytest.raises(JobError, match=f"no job {job.id}"):
        store.get(job.id)


def test_schema_and_bad_database_errors_name_the_file(tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "jobs.db").write_text("this is not sqlite" * 100)
    with pytest.raises(JobError, match=r"jobs\.db: .*not a (job )?database"):
        JobStore(runs, devices=["cpu"])
