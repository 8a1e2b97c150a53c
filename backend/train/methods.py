"""The registry of fine-tuning methods: name → where its config dataclass and its `Method` live.

The CLI (`spo train`), the job store and the studio page all read this one table; a method added
here is offered everywhere. Modules are imported on demand, so reading the table is cheap.
"""

from __future__ import annotations

import importlib
from typing import NamedTuple


class MethodEntry(NamedTuple):
    config_module: str  # a module of this package
    config_class: str
    method_module: str
    method_class: str


METHODS: dict[str, MethodEntry] = {
    "spo": MethodEntry("spo", "SPOConfig", "spo", "SPOMethod"),
    "dpo": MethodEntry("dpo", "DPOConfig", "dpo", "DPOMethod"),
    "rpo": MethodEntry("rpo", "RPOConfig", "rpo", "RPOMethod"),
}


def _entry(name: str) -> MethodEntry:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; available: {sorted(METHODS)}")
    return METHODS[name]


def config_class(name: str) -> type:
    """The config dataclass of method `name` (ValueError for an unknown name)."""
    entry = _entry(name)
    return getattr(importlib.import_module(f".{entry.config_module}", __package__), entry.config_class)


def method_class(name: str) -> type:
    """The `Method` subclass of method `name` (ValueError for an unknown name)."""
    entry = _entry(name)
    return getattr(importlib.import_module(f".{entry.method_module}", __package__), entry.method_class)


def config_classes() -> dict[str, type]:
    """Every method's name → its config dataclass."""
    return {name: config_class(name) for name in METHODS}
