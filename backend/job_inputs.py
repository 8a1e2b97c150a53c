"""What a job is made of, checked before it is queued: its method and config, its name, and the files
a page uploads (prompt lists, Pick-a-Pic preference data), which are copied into the run folder.

Prompt files are read by `sources.read_prompt_file`, the reader the trainer itself uses, so a list
the page accepts is one the trainer reads; here its refusals become `JobError`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import unicodedata
from pathlib import Path
from typing import Any

from . import sources
from .job_records import JobError
from .rewards import check_reward_paths, is_reward
from .sources import MAX_PARQUET_BYTES, MAX_PROMPT_CHARS, MAX_PROMPTS, MAX_PROMPTS_BYTES  # noqa: F401 (names of this module)

MAX_NAME_CHARS = 100
PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
UPLOAD_FIELDS = ("prompts", "train_data")  # config fields a page upload may fill
MODEL_FIELDS = ("base_model", "spm", "spm_clip", "embedding_model")  # 'pocket' or a local folder / file
PATH_FIELDS = (*MODEL_FIELDS, "prompts", "train_data")


# ----------------------------------------------------------------------------------------------
# Methods and their configs (whatever the registry `train.methods.METHODS` holds)
# ----------------------------------------------------------------------------------------------


def methods() -> dict[str, type]:
    """Method name → its config dataclass, from the method registry (`train.methods`)."""
    from .train.methods import config_classes

    return config_classes()


def config_class(method: str) -> type:
    classes = methods()
    if method not in classes:
        raise JobError(f"unknown method {method!r}; available: {', '.join(sorted(classes))}")
    return classes[method]


# ----------------------------------------------------------------------------------------------
# Uploaded prompt lists and preference data, names and model sources
# ----------------------------------------------------------------------------------------------


def _check_size(path: Path, limit: int) -> None:
    try:
        sources.check_size(path, limit)
    except ValueError as exc:
        raise JobError(str(exc)) from None


def read_prompt_list(path: str | Path, max_bytes: int = MAX_PROMPTS_BYTES) -> list[str]:
    """Prompts of a .txt (one per line), .json (list of strings) or .parquet (`caption` or `prompt` column):
    `sources.read_prompt_file`, the trainer's own reader, with its refusals as JobError."""
    try:
        return sources.read_prompt_file(path, max_bytes)
    except (OSError, ValueError) as exc:
        raise JobError(str(exc)) from exc


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
    if not sources.is_named(value) and not Path(value).expanduser().exists():
        raise JobError(f"{field}: {value}: no such folder or file (use 'pocket' or a local path)")


def check_config(method: str, values: dict[str, Any], uploads: dict[str, Path]):
    """The config of a job to queue, validated by the method's dataclass (`values` may be partial), with
    the uploaded files checked, every path made absolute (the trainer runs in the run folder), and the
    model sources, prompts and preference data it names checked. Fields filled by `uploads` keep their
    values until the upload is copied into the run folder. JobError says what is wrong."""
    from .config import from_dict

    cls = config_class(method)
    field_names = {f.name for f in dataclasses.fields(cls)}
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
        if field in uploads or not isinstance(value, str) or value == "" or sources.is_named(value):
            continue
        if field == "spm" and value == sources.POCKET_LATENT:
            sources.spm(value)  # built?
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
    if "prompts" in field_names and "prompts" not in uploads and not sources.is_named(cfg.prompts):
        read_prompt_list(cfg.prompts)
    if "train_data" in field_names and "train_data" not in uploads and not sources.is_named(cfg.train_data):
        check_pickapic(cfg.train_data)
    try:
        cfg.check_model()
    except ValueError as exc:  # ModelLoadError included
        raise JobError(str(exc)) from exc
    return cfg
