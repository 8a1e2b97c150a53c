"""`spo train --config FILE [key=value …]`: fine-tune a LoRA with SPO (or a baseline, by `method:`)."""

from __future__ import annotations

import argparse
import json

from .methods import METHODS, config_class, method_class


def args_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML preset, e.g. configs/pocket_spo.yaml (its `method:` picks "
                                                   "the method; default spo)")
    p.add_argument("--method", default=None, choices=sorted(METHODS), help="override the preset's method")
    p.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    p.add_argument("--list-keys", action="store_true", help="list the method's config keys with defaults and help")


def cmd_train(args) -> int:
    from pathlib import Path

    import yaml

    from ..config import help_texts, load_config

    method = args.method
    if method is None and args.config:
        path = Path(args.config)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such config file")
        method = (yaml.safe_load(path.read_text()) or {}).get("method", "spo")
    method = method or "spo"
    cls = config_class(method)  # ValueError for an unknown method
    if args.list_keys:
        defaults = cls()
        for key, text in help_texts(cls).items():
            print(f"{key} = {getattr(defaults, key)!r}\n    {text}")
        return 0
    cfg = load_config(cls, args.config, args.overrides)
    cfg.check_model()  # LoRA targets and rank against the base model, before a run folder is written
    from .loop import train

    result = train(cfg, method_class(method))
    print(json.dumps(result, indent=2))
    return 0 if result["status"] in ("finished", "stopped") else 1
