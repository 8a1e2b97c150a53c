"""`spo studio` and `python -m webui`: open the studio page.

    python -m webui                                 # http://127.0.0.1:7860, jobs in ./runs
    spo studio --port 7861 --runs ~/spo_runs
    spo studio --listen --auth me:secret            # reachable from the network, behind a password

Gradio is imported only when the page starts, so `spo --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .safety import UnsafeSetup, bind_address, parse_auth

logger = logging.getLogger(__name__)


def args_studio(p: argparse.ArgumentParser) -> None:
    p.add_argument("--runs", default=os.environ.get("SPO_STUDIO_RUNS", "runs"),
                   help="runs folder: one folder per job plus the job database jobs.db (default: ./runs)")
    p.add_argument("--port", type=int, default=int(os.environ.get("SPO_STUDIO_PORT", "7860")),
                   help="port (default 7860)")
    p.add_argument("--listen", action="store_true",
                   help="serve on all network interfaces (0.0.0.0) instead of 127.0.0.1; needs --auth or --insecure")
    p.add_argument("--host", default=None, help="address to bind with --listen (default 0.0.0.0)")
    p.add_argument("--auth", action="append", default=None, metavar="USER:PASSWORD",
                   help="require this login (repeatable; or SPO_STUDIO_AUTH=user:pass,…)")
    p.add_argument("--insecure", action="store_true", help="allow --listen without --auth")
    p.add_argument("--max-upload-mb", type=int, default=1024, help="largest accepted upload in MB (default 1024)")
    p.add_argument("--devices", default=None,
                   help="GPU ids jobs may use, e.g. 0,1 (default: all CUDA devices; 'cpu' for none)")
    p.add_argument("--inspector-device", default=None, help="device of the step inspector (default: cuda if any)")
    p.add_argument("--open", action="store_true", help="open the page in a web browser")
    p.add_argument("--smoke", action="store_true", default=os.environ.get("SPO_STUDIO_SMOKE") == "1",
                   help="start the page, check that it answers and that the pocket model loads, then exit "
                        "(CI; also SPO_STUDIO_SMOKE=1)")


def cmd_studio(args) -> int:
    try:
        auth = parse_auth(args.auth)
        host = bind_address(args.listen, auth, args.insecure, args.host)
    except UnsafeSetup as exc:
        sys.stderr.write(f"spo studio: error: {exc}\n")
        return 2
    devices = None
    if args.devices:
        devices = ["cpu"] if args.devices.lower() in ("cpu", "none") else [d.strip() for d in args.devices.split(",")]
    from .app import Studio, build_app, launch

    studio = Studio(runs_dir=args.runs, devices=devices, inspector_device=args.inspector_device)
    demo = build_app(studio)
    logger.info("runs folder %s; jobs run on %s", studio.runs_dir, ",".join(studio.store.devices))
    if args.listen and not auth:
        logger.warning("--insecure: the page is reachable from the network with no password")
    if args.smoke:
        return _smoke(demo, studio, host, args.port, auth, args.max_upload_mb)
    launch(demo, studio, host=host, port=args.port, auth=auth, max_upload_mb=args.max_upload_mb,
           inbrowser=args.open)
    return 0


def _smoke(demo, studio, host, port, auth, max_upload_mb) -> int:
    """Serve the page on a free port, fetch it and load the pocket model, then shut down."""
    import socket
    import urllib.request

    from ..backend.models import load_model
    from .app import launch

    if port is None or port == 7860:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    launch(demo, studio, host=host, port=port, auth=auth, max_upload_mb=max_upload_mb, prevent_thread_lock=True,
           quiet=True)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as response:
            ok = response.status == 200 and b"SPO Studio" in response.read()
        model = load_model("pocket", device="cpu")
        logger.info("smoke check: page %s, pocket model %s loaded", "answers" if ok else "FAILED", model.family)
    finally:
        demo.close()
    sys.stdout.write(f"spo studio --smoke: {'ok' if ok else 'the page did not answer'}\n")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m webui", description="SPO Studio: the studio page.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args_studio(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not args.verbose:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up requests
    return cmd_studio(args)
