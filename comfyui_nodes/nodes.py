"""The SPO nodes, V3 schema. Thin: each declares its inputs and outputs and calls `run.py`,
`lora_loader.py` or `spm_loader.py`. Imported only inside ComfyUI (see `__init__.py`).
"""

from __future__ import annotations

import logging
import os

import folder_paths
import torch
from comfy_api.latest import ComfyExtension, io, ui

from . import lora_loader, run, spm_loader
from .runtime import ComfyRuntime

logger = logging.getLogger(__name__)

RUNTIME = ComfyRuntime()  # stateless: a namespace of ComfyUI calls

# The spo_preference model folder: models/spo_preference, plus paths from extra_model_paths.yaml.
folder_paths.add_model_folder_path(spm_loader.FOLDER_NAME,
                                   os.path.join(folder_paths.models_dir, spm_loader.FOLDER_NAME), is_default=True)

SPOPreference = io.Custom("SPO_PREFERENCE")
SPOTrace = io.Custom("SPO_TRACE")
SPOPool = io.Custom("SPO_POOL")

SEED_MAX = 0xFFFFFFFFFFFFFFFF
SPM_PROMPT_TOOLTIP = ("The prompt text the preference model judges the images against. Use the words of the "
                      "positive prompt (link one String node to both).")


def _sampling_inputs(with_sampler: bool = True) -> list:
    """model, conditionings, latent, seed, steps, cfg, (sampler), scheduler: KSampler's inputs."""
    inputs = [
        io.Model.Input("model", tooltip="The diffusion model to sample (SD1.5 or SDXL, epsilon prediction)."),
        io.Conditioning.Input("positive", tooltip="The positive conditioning (CLIP Text Encode)."),
        io.Conditioning.Input("negative", tooltip="The negative conditioning; an empty prompt gives SPO's "
                                                  "classifier-free guidance."),
        io.Latent.Input("latent_image", tooltip="The starting latent: Empty Latent Image for text-to-image."),
        io.Int.Input("seed", default=0, min=0, max=SEED_MAX, control_after_generate=True,
                     tooltip="Seed of the initial noise and of every step's noise. With spo_ddim + ddim_uniform "
                             "the same seed gives the same trajectory as `spo score --seed`."),
        io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Denoising steps (SPO: 20)."),
        io.Float.Input("cfg", default=5.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale (SPO: 5)."),
    ]
    if with_sampler:
        inputs.append(io.Combo.Input("sampler_name", options=RUNTIME.sampler_names(), default="spo_ddim",
                                     tooltip="spo_ddim is SPO's DDIM with eta = 1 (one seeded noise stream); "
                                             "every ComfyUI sampler works too."))
    inputs.append(io.Combo.Input("scheduler", options=RUNTIME.scheduler_names(), default="ddim_uniform",
                                 tooltip="ddim_uniform is the DDIM grid SPO samples on (t = 951, 901, … for 20 "
                                         "steps)."))
    return inputs


def _scoring_inputs() -> list:
    return [
        io.Vae.Input("vae", tooltip="The VAE that decodes each step's x̂0 for the preference model."),
        SPOPreference.Input("spm", tooltip="The step-aware preference model (SPO Preference Model Loader)."),
        io.String.Input("spm_prompt", multiline=True, default="", tooltip=SPM_PROMPT_TOOLTIP),
    ]


# ----------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------


class SPOLoraLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPOLoraLoader",
            display_name="SPO LoRA Loader",
            category="SPO/loaders",
            description="Applies an SPO LoRA (webui/kohya or diffusers/peft file) through ComfyUI's own LoRA "
                        "patching, on clones, so it stacks with other LoRAs. Warns and passes the model through "
                        "when the LoRA is for another model family.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the LoRA to."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Optional: the CLIP model, for LoRAs with a text-encoder part."),
                io.Combo.Input("lora_name", options=RUNTIME.lora_names(),
                               tooltip="A LoRA file from the loras folder (either format)."),
                io.Float.Input("strength_model", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="How strongly to apply the LoRA to the diffusion model (1 = as trained)."),
                io.Float.Input("strength_clip", default=1.0, min=-20.0, max=20.0, step=0.01,
                               tooltip="How strongly to apply the LoRA to the CLIP model."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The patched diffusion model (a clone)."),
                io.Clip.Output(display_name="CLIP", tooltip="The patched CLIP model (a clone), or none."),
            ],
        )

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, clip=None) -> io.NodeOutput:
        if strength_model == 0 and strength_clip == 0:
            return io.NodeOutput(model, clip)
        path = RUNTIME.lora_path(lora_name)
        model_out, clip_out = lora_loader.load_spo_lora(RUNTIME, model, clip, path, strength_model, strength_clip)
        return io.NodeOutput(model_out, clip_out)


class SPOPreferenceModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPOPreferenceModelLoader",
            display_name="SPO Preference Model Loader",
            category="SPO/loaders",
            description="Loads a step-aware preference model (SPM) from the spo_preference model folder, or the "
                        "pocket SPM shipped with SPO Studio.",
            inputs=[
                io.Combo.Input("spm_name", options=spm_loader.choices(RUNTIME.spm_folders()),
                               default=spm_loader.POCKET,
                               tooltip="An SPM folder (spm.json + clip/), a PickScore/CLIP folder, or an official "
                                       "SPO .bin/.safetensors (inside or next to its PickScore/CLIP folder) under "
                                       "models/spo_preference; 'pocket (shipped)' is the pocket world's SPM."),
                io.Combo.Input("decode", options=["full", "fast"], default="full", optional=True,
                               tooltip="How the scoring nodes decode each step's x̂0 for the SPM. full: the "
                                       "VAE at full size (what the SPM was trained on; the backend's scores). "
                                       "fast: the latent shrunk to the SPM's input size first, far less VAE "
                                       "work, approximate scores."),
            ],
            outputs=[SPOPreference.Output(display_name="SPM", tooltip="The step-aware preference model.")],
        )

    @classmethod
    def execute(cls, spm_name, decode="full") -> io.NodeOutput:
        if decode not in ("full", "fast"):
            raise ValueError(f"decode must be 'full' or 'fast'; got {decode!r}")
        return io.NodeOutput(spm_loader.load_scorer(spm_name, RUNTIME.spm_folders(), RUNTIME.device(),
                                                    latent_decode=decode == "fast"))


# ----------------------------------------------------------------------------------------------
# Scoring and sampling
# ----------------------------------------------------------------------------------------------


def _preview(images: list[torch.Tensor], cls) -> list:
    saved = []
    for image in images:
        saved += ui.PreviewImage(image, cls=cls).as_dict()["images"]
    return saved


class SPOStepScorer(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPOStepScorer",
            display_name="SPO Step Scorer",
            category="SPO/scoring",
            description="Samples like KSampler and scores every step's one-step prediction x̂0 with the "
                        "step-aware preference model at that step's timestep. Shows the scores live.",
            inputs=_sampling_inputs() + [
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run (1 = from pure noise)."),
            ] + _scoring_inputs(),
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The sampled latent, as KSampler returns it."),
                io.Image.Output(display_name="score_plot", tooltip="Preference score vs step."),
                io.Image.Output(display_name="x0_strip",
                                tooltip="Every step's x̂0 with its score: decoded by the VAE or, with a latent "
                                        "preference model (which decodes one x̂0 only), its Latent2RGB preview "
                                        "through a linear map fitted to the decode of the next-to-last x̂0."),
                SPOTrace.Output(display_name="SPO_TRACE", tooltip="Timesteps, σ, scores and thumbnails per step."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, denoise,
                vae, spm, spm_prompt) -> io.NodeOutput:
        latent, plot, strip, trace = run.run_step_scorer(
            RUNTIME, model, positive, negative, latent_image, vae, spm, spm_prompt, seed, steps, cfg, sampler_name,
            scheduler, denoise, node_id=cls.hidden.unique_id)
        return io.NodeOutput(latent, plot, strip, trace,
                             ui={"images": _preview([plot, strip], cls), "spo_trace": [trace.as_dict()]})


def _pool_inputs(k_min: int, k_tooltip: str) -> list:
    """k and η of a pool of candidates drawn from one shared x_t."""
    return [
        io.Int.Input("k", default=4, min=k_min, max=16, tooltip=k_tooltip),
        io.Float.Input("eta", default=1.0, min=0.01, max=1.0, step=0.01,
                       tooltip="DDIM eta of the pool's step (1 = DDPM-style, as SPO)."),
    ]


class SPOPoolPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPOPoolPreview",
            display_name="SPO Pool Preview",
            category="SPO/scoring",
            description="Samples with SPO's DDIM (eta) to a chosen step, draws k candidates from the shared x_t "
                        "and scores each with the preference model: the pool SPO learns from.",
            inputs=_sampling_inputs(with_sampler=False) + [
                io.Int.Input("pool_step", default=8, min=0, max=999,
                             tooltip="The step whose x_t the candidates share (0 = first; at most steps - 2)."),
            ] + _pool_inputs(2, "Candidates in the pool (SPO: 4 SD1.5, 2 SDXL).") + _scoring_inputs(),
            outputs=[
                io.Image.Output(display_name="grid", tooltip="Each candidate's x̂0 with its score; the winner "
                                                             "framed green, the loser red."),
                io.Latent.Output(display_name="candidates", tooltip="The k candidates (at step pool_step + 1); "
                                                                    "continue them with KSamplerAdvanced."),
                SPOPool.Output(display_name="SPO_POOL", tooltip="Scores, winner, loser and latents of the pool."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, scheduler, pool_step, k, eta, vae,
                spm, spm_prompt) -> io.NodeOutput:
        grid, candidates, report = run.run_pool_preview(
            RUNTIME, model, positive, negative, latent_image, vae, spm, spm_prompt, seed, steps, cfg, scheduler,
            pool_step, k, eta, node_id=cls.hidden.unique_id)
        return io.NodeOutput(grid, candidates, report,
                             ui={"images": _preview([grid], cls), "spo_pool": [report.as_dict()]})


class SPOGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPOGuidedSampler",
            display_name="SPO Guided Sampler",
            category="SPO/sampling",
            description="A SAMPLER for SamplerCustom: at every step it draws k candidates (DDIM eta) and continues "
                        "from the one the step-aware preference model scores best.",
            inputs=_pool_inputs(1, "Candidates per step; k = 1 is plain spo_ddim. Costs about k x the UNet work.")
            + _scoring_inputs(),
            outputs=[io.Sampler.Output(display_name="SAMPLER", tooltip="Connect to SamplerCustom's sampler.")],
        )

    @classmethod
    def execute(cls, k, eta, vae, spm, spm_prompt) -> io.NodeOutput:
        return io.NodeOutput(run.guided_sampler(RUNTIME, vae, spm, spm_prompt, k, eta))


class SPOGuidedKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SPOGuidedKSampler",
            display_name="SPO Guided KSampler",
            category="SPO/sampling",
            description="One-node guided sampling: at every step k candidates, continue from the preference "
                        "model's best (inference-time step-wise preference selection).",
            inputs=_sampling_inputs(with_sampler=False)
            + _pool_inputs(1, "Candidates per step; k = 1 is plain spo_ddim. Costs about k x the UNet work.") + [
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule to run (1 = from pure noise)."),
            ] + _scoring_inputs(),
            outputs=[
                io.Latent.Output(display_name="LATENT", tooltip="The guided sample."),
                SPOTrace.Output(display_name="SPO_TRACE", tooltip="The kept candidate's score at every step."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, scheduler, k, eta, denoise, vae, spm,
                spm_prompt) -> io.NodeOutput:
        latent, trace = run.run_guided(RUNTIME, model, positive, negative, latent_image, vae, spm, spm_prompt, seed,
                                       steps, cfg, scheduler, k, eta, denoise, node_id=cls.hidden.unique_id)
        return io.NodeOutput(latent, trace)


NODES = [SPOLoraLoader, SPOPreferenceModelLoader, SPOStepScorer, SPOPoolPreview, SPOGuidedSampler, SPOGuidedKSampler]


class SPOExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> SPOExtension:
    return SPOExtension()
