"""What the page may bind to, who may log in, and which files it may hand out (no gradio import here).

    host = bind_address(listen=False, auth=None, insecure=False)     # "127.0.0.1"
    creds = parse_auth(["me:secret"])                                # [("me", "secret")]
    path = served_file(runs_dir, "runs/0001-spo-x/lora/spo_lora_webui.safetensors")
"""

from __future__ import annotations

import os
from pathlib import Path

LOCALHOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


class UnsafeSetup(ValueError):
    """The page was asked to run in a way that would expose it without a password."""


def parse_auth(values: list[str] | str | None) -> list[tuple[str, str]]:
    """`user:pass` strings (or the SPO_STUDIO_AUTH variable, comma-separated) → [(user, pass)]."""
    if values is None or values == []:
        env = os.environ.get("SPO_STUDIO_AUTH", "").strip()
        values = [v for v in env.split(",") if v.strip()] if env else []
    if isinstance(values, str):
        values = [values]
    creds = []
    for item in values:
        user, sep, password = item.partition(":")
        if not sep or not user.strip() or not password:
            raise UnsafeSetup(f"--auth expects user:password; got {item!r}")
        creds.append((user.strip(), password))
    return creds


def bind_address(listen: bool, auth: list[tuple[str, str]], insecure: bool, host: str | None = None) -> str:
    """127.0.0.1 unless --listen; listening on the network needs --auth, or an explicit --insecure."""
    if not listen:
        if host and host not in (LOCALHOST, "localhost", "::1"):
            raise UnsafeSetup(f"--host {host} exposes the page beyond this machine: use --listen (with --auth)")
        return host or LOCALHOST
    if not auth and not insecure:
        raise UnsafeSetup("--listen makes the page reachable from the network: add --auth user:password "
                          "(or --insecure if you really want no password)")
    return host or ALL_INTERFACES


def served_file(runs_dir: str | Path, path: str | Path | None) -> Path | None:
    """`path` resolved, if it is a file inside the runs folder; anything else is refused (no traversal)."""
    if path is None or str(path) == "":
        return None
    root = Path(runs_dir).resolve()
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_relative_to(root):
        raise PermissionError(f"{path}: outside the runs folder {root}; the page serves only files in it")
    if not resolved.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    return resolved
