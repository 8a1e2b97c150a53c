#!/usr/bin/env python3
"""A real ComfyUI for the `comfyui` tests: unpack the shared source tarball and install ComfyUI's own
requirements into the test environment, beside the project's.

    python3 tests/comfyui_env.py --dest /tmp/comfy          # then: COMFYUI_DIR=/tmp/comfy/ComfyUI
    python3 tests/comfyui_env.py --python .venv/bin/python --dest DIR [--tarball PATH]

Defaults: the newest `../shared/comfyui/ComfyUI-*.tar.gz` beside this repository, and the Python
that `python3 install.py` installs into (`.venv/`'s, or the running one inside an active virtualenv
or ComfyUI's `custom_nodes/`). The unpacked tree is DIR/ComfyUI.

What gets installed, and what never changes:
  * ComfyUI's `requirements.txt` less torch, torchvision and torchaudio: the test environment's
    torch stays (the registry's torchvision/torchaudio are CUDA builds that break the CPU torch;
    the end-to-end test supplies a torchvision stand-in instead). NO_DEPS packages (spandrel, whose
    metadata requires torchvision) are installed without their dependencies.
  * Every package already installed is pinned to its installed version, so this never upgrades
    or downgrades the project's environment; a ComfyUI requirement that would need that fails.
  * New packages get the versions in tests/comfyui.lock (--unlocked: whatever the ranges allow;
    --write-lock PATH then records the packages this run added, as `install.py lock` does).
  * Finally every requirement of ComfyUI's (torch family excepted) is checked to be satisfied.
Unpacking and installing again is harmless: pip installs nothing new the second time.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "comfyui"
TORCH_FAMILY = {"torch", "torchvision", "torchaudio"}
NO_DEPS = {"spandrel"}
CHECK_SATISFIED = """
import sys
from importlib.metadata import PackageNotFoundError, version
from packaging.requirements import Requirement
bad = []
for line in sys.argv[1:]:
    req = Requirement(line)
    try:
        have = version(req.name)
    except PackageNotFoundError:
        bad.append(f"{req}: not installed")
        continue
    if not req.specifier.contains(have, prereleases=True):
        bad.append(f"{req}: {have} installed")
print("\\n".join(bad))
sys.exit(1 if bad else 0)
"""


def _load_install():
    spec = importlib.util.spec_from_file_location("spo_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


install = _load_install()  # fail, say, pip, canonical, installed_versions, read_lock, write_lock


def newest_tarball() -> Path | None:
    found = sorted(SHARED.glob("ComfyUI-*.tar.gz"))
    return found[-1] if found else None


def unpack(tarball: Path, dest: Path) -> Path:
    """Unpacks the tarball into dest; returns the ComfyUI folder."""
    dest.mkdir(parents=True, exist_ok=True)
    install.say(f"unpacking {tarball} into {dest}")
    with tarfile.open(tarball) as tar:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(dest, filter="data")
        else:
            tar.extractall(dest)  # Python < 3.10.12/3.11.4: no extraction filters
    comfy = dest / "ComfyUI"
    if not (comfy / "main.py").is_file() or not (comfy / "requirements.txt").is_file():
        install.fail(f"{tarball} did not unpack to a ComfyUI tree ({comfy}/main.py and requirements.txt expected).")
    return comfy


def comfy_requirements(comfy: Path) -> list[str]:
    """ComfyUI's requirement lines, less the torch family, comments and blanks."""
    reqs = []
    for raw in (comfy / "requirements.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and requirement_name(line) not in TORCH_FAMILY:
            reqs.append(line)
    return reqs


def requirement_name(line: str) -> str:
    for sep in "<>=!~[; ":
        line = line.split(sep)[0]
    return install.canonical(line)


def install_requirements(python: str, comfy: Path, lock: Path | None) -> dict[str, str]:
    """Installs ComfyUI's requirements into `python`'s environment; returns the packages it added."""
    before = install.installed_versions(python)
    if "torch" not in before:
        install.fail(f"{python} has no torch; set up the project first (`python3 install.py`).")
    locked = {}
    if lock is not None:
        if not lock.exists():
            install.fail(f"{lock} is missing; restore it, or pass --unlocked.")
        locked = install.read_lock(lock)[1]
    reqs = comfy_requirements(comfy)
    with tempfile.TemporaryDirectory() as tmp:
        keep = Path(tmp) / "keep-installed.txt"
        pins = {**{n: v for n, v in locked.items() if n not in before}, **before}
        keep.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())
                                if n not in ("pip", "spo-studio")))
        req_file = Path(tmp) / "comfyui-requirements.txt"
        req_file.write_text("\n".join(r for r in reqs if requirement_name(r) not in NO_DEPS) + "\n")
        install.pip(python, "-c", str(keep), "-r", str(req_file))
        no_deps = [r for r in reqs if requirement_name(r) in NO_DEPS]
        if no_deps:
            install.pip(python, "-c", str(keep), "--no-deps", *no_deps)
    after = install.installed_versions(python)
    changed = sorted(n for n in before if after.get(n) != before[n])
    if changed:
        install.fail("installing ComfyUI's requirements changed packages of the environment: "
                     + ", ".join(f"{n} {before[n]} -> {after.get(n)}" for n in changed))
    if "torchvision" in after and "torchvision" not in before:
        install.fail("torchvision got installed as a dependency; add the package that pulled it to NO_DEPS.")
    res = subprocess.run([python, "-c", CHECK_SATISFIED, *reqs], capture_output=True, text=True)
    if res.returncode != 0:
        install.fail(f"ComfyUI's requirements are not satisfied in {python}:\n{res.stdout}{res.stderr}")
    added = {n: v for n, v in after.items() if n not in before}
    install.say(f"ComfyUI's requirements are installed in {python} ({len(added)} packages added)")
    return added


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dest", required=True, help="folder to unpack into (ComfyUI lands in DEST/ComfyUI)")
    parser.add_argument("--python", default=None,
                        help="the test environment's interpreter (default: the one install.py installs into)")
    parser.add_argument("--tarball", default=None, help="ComfyUI source tarball (default: the newest in "
                                                        "../shared/comfyui)")
    parser.add_argument("--if-present", action="store_true",
                        help="without a tarball, say so and exit 0 instead of failing")
    parser.add_argument("--unlocked", action="store_true",
                        help=f"new packages from the ranges, not from {install.COMFYUI_LOCK.name}")
    parser.add_argument("--write-lock", default=None, help="write the packages this run added as a lock here")
    args = parser.parse_args(argv)

    tarball = Path(args.tarball) if args.tarball else newest_tarball()
    if tarball is None or not tarball.is_file():
        if args.if_present:
            install.say(f"no ComfyUI tarball ({SHARED}/ComfyUI-*.tar.gz); nothing to set up")
            return 0
        install.fail(f"no ComfyUI tarball: expected {SHARED}/ComfyUI-*.tar.gz, or pass --tarball.")
    if args.python is None:
        args.python = sys.executable if install.in_managed_env() else str(install.venv_python(ROOT / ".venv"))
    if not Path(args.python).exists():
        install.fail(f"{args.python} does not exist; set up the project first (`python3 install.py`).")
    comfy = unpack(tarball, Path(args.dest).resolve())
    added = install_requirements(args.python, comfy, None if args.unlocked else install.COMFYUI_LOCK)
    if args.write_lock:
        install.write_lock(Path(args.write_lock), added, install.python_version(args.python),
                           f"Packages that ComfyUI ({tarball.name}) adds to the project's locked environment; "
                           "written by `python3 install.py lock`.")
        install.say(f"wrote {args.write_lock}")
    install.say(f"ComfyUI is ready: COMFYUI_DIR={comfy}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
