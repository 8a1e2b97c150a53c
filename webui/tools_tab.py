"""Step inspector, pool explorer and LoRA tools (convert, info, merge: the `spo lora` features)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import gradio as gr
import pandas as pd

from ..backend.sources import POCKET, POCKET_LATENT
from .safety import bound_upload_folder, discard_upload, public_message

DEFAULT_PROMPT = "a yellow circle on a green background"
ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)


def _model_inputs(prefix: str):
    with gr.Row():
        model = gr.Dropdown(choices=[POCKET], value=POCKET, allow_custom_value=True, label="Base model",
                            info="'pocket', or a local SD1.5 / SDXL diffusers folder or .safetensors file",
                            elem_id=f"{prefix}-model")
        spm = gr.Dropdown(choices=[POCKET, POCKET_LATENT], value=POCKET, allow_custom_value=True, label="SPM",
                          info="step-aware preference model: 'pocket', 'pocket-latent' (the latent SPM), an SPM "
                               "or latent SPM folder, or an official SPO .bin", elem_id=f"{prefix}-spm")
    return model, spm


def _sampler_inputs(prefix: str):
    with gr.Row():
        prompt = gr.Textbox(value=DEFAULT_PROMPT, label="Prompt", scale=3, elem_id=f"{prefix}-prompt")
        seed = gr.Number(value=0, precision=0, label="Seed", elem_id=f"{prefix}-seed")
    with gr.Row():
        steps = gr.Slider(2, 100, value=20, step=1, label="Steps", info="DDIM steps", elem_id=f"{prefix}-steps")
        cfg = gr.Number(value=5.0, label="CFG", info="classifier-free guidance scale", elem_id=f"{prefix}-cfg")
        eta = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="η", info="DDIM η (1: as SPO rolls out)",
                        elem_id=f"{prefix}-eta")
    return prompt, seed, steps, cfg, eta


def _error(exc: Exception) -> gr.Error:
    return gr.Error(public_message(str(exc)))


# ----------------------------------------------------------------------------------------------
# Step inspector
# ----------------------------------------------------------------------------------------------


def inspector_tab(studio) -> dict:
    gr.Markdown("Sample one trajectory and score every step's one-step prediction x̂0 with the step-aware "
                "preference model — for the base model and, from the same seed, for each LoRA.")
    model, spm = _model_inputs("inspect")
    with gr.Row():
        loras = gr.Dropdown(choices=studio.lora_choices(), multiselect=True, allow_custom_value=True,
                            label="LoRA(s)", info="from your jobs, or a path to a .safetensors LoRA", scale=3,
                            elem_id="inspect-loras")
        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength", elem_id="inspect-scale")
    prompt, seed, steps, cfg, eta = _sampler_inputs("inspect")
    run = gr.Button("Score every step", variant="primary", elem_id="inspect-btn")
    plot = gr.LinePlot(x="step", y="score", color="series", title="Preference score of x̂0 per step", height=280,
                       tooltip="all", buttons=["fullscreen", "export"], elem_id="inspect-plot")
    summary = gr.Markdown(elem_id="inspect-summary")
    gallery = gr.Gallery(label="x̂0 per step (then the final image)", columns=10, object_fit="contain",
                         elem_id="inspect-x0")

    def inspect(model, spm, loras, scale, prompt, seed, steps, cfg, eta):
        try:
            res = studio.inspector.score_steps(model, spm, list(loras or []), prompt, seed=int(seed or 0),
                                               steps=int(steps), cfg_scale=float(cfg), eta=float(eta),
                                               lora_scale=float(scale))
        except ERRORS as exc:
            raise _error(exc) from exc
        rows, images, lines = [], [], ["| series | mean score | last step |", "|---|---|---|"]
        for s in res["series"]:
            for i, (t, score) in enumerate(zip(res["timesteps"], s["scores"])):
                rows.append({"step": i, "t": t, "score": score, "series": s["label"]})
                images.append((s["thumbnails"][i], f"{s['label']} {i} (t={t}): {score:.3f}"))
            images.append((s["final"], f"{s['label']}: final image"))
            lines.append(f"| {s['label']} | {sum(s['scores']) / len(s['scores']):.4f} | {s['scores'][-1]:.4f} |")
        return pd.DataFrame(rows), "\n".join(lines), images

    run.click(inspect, inputs=[model, spm, loras, scale, prompt, seed, steps, cfg, eta],
              outputs=[plot, summary, gallery], api_name="inspect_steps", concurrency_id="inspector",
              concurrency_limit=1)
    return {"loras": loras}


# ----------------------------------------------------------------------------------------------
# Pool explorer
# ----------------------------------------------------------------------------------------------


def pool_tab(studio) -> dict:
    gr.Markdown("Pick a step: see the k candidates x_{t−1} drawn from the shared x_t, as an SPO rollout draws them, "
                "each shown by its one-step x̂0 with the SPM's score; ★ winner (argmax), ✗ loser (argmin). The pair "
                "is trained on when p_w − p_l = tanh((s_w − s_l)/2) exceeds the threshold.")
    model, spm = _model_inputs("pool")
    with gr.Row():
        lora = gr.Dropdown(choices=studio.lora_choices(), allow_custom_value=True, label="LoRA (optional)",
                           info="the policy whose pool to draw; empty: the base model", scale=3, elem_id="pool-lora")
        scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="LoRA strength", elem_id="pool-scale")
    prompt, seed, steps, cfg, eta = _sampler_inputs("pool")
    with gr.Row():
        step = gr.Slider(0, 99, value=10, step=1, label="Step", info="0 = the first (noisiest) step",
                         elem_id="pool-step")
        k = gr.Slider(2, 16, value=4, step=1, label="k candidates", info="paper: 4 SD1.5, 2 SDXL", elem_id="pool-k")
        threshold = gr.Slider(0.0, 0.99, value=0.3, step=0.01, label="Threshold",
                              info="paper: 0.3 SD1.5, 0.4 SDXL", elem_id="pool-threshold")
    run = gr.Button("Draw the pool", variant="primary", elem_id="pool-btn")
    summary = gr.Markdown(elem_id="pool-summary")
    gallery = gr.Gallery(label="Shared x_t (its x̂0), then the candidates", columns=5, height=300,
                         object_fit="contain", elem_id="pool-gallery")

    def explore(model, spm, lora, scale, prompt, seed, steps, cfg, eta, step, k, threshold):
        try:
            res = studio.inspector.pool(model, spm, lora or None, prompt, seed=int(seed or 0), steps=int(steps),
                                        step=int(step), k=int(k), cfg_scale=float(cfg), eta=float(eta),
                                        threshold=float(threshold), lora_scale=float(scale))
        except ERRORS as exc:
            raise _error(exc) from exc
        images = [(res["shared_x0"], f"shared x_t at t={res['t']} → its x̂0")]
        for i, (img, s) in enumerate(zip(res["candidates"], res["scores"])):
            mark = " ★ winner" if i == res["winner"] else (" ✗ loser" if i == res["loser"] else "")
            images.append((img, f"candidate {i} · score {s:.4f}{mark}"))
        verdict = "**kept**: trained on" if res["kept"] else "**dropped**: too close to learn from"
        text = (f"Step {int(step)}: t = {res['t']} → {res['t_prev']}; candidates scored at t = {res['t_scored']}.  \n"
                f"Winner {res['winner']}, loser {res['loser']}: p_w − p_l = {res['gap']:.3f} "
                f"{'>' if res['kept'] else '≤'} {res['threshold']:.2f} → the pair is {verdict}.")
        return text, images

    run.click(explore, inputs=[model, spm, lora, scale, prompt, seed, steps, cfg, eta, step, k, threshold],
              outputs=[summary, gallery], api_name="explore_pool", concurrency_id="inspector", concurrency_limit=1)
    return {"lora": lora}


# ----------------------------------------------------------------------------------------------
# LoRA tools
# ----------------------------------------------------------------------------------------------


def _out_path(studio, stem: str, suffix: str = ".safetensors") -> Path:
    folder = Path(studio.runs_dir) / "lora_tools"
    folder.mkdir(parents=True, exist_ok=True)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-.") or "lora"
    path = folder / f"{stem}{suffix}"
    if path.exists():
        path = folder / f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}{suffix}"
    return path


def lora_tab(studio) -> dict:
    gr.Markdown("Convert a LoRA between the webui (ComfyUI, A1111) and diffusers forms, see what it holds, or fold "
                "it into a base model. Outputs are written to `lora_tools/` in the runs folder.")
    with gr.Row():
        upload = gr.File(label="Upload a LoRA (.safetensors)", file_types=[".safetensors"], elem_id="lora-upload")
        pick = gr.Dropdown(choices=studio.lora_choices(), allow_custom_value=True,
                           label="…or pick one your jobs wrote", info="only files in the runs folder",
                           elem_id="lora-pick")
    with gr.Row():
        info_btn = gr.Button("Info", elem_id="lora-info-btn")
        to = gr.Radio(choices=["webui", "diffusers", "diffusers-legacy"], value="webui", label="Convert to",
                      elem_id="lora-to")
        family = gr.Radio(choices=["from the file", "sd15", "sdxl"], value="from the file", label="Family",
                          info="for a file that does not say whether it is an SD1.5 or an SDXL LoRA",
                          elem_id="lora-family")
        convert_btn = gr.Button("Convert", elem_id="lora-convert-btn")
    with gr.Row():
        base = gr.Dropdown(choices=[POCKET], value=POCKET, allow_custom_value=True, label="Merge into base model",
                           info="'pocket' or a local SD1.5 / SDXL folder or .safetensors", elem_id="lora-base")
        merge_scale = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", elem_id="lora-merge-scale")
        merge_btn = gr.Button("Merge", elem_id="lora-merge-btn")
    message = gr.Markdown(elem_id="lora-msg")
    info = gr.JSON(label="LoRA info", elem_id="lora-info")
    result = gr.File(label="Result", interactive=False, height=90, elem_id="lora-result")

    def source(upload, pick) -> Path:
        if upload:
            path = Path(upload)
            try:
                bound_upload_folder(studio.temp_max_bytes, keep=path)
            except ValueError as exc:
                raise gr.Error(str(exc)) from exc
        elif pick:
            path = Path(studio.served(pick))  # a picked file must lie in the runs folder
        else:
            raise gr.Error("upload a LoRA or pick one")
        if path.suffix.lower() != ".safetensors":
            discard_upload(upload)
            raise gr.Error(f"{path.name}: a LoRA must be a .safetensors file")
        return path

    def refuse(exc: Exception, upload) -> gr.Error:
        """The error for a LoRA that cannot be read; an uploaded one is removed (it is of no use)."""
        from ..backend.lora import LoraError

        if isinstance(exc, LoraError):
            discard_upload(upload)
        return _error(exc)

    def lora_info(upload, pick):
        from ..backend import lora as lora_io

        try:
            info = lora_io.lora_info(source(upload, pick))
        except ERRORS as exc:
            raise refuse(exc, upload) from exc
        # the file's name only: no server paths, and a "path" key would read as a file to gradio_client
        return {"file": Path(info.pop("path")).name, **info}

    def lora_convert(upload, pick, to, family="from the file"):
        from ..backend import lora as lora_io

        src = source(upload, pick)
        out = _out_path(studio, f"{src.stem}_to_{to}")
        try:
            lora_io.convert_lora(src, out, to=to, family=None if family in (None, "", "from the file") else family)
        except ERRORS as exc:
            raise refuse(exc, upload) from exc
        return f"Wrote `{out}` ({to} format).", studio.served(out)

    def lora_merge(upload, pick, base, scale):
        import torch

        from ..backend import lora as lora_io
        from ..backend.checkpoint_io import save_single_file
        from ..backend.models import load_model

        src = source(upload, pick)
        out = _out_path(studio, f"{Path(str(base)).stem}_plus_{src.stem}")
        try:
            weights = lora_io.read_lora(src)
            model = load_model(base or POCKET, device="cpu", dtype="fp32")
            lora_io.merge_lora(model, weights, scale=float(scale))
            save_single_file(model.unet, model.vae, model.text_encoders, model.family, out, dtype=torch.float16,
                             metadata={"spo.merged_lora": src.name, "spo.merge_scale": str(scale),
                                       "spo.base_model": str(base)})
        except ERRORS as exc:
            raise _error(exc) from exc
        return f"Wrote `{out}` ({model.family}, {base} + {src.name} at strength {float(scale):g}).", studio.served(out)

    info_btn.click(lora_info, inputs=[upload, pick], outputs=info, api_name="lora_info")
    convert_btn.click(lora_convert, inputs=[upload, pick, to, family], outputs=[message, result],
                      api_name="lora_convert")
    merge_btn.click(lora_merge, inputs=[upload, pick, base, merge_scale], outputs=[message, result],
                    api_name="lora_merge", concurrency_id="inspector", concurrency_limit=1)
    return {"pick": pick}
