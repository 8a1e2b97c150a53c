"""Train tab: a form generated from the method's config dataclass; Launch queues a job."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import gradio as gr

from ..backend.jobs import JobError, check_pickapic, read_prompt_list
from ..backend.sources import POCKET, POCKET_LATENT
from . import form
from .safety import bound_upload_folder, discard_upload, plain_markdown, public_message

DEFAULT_PRESET = "pocket_spo.yaml"

UPLOAD_HELP = ("Optional. SPO: a prompt list (.txt one per line, .json list of strings, or .parquet with a "
               "`caption` column); Diffusion-DPO / -RPO: a Pick-a-Pic .parquet of preference pairs. "
               "It replaces the prompts / train_data field.")


def _widget(spec: form.FieldSpec, value, method: str):
    label, info, elem_id = spec.name, spec.help, f"{method}-{spec.name}".replace("_", "-")
    value = form.to_widget(spec, value)
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), label=label, info=info, elem_id=elem_id)
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, label=label, info=info, elem_id=elem_id)
    if spec.kind == "float":
        return gr.Number(value=value, label=label, info=info, elem_id=elem_id)
    if spec.kind == "choice":
        return gr.Dropdown(choices=spec.choices, value=value, label=label, info=info, elem_id=elem_id)
    if spec.kind == "source":
        named = [POCKET, POCKET_LATENT] if spec.name == "spm" else [POCKET]
        choices = named + ([value] if value and value not in named else [])
        return gr.Dropdown(choices=choices, value=value, allow_custom_value=True, label=label,
                           info=info + " — type a local path for your own", elem_id=elem_id)
    if spec.kind == "list":
        return gr.Textbox(value=value, lines=2, label=label, info=info + " (one per line)", elem_id=elem_id)
    return gr.Textbox(value=value, label=label, info=info, elem_id=elem_id)


def upload_field(cls) -> str:
    names = {f.name for f in dataclasses.fields(cls)}
    return "prompts" if "prompts" in names else "train_data"


def train_tab(studio) -> dict:
    classes = studio.methods
    specs = {m: form.field_specs(cls) for m, cls in classes.items()}
    preset_files = form.presets(studio.configs_dir, classes)
    values = {m: {s.name: s.default for s in specs[m]} for m in classes}
    method0 = "spo" if "spo" in classes else next(iter(classes))
    preset0 = DEFAULT_PRESET if DEFAULT_PRESET in preset_files else None  # the pocket, preselected
    if preset0:
        method0, preset_values = form.read_preset(preset_files[preset0])
        values[method0].update({k: v for k, v in preset_values.items() if k in values[method0]})
    devices = studio.store.devices
    on_gpu = studio.store.on_gpu

    with gr.Row():
        method = gr.Radio(choices=[(m.upper(), m) for m in classes], value=method0, label="Method",
                          info="SPO: step-aware preference optimization; DPO / RPO: the offline baselines",
                          elem_id="method")
        preset = gr.Dropdown(choices=list(preset_files), value=preset0, label="Preset",
                             info="fills the form from configs/*.yaml", elem_id="preset")
        name = gr.Textbox(label="Job name", placeholder="e.g. pocket SPO", elem_id="job-name")
        gpus = gr.Number(value=1, precision=0, minimum=1, maximum=len(devices) if on_gpu else 1, label="GPUs",
                         info=f"one process per GPU (accelerate); GPUs here: {','.join(devices)}" if on_gpu
                         else "no GPU here: the job runs as one CPU process", interactive=on_gpu and len(devices) > 1,
                         elem_id="gpus")
    upload = gr.File(label="Upload prompts or preference data", file_types=[".txt", ".json", ".parquet"],
                     elem_id="upload")
    gr.Markdown(UPLOAD_HELP, elem_classes=["spo-help"])
    upload_msg = gr.Markdown(elem_id="upload-msg")

    columns, inputs, order = {}, [], []
    for m in classes:
        with gr.Column(visible=m == method0) as column:
            for title, group, open_ in form.sections(specs[m], m):
                with gr.Accordion(title, open=open_):
                    for i in range(0, len(group), 3):
                        with gr.Row():
                            for spec in group[i:i + 3]:
                                inputs.append(_widget(spec, values[m].get(spec.name), m))
                                order.append((m, spec))
        columns[m] = column
    launch = gr.Button("Launch", variant="primary", elem_id="launch-btn")
    message = gr.Markdown(elem_id="launch-msg")
    with gr.Accordion("Config (YAML): what Launch submits", open=False):
        config = gr.Code(language="yaml", interactive=True, elem_id="config-yaml")

    # -- handlers ------------------------------------------------------------------------------------

    def select_method(m):
        return [gr.update(visible=k == m) for k in columns]

    def load_preset(filename):
        if not filename:
            return [gr.update()] * (1 + len(inputs))
        if filename not in preset_files:
            raise gr.Error(f"{filename}: no such preset")
        try:
            m, data = form.read_preset(preset_files[filename])
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        unknown = sorted(set(data) - {s.name for s in specs[m]} - set(form.HIDDEN))
        if unknown:
            raise gr.Error(f"{filename}: unknown key(s) {unknown} for {m}")
        updates = [gr.update(value=m)]
        for mm, spec in order:
            if mm == m:
                updates.append(gr.update(value=form.to_widget(spec, data.get(spec.name, spec.default))))
            else:
                updates.append(gr.update())
        return updates

    def check_upload(m, path):
        if not path:
            return ""
        field = upload_field(classes[m])
        try:
            bound_upload_folder(studio.temp_max_bytes, keep=path)
        except ValueError as exc:
            raise gr.Error(str(exc)) from exc
        try:
            if field == "prompts":
                n = len(read_prompt_list(path))
                return f"✓ {Path(path).name}: {n} prompts; they replace the `prompts` field"
            n = check_pickapic(path)
            return f"✓ {Path(path).name}: {n} preference pairs; they replace the `train_data` field"
        except JobError as exc:
            discard_upload(path)  # a rejected upload is of no further use
            raise gr.Error(public_message(str(exc))) from exc

    def build_config(m, *widget_values):
        if m not in classes:
            raise gr.Error(f"unknown method {m!r}")
        data = {}
        try:
            for (mm, spec), value in zip(order, widget_values):
                if mm == m:
                    data[spec.name] = form.from_widget(spec, value)
        except (TypeError, ValueError) as exc:
            raise gr.Error(str(exc)) from exc
        return form.config_yaml(m, data)

    def submit(config_text, job_name, n_gpus, path):
        try:
            m, data = form.parse_config_yaml(config_text)
            if m not in classes:
                raise JobError(f"unknown method {m!r}; available: {', '.join(classes)}")
            uploads = {upload_field(classes[m]): path} if path else None
            job = studio.store.submit(m, data, name=job_name, gpus=int(n_gpus or 1), uploads=uploads)
        except (JobError, ValueError, FileNotFoundError) as exc:
            raise gr.Error(public_message(str(exc))) from exc
        discard_upload(path)  # the run folder holds its copy now
        text = (f"Job **#{job.id}** ({plain_markdown(job.name)}) is {plain_markdown(job.status_line())}. "
                f"Run folder: `{job.run_dir}`")
        return text, gr.Tabs(selected="jobs"), gr.update(choices=_job_choices(studio), value=job.id), {}

    method.change(select_method, inputs=method, outputs=list(columns.values()), api_name="select_method")
    preset.input(load_preset, inputs=preset, outputs=[method, *inputs], api_name="load_preset")
    upload.upload(check_upload, inputs=[method, upload], outputs=upload_msg, api_name="check_upload")
    return {"launch": launch, "build_config": build_config, "submit": submit, "form_inputs": [method, *inputs],
            "config": config, "name": name, "gpus": gpus, "upload": upload, "message": message}


def _job_choices(studio) -> list[tuple[str, int]]:
    from .jobs_tab import job_label

    return [(job_label(j), j.id) for j in studio.store.list(reconcile=False)]
