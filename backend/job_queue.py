"""Processes of the job store, and the watchdog that keeps its queue moving with no page open.

A supervisor that ends normally starts the next queued job itself. One that is killed (kill -9, the
out-of-memory killer) cannot, so `dispatch` also starts a watchdog whenever it starts a job: one
detached process per job database (a lock file makes a second one exit at once) that reconciles
the store every `WATCH_PERIOD` seconds, so a dead supervisor's job is failed and the next queued job
starts, and that exits when no job is active.

    python -m spo_studio.backend.job_queue watchdog runs/jobs.db    # what `start_watchdog` spawns
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

WATCH_PERIOD = 2.0  # seconds between the watchdog's looks at the store


def _process_started(pid: int) -> float | None:
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def process_alive(pid: int | None, started: float | None = None) -> bool:
    """True if `pid` runs (not a zombie) and, when `started` is given, is the process that began then."""
    if not pid:
        return False
    try:
        import psutil

        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except ImportError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False
    except Exception:  # NoSuchProcess, AccessDenied
        return False


def _signal_group(pid: int | None, sig: int) -> None:
    """Send `sig` to the process group led by `pid` (the trainer and, under accelerate, its ranks)."""
    if not pid:
        return
    try:
        if hasattr(os, "killpg"):
            os.killpg(pid, sig)
        else:  # Windows: no groups; SIGINT is not deliverable, so anything but a kill becomes terminate
            os.kill(pid, sig if sig == signal.SIGINT else signal.SIGTERM)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _detach_kwargs() -> dict:
    if os.name == "nt":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "DETACHED_PROCESS", 0)}
    return {"start_new_session": True}


def _die_with_parent() -> None:  # runs in the trainer child before exec (Linux): SIGKILL when the supervisor dies
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def trainer_exit_text(rc: int) -> str:
    """How a trainer ended, for people: a signal by its name (SIGKILL: most often the out-of-memory killer)."""
    if rc >= 0:
        return f"the trainer exited with code {rc}"
    try:
        name = signal.Signals(-rc).name
    except ValueError:
        name = f"signal {-rc}"
    hint = " (by someone, or by the out-of-memory killer when memory ran out)" if rc == -signal.SIGKILL else ""
    return f"the trainer was killed by {name}{hint}"


# ----------------------------------------------------------------------------------------------
# The watchdog
# ----------------------------------------------------------------------------------------------


def _lock_path(db_path: Path) -> Path:
    return db_path.with_name(db_path.name + ".watchdog.lock")


def _try_lock(f) -> bool:
    """Take the lock file without waiting; False when another process holds it."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(f.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _unlock(f) -> None:
    with contextlib.suppress(OSError):
        if os.name == "nt":
            import msvcrt

            f.seek(0)
            msvcrt.locking(f.fileno(), msvcrt.LK_UNLCK, 1)
        else:
            import fcntl

            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _active(store) -> int:
    from .job_records import ACTIVE

    with store._read() as db:
        return db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({','.join('?' * len(ACTIVE))})",
                          ACTIVE).fetchone()[0]


def start_watchdog(db_path: str | Path) -> bool:
    """Start the watchdog of `db_path` unless one runs; True if one was started. Call it after the
    rows of the jobs just started are committed (the watchdog exits when it sees none active)."""
    db_path = Path(db_path)
    with open(_lock_path(db_path), "a+b") as f:
        if not _try_lock(f):
            return False  # one is watching; it sees the new job at its next look
        _unlock(f)
    with open(db_path.with_name(db_path.name + ".watchdog.log"), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", f"{__package__}.job_queue", "watchdog", str(db_path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=db_path.parent,
                                **_detach_kwargs())
    threading.Thread(target=proc.wait, daemon=True).start()  # reap it if it ends while we live
    return True


def run_watchdog(db_path: str | Path, period: float = WATCH_PERIOD) -> int:
    """Reconcile the store every `period` seconds (a dead supervisor's job fails, the next queued job
    starts) while any job is active; exit when none is, or when another watchdog holds the lock."""
    from .job_store import JobStore

    db_path = Path(db_path)
    store = JobStore(db_path.parent, db_path=db_path)
    with open(_lock_path(db_path), "a+b") as f:
        if not _try_lock(f):
            return 0
        logger.info("watching %s", db_path)
        while True:
            if store.reconcile():
                store.dispatch()
            if not _active(store):
                _unlock(f)
                # a job started between the look and the unlock found the lock taken and counted on us
                if not _active(store) or not _try_lock(f):
                    logger.info("no active job: the watchdog ends")
                    return 0
            time.sleep(period)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) != 2 or argv[0] != "watchdog":
        sys.stderr.write("usage: python -m spo_studio.backend.job_queue watchdog DB_PATH\n")
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    return run_watchdog(argv[1])


if __name__ == "__main__":
    sys.exit(main())
