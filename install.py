#!/usr/bin/env python3
"""SPO Studio setup: the one command that installs (and optionally runs) everything.

    python3 install.py            # set up only (what ComfyUI-Manager runs after cloning)
    python3 install.py studio     # set up, then open the studio page
    python3 install.py test       # set up with the test extras, then run the whole test suite
    python3 install.py spo ARGS   # set up, then run the `spo` command line with ARGS

Where it installs:
  * inside an active virtualenv / conda env, or when this folder sits in ComfyUI's
    `custom_nodes/`, into the Python running this script (ComfyUI's own environment);
  * otherwise into `.venv/` next to this file (created on first run). If the Python running this
    script already has torch, the venv sees it (`--system-site-packages`) instead of installing
    a second copy.

torch: an installed torch is always kept (and pinned while the rest installs, so no dependency
can pull a second, multi-GB build). Only when no torch is present is `torch==2.13.0` installed.
torchvision is never installed: the project does not need it, and on CPU-only machines the
registry's torchvision wheels break diffusers' imports.

The script is idempotent: a stamp file records what was installed, and a second run with the same
requirement files and a working environment installs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SUPPORTED = ((3, 10), (3, 13))
DEFAULT_TORCH = "torch==2.13.0"
STAMP_NAME = ".spo_install_stamp"


def fail(msg: str) -> "None":
    print(f"install.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def say(msg: str) -> None:
    print(f"install.py: {msg}", flush=True)


def check_python(version: tuple[int, int] = sys.version_info[:2]) -> None:
    lo, hi = SUPPORTED
    if not (lo <= version <= hi):
        fail(
            f"Python {version[0]}.{version[1]} is not supported; SPO Studio needs Python "
            f"{lo[0]}.{lo[1]} to {hi[0]}.{hi[1]} (3.11 recommended). Run this script with a supported "
            f"interpreter, e.g. `python3.11 install.py`."
        )


def in_managed_env() -> bool:
    """True when we should install into the running interpreter rather than our own .venv."""
    if sys.prefix != getattr(sys, "base_prefix", sys.prefix):
        return True  # an active virtualenv
    if os.environ.get("CONDA_PREFIX") and Path(sys.prefix).resolve() == Path(os.environ["CONDA_PREFIX"]).resolve():
        return True
    return ROOT.parent.name == "custom_nodes"  # ComfyUI runs us with its own Python


def has_module(python: str, module: str) -> str | None:
    """Version string of `module` importable by `python`, or None."""
    code = f"import {module}, sys; sys.stdout.write({module}.__version__)"
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def target_python(args: argparse.Namespace) -> str:
    if args.no_venv or (args.venv is None and in_managed_env()):
        return sys.executable
    venv_dir = Path(args.venv) if args.venv else ROOT / ".venv"
    py = venv_python(venv_dir)
    if not py.exists():
        share = has_module(sys.executable, "torch") is not None
        say(f"creating virtual environment {venv_dir}" + (" (sharing the installed torch)" if share else ""))
        venv.EnvBuilder(with_pip=True, system_site_packages=share).create(venv_dir)
    return str(py)


def pip(python: str, *argv: str) -> None:
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *argv]
    say("$ " + " ".join(cmd))
    if subprocess.run(cmd).returncode != 0:
        fail(f"`{' '.join(cmd)}` failed (see pip's output above).")


def requirement_files(with_tests: bool) -> list[Path]:
    files = [ROOT / "requirements.txt"]
    if with_tests:
        files.append(ROOT / "requirements-test.txt")
    return files


def stamp_digest(python: str, files: list[Path]) -> str:
    h = hashlib.sha256(python.encode())
    for f in [*files, ROOT / "pyproject.toml"]:
        h.update(f.read_bytes())
    return h.hexdigest()


def setup(python: str, with_tests: bool) -> None:
    files = requirement_files(with_tests)
    stamp = Path(python).resolve().parent.parent / STAMP_NAME
    if python == sys.executable:
        stamp = ROOT / ".cache" / STAMP_NAME
    digest = stamp_digest(python, files)
    if stamp.exists() and stamp.read_text() == digest and has_module(python, "spo_studio.backend") is not None:
        say("environment already up to date")
        return

    torch_version = has_module(python, "torch")
    if torch_version:
        say(f"keeping the installed torch {torch_version}")
    else:
        say(f"no torch found; installing {DEFAULT_TORCH}")
        pip(python, DEFAULT_TORCH)
        torch_version = has_module(python, "torch")
        if not torch_version:
            fail("torch was installed but cannot be imported; see pip's output above.")

    with tempfile.TemporaryDirectory() as tmp:
        pin = Path(tmp) / "keep-torch.txt"
        # Pin the torch we have so nothing can replace it with another (multi-GB) build.
        pin.write_text(f"torch=={torch_version}\n")
        req_args = [a for f in files for a in ("-r", str(f))]
        pip(python, "-c", str(pin), "setuptools>=64", "wheel", *req_args)
        pip(python, "-c", str(pin), "--no-deps", "--no-build-isolation", "-e", str(ROOT))

    if has_module(python, "torchvision") is not None:
        say("warning: torchvision is installed in this environment; SPO Studio does not need it, and a "
            "torchvision that does not match torch breaks diffusers' pipeline imports.")
    if has_module(python, "spo_studio.backend") is None:
        fail("the install finished but `import spo_studio.backend` fails; run it by hand to see why.")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    say(f"ready: {python} (torch {torch_version})")


def run(python: str, argv: list[str]) -> int:
    say("$ " + " ".join([python, *argv]))
    return subprocess.run([python, *argv], cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", default="setup", choices=["setup", "studio", "test", "spo"],
                        help="what to do after setting up (default: only set up)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to pytest (test) or spo (spo)")
    parser.add_argument("--venv", default=None, help="virtual environment to use/create (default: ./.venv)")
    parser.add_argument("--no-venv", action="store_true", help="install into the Python running this script")
    args = parser.parse_args(argv)

    check_python()
    python = target_python(args)
    setup(python, with_tests=args.action == "test")

    if args.action == "test":
        return run(python, ["-m", "pytest", *args.args])
    if args.action == "spo":
        return run(python, ["-m", "spo_studio.backend.cli", *args.args])
    if args.action == "studio":
        return run(python, ["-m", "spo_studio.backend.cli", "studio", *args.args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
