"""The few ComfyUI calls the SPO nodes make, in one place.

Every ComfyUI module is imported inside the method that needs it, so this file imports outside
ComfyUI too. The node logic (`run.py`, `lora_loader.py`) only talks to a runtime object;
`standalone.StandaloneRuntime` implements the same methods over a `backend` model with ComfyUI's
sampling conventions, for tests and benchmarks without a ComfyUI checkout.
"""

from __future__ import annotations

import logging

import torch

from . import sampling

logger = logging.getLogger(__name__)

SPO_SAMPLERS = {"spo_ddim": sampling.spo_ddim}


class ComfyRuntime:
    """ComfyUI itself (the runtime the nodes use inside ComfyUI)."""

    # -- sampling ------------------------------------------------------------------------------
    def sampler_names(self) -> list[str]:
        import comfy.samplers

        return list(SPO_SAMPLERS) + list(comfy.samplers.KSampler.SAMPLERS)

    def scheduler_names(self) -> list[str]:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SCHEDULERS)

    def sigmas(self, model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
        """The σ schedule, as ComfyUI's BasicScheduler computes it (denoise < 1 keeps the tail)."""
        import comfy.samplers

        if denoise <= 0.0:
            raise ValueError("denoise must be > 0")
        total = steps if denoise >= 0.9999 else int(steps / denoise)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, total).cpu()
        return sigmas[-(steps + 1):]

    def ksampler(self, function, **options):
        """A SAMPLER running one of our k-diffusion functions (see `sampling.SPOSamplerMixin`)."""
        import comfy.samplers

        class SPOKSampler(sampling.SPOSamplerMixin, comfy.samplers.KSAMPLER):
            pass

        return SPOKSampler(function, extra_options=options)

    def sampler(self, name: str):
        import comfy.samplers

        if name in SPO_SAMPLERS:
            return self.ksampler(SPO_SAMPLERS[name], eta=1.0)
        if name not in comfy.samplers.KSampler.SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}")
        return comfy.samplers.sampler_object(name)

    def prepare_latent(self, model, latent: dict) -> torch.Tensor:
        import comfy.sample

        return comfy.sample.fix_empty_latent_channels(model, latent["samples"])

    def noise(self, samples: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
        import comfy.sample

        return comfy.sample.prepare_noise(samples, seed, batch_index)

    def sample(self, model, noise, cfg, sampler, sigmas, positive, negative, samples, noise_mask=None,
               callback=None, seed=None) -> torch.Tensor:
        import comfy.sample
        import comfy.utils

        return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, samples,
                                          noise_mask=noise_mask, callback=callback,
                                          disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)

    def latent_out(self, model, x: torch.Tensor) -> torch.Tensor:
        return model.model.process_latent_out(x)

    def base_model(self, model):
        return model.model

    def scoring_overlaps(self) -> bool:
        """Score on a second thread while the UNet runs: only on a CPU (a GPU queue serialises anyway)."""
        import comfy.model_management

        return comfy.model_management.get_torch_device().type == "cpu"

    # -- UI ------------------------------------------------------------------------------------
    def progress(self, total: int, node_id=None):
        import comfy.utils

        return comfy.utils.ProgressBar(total, node_id=node_id)

    def send(self, event: str, data: dict) -> None:
        try:
            from server import PromptServer
        except ImportError:
            return
        if getattr(PromptServer, "instance", None) is not None:
            PromptServer.instance.send_sync(event, data)

    # -- models --------------------------------------------------------------------------------
    def device(self) -> torch.device:
        import comfy.model_management

        return comfy.model_management.get_torch_device()

    def family(self, model) -> str | None:
        """'sd15' / 'sdxl' for those model configs, else None."""
        import comfy.supported_models as sm

        config = model.model.model_config
        if isinstance(config, sm.SDXL):
            return "sdxl"
        if isinstance(config, sm.SD15):
            return "sd15"
        return None

    def model_name(self, model) -> str:
        return type(model.model.model_config).__name__

    def lora_key_map(self, model, clip) -> dict[str, str]:
        import comfy.lora

        key_map: dict[str, str] = {}
        if model is not None:
            key_map = comfy.lora.model_lora_keys_unet(model.model, key_map)
        if clip is not None:
            key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
        return key_map

    def apply_lora(self, model, clip, tensors: dict, strength_model: float, strength_clip: float):
        """ComfyUI's own LoRA patching (`comfy.sd.load_lora_for_models`): clones, patches, stacks."""
        import comfy.sd

        return comfy.sd.load_lora_for_models(model, clip, tensors, strength_model, strength_clip)

    def lora_path(self, name: str) -> str:
        import folder_paths

        return folder_paths.get_full_path_or_raise("loras", name)

    def lora_names(self) -> list[str]:
        import folder_paths

        return folder_paths.get_filename_list("loras")

    def spm_folders(self) -> list[str]:
        import folder_paths

        return folder_paths.get_folder_paths("spo_preference")
