"""The Train tab's form, generated from a method's config dataclass (no gradio import here).

Every field of `SPOConfig` / `DPOConfig` / `RPOConfig` (whatever the registry `train.methods.METHODS`
holds) becomes one input with the field's help text; the page turns the inputs back into a config
dict, which the dataclass validates. Nothing about a method is written twice.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..backend.rewards import MODES as REWARD_MODES
from ..backend.train.spo_levers import PAIR_MODES, TRUNKS

HIDDEN = ("output_dir", "resume")  # the job store sets these
CHOICE_FIELDS = {"mixed_precision": ["no", "fp16", "bf16"], "reward_mode": list(REWARD_MODES),
                 "pair_mode": list(PAIR_MODES), "trunk": list(TRUNKS)}
SOURCE_FIELDS = ("base_model", "spm", "embedding_model", "prompts", "train_data")  # "pocket" or a local path
SECTIONS = (
    ("Model", ("base_model", "spm", "spm_clip", "embedding_model"), True),
    ("Data", ("prompts", "train_data", "sample_prompts", "prompts_per_round", "pairs_per_round", "shuffle_buffer"),
     True),
    # method-specific fields go here, open
    ("LoRA and optimizer", ("lora_rank", "lora_alpha", "lora_targets", "lr", "lr_warmup_steps", "weight_decay",
                            "grad_clip", "train_batch_size", "grad_accum"), False),
    ("Budget and run", ("epochs", "max_steps", "max_minutes", "checkpoint_every", "log_every", "seed",
                        "mixed_precision", "gradient_checkpointing"), False),
)


@dataclass
class FieldSpec:
    name: str
    kind: str  # bool | int | float | str | list | choice | source
    default: Any
    help: str
    choices: list[str] | None = None


def _kind(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, tuple):
        return "list"
    if origin is not None:  # X | None
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _kind(args[0]) if args else "str"
    return {bool: "bool", int: "int", float: "float"}.get(tp, "str")


def field_specs(cls) -> list[FieldSpec]:
    hints = typing.get_type_hints(cls)
    defaults = cls()
    specs = []
    for f in dataclasses.fields(cls):
        if f.name in HIDDEN:
            continue
        kind = _kind(hints[f.name])
        choices = None
        if f.name in CHOICE_FIELDS:
            kind, choices = "choice", CHOICE_FIELDS[f.name]
        elif f.name in SOURCE_FIELDS:
            kind = "source"
        specs.append(FieldSpec(f.name, kind, getattr(defaults, f.name), f.metadata.get("help", ""), choices))
    return specs


def sections(specs: list[FieldSpec], method: str) -> list[tuple[str, list[FieldSpec], bool]]:
    """Fields grouped for display: model, data, the method's own fields, LoRA/optimizer, budget."""
    by_name = {s.name: s for s in specs}
    placed: set[str] = set()
    out = []
    for title, names, open_ in SECTIONS:
        group = [by_name[n] for n in names if n in by_name]
        placed.update(s.name for s in group)
        out.append((title, group, open_))
    own = [s for s in specs if s.name not in placed]
    out.insert(2, (f"{method.upper()} settings", own, True))
    return [(title, group, open_) for title, group, open_ in out if group]


def to_widget(spec: FieldSpec, value: Any) -> Any:
    """A config value as the input shows it (lists as one item per line)."""
    if spec.kind == "list":
        return "\n".join(str(v) for v in (value or []))
    return value


def from_widget(spec: FieldSpec, value: Any) -> Any:
    """An input's value as config data; the dataclass does the type checking and says what is wrong."""
    if spec.kind == "list":
        text = value if isinstance(value, str) else "\n".join(map(str, value or []))
        sep = "\n" if "\n" in text or spec.name == "sample_prompts" else ","
        return [item.strip() for item in text.split(sep) if item.strip()]
    if spec.kind in ("int", "float"):
        if value is None or value == "":
            raise ValueError(f"{spec.name}: a number is needed")
        if spec.kind == "int":
            if float(value) != int(float(value)):
                raise ValueError(f"{spec.name}: expected a whole number, got {value}")
            return int(float(value))
        return float(value)
    if spec.kind == "bool":
        return bool(value)
    return "" if value is None else str(value).strip()


def read_preset(path: str | Path) -> tuple[str, dict]:
    """A YAML preset → (method, values)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read the preset ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a preset must be a mapping of key: value")
    method = str(data.pop("method", "spo"))
    return method, data


def presets(configs_dir: Path, methods: dict[str, type]) -> dict[str, Path]:
    """Training presets by file name: YAML files whose method the trainer knows and whose keys its config has
    (the SPM and scorer presets in the same folder are skipped)."""
    out = {}
    if not configs_dir.is_dir():
        return out
    for path in sorted(configs_dir.glob("*.yaml")):
        try:
            method, data = read_preset(path)
        except ValueError:
            continue
        if method in methods and set(data) <= {f.name for f in dataclasses.fields(methods[method])}:
            out[path.name] = path
    return out


def config_yaml(method: str, values: dict) -> str:
    return yaml.safe_dump({"method": method, **values}, sort_keys=False, allow_unicode=True)


def parse_config_yaml(text: str) -> tuple[str, dict]:
    try:
        data = yaml.safe_load(text or "") or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"the config is not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError("the config must be a mapping of key: value")
    method = str(data.pop("method", "spo"))
    return method, data
