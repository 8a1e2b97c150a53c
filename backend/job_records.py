"""What a job *is*, as every reader of the job store sees it: statuses, the `Job` row, `JobError`.

No process, database or file is touched here except by `log_tail`, which reads the end of a log;
the page, the store and the detached supervisor all share these names (see `jobs` for the whole).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

ACTIVE = ("starting", "running", "stopping")
RESUMABLE = ("stopped", "failed")
LOG_TAIL_LINES = 30


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
