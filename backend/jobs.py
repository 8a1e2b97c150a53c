"""The job store: fine-tune jobs in SQLite (WAL), run by detached supervisors, read by any number of pages.

    store = JobStore("runs")                                   # runs/jobs.db, created on first use
    job = store.submit("spo", {"epochs": 2}, name="pocket")    # queued; starts as soon as a slot is free
    store.stop(job.id); store.resume(job.id); store.delete(job.id)

    python -m spo_studio.backend.jobs worker runs/jobs.db 7    # what `dispatch` spawns, detached

The contract between trainer and page is files and SQLite, never memory:
  * `submit` validates the config with the method's dataclass (`train.cli.METHODS`), writes
    `<run>/job.yaml` and a `queued` row. `dispatch` starts queued jobs in FIFO order, one job per GPU
    (one at a time on a CPU machine); the head of the queue waits for its GPUs, nothing jumps it.
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
import unicodedata
from pathlib import Path
from typing import Any

from .job_queue import (  # noqa: F401 (process_alive and the helpers are part of this module's names)
    _detach_kwargs,
    _die_with_parent,
    _process_started,
    _signal_group,
    process_alive,
    start_watchdog,
    trainer_exit_text,
)
from .rewards import check_reward_paths, is_reward

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
ACTIVE = ("starting", "running", "stopping")
RESUMABLE = ("stopped", "failed")
SIGINT_AFTER = 10.0  # seconds between the STOP file and SIGINT
DEFAULT_GRACE = 300.0  # seconds between the STOP file and SIGKILL
START_TIMEOUT = 120.0  # a `starting` row with no supervisor after this long is failed
POLL = 0.5  # supervisor loop period (seconds)
LOG_TAIL_LINES = 30
MAX_PROMPTS_BYTES = 20 * 2**20  # an uploaded .txt / .json prompt list
MAX_PARQUET_BYTES = 2 * 2**30  # an uploaded parquet (prompts or Pick-a-Pic pairs)
MAX_PROMPTS = 200_000
MAX_PROMPT_CHARS = 2000
MAX_NAME_CHARS = 100
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
UPLOAD_FIELDS = ("prompts", "train_data")  # config fields a page upload may fill
MODEL_FIELDS = ("base_model", "spm", "spm_clip", "embedding_model")  # 'pocket' or a local folder / file
PATH_FIELDS = (*MODEL_FIELDS, "prompts", "train_data")

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


class JobError(ValueError):
    """A request the store refuses (unknown job, wrong state, invalid config or upload): the message says why."""


@dataclasses.dataclass
class Job:
    """One row of the `jobs` table, plus what a reader derives from it."""

    id: int
    name: str
    method: str
    status: str
    run_dir: str
    gpus: int
    devices: str | None
    queue_seq: int | None
    pid: int | None
    pid_started: float | None
    trainer_pid: int | None
    step: int
    total: int | None
    step0: int | None
    run_started: float | None
    created: float
    started: float | None
    ended: float | None
    heartbeat: float | None
    stop_requested: float | None
    grace: float
    message: str | None
    error_tail: str | None
    lora: str | None
    attempts: int
    queue_position: int | None = None  # 1 = next to start; set by `list`/`get` for queued jobs

    @property
    def active(self) -> bool:
        return self.status in ACTIVE

    @property
    def progress(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def lora_files(self) -> dict[str, str]:
        return json.loads(self.lora) if self.lora else {}

    def progress_text(self) -> str:
        """"40/120 (33%)"; past the trainer's estimate of the total, only the step."""
        if self.total and self.step <= self.total:
            return f"{self.step}/{self.total} ({100 * self.progress:.0f}%)"
        return str(self.step) if self.step or self.total else ""

    def eta_seconds(self, now: float | None = None) -> float | None:
        """Seconds left at the rate of this attempt (None before two points are known)."""
        if self.status not in ("running", "stopping") or not self.total or self.run_started is None:
            return None
        if self.step > self.total:  # the total was an estimate and is behind us
            return None
        done = self.step - (self.step0 or 0)
        if done <= 0:
            return None
        elapsed = (now or time.time()) - self.run_started
        return max(0.0, (self.total - self.step) * elapsed / done)

    def status_line(self) -> str:
        """One line for people: status, progress, ETA or the reason it ended."""
        if self.status == "queued":
            pos = f" #{self.queue_position}" if self.queue_position else ""
            return f"queued{pos}" + (f": {self.message}" if self.message else "")
        parts = [self.status]
        if self.progress_text():
            parts.append(f"step {self.progress_text()}")
        eta = self.eta_seconds()
        if eta is not None:
            parts.append(f"ETA {format_duration(eta)}")
        if self.message:
            parts.append(self.message)
        return " · ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


# ----------------------------------------------------------------------------------------------
# Methods and their configs (whatever `train.cli.METHODS` holds)
# ----------------------------------------------------------------------------------------------


def methods() -> dict[str, type]:
    """Method name → its config dataclass, from the trainer's registry."""
    import importlib

    from .train.cli import METHODS

    out = {}
    for name, (cfg_module, cfg_class, *_rest) in METHODS.items():
        module = importlib.import_module(f".train.{cfg_module}", __package__)
        out[name] = getattr(module, cfg_class)
    return out


def config_class(method: str) -> type:
    classes = methods()
    if method not in classes:
        raise JobError(f"unknown method {method!r}; available: {', '.join(sorted(classes))}")
    return classes[method]


# ----------------------------------------------------------------------------------------------
# Uploaded prompt lists and preference data: validated before a job is queued
# ----------------------------------------------------------------------------------------------


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise JobError(f"{path.name}: {size / 2**20:.1f} MB is over the {limit / 2**20:.0f} MB limit "
                       f"for this kind of file")


def read_prompt_list(path: str | Path, max_bytes: int = MAX_PROMPTS_BYTES) -> list[str]:
    """Prompts of a .txt (one per line), .json (list of strings) or .parquet (`caption` or `prompt` column)."""
    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: no such prompts file")
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".json", ".parquet"):
        raise JobError(f"{path.name}: prompts must be a .txt (one per line), .json (list of strings) "
                       f"or .parquet (a `caption` or `prompt` column) file")
    _check_size(path, MAX_PARQUET_BYTES if suffix == ".parquet" else max_bytes)
    if suffix == ".parquet":
        prompts = _parquet_column(path, ("caption", "prompt"))
    elif suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise JobError(f"{path.name}: not valid JSON ({exc})") from exc
        if not isinstance(data, list) or not all(isinstance(p, str) for p in data):
            raise JobError(f"{path.name}: expected a JSON list of strings, e.g. [\"a red circle\", \"a blue square\"]")
        prompts = data
    else:
        try:
            prompts = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as exc:
            raise JobError(f"{path.name}: not UTF-8 text ({exc})") from exc
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise JobError(f"{path.name}: no prompts in the file")
    if len(prompts) > MAX_PROMPTS:
        raise JobError(f"{path.name}: {len(prompts)} prompts; at most {MAX_PROMPTS} are accepted")
    long = [i for i, p in enumerate(prompts) if len(p) > MAX_PROMPT_CHARS]
    if long:
        raise JobError(f"{path.name}: prompt {long[0] + 1} is longer than {MAX_PROMPT_CHARS} characters")
    return prompts


def _parquet_column(path: Path, names: tuple[str, ...]) -> list[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several types for a broken file
        raise JobError(f"{path.name}: not a readable parquet file ({exc})") from exc
    columns = pf.schema_arrow.names
    name = next((n for n in names if n in columns), None)
    if name is None:
        raise JobError(f"{path.name}: needs a {' or '.join(repr(n) for n in names)} column; it has {columns}")
    values = pf.read(columns=[name]).column(name).to_pylist()
    if not all(v is None or isinstance(v, str) for v in values):
        raise JobError(f"{path.name}: column {name!r} must hold strings")
    return [v for v in values if v]


def check_pickapic(path: str | Path) -> int:
    """Validate a Pick-a-Pic parquet (schema only, no image decoding); returns its row count."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise JobError(f"{path}: no such preference-data file")
    if path.suffix.lower() != ".parquet":
        raise JobError(f"{path.name}: preference data must be a Pick-a-Pic .parquet file")
    _check_size(path, MAX_PARQUET_BYTES)
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise JobError(f"{path.name}: not a readable parquet file ({exc})") from exc
    missing = [c for c in PICKAPIC_COLUMNS if c not in pf.schema_arrow.names]
    if missing:
        raise JobError(f"{path.name}: not in Pick-a-Pic schema; missing column(s) {missing} "
                       f"(needs {list(PICKAPIC_COLUMNS)})")
    if pf.metadata.num_rows == 0:
        raise JobError(f"{path.name}: no rows")
    return pf.metadata.num_rows


def _import_upload(field: str, src: Path, run_dir: Path) -> str:
    """Validate an uploaded file for `field` and copy it into the run folder; returns the new path."""
    if field == "prompts":
        prompts = read_prompt_list(src)
        if src.suffix.lower() == ".parquet":  # the trainer reads .txt / .json: keep the captions only
            dst = run_dir / "prompts.json"
            _atomic_write(dst, json.dumps(prompts, ensure_ascii=False, indent=0))
            return str(dst)
        dst = run_dir / f"prompts{src.suffix.lower()}"
    elif field == "train_data":
        check_pickapic(src)
        dst = run_dir / "train_data.parquet"
    else:
        raise JobError(f"uploads fill only {UPLOAD_FIELDS}; got {field!r}")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)
    return str(dst)


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def check_job_name(name: str | None) -> str:
    """A job name as given, stripped; refused when too long or holding control characters ("" = a default)."""
    name = (name or "").strip()
    if len(name) > MAX_NAME_CHARS:
        raise JobError(f"name: at most {MAX_NAME_CHARS} characters; got {len(name)}")
    bad = next((c for c in name if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise JobError(f"name: control character {bad!r} is not allowed")
    return name


def _check_model_source(field: str, value: str) -> None:
    if value != "pocket" and not Path(value).expanduser().exists():
        raise JobError(f"{field}: {value}: no such folder or file (use 'pocket' or a local path)")


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 64 * 1024) -> str:
    """The last `lines` lines of a log, progress-bar redraws (\\r) collapsed to their last state."""
    path = Path(path)
    if not path.exists():
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - max_bytes))
        data = f.read().decode("utf-8", errors="replace")
    out = []
    for line in data.split("\n"):
        line = line.rstrip("\r").rsplit("\r", 1)[-1]
        if line.strip():
            out.append(line)
    return "\n".join(out[-lines:])


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


# ----------------------------------------------------------------------------------------------
# The store
# ----------------------------------------------------------------------------------------------


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
        from .config import from_dict, save_config

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
        # validate everything before a row or a folder exists
        for field, src in uploads.items():
            if field == "prompts":
                read_prompt_list(src)
            else:
                check_pickapic(src)
        try:
            cfg = from_dict(cls, {**values, "output_dir": "pending"}, f"{method} config")
        except ValueError as exc:
            raise JobError(str(exc)) from exc
        for field in PATH_FIELDS:  # the trainer runs in the run folder: relative paths become absolute
            value = getattr(cfg, field, None)
            if field in uploads or not isinstance(value, str) or value in ("", "pocket"):
                continue
            if field == "spm" and is_reward(value):  # an image reward: its own paths are checked and resolved
                try:
                    cfg.spm = check_reward_paths(value)
                except ValueError as exc:
                    raise JobError(str(exc)) from exc
                continue
            if field in MODEL_FIELDS:
                _check_model_source(field, value)
            setattr(cfg, field, str(Path(value).expanduser().resolve()))
        if "prompts" in field_names and "prompts" not in uploads and cfg.prompts != "pocket":
            read_prompt_list(cfg.prompts)
        if "train_data" in field_names and "train_data" not in uploads and cfg.train_data != "pocket":
            check_pickapic(cfg.train_data)
        try:
            cfg.check_model()
        except ValueError as exc:  # ModelLoadError included
            raise JobError(str(exc)) from exc

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
            proc = subprocess.Popen([sys.executable, "-m", f"{__package__}.jobs", "worker", str(self.db_path),
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
# The supervisor: runs one job's trainer and copies its progress into the store
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
        sys.stderr.write("usage: python -m spo_studio.backend.jobs worker DB_PATH JOB_ID\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_worker(argv[1], int(argv[2]))


if __name__ == "__main__":
    sys.exit(main())
