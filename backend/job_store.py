"""The job store: fine-tune jobs in SQLite (WAL) under a runs folder, as the page and the CLI use it.

`JobStore` queues jobs (`submit`), stops, resumes and deletes them, reads their rows, metrics and
sample images, and keeps the queue moving: `reconcile` fails jobs whose supervisor is gone,
`dispatch` starts queued jobs on free GPUs by spawning a detached supervisor (`job_runner`) per job.
`_Tail` copies a run's `metrics.jsonl` / `events.jsonl` into the tables; the supervisor calls it
while the trainer runs, `reconcile` once more for a run whose supervisor died. See `jobs` for the
whole design.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .job_inputs import _import_upload, check_config, check_job_name, config_class
from .job_queue import _detach_kwargs, _process_started, _signal_group, process_alive, start_watchdog
from .job_records import ACTIVE, RESUMABLE, Job, JobError, log_tail

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
DEFAULT_GRACE = 300.0  # seconds between the STOP file and SIGKILL
START_TIMEOUT = 120.0  # a `starting` row with no supervisor after this long is failed

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    method TEXT NOT NULL,
    status TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    gpus INTEGER NOT NULL DEFAULT 1,
    devices TEXT,
    queue_seq INTEGER,
    pid INTEGER,
    pid_started REAL,
    trainer_pid INTEGER,
    step INTEGER NOT NULL DEFAULT 0,
    total INTEGER,
    step0 INTEGER,
    run_started REAL,
    created REAL NOT NULL,
    started REAL,
    ended REAL,
    heartbeat REAL,
    stop_requested REAL,
    grace REAL NOT NULL DEFAULT 300,
    message TEXT,
    error_tail TEXT,
    lora TEXT,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS metrics (
    job_id INTEGER NOT NULL, step INTEGER NOT NULL, key TEXT NOT NULL, value REAL, time REAL,
    PRIMARY KEY (job_id, step, key)
);
CREATE TABLE IF NOT EXISTS images (
    job_id INTEGER NOT NULL, path TEXT NOT NULL, step INTEGER, epoch INTEGER, kind TEXT, time REAL,
    PRIMARY KEY (job_id, path)
);
"""


def detect_devices() -> list[str]:
    """GPU ids this machine offers to jobs (["cpu"] without CUDA). `SPO_STUDIO_DEVICES=0,1|cpu` overrides."""
    env = os.environ.get("SPO_STUDIO_DEVICES", "").strip()
    if env:
        return ["cpu"] if env.lower() in ("cpu", "none") else [d.strip() for d in env.split(",") if d.strip()]
    try:
        import torch

        n = torch.cuda.device_count()
    except Exception:
        n = 0
    return [str(i) for i in range(n)] if n else ["cpu"]


class JobStore:
    """Jobs of one runs folder. Cheap to create: every call opens a short-lived SQLite connection."""

    def __init__(self, runs_dir: str | Path, devices: list[str] | None = None, db_path: str | Path | None = None):
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.db_path = Path(db_path).resolve() if db_path else self.runs_dir / "jobs.db"
        self._init_db()
        if devices is not None:
            self._set_meta("devices", json.dumps(list(devices)))
        self.devices = self._devices()

    # -- database ---------------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA busy_timeout = 30000")
        db.execute("PRAGMA synchronous = NORMAL")
        return db

    @contextlib.contextmanager
    def _tx(self, immediate: bool = True):
        """A transaction; IMMEDIATE takes the write lock up front, so read-then-write claims cannot race."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE" if immediate else "BEGIN")
            yield db
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    @contextlib.contextmanager
    def _read(self):
        db = self._connect()
        try:
            yield db
        finally:
            db.close()

    def _init_db(self) -> None:
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise JobError(f"{self.db_path}: cannot open the job database ({exc})") from exc
        try:
            db.execute("PRAGMA journal_mode = WAL")
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            if row is None:
                db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
            elif int(row["value"]) > SCHEMA_VERSION:
                raise JobError(f"{self.db_path}: job database schema {row['value']} is newer than this SPO Studio "
                               f"({SCHEMA_VERSION})")
        except sqlite3.DatabaseError as exc:
            raise JobError(f"{self.db_path}: not a job database ({exc})") from exc
        finally:
            db.close()

    def _set_meta(self, key: str, value: str) -> None:
        with self._tx() as db:
            db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def _devices(self) -> list[str]:
        with self._read() as db:
            row = db.execute("SELECT value FROM meta WHERE key = 'devices'").fetchone()
        if row is not None:
            return json.loads(row["value"])
        devices = detect_devices()
        self._set_meta("devices", json.dumps(devices))
        return devices

    @property
    def on_gpu(self) -> bool:
        return self.devices != ["cpu"]

    # -- reading ------------------------------------------------------------------------------------

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        return Job(**{k: row[k] for k in row.keys()})

    def list(self, reconcile: bool = True) -> list[Job]:
        """Every job, newest first; queued jobs carry their queue position."""
        if reconcile and self.reconcile():
            self.dispatch()  # a dead job freed its GPU: the next one may start
        with self._read() as db:
            jobs = [self._job(r) for r in db.execute("SELECT * FROM jobs ORDER BY id DESC")]
        queued = sorted((j for j in jobs if j.status == "queued"), key=lambda j: j.queue_seq or 0)
        for i, job in enumerate(queued):
            job.queue_position = i + 1
        return jobs

    def get(self, job_id: int) -> Job:
        try:
            job_id = int(job_id)
        except (TypeError, ValueError):
            raise JobError(f"job id must be a number; got {job_id!r}") from None
        with self._read() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobError(f"no job {job_id} in {self.db_path}")
            job = self._job(row)
            if job.status == "queued":
                ahead = db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND queue_seq < ?",
                                   (job.queue_seq,)).fetchone()[0]
                job.queue_position = ahead + 1
        return job

    def metrics(self, job_id: int, since_step: int = -1) -> list[dict]:
        """Metric rows {step, key, value, time} after `since_step`, in step order."""
        with self._read() as db:
            rows = db.execute("SELECT step, key, value, time FROM metrics WHERE job_id = ? AND step > ? "
                              "ORDER BY step, key", (int(job_id), since_step)).fetchall()
        return [dict(r) for r in rows]

    def images(self, job_id: int) -> list[dict]:
        """Sample images {path, step, epoch, kind} in epoch order (only files that exist)."""
        with self._read() as db:
            rows = db.execute("SELECT path, step, epoch, kind FROM images WHERE job_id = ? ORDER BY epoch, step, path",
                              (int(job_id),)).fetchall()
        return [dict(r) for r in rows if Path(r["path"]).is_file()]

    def log(self, job_id: int, lines: int = 40) -> str:
        return log_tail(Path(self.get(job_id).run_dir) / "log.txt", lines)

    # -- writing: submit, stop, resume, delete ----------------------------------------------------------

    def submit(self, method: str, values: dict[str, Any] | None = None, name: str | None = None, gpus: int = 1,
               uploads: dict[str, str | Path] | None = None, grace: float = DEFAULT_GRACE, start: bool = True) -> Job:
        """Validate a config (the method's dataclass; `values` may be partial), write the run folder, queue it.

        `uploads` maps a field (`prompts` or `train_data`) to a file that is validated and copied into the
        run folder. `grace`: seconds from a stop request to the kill. `start=False` only queues (the next
        `dispatch` starts it).
        """
        from .config import save_config

        cls = config_class(method)
        values = {k: v for k, v in dict(values or {}).items() if k != "method"}
        name = check_job_name(name)
        uploads = {k: Path(v) for k, v in (uploads or {}).items() if v}
        field_names = {f.name for f in dataclasses.fields(cls)}
        for field in uploads:
            if field not in field_names:
                raise JobError(f"method {method!r} has no {field!r} field for the uploaded file")
        try:
            gpus = int(gpus)
        except (TypeError, ValueError):
            raise JobError(f"gpus must be a whole number; got {gpus!r}") from None
        if gpus < 1:
            raise JobError(f"gpus must be >= 1; got {gpus}")
        if not self.on_gpu and gpus > 1:
            raise JobError(f"this machine has no GPU: a job runs as one CPU process (asked for {gpus} GPUs)")
        if self.on_gpu and gpus > len(self.devices):
            raise JobError(f"asked for {gpus} GPUs; this machine offers {len(self.devices)} "
                           f"({','.join(self.devices)})")
        cfg = check_config(method, values, uploads)  # everything, before a row or a folder exists

        name = name or f"{method.upper()} on {Path(str(getattr(cfg, 'base_model', 'model'))).name}"
        now = time.time()
        with self._tx() as db:
            seq = db.execute("SELECT COALESCE(MAX(queue_seq), 0) + 1 FROM jobs").fetchone()[0]
            cur = db.execute("INSERT INTO jobs (name, method, status, run_dir, gpus, queue_seq, created, grace) "
                             "VALUES (?, ?, 'queued', '', ?, ?, ?, ?)", (name, method, gpus, seq, now, float(grace)))
            job_id = cur.lastrowid
            run_dir = self.runs_dir / f"{job_id:04d}-{method}-{_slug(name)}"
            try:
                run_dir.mkdir(parents=True, exist_ok=False)
                for field, src in uploads.items():
                    setattr(cfg, field, _import_upload(field, src, run_dir))
                cfg.output_dir = str(run_dir)
                cfg.resume = True  # a resumed job continues from its latest checkpoint
                save_config(cfg, run_dir / "job.yaml", method=method)
            except BaseException:
                shutil.rmtree(run_dir, ignore_errors=True)
                raise
            db.execute("UPDATE jobs SET run_dir = ? WHERE id = ?", (str(run_dir), job_id))
        logger.info("queued job %d (%s, %s) in %s", job_id, method, name, run_dir)
        if start:
            self.dispatch()
        return self.get(job_id)

    def stop(self, job_id: int) -> Job:
        """Queued: cancel. Running: STOP file now; the supervisor sends SIGINT, then kills after the grace period."""
        job = self.get(job_id)
        now = time.time()
        with self._tx() as db:
            status = db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()["status"]
            if status == "queued":
                db.execute("UPDATE jobs SET status = 'stopped', ended = ?, message = 'cancelled before it started' "
                           "WHERE id = ?", (now, job.id))
            elif status in ("starting", "running"):
                (Path(job.run_dir) / "STOP").write_text(f"stop requested at {time.ctime(now)}\n")
                db.execute("UPDATE jobs SET status = 'stopping', stop_requested = ?, "
                           "message = 'stop requested: finishing the step, then a final checkpoint' WHERE id = ?",
                           (now, job.id))
            elif status == "stopping":
                pass  # already on its way
            else:
                raise JobError(f"job {job.id} is {status}; only queued or running jobs can be stopped")
        logger.info("stop requested for job %d", job.id)
        return self.get(job.id)

    def resume(self, job_id: int) -> Job:
        """Put a stopped or failed job back in the queue; the trainer continues from its latest checkpoint."""
        job = self.get(job_id)
        with self._tx() as db:
            status = db.execute("SELECT status FROM jobs WHERE id = ?", (job.id,)).fetchone()["status"]
            if status not in RESUMABLE:
                raise JobError(f"job {job.id} is {status}; only stopped or failed jobs can be resumed")
            with contextlib.suppress(FileNotFoundError):
                (Path(job.run_dir) / "STOP").unlink()
            seq = db.execute("SELECT COALESCE(MAX(queue_seq), 0) + 1 FROM jobs").fetchone()[0]
            db.execute("UPDATE jobs SET status = 'queued', queue_seq = ?, stop_requested = NULL, pid = NULL, "
                       "pid_started = NULL, trainer_pid = NULL, devices = NULL, ended = NULL, error_tail = NULL, "
                       "message = 'resume: continues from the latest checkpoint' WHERE id = ?", (seq, job.id))
        logger.info("job %d queued again (resume)", job.id)
        self.dispatch()
        return self.get(job.id)

    def delete(self, job_id: int) -> str | None:
        """Remove a job that is not running: its run folder (only inside the runs folder), then its rows.

        A folder that cannot be removed completely keeps the job (delete it again once it can be) and is
        a JobError naming what is left; a folder outside the runs folder is left in place, which the
        returned note says (None when everything went)."""
        job = self.get(job_id)
        if job.active:
            raise JobError(f"job {job.id} is {job.status}; stop it before deleting it")
        run_dir = Path(job.run_dir).resolve() if job.run_dir else None
        note = None
        if run_dir and run_dir.exists():
            if not run_dir.is_relative_to(self.runs_dir) or run_dir == self.runs_dir:
                note = f"its run folder {run_dir} lies outside the runs folder {self.runs_dir}: left in place"
            else:
                failures: list[str] = []
                if sys.version_info >= (3, 12):
                    shutil.rmtree(run_dir, onexc=lambda _fn, path, exc: failures.append(f"{path}: {exc}"))
                else:
                    shutil.rmtree(run_dir, onerror=lambda _fn, path, info: failures.append(f"{path}: {info[1]}"))
                if failures or run_dir.exists():
                    detail = failures[0] if failures else f"{run_dir} still exists"
                    raise JobError(f"job {job.id}: could not remove {max(1, len(failures))} item(s) of its run "
                                   f"folder (first: {detail}); the job is kept, delete it again once it can go")
        with self._tx() as db:
            for table, key in (("metrics", "job_id"), ("images", "job_id"), ("jobs", "id")):
                db.execute(f"DELETE FROM {table} WHERE {key} = ?", (job.id,))  # noqa: S608 (fixed names)
        logger.info("deleted job %d%s", job.id, f" ({note})" if note else "")
        return note

    # -- the queue ------------------------------------------------------------------------------------

    def reconcile(self) -> list[int]:
        """Mark jobs whose supervisor is gone as failed (with their last log lines); returns their ids."""
        now = time.time()
        failed = []
        with self._read() as db:
            rows = [self._job(r) for r in db.execute(
                f"SELECT * FROM jobs WHERE status IN ({','.join('?' * len(ACTIVE))})", ACTIVE)]
        for job in rows:
            if job.pid is None:
                if now - (job.started or job.created) < START_TIMEOUT:
                    continue
                reason = "its runner never started"
            elif process_alive(job.pid, job.pid_started):
                continue
            else:
                reason = f"its runner (pid {job.pid}) ended without reporting"
            if process_alive(job.trainer_pid):  # an orphaned trainer cannot report: end it
                _signal_group(job.trainer_pid, signal.SIGKILL)
            run_dir = Path(job.run_dir)
            with contextlib.suppress(Exception):
                _Tail(run_dir).ingest(self, job.id)  # keep whatever it wrote before dying
            tail = log_tail(run_dir / "log.txt")
            last = tail.splitlines()[-1] if tail else "no log"
            with self._tx() as db:
                cur = db.execute(f"UPDATE jobs SET status = 'failed', ended = ?, error_tail = ?, message = ? "
                                 f"WHERE id = ? AND status IN ({','.join('?' * len(ACTIVE))}) AND "
                                 f"COALESCE(pid, -1) = COALESCE(?, -1)",
                                 (now, tail, f"{reason}; last log line: {last}", job.id, *ACTIVE, job.pid))
            if cur.rowcount:
                logger.warning("job %d failed: %s", job.id, reason)
                failed.append(job.id)
        return failed

    def dispatch(self) -> list[int]:
        """Start queued jobs, oldest first, while GPUs are free (one job at a time on CPU); returns started ids."""
        self.reconcile()
        started = []
        with self._tx() as db:
            rows = [self._job(r) for r in db.execute("SELECT * FROM jobs WHERE status IN "
                                                      f"({','.join('?' * (len(ACTIVE) + 1))}) ORDER BY queue_seq",
                                                      (*ACTIVE, "queued"))]
            busy = {d for j in rows if j.active for d in (j.devices or "").split(",") if d}
            free = [d for d in self.devices if d not in busy]
            for job in (j for j in rows if j.status == "queued"):
                need = job.gpus if self.on_gpu else 1
                if need > len(self.devices):
                    db.execute("UPDATE jobs SET status = 'failed', ended = ?, message = ? WHERE id = ?",
                               (time.time(), f"asks for {need} GPUs; this machine offers {len(self.devices)}", job.id))
                    continue
                if need > len(free):
                    break  # strict FIFO: the head of the queue waits for its GPUs
                take, free = free[:need], free[need:]
                now = time.time()
                proc = self._spawn(job, take)
                db.execute("UPDATE jobs SET status = 'starting', devices = ?, started = ?, heartbeat = ?, pid = ?, "
                           "pid_started = ?, attempts = attempts + 1, message = NULL WHERE id = ?",
                           (",".join(take), now, now, proc.pid, _process_started(proc.pid), job.id))
                started.append(job.id)
        for job_id in started:
            logger.info("started job %d", job_id)
        if started:
            start_watchdog(self.db_path)
        return started

    def _spawn(self, job: Job, devices: list[str]) -> subprocess.Popen:
        env = dict(os.environ)
        if devices != ["cpu"]:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
        env.setdefault("PYTHONUNBUFFERED", "1")
        run_dir = Path(job.run_dir)
        log = open(run_dir / "log.txt", "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", f"{__package__}.job_runner", "worker", str(self.db_path),
                                     str(job.id)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                    cwd=run_dir, env=env, **_detach_kwargs())
        finally:
            log.close()
        threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it ends while we live
        return proc

    # -- what the supervisor writes -------------------------------------------------------------------

    def _update(self, job_id: int, **values: Any) -> None:
        cols = ", ".join(f"{k} = ?" for k in values)
        with self._tx() as db:
            db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*values.values(), job_id))  # noqa: S608


def _slug(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-").lower()
    return slug[:40] or "job"


# ----------------------------------------------------------------------------------------------
# A run's files, copied into the store
# ----------------------------------------------------------------------------------------------


class _Tail:
    """Reads new complete lines of the run's metrics.jsonl / events.jsonl and writes them as rows."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.offsets = {"metrics.jsonl": 0, "events.jsonl": 0}
        self.events: list[dict] = []

    def _new_lines(self, name: str) -> list[dict]:
        path = self.run_dir / name
        if not path.exists():
            return []
        with open(path, "rb") as f:
            f.seek(self.offsets[name])
            data = f.read()
        end = data.rfind(b"\n")
        if end < 0:
            return []
        self.offsets[name] += end + 1
        out = []
        for line in data[: end + 1].decode("utf-8", errors="replace").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def ingest(self, store: JobStore, job_id: int) -> bool:
        """Copy what is new into the store; True if anything was."""
        metrics, events = self._new_lines("metrics.jsonl"), self._new_lines("events.jsonl")
        if not metrics and not events:
            return False
        self.events += events
        rows, images, updates = [], [], {}
        for m in metrics:
            step = int(m.get("step", 0))
            for key, value in m.items():
                if key in ("step", "time") or not isinstance(value, (int, float)):
                    continue
                rows.append((job_id, step, key, None if value != value else float(value), m.get("time")))
            updates["step"] = max(updates.get("step", 0), step)
        for e in events:
            kind = e.get("event")
            if kind == "started":
                updates.update(total=e.get("total"), step0=e.get("step", 0), run_started=e.get("time"),
                               step=max(updates.get("step", 0), int(e.get("step", 0))))
            elif kind == "sample" and e.get("path"):
                images.append((job_id, str(e["path"]), e.get("step"), e.get("epoch"), "sample", e.get("time")))
            elif kind in ("finished", "stopped") and e.get("lora"):
                updates["lora"] = json.dumps(e["lora"])
            if "step" in e and kind != "started":
                updates["step"] = max(updates.get("step", 0), int(e["step"]))
        with store._tx() as db:
            db.executemany("INSERT OR REPLACE INTO metrics VALUES (?, ?, ?, ?, ?)", rows)
            db.executemany("INSERT OR REPLACE INTO images VALUES (?, ?, ?, ?, ?, ?)", images)
            if updates:
                if "step" in updates and "step0" not in updates:  # never move the counter backwards mid-attempt
                    cur = db.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    updates["step"] = max(updates["step"], cur["step"] if cur else 0)
                cols = ", ".join(f"{k} = ?" for k in updates)
                db.execute(f"UPDATE jobs SET {cols} WHERE id = ?", (*updates.values(), job_id))  # noqa: S608
        return True
