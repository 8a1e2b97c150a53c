"""The job store: fine-tune jobs in SQLite (WAL), run by detached supervisors, read by any number of pages.

    store = JobStore("runs")                                   # runs/jobs.db, created on first use
    job = store.submit("spo", {"epochs": 2}, name="pocket")    # queued; starts as soon as a slot is free
    store.stop(job.id); store.resume(job.id); store.delete(job.id)

    python -m spo_studio.backend.job_runner worker runs/jobs.db 7    # what `dispatch` spawns, detached

The contract between trainer and page is files and SQLite, never memory:
  * `submit` validates the config with the method's dataclass (the registry `train.methods`),
    writes `<run>/job.yaml` and a `queued` row. `dispatch` starts queued jobs in FIFO order, one job
    per GPU (one at a time on a CPU machine); the head of the queue waits for its GPUs, nothing jumps it.
  * A job runs as a *supervisor* process in its own session (so it outlives the page and an app
    restart) that starts the trainer (`spo train --config job.yaml`, or `accelerate launch` for
    several GPUs), tails its `metrics.jsonl` / `events.jsonl` into the `metrics` and `images`
    tables, beats a heartbeat, and writes the final status. When it ends it dispatches the next job;
    a watchdog (`job_queue.py`) does it for a supervisor that was killed, so no job waits for a page.
  * Stop = a `STOP` file in the run folder (the trainer ends the step and writes a final
    checkpoint), then SIGINT after `SIGINT_AFTER` seconds, then SIGKILL after the job's grace period.
    The supervisor runs that escalation, so it happens with no page open.
  * Every reader reconciles the rows with the real processes: a job whose supervisor is gone is
    marked `failed` with its last log lines, never left `running`.
Statuses: queued → starting → running (→ stopping) → finished | stopped | failed; stopped and failed
jobs can be resumed (the trainer continues from its latest checkpoint).

The parts, by where they run; this module re-exports their public names:
  * `job_records`: statuses, the `Job` row, `JobError`, `log_tail` (every reader);
  * `job_inputs`: methods and their configs, job names, uploaded prompt lists and Pick-a-Pic files,
    checked before a job is queued (the page, the CLI);
  * `job_store`: `JobStore`, the SQLite store and its queue (the page, the supervisor, the watchdog);
  * `job_runner`: the supervisor of one job (a detached process per job);
  * `job_queue`: process helpers and the watchdog (a detached process per job database).
"""

from __future__ import annotations

import sys

from .job_inputs import (
    MAX_NAME_CHARS,
    MAX_PARQUET_BYTES,
    MAX_PROMPT_CHARS,
    MAX_PROMPTS,
    MAX_PROMPTS_BYTES,
    MODEL_FIELDS,
    PATH_FIELDS,
    PICKAPIC_COLUMNS,
    UPLOAD_FIELDS,
    check_config,
    check_job_name,
    check_pickapic,
    config_class,
    methods,
    read_prompt_list,
)
from .job_queue import (  # noqa: F401 (the process helpers are names of this module too)
    _detach_kwargs,
    _die_with_parent,
    _process_started,
    _signal_group,
    process_alive,
    start_watchdog,
    trainer_exit_text,
)
from .job_records import ACTIVE, LOG_TAIL_LINES, RESUMABLE, Job, JobError, format_duration, log_tail
from .job_runner import POLL, SIGINT_AFTER, main, run_worker, trainer_command
from .job_store import DEFAULT_GRACE, SCHEMA_VERSION, START_TIMEOUT, JobStore, detect_devices

__all__ = [
    "ACTIVE", "DEFAULT_GRACE", "LOG_TAIL_LINES", "MAX_NAME_CHARS", "MAX_PARQUET_BYTES", "MAX_PROMPTS",
    "MAX_PROMPTS_BYTES", "MAX_PROMPT_CHARS", "MODEL_FIELDS", "PATH_FIELDS", "PICKAPIC_COLUMNS", "POLL", "RESUMABLE",
    "SCHEMA_VERSION", "SIGINT_AFTER", "START_TIMEOUT", "UPLOAD_FIELDS", "Job", "JobError", "JobStore",
    "check_config", "check_job_name", "check_pickapic", "config_class", "detect_devices", "format_duration",
    "log_tail", "main", "methods", "process_alive", "read_prompt_list", "run_worker", "start_watchdog",
    "trainer_command", "trainer_exit_text",
]

if __name__ == "__main__":  # `python -m spo_studio.backend.jobs worker DB JOB`, as before: the supervisor
    sys.exit(main())
