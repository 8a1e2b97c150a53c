"""Run folders: resolved config, metrics, events, checkpoints — written so a reader never sees half a file.

A run folder holds `config.yaml` (resolved, with config_version), `metrics.jsonl` (one JSON object
per logged step), `events.jsonl` (started / checkpoint / sample / finished / failed, for the job
store and the page), TensorBoard event files under `tb/`, `checkpoints/step-N/` and `log.txt`.
Checkpoints are written to a temporary folder and renamed; `latest_checkpoint` ignores leftovers.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)


class RunLogger:
    """Append-only metrics and events for one run (rank 0 only writes)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self._tb = None
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self._tb = SummaryWriter(str(self.dir / "tb"))
                except ImportError:  # tensorboard is optional for library users
                    logger.warning("tensorboard is not installed: metrics go to metrics.jsonl only")

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def metrics(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in values.items() if v is not None}
        self._append("metrics.jsonl", {"step": step, "time": time.time(), **clean})
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)

    def event(self, kind: str, **data: Any) -> None:
        if not self.enabled:
            return
        self._append("events.jsonl", {"event": kind, "time": time.time(), **data})

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return rows


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write `checkpoints/step-<step>/state.pt` atomically and keep the newest `keep` checkpoints."""
    ckpt_root = Path(run_dir) / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f".tmp-step-{step:08d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    torch.save(state, tmp / "state.pt")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    existing = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir())
    for old in existing[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*") if (p / "state.pt").exists())
    return ckpts[-1] if ckpts else None


def resume_checkpoint(cfg, run_dir: str | Path, method: str, may_change: frozenset[str]) -> Path | None:
    """The checkpoint a run resumes from (None: `cfg.resume` is off or `run_dir` has none), refusing checkpoints
    that were made with another recipe (method, data, init, lr, …).

    `run_dir/config.yaml` is the config the checkpoints were made with; only the keys in `may_change`
    (how long a run goes, how often it writes, how it computes) may differ. Without this a re-run with
    new data in the same folder silently continued the old run. Call it before the run's own config is saved.
    """
    import yaml

    from .config import to_dict

    ckpt = latest_checkpoint(run_dir) if cfg.resume else None
    saved = Path(run_dir) / "config.yaml"
    if ckpt is None or not saved.exists():
        return ckpt
    old = yaml.safe_load(saved.read_text()) or {}
    changed = [f"method: {old['method']!r} → {method!r}"] if old.get("method", method) != method else []
    changed += [f"{k}: {old[k]!r} → {v!r}" for k, v in to_dict(cfg).items()
                if k not in may_change and k in old and old[k] != v]
    if changed:
        raise ValueError(f"{saved}: the checkpoints in {saved.parent} were made with another config "
                         f"({'; '.join(changed)}); use a new output_dir, or resume=false to start over there")
    return ckpt


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / "state.pt" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"{file}: no checkpoint there")
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"{file}: corrupt checkpoint ({exc})") from exc
