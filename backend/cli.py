"""The `spo` command line.

    spo info MODEL                 # family, components and sizes of a model (folder, .safetensors, "pocket")
    spo sample MODEL --prompt P    # sample with our DDIM-eta step core and write a PNG
    spo pocket build|sample        # the embedded tiny model
    spo lora info|convert|merge    # LoRA files in webui/kohya and diffusers form
    spo train --config FILE        # SPO / Diffusion-DPO / Diffusion-RPO LoRA fine-tuning
    spo eval --lora FILE --out D   # base vs LoRAs on a prompt set
    spo demo                       # SPO vs DPO in the pocket world, evaluated, in ≤ 15 min on a CPU
    spo studio [--port N]          # the studio page (also `python -m webui`)

Each subcommand's handler is imported only when it runs, so `spo --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (name, "module:function", help, argument-adder). Modules are relative to this package.
_COMMANDS: list[tuple[str, str, str]] = [
    ("info", "commands:cmd_info", "show the family, components and size of a base model"),
    ("sample", "commands:cmd_sample", "sample images with the DDIM-eta step core"),
    ("pocket", "pocket.cli:cmd_pocket", "the pocket world: build the tiny offline model, sample from it"),
    ("lora", "lora_cli:cmd_lora", "LoRA files: info, convert webui <-> diffusers, merge into a base model"),
    ("train-spm", "preference.cli:cmd_train_spm", "train the step-aware preference model (SPM)"),
    ("eval-spm", "preference.cli:cmd_eval_spm", "SPM vs base scorer accuracy per timestep bucket"),
    ("spm", "preference.cli:cmd_spm", "preference-model files: import an official SPO SPM into an SPM folder"),
    ("score", "preference.cli:cmd_score", "sample a trajectory and score every step's x0 with the SPM"),
    ("train", "train.cli:cmd_train", "fine-tune a LoRA with SPO (or Diffusion-DPO / -RPO)"),
    ("eval", "eval_cli:cmd_eval", "evaluate a base model and LoRAs: judges/scorers, report.json, a grid"),
    ("demo", "eval_cli:cmd_demo", "SPO vs Diffusion-DPO on the pocket model at equal budget, evaluated (CPU)"),
    # the page lives beside the library (`spo_studio.webui`); gradio is imported only when it runs
    ("studio", ".webui.cli:cmd_studio", "open the studio page: launch, watch, stop and resume jobs in a browser"),
]


def _add_arguments(name: str, target: str, p: argparse.ArgumentParser) -> None:
    # the handler's module defines `args_<name>`; these modules import torch only inside handlers
    module = importlib.import_module(f".{target.split(':')[0]}", __package__)
    getattr(module, f"args_{name.replace('-', '_')}")(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spo",
        description="SPO Studio: step-aware preference optimization for Stable Diffusion 1.5 and SDXL.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, target, help_text in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        _add_arguments(name, target, p)
        p.set_defaults(_target=target)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_target", None):
        parser.print_help()
        return 0
    module_name, func_name = args._target.split(":")
    module = importlib.import_module(f".{module_name}", __package__)
    try:
        return int(getattr(module, func_name)(args) or 0)
    except (ValueError, FileNotFoundError) as exc:  # our loaders raise these with a clear message
        print(f"spo {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
