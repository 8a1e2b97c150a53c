"""Typed configs shared by the CLI, the YAML presets and the web page.

Each method has one `@dataclass` whose fields carry the paper's defaults and a help text
(`option(default, "help")`). The same class is read from a YAML preset, patched by `key=value`
overrides from the command line, rendered as a form by the page, and saved resolved beside every run
with a `config_version`, so an old run's config can be migrated instead of failing to load.

    cfg = load_config(SPMTrainConfig, "configs/pocket_spm.yaml", ["lr=1e-4", "max_steps=200"])
    save_config(cfg, run_dir / "config.yaml")
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

CONFIG_VERSION = 1


def option(default: Any, help: str, **extra: Any) -> Any:
    """A config field with a default and a help text (shown by `--help`, YAML docs and the page)."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def help_texts(cls) -> dict[str, str]:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


def _field_type(cls, name: str):
    hints = typing.get_type_hints(cls)
    return hints[name]


def _coerce(value: Any, tp, where: str) -> Any:
    """Convert a YAML/CLI value to the field's type; raise a clear error instead of guessing."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except ValueError as exc:
                errors.append(str(exc))
        raise ValueError(errors[0] if errors else f"{where}: cannot use {value!r}")
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_coerce(v, inner, where) for v in value]
        return tuple(items) if origin is tuple else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ValueError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)):
            raise ValueError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def from_dict(cls, data: dict, source: str = "config"):
    """Build `cls` from a dict; unknown keys are an error that lists the valid ones."""
    data = dict(data)
    version = _coerce(data.pop("config_version", CONFIG_VERSION), int, f"{source}: config_version")
    data.pop("method", None)
    if version > CONFIG_VERSION:
        raise ValueError(f"{source}: config_version {version} is newer than this SPO Studio ({CONFIG_VERSION})")
    if version < 1:
        raise ValueError(f"{source}: config_version must be >= 1; got {version}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown} for {cls.__name__}; valid keys: {sorted(names)}")
    kwargs = {k: _coerce(v, _field_type(cls, k), f"{source}: {k}") for k, v in data.items()}
    cfg = cls(**kwargs)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        out[key.strip()] = value
    return out


def load_config(cls, path: str | Path | None = None, overrides: list[str] | None = None):
    """Defaults ← YAML preset (if given) ← `key=value` overrides."""
    data: dict[str, Any] = {}
    source = cls.__name__
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such config file")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML ({exc})") from exc
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config must be a mapping of key: value")
        data.update(loaded)
        source = str(path)
    data.update(parse_overrides(overrides or []))
    return from_dict(cls, data, source)


def to_dict(cfg) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def config_hash(cfg) -> str:
    return hashlib.sha256(json.dumps(to_dict(cfg), sort_keys=True, default=str).encode()).hexdigest()[:12]


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_config(cfg, path: str | Path, method: str | None = None) -> None:
    """Write the resolved config as YAML with `config_version` (and the method name), atomically."""
    data = {"config_version": CONFIG_VERSION, **({"method": method} if method else {}), **to_dict(cfg)}
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
