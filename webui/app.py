"""The studio page: Train, Jobs, Step inspector, Pool explorer and LoRA tools over `backend`.

    from spo_studio.webui.app import Studio, build_app, launch
    studio = Studio(runs_dir="runs")
    demo = build_app(studio)
    launch(demo, studio, host="127.0.0.1", port=7860)

The page holds no job state: every tab reads the job store (SQLite + run folders), so two pages, or a
page opened after a restart, see the same jobs. Buttons only write rows and flags; the detached
supervisors do the work. Every event has an explicit `api_name` (the gradio_client tests use them),
and only files inside the runs folder are ever handed out.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # the page never calls home

import gradio as gr  # noqa: E402

from ..backend.jobs import JobStore, detect_devices, methods  # noqa: E402
from .inspector import Inspector  # noqa: E402
from .safety import served_file  # noqa: E402

logger = logging.getLogger(__name__)

PACKAGE_ROOT = Path(__file__).resolve().parents[1]
CONFIGS_DIR = PACKAGE_ROOT / "configs"
MAX_UPLOAD_MB = 1024
TEMP_MAX_AGE_S = 3600  # uploads and copies of handed-out files older than this leave the server's temp folder
TEMP_MAX_BYTES = 4 * 2**30  # and the temp folder never holds more: the oldest files go first

CSS = """
#job-status {font-size: 1.05em}
.spo-help {color: var(--body-text-color-subdued)}
"""


@dataclass
class Studio:
    """What the page works on: the job store of a runs folder, the presets, the inspector's model cache."""

    runs_dir: str | Path = "runs"
    configs_dir: Path = CONFIGS_DIR
    devices: list[str] | None = None
    inspector_device: str | None = None
    refresh_seconds: float = 2.0
    temp_max_age_s: int = TEMP_MAX_AGE_S
    temp_max_bytes: int = TEMP_MAX_BYTES
    store: JobStore = field(init=False)
    inspector: Inspector = field(init=False)
    methods: dict = field(init=False)

    def __post_init__(self):
        # what this machine offers now (or --devices); the supervisors read it from the store
        self.store = JobStore(self.runs_dir, devices=self.devices if self.devices is not None else detect_devices())
        self.runs_dir = self.store.runs_dir
        self.inspector = Inspector(device=self.inspector_device)
        self.methods = methods()
        failed = self.store.reconcile()  # at start-up: a job whose runner died is failed, not "running"
        if failed:
            logger.warning("marked job(s) %s as failed: their runners are gone", failed)
        self.store.dispatch()  # and queued jobs start if a slot is free

    def served(self, path) -> str | None:
        """A path the page may hand out (inside the runs folder), or an error."""
        try:
            found = served_file(self.runs_dir, path)
        except (PermissionError, FileNotFoundError) as exc:
            raise gr.Error(str(exc)) from exc
        return str(found) if found else None

    def lora_choices(self) -> list[tuple[str, str]]:
        """(label, path) of every LoRA file the jobs wrote."""
        out = []
        for job in self.store.list(reconcile=False):
            for fmt, path in sorted(job.lora_files.items()):
                if Path(path).is_file():
                    out.append((f"#{job.id} {job.name} ({fmt})", path))
        return out


def build_app(studio: Studio) -> gr.Blocks:
    from .jobs_tab import jobs_tab
    from .tools_tab import inspector_tab, lora_tab, pool_tab
    from .train_tab import train_tab

    # the server's temp folder is swept: rejected and used uploads go at once (the tabs remove them),
    # everything else (kept uploads, copies of samples, LoRAs and merges it handed out) after temp_max_age_s
    age = max(1, int(studio.temp_max_age_s))
    with gr.Blocks(title="SPO Studio", delete_cache=(min(300, max(1, age // 2)), age)) as demo:
        gr.Markdown("# SPO Studio\nStep-aware preference optimization for Stable Diffusion: launch LoRA fine-tunes, "
                    "watch them, and look inside the sampling steps. Jobs run detached: closing this page does not "
                    "stop them.")
        with gr.Tabs(selected="train") as tabs:
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = train_tab(studio)
            with gr.Tab("Jobs", id="jobs", elem_id="tab-jobs"):
                jobs = jobs_tab(studio)
            with gr.Tab("Step inspector", id="inspect", elem_id="tab-inspect") as inspect_tab_:
                inspect = inspector_tab(studio)
            with gr.Tab("Pool explorer", id="pool", elem_id="tab-pool") as pool_tab_:
                pool = pool_tab(studio)
            with gr.Tab("LoRA tools", id="lora", elem_id="tab-lora") as lora_tab_:
                lora = lora_tab(studio)

        # Launch: the form becomes a config (validated), then a queued job; the page shows the Jobs tab.
        train["launch"].click(train["build_config"], inputs=train["form_inputs"], outputs=train["config"],
                              api_name="build_config").success(
            train["submit"], inputs=[train["config"], train["name"], train["gpus"], train["upload"]],
            outputs=[train["message"], tabs, jobs["select"], jobs["seen"]], api_name="submit_job")

        # LoRA pickers list what the jobs wrote; refreshed when their tab opens.
        def lora_lists():
            choices = studio.lora_choices()
            return (gr.update(choices=choices), gr.update(choices=choices), gr.update(choices=choices))

        pickers = [inspect["loras"], pool["lora"], lora["pick"]]
        for tab, name in ((inspect_tab_, "list_loras_inspector"), (pool_tab_, "list_loras_pool"),
                          (lora_tab_, "list_loras_tools")):
            tab.select(lora_lists, outputs=pickers, api_name=name)
    return demo


def launch(demo: gr.Blocks, studio: Studio, host: str = "127.0.0.1", port: int | None = None,
           auth: list[tuple[str, str]] | None = None, max_upload_mb: int = MAX_UPLOAD_MB,
           prevent_thread_lock: bool = False, inbrowser: bool = False, quiet: bool = False):
    """Serve the page. Only the runs folder is served (minus the job database); uploads are size-limited."""
    db = str(studio.store.db_path)
    demo.queue(default_concurrency_limit=4, max_size=64)
    return demo.launch(
        server_name=host,
        server_port=port,
        auth=auth or None,
        auth_message="SPO Studio: log in with the --auth user and password." if auth else None,
        allowed_paths=[str(studio.runs_dir)],
        blocked_paths=[db, db + "-wal", db + "-shm", db + ".watchdog.lock", db + ".watchdog.log"],
        max_file_size=f"{int(max_upload_mb)}mb",
        prevent_thread_lock=prevent_thread_lock,
        inbrowser=inbrowser,
        quiet=quiet,
        show_error=True,
        footer_links=["api"],
        css=CSS,
    )
