"""`python -m spo_studio.webui` killed while a pocket job trains, then started again: the job kept running
without any page, and the new page (two of them) shows everything it wrote: every metric row, every
sample image, the finished LoRA."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import test_jobs
import yaml
from gradio_client import Client
from spo_studio.backend import jobs
from spo_studio.backend.jobs import JobStore
from spo_studio.backend.runs import read_jsonl
from test_jobs import tiny_values, wait_for

job_spm, pocket_prompts = test_jobs.job_spm, test_jobs.pocket_prompts  # shared fixtures

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_page(runs: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TQDM_DISABLE": "1",
           "HF_HUB_OFFLINE": "1", "SPO_STUDIO_DEVICES": "cpu", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "spo_studio.webui", "--runs", str(runs), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"

    def up():
        if proc.poll() is not None:
            raise AssertionError(f"the page exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(up, timeout=90, what="the page to answer")
    return proc, url


def test_page_restart_while_a_job_runs_loses_nothing(tmp_path, job_spm, pocket_prompts):
    runs, log = tmp_path / "runs", tmp_path / "page.log"
    page, url = _start_page(runs, log)
    try:
        client = Client(url, verbose=False)
        config = "method: spo\n" + yaml.safe_dump(tiny_values(job_spm, pocket_prompts, epochs=6))
        message, _ = client.predict(config, "survives restarts", 1, None, api_name="/submit_job")
        assert "Job **#1**" in message
        store = JobStore(runs)
        running = wait_for(lambda: (j := store.get(1)).status == "running" and j.step > 0 and j,
                           what="the job to make progress")
    finally:
        page.send_signal(signal.SIGKILL)  # the page dies hard, mid-job
        page.wait()

    assert jobs.process_alive(running.pid, running.pid_started)  # the runner did not die with the page
    wait_for(lambda: store.get(1).step > running.step, what="progress with no page open")

    page, url = _start_page(runs, log)
    try:
        first, second = Client(url, verbose=False), Client(url, verbose=False)  # two pages at once
        done = wait_for(lambda: "finished" in (s := first.predict(1, api_name="/select_job"))[2] and s,
                        what="the job to finish")
        other = second.predict(1, api_name="/select_job")
        assert other[0]["data"] == done[0]["data"] and other[2] == done[2]  # both pages see the same state
    finally:
        page.send_signal(signal.SIGTERM)
        page.wait(timeout=30)

    run = Path(store.get(1).run_dir)
    logged = {(m["step"], k) for m in read_jsonl(run / "metrics.jsonl") for k, v in m.items()
              if k not in ("step", "time") and isinstance(v, (int, float)) and v == v}
    stored = {(r["step"], r["key"]) for r in store.metrics(1) if r["value"] is not None}
    assert stored == logged  # every metric row the trainer wrote is in the store
    samples = [e["path"] for e in read_jsonl(run / "events.jsonl") if e["event"] == "sample"]
    assert sorted(im["path"] for im in store.images(1)) == sorted(samples) and len(samples) == 6
    loss_steps = {row[0] for row in done[3]["data"]}
    assert loss_steps == {s for s, k in logged if k == "loss"}  # and the page plots all of them
    assert {Path(p).name for p in store.get(1).lora_files.values()} == {"spo_lora_webui.safetensors",
                                                                          "spo_lora_diffusers.safetensors"}
    assert time.time() - store.get(1).ended < 120
