"""The supervisor of one job: a detached process that runs the trainer and reports to the job store.

    python -m spo_studio.backend.job_runner worker runs/jobs.db 7    # what `JobStore.dispatch` spawns

It runs in its own session, so it outlives the page that started it. It starts the trainer
(`spo train --config job.yaml`, or `accelerate launch` with one process per GPU), tails the run's
`metrics.jsonl` / `events.jsonl` into the store, beats a heartbeat, escalates a stop request (the
`STOP` file, then SIGINT after `SIGINT_AFTER` seconds, then SIGKILL after the job's grace period),
writes the final status and dispatches the next queued job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .job_queue import _detach_kwargs, _die_with_parent, _signal_group, trainer_exit_text
from .job_records import Job, log_tail
from .job_store import JobStore, _Tail

logger = logging.getLogger(__name__)

SIGINT_AFTER = 10.0  # seconds between the STOP file and SIGINT
POLL = 0.5  # supervisor loop period (seconds)


def trainer_command(job: Job, run_dir: Path) -> list[str]:
    """The trainer's argv: one process, or `accelerate launch` with one process per GPU."""
    package = __package__  # spo_studio.backend
    config = str(run_dir / "job.yaml")
    n = len([d for d in (job.devices or "").split(",") if d and d != "cpu"])
    if n > 1:
        import socket

        with socket.socket() as s:  # a free rendezvous port, so concurrent multi-GPU jobs do not collide
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(n), "--multi_gpu",
                "--main_process_port", str(port), "-m", f"{package}.cli", "train", "--config", config]
    return [sys.executable, "-m", f"{package}.cli", "train", "--config", config]


def run_worker(db_path: str | Path, job_id: int) -> int:
    """Supervise one job until its trainer exits; write the final status; start the next queued job."""
    db_path = Path(db_path)
    store = JobStore(db_path.parent, db_path=db_path)
    job = store.get(job_id)
    run_dir = Path(job.run_dir)
    stop_seen = {"signal": False}

    def on_signal(signum, frame):  # someone asked the supervisor itself to stop: do it the graceful way
        stop_seen["signal"] = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)

    if job.stop_requested is None:
        with contextlib.suppress(FileNotFoundError):
            (run_dir / "STOP").unlink()
    attempt_start = time.time()
    with store._tx() as db:  # a stop may have arrived while we started: keep `stopping` then
        db.execute("UPDATE jobs SET status = CASE status WHEN 'starting' THEN 'running' ELSE status END, pid = ?, "
                   "heartbeat = ? WHERE id = ?", (os.getpid(), attempt_start, job.id))
    env = dict(os.environ)
    env.setdefault("TQDM_MININTERVAL", "2")
    cmd = trainer_command(job, run_dir)
    logger.info("job %d: %s", job.id, " ".join(cmd))
    with open(run_dir / "log.txt", "ab") as log:
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=run_dir,
                                 env=env, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
                                 **_detach_kwargs())
    store._update(job.id, trainer_pid=child.pid)
    tail = _Tail(run_dir)
    sent_int = killed = False
    last_beat = 0.0
    rc = None
    while rc is None:
        time.sleep(POLL)
        rc = child.poll()
        tail.ingest(store, job.id)
        now = time.time()
        current = store.get(job.id)
        if stop_seen["signal"] and current.stop_requested is None:
            (run_dir / "STOP").write_text("stop requested (the supervisor was signalled)\n")
            store._update(job.id, status="stopping", stop_requested=now, message="stop requested")
            current = store.get(job.id)
        if current.stop_requested is not None and rc is None:
            waited = now - current.stop_requested
            if not (run_dir / "STOP").exists():
                (run_dir / "STOP").write_text("stop requested\n")
            if waited >= min(SIGINT_AFTER, current.grace / 3) and not sent_int:
                logger.warning("job %d: still running %.0f s after the stop flag: sending SIGINT", job.id, waited)
                _signal_group(child.pid, signal.SIGINT)
                sent_int = True
            if waited >= current.grace and not killed:
                logger.warning("job %d: grace period of %.0f s is over: killing the trainer", job.id, current.grace)
                _signal_group(child.pid, signal.SIGKILL)
                killed = True
        if now - last_beat >= 2.0:
            store._update(job.id, heartbeat=now)
            last_beat = now
    tail.ingest(store, job.id)

    current = store.get(job.id)
    ends = [e for e in tail.events
            if e.get("event") in ("finished", "stopped") and e.get("time", 0) >= attempt_start - 1]
    last = ends[-1]["event"] if ends else None
    step = current.step
    if rc == 0 and last == "finished":
        status, message, error = "finished", f"finished at step {step}", None
    elif rc == 0 and last == "stopped" or (current.stop_requested is not None and not killed):
        status, message, error = "stopped", f"stopped at step {step}; resume continues from the final checkpoint", None
    elif killed:
        status, error = "stopped", None
        message = f"killed after the {current.grace:.0f} s grace period; resume continues from the latest checkpoint"
    else:
        status, error = "failed", log_tail(run_dir / "log.txt")
        last_line = error.splitlines()[-1] if error else "no output"
        message = f"{trainer_exit_text(rc)}: {last_line}"
    store._update(job.id, status=status, message=message, error_tail=error, ended=time.time(), heartbeat=time.time(),
                  trainer_pid=None)
    logger.info("job %d %s (%s)", job.id, status, message)
    with contextlib.suppress(FileNotFoundError):
        (run_dir / "STOP").unlink()
    store.dispatch()  # the next queued job, whether or not a page is open
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 3 or argv[0] != "worker":
        sys.stderr.write("usage: python -m spo_studio.backend.job_runner worker DB_PATH JOB_ID\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_worker(argv[1], int(argv[2]))


if __name__ == "__main__":
    sys.exit(main())
