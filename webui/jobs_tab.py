"""Jobs tab: every job with status, progress and ETA; curves, samples and log of the selected one; stop,
resume, delete; LoRA downloads. A `gr.Timer` re-reads the job store; nothing lives in the page."""

from __future__ import annotations

import time

import gradio as gr
import pandas as pd

from ..backend.jobs import ACTIVE, RESUMABLE, Job, JobError, format_duration
from .safety import plain_markdown

PLOTS = (  # (title, metric keys): whatever a method logs of these shows up
    ("Loss", ("loss",)),
    ("Ratios / implicit accuracy", ("ratio_w", "ratio_l", "implicit_acc")),
    ("Pair yield / clamped share", ("pair_yield", "clamped")),
    ("Preference scores", ("score_mean", "score_std")),
)
MAX_POINTS = 1500  # per curve; longer runs are thinned evenly
TABLE_COLUMNS = ["id", "name", "method", "status", "progress", "ETA", "created"]


def job_label(job: Job) -> str:
    return f"#{job.id} {job.name} ({job.status})"


def _table(jobs: list[Job]) -> pd.DataFrame:
    rows = []
    for j in jobs:
        eta = j.eta_seconds()
        status = f"queued #{j.queue_position}" if j.status == "queued" and j.queue_position else j.status
        progress = j.progress_text()
        rows.append([j.id, j.name, j.method, status, progress, format_duration(eta) if eta is not None else "",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(j.created))])
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def _curves(rows: list[dict], keys: tuple[str, ...]) -> pd.DataFrame | None:
    data = [r for r in rows if r["key"] in keys and r["value"] is not None]
    if not data:  # no value rather than an empty frame: a plot's first frame fixes its series and colours
        return None
    df = pd.DataFrame(data, columns=["step", "key", "value", "time"]).rename(columns={"key": "series"})
    if len(df) > MAX_POINTS * max(1, df["series"].nunique()):
        steps = sorted(df["step"].unique())
        keep = set(steps[:: max(1, len(steps) // MAX_POINTS)]) | {steps[-1]}
        df = df[df["step"].isin(keep)]
    return df[["step", "value", "series"]].astype({"step": "int64", "value": "float64", "series": "str"})


def _status_markdown(job: Job | None) -> str:
    if job is None:
        return "No job yet: launch one from the **Train** tab."
    lines = [f"### #{job.id} {plain_markdown(job.name)} — {job.method.upper()}",
             f"**{plain_markdown(job.status_line())}**"]
    details = [f"run folder `{job.run_dir}`"]
    if job.devices:
        details.append(f"device {job.devices}")
    if job.heartbeat and job.active:
        details.append(f"last heartbeat {time.time() - job.heartbeat:.0f} s ago")
    lines.append(" · ".join(details))
    return "\n\n".join(lines)


def jobs_tab(studio) -> dict:
    store = studio.store
    jobs0 = store.list()
    first = jobs0[0].id if jobs0 else None
    table = gr.Dataframe(value=_table(jobs0), headers=TABLE_COLUMNS, interactive=False, label="Jobs (newest first)",
                         elem_id="jobs-table")
    with gr.Row():
        # any job id is taken (a script's session knows only the jobs of the page's start): the handlers
        # check that it exists
        select = gr.Dropdown(choices=[(job_label(j), j.id) for j in jobs0], value=first, label="Selected job",
                             allow_custom_value=True, scale=3, elem_id="job-select")
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1)
        resume_btn = gr.Button("Resume", elem_id="resume-btn", scale=1)
        delete_btn = gr.Button("Delete", elem_id="delete-btn", scale=1)
    status = gr.Markdown(_status_markdown(jobs0[0] if jobs0 else None), elem_id="job-status")
    action = gr.Markdown(elem_id="action-msg")
    plots = []
    for i in range(0, len(PLOTS), 2):
        with gr.Row():
            for title, _keys in PLOTS[i:i + 2]:
                plots.append(gr.LinePlot(x="step", y="value", color="series", title=title, height=240,
                                         tooltip="axis", buttons=["fullscreen", "export"],
                                         elem_id="plot-" + title.split()[0].lower().strip("/")))
    samples = gr.Gallery(label="Samples (fixed seeds), one image per epoch", columns=6, height=240,
                         object_fit="contain", preview=False, fit_columns=False, elem_id="job-samples")
    with gr.Row():
        dl_webui = gr.DownloadButton("LoRA: webui / ComfyUI / A1111 format", interactive=False, elem_id="dl-webui")
        dl_diffusers = gr.DownloadButton("LoRA: diffusers / peft format", interactive=False, elem_id="dl-diffusers")
    log = gr.Textbox(label="Log (last lines)", lines=12, max_lines=12, autoscroll=True, elem_id="job-log")
    seen_state = gr.State({})
    timer = gr.Timer(studio.refresh_seconds)

    outputs = [table, select, status, *plots, samples, dl_webui, dl_diffusers, log, stop_btn, resume_btn, delete_btn,
               seen_state]

    def refresh(job_id, seen):
        """Re-read the store; send only what changed since this page's last look."""
        seen = dict(seen or {})
        jobs = store.list()
        out = {}
        sig = [(j.id, j.status, j.step, j.total, j.queue_position, j.message) for j in jobs]
        ids = [j.id for j in jobs]
        if job_id not in ids:
            job_id = ids[0] if ids else None
        if seen.get("list") != sig or seen.get("job_id") != job_id:
            out[table] = _table(jobs)
            out[select] = gr.update(choices=[(job_label(j), j.id) for j in jobs], value=job_id)
        job = next((j for j in jobs if j.id == job_id), None)
        images = store.images(job.id) if job else []
        job_sig = None if job is None else (job.id, job.status, job.step, job.message, len(images), job.lora)
        if seen.get("job") != job_sig or seen.get("job_id") != job_id:
            out[status] = _status_markdown(job)
            rows = store.metrics(job.id) if job else []
            for plot, (_title, keys) in zip(plots, PLOTS):
                out[plot] = _curves(rows, keys)
            out[samples] = [(studio.served(im["path"]), f"epoch {im['epoch']} · step {im['step']}") for im in images]
            files = job.lora_files if job else {}
            for button, fmt in ((dl_webui, "webui"), (dl_diffusers, "diffusers")):
                path = files.get(fmt)
                ok = bool(path) and job.status not in ACTIVE
                out[button] = gr.DownloadButton(value=studio.served(path) if ok else None, interactive=ok)
            out[stop_btn] = gr.Button(interactive=bool(job) and job.status in ("queued", "starting", "running"))
            out[resume_btn] = gr.Button(interactive=bool(job) and job.status in RESUMABLE)
            out[delete_btn] = gr.Button(interactive=bool(job) and not job.active)
        if job is not None:
            text = store.log(job.id, 40)
            if job.status == "failed" and job.error_tail and job.error_tail not in text:
                text = f"{text}\n--- last lines before it failed ---\n{job.error_tail}"
            if seen.get("log") != text:
                out[log] = text
                seen["log"] = text
        elif seen.get("log"):
            out[log], seen["log"] = "", ""
        seen.update(list=sig, job=job_sig, job_id=job_id)
        out[seen_state] = seen
        return out

    def select_job(job_id, seen):
        if job_id is not None:
            job_id = existing_job(job_id)
        return refresh(job_id, {})

    def existing_job(job_id) -> int:
        """The id of a job in the store, or a gr.Error saying there is none."""
        try:
            job_id = int(job_id)
        except (TypeError, ValueError):
            raise gr.Error(f"a job id is a number; got {job_id!r}") from None
        try:
            return store.get(job_id).id
        except JobError as exc:
            raise gr.Error(f"no job {job_id}: it does not exist (or was deleted)") from exc

    def act(fn, verb):
        def handler(job_id):
            if job_id is None:
                if verb == "deleted":  # the confirmation was declined
                    return "Nothing deleted."
                raise gr.Error("select a job first")
            job_id = existing_job(job_id)
            try:
                result = fn(job_id)
            except JobError as exc:
                raise gr.Error(str(exc)) from exc
            if result is None:
                return f"Job #{job_id} {verb}."
            if isinstance(result, str):  # what a delete left behind
                return f"Job #{job_id} {verb}; {plain_markdown(result)}."
            return f"Job #{job_id}: {plain_markdown(result.status_line())}"
        return handler

    timer.tick(refresh, inputs=[select, seen_state], outputs=outputs, api_name="refresh_jobs", concurrency_limit=8,
               show_progress="hidden")
    select.input(select_job, inputs=[select, seen_state], outputs=outputs, api_name="select_job",
                 show_progress="hidden")

    def pick_row(df, seen, evt: gr.SelectData):
        try:
            job_id = int(df.iloc[evt.index[0]]["id"])
        except (TypeError, ValueError, IndexError, KeyError):
            return refresh(None, seen)
        return refresh(job_id, {})

    # A row click carries the browser's event data, which an API client cannot send: it stays private
    # (its API twin is /select_job).
    table.select(pick_row, inputs=[table, seen_state], outputs=outputs, api_name="pick_job_row",
                 api_visibility="private", show_progress="hidden")
    stop_btn.click(act(store.stop, "stopped"), inputs=select, outputs=action, api_name="stop_job")
    resume_btn.click(act(store.resume, "resumed"), inputs=select, outputs=action, api_name="resume_job")
    delete_btn.click(act(store.delete, "deleted"), inputs=select, outputs=action, api_name="delete_job",
                     js="(id) => (id != null && confirm('Delete job #' + id + ' and its run folder?')) ? id : null")
    return {"select": select, "seen": seen_state, "table": table, "refresh": refresh}
