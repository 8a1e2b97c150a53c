"""The SPO nodes' logic on a `backend` model, with ComfyUI's sampling conventions, without ComfyUI.

    from spo_studio.comfyui_nodes import run, standalone
    rt, model, vae = standalone.StandaloneRuntime(), *standalone.wrap(load_model("pocket"))
    positive, negative = standalone.encode(model, "a red circle"), standalone.encode(model, "")
    latent, plot, strip, trace = run.run_step_scorer(rt, model, positive, negative, standalone.empty_latent(model),
                                                     vae, scorer, "a red circle", 0, 20, 5.0, "spo_ddim",
                                                     "ddim_uniform")

Stand-ins for ComfyUI's objects, written to behave as ComfyUI's `comfy.model_sampling` and
`comfy.samplers` do, for the tests
and benchmarks that run where no ComfyUI checkout is (and for models ComfyUI cannot detect, such
as the pocket model):

  * model sampling — ModelSamplingDiscrete: σ_i = √((1−ᾱ_i)/ᾱ_i) from the model's own schedule,
    t(σ) = argmin |log σ − log σ_i|; the `ddim_uniform` and `simple` schedulers;
  * the denoiser — EPS parameterisation with CFG: x̂0 = x − σ·ε̂(x/√(1+σ²), t(σ)),
    ε̂ = ε_u + cfg·(ε_c − ε_u) in one batched UNet call; latents scaled by the VAE's
    scaling_factor in `process_latent_in` (an empty latent is not shifted);
  * KSAMPLER.sample — initial x = noise·√(1+σ₀²) when σ₀ ≥ σ_max, else noise·σ₀ + latent; the
    per-step callback (step, x̂0, x, total);
  * prepare_noise — one `torch.randn` of the latent's shape from a generator seeded with the seed.

Only what the SPO nodes use is here (no LoRA patching, masks, ControlNet, …).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import sampling
from .runtime import SPO_SAMPLERS

# ----------------------------------------------------------------------------------------------
# Model stand-ins
# ----------------------------------------------------------------------------------------------


class ModelSamplingDiscrete:
    """σ ↔ t of a discrete-time eps model, as `comfy.model_sampling.ModelSamplingDiscrete`."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        a = alphas_cumprod.float()
        self.sigmas = ((1 - a) / a) ** 0.5
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self):
        return self.sigmas[0]

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        dists = sigma.log().to(self.log_sigmas.device) - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape).to(sigma.device)


class BaseModel:
    """The `model_patcher.model` stand-in: latent format, model sampling and the eps UNet."""

    def __init__(self, diffusion_model):
        self.dm = diffusion_model
        self.model_sampling = ModelSamplingDiscrete(diffusion_model.scheduler.alphas_cumprod)
        self.scale = diffusion_model.latent_scale

    def process_latent_in(self, latent: torch.Tensor) -> torch.Tensor:
        return latent * self.scale

    def process_latent_out(self, latent: torch.Tensor) -> torch.Tensor:
        return latent / self.scale

    @torch.no_grad()
    def cfg_denoise(self, x: torch.Tensor, sigma: torch.Tensor, positive, negative, cfg: float) -> torch.Tensor:
        """x̂0 = x − σ·ε̂, ε̂ the CFG combination (one batched UNet call, as ComfyUI's calc_cond_batch)."""
        s = sigma.view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x_in = x / (s**2 + 1) ** 0.5
        t = self.model_sampling.timestep(sigma).float()
        b = x.shape[0]
        cond = _batch(positive, b)
        if cfg == 1.0:
            eps = self.dm.unet(x_in, t, encoder_hidden_states=cond, return_dict=False)[0]
        else:
            both = torch.cat([_batch(negative, b), cond])
            eps_u, eps_c = self.dm.unet(torch.cat([x_in, x_in]), torch.cat([t, t]), encoder_hidden_states=both,
                                        return_dict=False)[0].chunk(2)
            eps = eps_u + cfg * (eps_c - eps_u)
        return x - eps * s


def _batch(conditioning, b: int) -> torch.Tensor:
    hidden = conditioning[0][0]
    return hidden if hidden.shape[0] == b else hidden.repeat(b // hidden.shape[0], 1, 1)


@dataclass
class ModelPatcher:
    """The MODEL value stand-in."""

    model: BaseModel
    model_options: dict = field(default_factory=dict)

    def get_model_object(self, name: str):
        if name == "model_sampling":
            return self.model.model_sampling
        raise KeyError(name)

    def clone(self) -> "ModelPatcher":
        return ModelPatcher(self.model, dict(self.model_options))


class VAE:
    """The VAE value stand-in: decode(VAE latent [B, C, H, W]) → images [B, H, W, 3] in [0, 1]."""

    def __init__(self, diffusion_model):
        self.dm = diffusion_model
        self.downscale_ratio = diffusion_model.vae_scale_factor  # as comfy.sd.VAE

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        vae = self.dm.vae
        image = vae.decode(latent.to(self.dm.device, next(vae.parameters()).dtype)).sample
        return ((image.float() + 1) / 2).clamp(0, 1).movedim(1, -1).cpu()


def wrap(diffusion_model) -> tuple[ModelPatcher, VAE]:
    """(MODEL, VAE) stand-ins for a `backend.models.DiffusionModel` (SD1.5 family)."""
    if diffusion_model.family != "sd15":
        raise ValueError("the standalone runtime covers SD1.5-family models (the pocket model, tiny SD1.5)")
    return ModelPatcher(BaseModel(diffusion_model)), VAE(diffusion_model)


def encode(model: ModelPatcher, prompt: str) -> list:
    """CONDITIONING of a prompt, as CLIPTextEncode gives it: [[hidden [1, L, D], {}]]."""
    return [[model.model.dm.encode_prompts([prompt]).hidden, {}]]


def empty_latent(model: ModelPatcher, batch: int = 1, size: int | None = None) -> dict:
    """An Empty Latent Image: zeros of the model's latent shape."""
    dm = model.model.dm
    side = (size or dm.default_resolution) // dm.vae_scale_factor
    return {"samples": torch.zeros(batch, dm.latent_channels, side, side)}


# ----------------------------------------------------------------------------------------------
# Sampling stand-ins
# ----------------------------------------------------------------------------------------------


class Guider:
    """CFGGuider stand-in: `guider(x, sigma, model_options, seed)` → x̂0; `.inner_model` the BaseModel."""

    def __init__(self, model: ModelPatcher, positive, negative, cfg: float):
        self.inner_model = model.model
        self.positive, self.negative, self.cfg = positive, negative, cfg

    def __call__(self, x, sigma, model_options=None, seed=None):
        return self.inner_model.cfg_denoise(x, sigma, self.positive, self.negative, self.cfg)


class X0Inpaint:
    """KSamplerX0Inpaint stand-in (no masks): what a k-diffusion function calls as `model`."""

    def __init__(self, guider: Guider, sigmas):
        self.inner_model = guider
        self.sigmas = sigmas

    def __call__(self, x, sigma, denoise_mask=None, model_options=None, seed=None):
        if denoise_mask is not None:
            raise NotImplementedError("the standalone runtime has no inpainting masks")
        return self.inner_model(x, sigma, model_options=model_options, seed=seed)


class KSampler:
    """comfy.samplers.KSAMPLER stand-in."""

    def __init__(self, sampler_function, extra_options=None):
        self.sampler_function = sampler_function
        self.extra_options = dict(extra_options or {})

    def max_denoise(self, model_wrap, sigmas) -> bool:
        max_sigma = float(model_wrap.inner_model.model_sampling.sigma_max)
        sigma = float(sigmas[0])
        return math.isclose(max_sigma, sigma, rel_tol=1e-05) or sigma > max_sigma

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        extra_args["denoise_mask"] = denoise_mask
        model_k = X0Inpaint(model_wrap, sigmas)
        s0 = sigmas[0]
        x = noise * torch.sqrt(1.0 + s0**2) if self.max_denoise(model_wrap, sigmas) else noise * s0
        x = x + latent_image
        total = len(sigmas) - 1
        k_callback = None if callback is None else (lambda d: callback(d["i"], d["denoised"], d["x"], total))
        return self.sampler_function(model_k, x, sigmas, extra_args=extra_args, callback=k_callback,
                                     disable=disable_pbar, **self.extra_options)


class _SPOKSampler(sampling.SPOSamplerMixin, KSampler):
    pass


def ddim_uniform(model_sampling: ModelSamplingDiscrete, steps: int) -> torch.Tensor:
    """ComfyUI's `ddim_uniform` scheduler: σ at t = 1 + i·⌊1000/steps⌋, reversed, then 0."""
    sigmas = model_sampling.sigmas
    x, out = 1, []
    if math.isclose(float(sigmas[x]), 0, abs_tol=1e-5):
        steps += 1
    else:
        out = [0.0]
    stride = max(len(sigmas) // steps, 1)
    while x < len(sigmas):
        out.append(float(sigmas[x]))
        x += stride
    return torch.FloatTensor(out[::-1])


def simple(model_sampling: ModelSamplingDiscrete, steps: int) -> torch.Tensor:
    """ComfyUI's `simple` scheduler."""
    sigmas = model_sampling.sigmas
    stride = len(sigmas) / steps
    return torch.FloatTensor([float(sigmas[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])


SCHEDULERS = {"ddim_uniform": ddim_uniform, "simple": simple}


class NullProgress:
    def __init__(self):
        self.updates: list[tuple] = []

    def update_absolute(self, value, total=None, preview=None):
        self.updates.append((value, total))


class StandaloneRuntime:
    """The runtime interface of `runtime.ComfyRuntime`, over the stand-ins above."""

    def __init__(self, overlap: bool = False):
        self.overlap = overlap
        self.messages: list[tuple[str, dict]] = []
        self.bars: list[NullProgress] = []

    def sampler_names(self) -> list[str]:
        return list(SPO_SAMPLERS)

    def scheduler_names(self) -> list[str]:
        return list(SCHEDULERS)

    def sigmas(self, model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
        if scheduler not in SCHEDULERS:
            raise ValueError(f"the standalone runtime has the schedulers {sorted(SCHEDULERS)}, not {scheduler!r}")
        total = steps if denoise >= 0.9999 else int(steps / denoise)
        return SCHEDULERS[scheduler](model.get_model_object("model_sampling"), total)[-(steps + 1):]

    def ksampler(self, function, **options):
        return _SPOKSampler(function, extra_options=options)

    def sampler(self, name: str):
        if name not in SPO_SAMPLERS:
            raise ValueError(f"the standalone runtime has the samplers {sorted(SPO_SAMPLERS)}, not {name!r}")
        return self.ksampler(SPO_SAMPLERS[name], eta=1.0)

    def prepare_latent(self, model, latent: dict) -> torch.Tensor:
        return latent["samples"]

    def noise(self, samples: torch.Tensor, seed: int, batch_index=None) -> torch.Tensor:
        if batch_index is not None:
            raise NotImplementedError("batch_index is not supported by the standalone runtime")
        return torch.randn(samples.size(), dtype=samples.dtype, generator=torch.Generator().manual_seed(seed))

    def sample(self, model, noise, cfg, sampler, sigmas, positive, negative, samples, noise_mask=None,
               callback=None, seed=None) -> torch.Tensor:
        base = model.model
        device, dtype = base.dm.device, base.dm.dtype
        latent = samples.to(device, dtype)
        if torch.count_nonzero(latent) > 0:  # ComfyUI does not shift the empty latent
            latent = base.process_latent_in(latent)
        guider = Guider(model, positive, negative, cfg)
        extra_args = {"model_options": dict(model.model_options), "seed": seed}
        out = sampler.sample(guider, sigmas.to(device), extra_args, callback, noise.to(device, dtype), latent,
                             noise_mask, True)
        return base.process_latent_out(out.float()).cpu()

    def latent_out(self, model, x: torch.Tensor) -> torch.Tensor:
        return model.model.process_latent_out(x)

    def base_model(self, model):
        return model.model

    def scoring_overlaps(self) -> bool:
        return self.overlap

    def progress(self, total: int, node_id=None):
        bar = NullProgress()
        self.bars.append(bar)
        return bar

    def send(self, event: str, data: dict) -> None:
        self.messages.append((event, data))

    def device(self) -> torch.device:
        return torch.device("cpu")
