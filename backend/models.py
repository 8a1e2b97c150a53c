"""Offline loading of Stable Diffusion 1.5 and SDXL base models.

    from spo_studio.backend.models import load_model
    model = load_model("path/to/sd15-folder-or-file.safetensors")   # or "pocket"
    cond = model.encode_prompts(["a red circle on a blue background"])

Sources:
  * a diffusers folder (`model_index.json` plus component subfolders); `fp16` weight variants are
    used when they are the only weights present;
  * a single `.safetensors` checkpoint in LDM (SD1.5) or SGM (SDXL) layout. Configs and tokenizers
    ship in `backend/model_configs/`, so nothing is fetched; `config_dir=` overrides them (tests use
    it for tiny models);
  * `"pocket"`: the tiny model the project trains and ships (see `backend/pocket/`).

Families: `sd15` (epsilon prediction, 1000 discrete steps, CLIP-L text encoder) and `sdxl` (two text
encoders, pooled embeddings, add_time_ids). Anything else — SD2 (v-prediction / OpenCLIP-H), the
SDXL refiner, SD3, FLUX, other flow-matching models — is rejected with a message that says what is
supported. Nothing is ever downloaded: every loader runs with `local_files_only=True`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .sources import POCKET_MODEL_DIR

logger = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl")
SUPPORTED = (
    "supported: Stable Diffusion 1.x ('sd15', epsilon prediction) and SDXL base 1.0 ('sdxl'), "
    "as a diffusers folder or a single .safetensors file, or 'pocket'"
)
POCKET_DIR = POCKET_MODEL_DIR  # what the name "pocket" loads (see `sources`)


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message names the path and the problem."""


# ----------------------------------------------------------------------------------------------
# Text conditioning
# ----------------------------------------------------------------------------------------------


@dataclass
class TextConditioning:
    """What the UNet is conditioned on, batched along dim 0.

    hidden (`torch.Tensor` [B, L, D]): `encoder_hidden_states`.
    pooled (`torch.Tensor` [B, P], *optional*): SDXL's pooled text embedding (`text_embeds`).
    time_ids (`torch.Tensor` [B, 6], *optional*): SDXL's add_time_ids (size, crop, target size).
    """

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def _map(self, fn) -> "TextConditioning":
        return TextConditioning(
            fn(self.hidden),
            None if self.pooled is None else fn(self.pooled),
            None if self.time_ids is None else fn(self.time_ids),
        )

    def repeat_interleave(self, k: int) -> "TextConditioning":
        """Each row k times in a row: conditioning for k candidates per prompt."""
        return self._map(lambda t: t.repeat_interleave(k, dim=0))

    def index(self, idx) -> "TextConditioning":
        return self._map(lambda t: t[idx])

    def to(self, device=None, dtype=None) -> "TextConditioning":
        return self._map(lambda t: t.to(device=device, dtype=dtype if t.is_floating_point() else None))

    @staticmethod
    def cat(parts: list["TextConditioning"]) -> "TextConditioning":
        first = parts[0]
        return TextConditioning(
            torch.cat([p.hidden for p in parts]),
            None if first.pooled is None else torch.cat([p.pooled for p in parts]),
            None if first.time_ids is None else torch.cat([p.time_ids for p in parts]),
        )

    def unet_kwargs(self) -> dict:
        """Keyword arguments for `UNet2DConditionModel.forward`."""
        kwargs: dict = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


# ----------------------------------------------------------------------------------------------
# The model bundle
# ----------------------------------------------------------------------------------------------


@dataclass
class DiffusionModel:
    """A loaded SD1.5 or SDXL model: the components, the DDIM scheduler, and prompt encoding."""

    family: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    scheduler: object
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    # SDXL was trained with zeroed embeddings for dropped captions: use zeros as the CFG negative.
    zero_negative: bool = False

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def components(self) -> dict:
        names = ["text_encoder", "text_encoder_2"][: len(self.text_encoders)]
        toks = ["tokenizer", "tokenizer_2"][: len(self.tokenizers)]
        out = {"unet": self.unet, "vae": self.vae, "scheduler": self.scheduler}
        out.update(zip(names, self.text_encoders))
        out.update(zip(toks, self.tokenizers))
        return out

    @torch.no_grad()
    def encode_prompts(
        self, prompts: list[str], height: int | None = None, width: int | None = None
    ) -> TextConditioning:
        """Encode prompts as the diffusers pipelines do (no clip skip, padded to max length).

        SD1.5: the text encoder's last hidden state. SDXL: the penultimate hidden states of both
        encoders concatenated, the second encoder's projected pooled output, and add_time_ids
        `(height, width, 0, 0, height, width)`.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                return_tensors="pt",
            ).input_ids.to(self.device)
            if self.family == "sd15":
                hidden_states.append(encoder(ids)[0])
            else:
                out = encoder(ids, output_hidden_states=True)
                hidden_states.append(out.hidden_states[-2])
                pooled = out[0]  # the last encoder's projected pooled output
        hidden = torch.cat(hidden_states, dim=-1).to(self.dtype)
        if self.family == "sd15":
            return TextConditioning(hidden)
        h = height or self.default_resolution
        w = width or self.default_resolution
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=self.dtype, device=self.device).repeat(len(prompts), 1)
        return TextConditioning(hidden, pooled.to(self.dtype), time_ids)

    @torch.no_grad()
    def encode_negative(self, batch: int, height: int | None = None, width: int | None = None) -> TextConditioning:
        """The unconditional half of classifier-free guidance: "" (SD1.5) or zeros (SDXL)."""
        cond = self.encode_prompts([""], height, width)
        if self.zero_negative:
            cond = TextConditioning(torch.zeros_like(cond.hidden), torch.zeros_like(cond.pooled), cond.time_ids)
        return cond.repeat_interleave(batch)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (scaled, as the UNet sees them) → images in [0, 1], [B, 3, H, W], float32."""
        vae_dtype = next(self.vae.parameters()).dtype
        image = self.vae.decode(latents.to(vae_dtype) / self.latent_scale).sample
        return (image.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1], [B, 3, H, W] → scaled latents (a sample of the VAE posterior)."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode((images * 2 - 1).to(self.device, vae_dtype)).latent_dist
        return dist.sample(generator) * self.latent_scale


# ----------------------------------------------------------------------------------------------
# Device and dtype
# ----------------------------------------------------------------------------------------------


def pick_device(device: str | torch.device | None = None) -> torch.device:
    """`cuda` when available, else `cpu`; an explicit device is checked, never silently replaced."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device 'cuda' was requested but CUDA is not available on this machine")
    return device


def pick_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on a CUDA GPU that supports it, fp16 on other GPUs, fp32 on CPU; or the given dtype."""
    if dtype is not None:
        if isinstance(dtype, str):
            names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16,
                     "float16": torch.float16, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
            if dtype not in names:
                raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(names)}")
            dtype = names[dtype]
        return dtype
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


# ----------------------------------------------------------------------------------------------
# Family detection
# ----------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc})") from exc


def detect_folder_family(path: Path) -> str:
    """Family of a diffusers folder, from `model_index.json` and the component configs."""
    index_file = path / "model_index.json"
    if not index_file.exists():
        raise ModelLoadError(
            f"{path}: not a diffusers model folder (no model_index.json). {SUPPORTED}."
        )
    index = _read_json(index_file)
    cls = index.get("_class_name", "")
    if "XL" in cls and "Img2Img" in cls and "text_encoder" in index and index["text_encoder"][0] is None:
        raise ModelLoadError(f"{path}: this is the SDXL refiner ({cls}), which is not supported. {SUPPORTED}.")
    if cls in ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"):
        family = "sdxl"
    elif cls in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        family = "sd15"
    elif "transformer" in index or "StableDiffusion3" in cls or "Flux" in cls:
        raise ModelLoadError(
            f"{path}: '{cls}' is a flow-matching transformer model (SD3/FLUX family); SPO here works on "
            f"DDIM-style UNet models. {SUPPORTED}."
        )
    else:
        raise ModelLoadError(f"{path}: unsupported pipeline class '{cls}'. {SUPPORTED}.")

    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.exists():
        pred = _read_json(sched_file).get("prediction_type", "epsilon")
        if pred != "epsilon":
            raise ModelLoadError(
                f"{path}: prediction_type '{pred}' (e.g. SD2.x 768-v) is not supported; SPO's step "
                f"log-probabilities here assume epsilon prediction. {SUPPORTED}."
            )
    unet_file = path / "unet" / "config.json"
    if family == "sd15" and unet_file.exists():
        cross = _read_json(unet_file).get("cross_attention_dim")
        if cross == 1024:
            raise ModelLoadError(f"{path}: cross_attention_dim 1024 means Stable Diffusion 2.x. {SUPPORTED}.")
    return family


def _safetensors_keys(path: Path) -> list[str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc


def detect_file_family(path: Path, keys: list[str] | None = None) -> str:
    """Family of a single-file checkpoint, from its tensor names (the header only is read)."""
    if path.suffix.lower() != ".safetensors":
        raise ModelLoadError(
            f"{path}: only .safetensors single-file checkpoints are supported (pickled .ckpt/.pt files can "
            f"run arbitrary code when loaded); convert it to .safetensors first."
        )
    keys = _safetensors_keys(path) if keys is None else keys
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("model.diffusion_model.joint_blocks.") or has("joint_blocks."):
        raise ModelLoadError(f"{path}: this is a Stable Diffusion 3 checkpoint (flow matching). {SUPPORTED}.")
    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        raise ModelLoadError(f"{path}: this is a FLUX checkpoint (flow matching). {SUPPORTED}.")
    if not has("model.diffusion_model."):
        if any(k.startswith(("lora_unet_", "lora_te", "unet.", "text_encoder.")) and "lora" in k for k in keys):
            raise ModelLoadError(
                f"{path}: this is a LoRA, not a base model; load it as a LoRA on top of a base model."
            )
        hint = f" (first keys: {', '.join(keys[:3])})" if keys else " (it holds no tensors)"
        raise ModelLoadError(
            f"{path}: not a diffusion model checkpoint: it has no UNet weights 'model.diffusion_model.*'{hint}."
        )
    if has("conditioner.embedders.1.model.") or has("model.diffusion_model.label_emb."):
        if not has("conditioner.embedders.1."):
            raise ModelLoadError(f"{path}: this looks like the SDXL refiner, which is not supported. {SUPPORTED}.")
        return "sdxl"
    if has("cond_stage_model.model."):
        raise ModelLoadError(
            f"{path}: this is a Stable Diffusion 2.x checkpoint (OpenCLIP-H text encoder). {SUPPORTED}."
        )
    return "sd15"


def detect_family(source: str | Path) -> str:
    """`sd15` or `sdxl` for a folder, a single file or "pocket"; ModelLoadError otherwise."""
    if str(source) == "pocket":
        return "sd15"
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or folder. {SUPPORTED}.")
    return detect_folder_family(path) if path.is_dir() else detect_file_family(path)


def unet_linear_shapes(source: str | Path) -> dict[str, tuple[int, ...]]:
    """Name → (in, out) width of every Linear / 1x1-or-larger Conv layer of a base model's UNet, built
    from its config on the meta device (no weights are read): what LoRA targets and ranks are checked
    against before a job is queued."""
    from diffusers import UNet2DConditionModel

    if str(source) == "pocket":
        source = POCKET_DIR
    path = Path(source).expanduser()
    family = detect_family(path)
    if path.is_dir():
        config_file = path / "unet" / "config.json"
    else:
        from .model_configs import config_dir

        config_file = config_dir(family) / "unet" / "config.json"
    config = {k: v for k, v in _read_json(config_file).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    shapes = {}
    for name, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear):
            shapes[name] = (m.in_features, m.out_features)
        elif isinstance(m, torch.nn.Conv2d):
            shapes[name] = (m.in_channels, m.out_channels)
    return shapes


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _variant(folder: Path, sub: str) -> str | None:
    """'fp16' when a component folder holds only fp16-variant weights."""
    files = [p.name for p in (folder / sub).glob("*.safetensors")] + [p.name for p in (folder / sub).glob("*.bin")]
    if files and all(".fp16." in f for f in files):
        return "fp16"
    return None


def _load_folder(path: Path, family: str, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def load(cls, sub, **kw):
        try:
            return cls.from_pretrained(path, subfolder=sub, local_files_only=True, **kw)
        except (OSError, ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"{path / sub}: cannot load {cls.__name__} ({exc})") from exc

    comps = {
        "unet": load(UNet2DConditionModel, "unet", torch_dtype=dtype, variant=_variant(path, "unet")),
        "vae": load(AutoencoderKL, "vae", torch_dtype=dtype, variant=_variant(path, "vae")),
        "text_encoders": [
            load(CLIPTextModel, "text_encoder", torch_dtype=dtype, variant=_variant(path, "text_encoder"))
        ],
        "tokenizers": [load(CLIPTokenizer, "tokenizer")],
    }
    if family == "sdxl":
        comps["text_encoders"].append(
            load(
                CLIPTextModelWithProjection, "text_encoder_2", torch_dtype=dtype,
                variant=_variant(path, "text_encoder_2"),
            )
        )
        comps["tokenizers"].append(load(CLIPTokenizer, "tokenizer_2"))
    return comps


def _load_single_file(path: Path, family: str, dtype: torch.dtype, config_dir: Path | None) -> dict:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if config_dir is None:
        from .model_configs import config_dir as shipped_config_dir

        config_dir = shipped_config_dir(family)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    try:
        pipe = cls.from_single_file(
            str(path), config=str(config_dir), local_files_only=True, torch_dtype=dtype, **kwargs
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(
            f"{path}: cannot load as a {family} checkpoint with the configs in {config_dir} ({exc})"
        ) from exc
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    tokenizers = [pipe.tokenizer] + ([pipe.tokenizer_2] if family == "sdxl" else [])
    return {"unet": pipe.unet, "vae": pipe.vae, "text_encoders": encoders, "tokenizers": tokenizers}


def ddim_scheduler(config_source: dict | None = None):
    """A DDIMScheduler with the SD training schedule (scaled_linear 0.00085→0.012, 1000 steps)."""
    from diffusers import DDIMScheduler

    base = dict(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )
    if config_source:
        for key in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "steps_offset", "set_alpha_to_one", "timestep_spacing"):
            if key in config_source:
                base[key] = config_source[key]
    return DDIMScheduler(**base)


def load_model(
    source: str | Path = "pocket",
    family: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config_dir: str | Path | None = None,
) -> DiffusionModel:
    """Load a base model, offline.

    Args:
        source (`str | Path`, *optional*, defaults to "pocket"): a diffusers folder, a single
            `.safetensors` checkpoint (LDM/SGM layout), or "pocket".
        family (`str`, *optional*): "sd15" or "sdxl". Detected from the files when omitted; when
            given, it must match what the files say.
        device (`str | torch.device`, *optional*): defaults to cuda when available, else cpu.
        dtype (`str | torch.dtype`, *optional*): defaults to bf16 (or fp16) on GPU, fp32 on CPU.
        config_dir (`str | Path`, *optional*): diffusers-layout configs for single-file loading;
            defaults to the configs shipped for the detected family.
    """
    if family is not None and family not in FAMILIES:
        raise ModelLoadError(f"unknown family {family!r}; {SUPPORTED}.")
    if str(source) == "pocket":
        if not (POCKET_DIR / "model_index.json").exists():
            raise ModelLoadError(
                f"{POCKET_DIR}: the pocket model is not built in this checkout; run `spo pocket build`."
            )
        source = POCKET_DIR
    path = Path(source).expanduser()
    detected = detect_family(path)
    if family is not None and family != detected:
        raise ModelLoadError(f"{path}: the files are a '{detected}' model, but family '{family}' was requested.")
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)

    logger.info("loading %s model from %s (%s, %s)", detected, path, dev, dt)
    if path.is_dir():
        comps = _load_folder(path, detected, dt)
        sched_file = path / "scheduler" / "scheduler_config.json"
        sched_cfg = _read_json(sched_file) if sched_file.exists() else None
    else:
        comps = _load_single_file(path, detected, dt, Path(config_dir) if config_dir else None)
        sched_cfg = None
    for module in [comps["unet"], comps["vae"], *comps["text_encoders"]]:
        module.to(dev).eval().requires_grad_(False)
    return DiffusionModel(
        family=detected,
        unet=comps["unet"],
        vae=comps["vae"],
        text_encoders=comps["text_encoders"],
        tokenizers=comps["tokenizers"],
        scheduler=ddim_scheduler(sched_cfg),
        source=str(path),
        device=dev,
        dtype=dt,
        zero_negative=detected == "sdxl",
    )
