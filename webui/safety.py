"""What the page may bind to, who may log in, and which files it may hand out (no gradio import here).

    host = bind_address(listen=False, auth=None, insecure=False)     # "127.0.0.1"
    creds = parse_auth(["me:secret"])                                # [("me", "secret")]
    path = served_file(runs_dir, "runs/0001-spo-x/lora/spo_lora_webui.safetensors")
    gr.Error(public_message(str(exc)))                               # no server upload paths in messages
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import tempfile
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


# ----------------------------------------------------------------------------------------------
# The upload area: what a message may say about it, and when an upload goes
# ----------------------------------------------------------------------------------------------


def upload_folder() -> Path:
    """Where the page's server keeps uploads and copies of the files it hands out (gradio's cache)."""
    env = os.environ.get("GRADIO_TEMP_DIR")
    return Path(env).resolve() if env else (Path(tempfile.gettempdir()) / "gradio").resolve()


def public_message(text: str) -> str:
    """`text` with every path inside the upload folder cut to its file name: an error names the file a
    user sent, never where the server keeps it."""
    roots = {str(upload_folder())} | ({os.path.abspath(os.environ["GRADIO_TEMP_DIR"])}
                                      if os.environ.get("GRADIO_TEMP_DIR") else set())
    for root in sorted(roots, key=len, reverse=True):
        text = re.sub(re.escape(root) + r"[/\\](?:[^\s'\"`:,;()\[\]]+[/\\])*", "", text)
    return text


def discard_upload(path: str | Path | None) -> bool:
    """Remove an upload (and its folder when that empties) once it is rejected or copied where it belongs.
    Only files inside the upload folder are touched; True if one was removed."""
    if not path:
        return False
    file = Path(path).resolve()
    root = upload_folder()
    if not file.is_relative_to(root) or file == root or not file.is_file():
        return False
    file.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        if file.parent != root:
            file.parent.rmdir()  # gradio keeps each upload in a folder of its own
    return True


def bound_upload_folder(max_bytes: int, keep: str | Path | None = None) -> int:
    """Keep the upload folder under `max_bytes`: the oldest files go first (never `keep`, the upload being
    checked). Returns the bytes left; a `keep` that alone exceeds the bound is refused (ValueError)."""
    root = upload_folder()
    keep = Path(keep).resolve() if keep else None
    files = sorted((f for f in root.rglob("*") if f.is_file()), key=lambda f: f.stat().st_mtime) \
        if root.is_dir() else []
    total = sum(f.stat().st_size for f in files)
    for file in files:
        if total <= max_bytes:
            break
        if file == keep:
            continue
        size = file.stat().st_size
        if discard_upload(file):
            total -= size
    if total > max_bytes:
        discard_upload(keep)
        raise ValueError(f"{keep.name if keep else 'the upload'}: the server's upload area is full "
                         f"({total / 2**20:.0f} MiB of {max_bytes / 2**20:.0f} MiB); try again later")
    return total


def plain_markdown(text: str) -> str:
    """`text` shown as typed in a Markdown component: no HTML, no emphasis, links or headings."""
    text = html.escape(str(text), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text)
