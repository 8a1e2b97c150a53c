#!/usr/bin/env python3
"""SPO Studio setup: the one command that installs (and optionally runs) everything.

    python3 install.py            # set up only (what ComfyUI-Manager runs after cloning)
    python3 install.py studio     # set up, then open the studio page
    python3 install.py test       # set up with the test extras, then run the whole test suite
    python3 install.py spo ARGS   # set up, then run the `spo` command line with ARGS
    python3 install.py lock       # refresh requirements.lock (see "The lock" below)

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

The lock: `requirements.lock` holds the exact versions (`name==version`, torch and the project
itself excepted) of an environment in which the whole suite passed. It is passed to pip as a
constraints file (`-c`) beside the torch pin, so a fresh install gets those versions and not
whatever the registry serves that day. The rule for where it applies:
  * our own `.venv/` (or --venv): every locked version applies;
  * an environment that is not ours (ComfyUI's, an active virtualenv/conda env, --no-venv): a
    locked version applies only to a package that is not installed there yet. Packages already
    installed (torch, numpy, transformers, safetensors, pillow, ... which ComfyUI owns) are never
    forced to the locked version: pip keeps them when they satisfy requirements.txt and otherwise
    upgrades them within requirements.txt's ranges, as without a lock. Should the locked versions
    of the new packages still clash with what is installed there, the install is retried from
    requirements.txt's ranges alone, saying so;
  * a Python other than the one the lock was made with (its `# python:` line): the lock is not
    applied, saying so, since locked versions may have no build for that Python;
  * `--no-lock`: not applied.
`python3 install.py lock [PYTEST ARGS]` refreshes it: a fresh scratch environment from the unpinned
requirement files (torch==2.13.0 included), ComfyUI's requirements beside it when
`../shared/comfyui/ComfyUI-*.tar.gz` is there (tests/comfyui_env.py, which also writes
tests/comfyui.lock), the whole suite, and only if the suite passed are the new locks written.

The script is idempotent: a stamp file records what was installed, and a second run with the same
requirement files, lock and a working environment installs nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SUPPORTED = ((3, 10), (3, 13))
DEFAULT_TORCH = "torch==2.13.0"
STAMP_NAME = ".spo_install_stamp"
LOCK = ROOT / "requirements.lock"
COMFYUI_LOCK = ROOT / "tests" / "comfyui.lock"
# Never written to or taken from a lock: torch is kept and pinned on its own, pip manages itself,
# and the project is installed from this folder.
NOT_LOCKED = {"torch", "pip", "spo-studio"}


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


def _python_says(python: str, code: str) -> str | None:
    """What `code` writes to stdout when `python` runs it, or None if it fails."""
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def has_module(python: str, module: str) -> str | None:
    """Version string of `module` importable by `python`, or None."""
    return _python_says(python, f"import {module}, sys; sys.stdout.write({module}.__version__)")


def installed_root(python: str) -> str | None:
    """The folder `python` imports `spo_studio` from (an editable install points at one checkout), or None when
    `spo_studio.backend` does not import."""
    return _python_says(python, "import os, sys, spo_studio.backend as b; "
                                "sys.stdout.write(os.path.dirname(os.path.dirname(os.path.abspath(b.__file__))))")


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


def pip(python: str, *argv: str, check: bool = True) -> bool:
    """`pip install ARGV` with `python`; fails loudly unless check is False (then says whether it worked)."""
    cmd = [python, "-m", "pip", "install", "--disable-pip-version-check", *argv]
    say("$ " + " ".join(cmd))
    ok = subprocess.run(cmd).returncode == 0
    if not ok and check:
        fail(f"`{' '.join(cmd)}` failed (see pip's output above).")
    return ok


def canonical(name: str) -> str:
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def python_version(python: str) -> str:
    """`major.minor` of `python`."""
    res = subprocess.run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                         capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"cannot run {python}: {res.stderr.strip()}")
    return res.stdout.strip()


def installed_versions(python: str) -> dict[str, str]:
    """{canonical name: version} of every distribution `python` can import from."""
    code = ("import importlib.metadata as m, json, sys; json.dump({d.metadata['Name']: d.version "
            "for d in m.distributions() if d.metadata['Name']}, sys.stdout)")
    res = subprocess.run([python, "-c", code], capture_output=True, text=True)
    if res.returncode != 0:
        fail(f"cannot list the packages of {python}: {res.stderr.strip()}")
    return {canonical(name): version for name, version in json.loads(res.stdout).items()}


def read_lock(path: Path) -> tuple[str | None, dict[str, str]]:
    """(the Python `major.minor` it was made with, {canonical name: version}) of a lock file."""
    made_with, versions = None, {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if line.startswith("# python:"):
            made_with = line.split(":", 1)[1].strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name.strip()) or not version.strip():
            fail(f"{path}:{n}: expected `name==version`, got {raw!r}")
        versions[canonical(name.strip())] = version.strip()
    return made_with, versions


def write_lock(path: Path, versions: dict[str, str], made_with: str, about: str) -> None:
    """Writes {name: version} (NOT_LOCKED left out) as a pip constraints file."""
    lines = [f"# {about}", f"# python: {made_with}", *(f"{name}=={versions[name]}" for name in sorted(versions)
                                                      if canonical(name) not in NOT_LOCKED)]
    path.write_text("\n".join(lines) + "\n")


def lock_to_apply(python: str, lock: Path | None, own_env: bool) -> dict[str, str]:
    """The locked versions to pass to pip for `python` (the rule is in this file's docstring)."""
    if lock is None:
        return {}
    if not lock.exists():
        fail(f"{lock} is missing; restore it (git checkout -- {lock.name}) or run with --no-lock.")
    made_with, versions = read_lock(lock)
    versions = {name: v for name, v in versions.items() if name not in NOT_LOCKED}
    here = python_version(python)
    if made_with != here:
        say(f"{lock.name} was made with Python {made_with}, this is Python {here}: installing from the "
            f"requirement files' ranges (`python3 install.py lock` with this Python makes a lock for it)")
        return {}
    if own_env:
        say(f"installing the versions in {lock.name}")
        return versions
    installed = installed_versions(python)
    kept = sorted(name for name in versions if name in installed)
    say(f"installing into an environment that is not ours: the {len(kept)} packages already installed here "
        f"are kept (not forced to {lock.name}), new ones get the locked versions")
    return {name: v for name, v in versions.items() if name not in installed}


def requirement_files(with_tests: bool) -> list[Path]:
    files = [ROOT / "requirements.txt"]
    if with_tests:
        files.append(ROOT / "requirements-test.txt")
    return files


def stamp_digest(python: str, files: list[Path], lock: Path | None = None) -> str:
    h = hashlib.sha256(python.encode())
    for f in [*files, ROOT / "pyproject.toml"]:
        h.update(f.read_bytes())
    h.update(b"lock:" + (lock.read_bytes() if lock is not None and lock.exists() else b"none"))
    return h.hexdigest()


def setup(python: str, with_tests: bool, lock: Path | None = LOCK) -> None:
    """Installs the requirements (and the test extras) into `python`'s environment, with `lock`'s
    versions as the rule in this file's docstring says (None: no lock)."""
    files = requirement_files(with_tests)
    own_env = python != sys.executable
    stamp = Path(python).resolve().parent.parent / STAMP_NAME
    if not own_env:
        stamp = ROOT / ".cache" / STAMP_NAME
    digest = stamp_digest(python, files, lock)
    # an environment shared by two checkouts imports whichever was installed last: re-point it at this one
    other = installed_root(python)
    elsewhere = other is not None and Path(other).resolve() != ROOT.resolve()
    if elsewhere:
        say(f"note: this environment's spo_studio is the checkout at {other}; pointing it at {ROOT}")
    if other is not None and not elsewhere and stamp.exists() and stamp.read_text() == digest:
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

    locked = lock_to_apply(python, lock, own_env)
    with tempfile.TemporaryDirectory() as tmp:
        pin = Path(tmp) / "keep-torch.txt"
        # Pin the torch we have so nothing can replace it with another (multi-GB) build.
        pin.write_text(f"torch=={torch_version}\n")
        constraints = ["-c", str(pin)]
        if locked:
            locked_file = Path(tmp) / "locked.txt"
            locked_file.write_text("".join(f"{name}=={v}\n" for name, v in sorted(locked.items())))
            constraints += ["-c", str(locked_file)]
        req_args = ["setuptools>=64", "wheel", *(a for f in files for a in ("-r", str(f)))]
        if not pip(python, *constraints, *req_args, check=own_env or not locked):
            say("the locked versions of the packages new here clash with this environment's; installing "
                "from the requirement files' ranges instead")
            pip(python, "-c", str(pin), *req_args)
        pip(python, "-c", str(pin), "--no-deps", "--no-build-isolation", "-e", str(ROOT))

    if has_module(python, "torchvision") is not None:
        say("warning: torchvision is installed in this environment; SPO Studio does not need it, and a "
            "torchvision that does not match torch breaks diffusers' pipeline imports.")
    now = installed_root(python)
    if now is None:
        fail("the install finished but `import spo_studio.backend` fails; run it by hand to see why.")
    if Path(now).resolve() != ROOT.resolve():
        fail(f"the install finished but {python} imports spo_studio from {now}, not from {ROOT}; "
             f"another install of it shadows this checkout (see `pip show -f spo_studio`).")
    stamp.parent.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest)
    say(f"ready: {python} (torch {torch_version})")


def run(python: str, argv: list[str]) -> int:
    say("$ " + " ".join([python, *argv]))
    return subprocess.run([python, *argv], cwd=ROOT).returncode


def refresh_lock(pytest_args: list[str]) -> int:
    """`install.py lock`: a fresh environment from the unpinned requirements (and ComfyUI's, when its
    tarball is there), the whole suite, and the new locks written only if it passed."""
    with tempfile.TemporaryDirectory(prefix="spo-lock-") as tmp:
        venv_dir = Path(tmp) / "venv"
        say(f"creating a scratch environment {venv_dir} from the unpinned requirement files")
        venv.EnvBuilder(with_pip=True).create(venv_dir)
        python = str(venv_python(venv_dir))
        setup(python, with_tests=True, lock=None)
        versions = installed_versions(python)
        made_with = python_version(python)

        env = dict(os.environ)
        env.pop("COMFYUI_DIR", None)
        comfy_lock = Path(tmp) / "comfyui.lock"
        comfy_dest = Path(tmp) / "comfyui"
        helper = [sys.executable, str(ROOT / "tests" / "comfyui_env.py"), "--if-present", "--unlocked",
                  "--python", python, "--dest", str(comfy_dest), "--write-lock", str(comfy_lock)]
        say("$ " + " ".join(helper))
        if subprocess.run(helper).returncode != 0:
            fail("setting up ComfyUI in the scratch environment failed (see above); the locks are unchanged.")
        if (comfy_dest / "ComfyUI").is_dir():
            env["COMFYUI_DIR"] = str(comfy_dest / "ComfyUI")
        else:
            say(f"no ComfyUI tarball: the comfyui tests will be skipped and {COMFYUI_LOCK.name} stays as it is")

        cmd = [python, "-m", "pytest", "-q", *pytest_args]
        say("$ " + " ".join(cmd))
        rc = subprocess.run(cmd, cwd=ROOT, env=env).returncode
        if rc != 0:
            fail(f"the suite did not pass in the fresh environment (pytest exit {rc}); "
                 f"{LOCK.name} and {COMFYUI_LOCK.name} are unchanged.")
        write_lock(LOCK, versions, made_with, "Exact versions of an environment in which the whole suite passed; "
                                              "written by `python3 install.py lock`.")
        say(f"wrote {LOCK}")
        if comfy_lock.exists():
            shutil.copyfile(comfy_lock, COMFYUI_LOCK)
            say(f"wrote {COMFYUI_LOCK}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("action", nargs="?", default="setup", choices=["setup", "studio", "test", "spo", "lock"],
                        help="what to do after setting up (default: only set up)")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="passed on to pytest (test, lock) or spo (spo)")
    parser.add_argument("--venv", default=None, help="virtual environment to use/create (default: ./.venv)")
    parser.add_argument("--no-venv", action="store_true", help="install into the Python running this script")
    parser.add_argument("--no-lock", action="store_true",
                        help=f"install from the requirement files' ranges, without {LOCK.name}")
    args = parser.parse_args(argv)

    check_python()
    if args.action == "lock":
        return refresh_lock(args.args)
    python = target_python(args)
    setup(python, with_tests=args.action == "test", lock=None if args.no_lock else LOCK)

    if args.action == "test":
        return run(python, ["-m", "pytest", *args.args])
    if args.action == "spo":
        return run(python, ["-m", "spo_studio.backend.cli", *args.args])
    if args.action == "studio":
        return run(python, ["-m", "spo_studio.backend.cli", "studio", *args.args])
    return 0


if __name__ == "__main__":
    sys.exit(main())
