"""The latent step-aware preference model (latent SPM): judge the noisy latent itself, with no VAE decode.

The paper's SPM (SPO §4.1) scores a step by decoding the one-step x̂0 with the VAE and running CLIP on
the pixels. LPO (arXiv 2502.01051) builds the reward model from the diffusion model itself: the UNet's
encoder already reads a noisy latent x_t at timestep t under the prompt's cross-attention. Here

    e    = TimeEmbed(t) (+ SDXL's added text/time embedding)
    h    = Mid(Down(ConvIn(x_t), e, c), e, c)          the base UNet's conv_in, down and mid blocks,
                                                       c the text conditioning of the base text encoders
    s(x_t, t, y) = w₂ᵀ SiLU(W₁ · mean_{spatial}(h) + b₁) + b₂      a small pooled head

initialised from the base model's own UNet encoder (trained) and text encoders (frozen). Trained by
`spo train-spm kind=latent` with the SPM's data, noising (one noise for both images of a pair) and
loss with ties (PickScore's; `loss.preference_loss`): scores are in logit units, so SPO's pair
threshold reads as for the pixel SPM. Scoring a candidate x_{t−1} needs no UNet pass of the diffusion
model and no decode: SPO's pool is judged straight from the candidates.

Folder format (`lspm.json` with format `spo-studio-lspm/1`): `unet_config.json`, `encoder.safetensors`
(conv_in, time and added embeddings, down and mid blocks), `head.safetensors`, and the text encoders
and tokenizers (`text_encoder/`, `tokenizer/`, and `_2` for SDXL).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..lora_types import FAMILY_NAMES

logger = logging.getLogger(__name__)

LSPM_FORMAT = "spo-studio-lspm/1"
ENCODER_PARTS = ("conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "down_blocks",
                 "mid_block")
_DROP = ("up_blocks", "conv_norm_out", "conv_out", "conv_act")


def is_latent_spm(path) -> bool:
    return (Path(path) / "lspm.json").is_file()


def _encoder_only(unet) -> nn.Module:
    for name in _DROP:
        if hasattr(unet, name):
            setattr(unet, name, None)
    return unet


class LatentPreferenceModel(nn.Module):
    """Scores [B] of noisy latents x_t [B, C, h, w] at timesteps t [B] under text conditionings."""

    def __init__(self, unet, text, family: str, resolution: int, head_dim: int = 256):
        super().__init__()
        self.unet = _encoder_only(unet).requires_grad_(True)  # trained (a loaded base UNet comes frozen)
        self.text = text  # a DiffusionModel-like holder of the (frozen) text encoders and tokenizers
        self.family = family
        self.resolution = resolution
        self.latent_channels = unet.config.in_channels
        width = unet.config.block_out_channels[-1]
        self.head = nn.Sequential(nn.Linear(width, head_dim), nn.SiLU(), nn.Linear(head_dim, 1))
        for encoder in text.text_encoders:
            encoder.requires_grad_(False)

    @classmethod
    def from_base(cls, model, head_dim: int = 256, seed: int = 0) -> "LatentPreferenceModel":
        """A new latent SPM from a loaded `DiffusionModel`: a copy of its UNet encoder, its text encoders."""
        import copy

        torch.manual_seed(seed)
        text = _text_holder(model.family, model.text_encoders, model.tokenizers, model.device, model.dtype)
        return cls(copy.deepcopy(model.unet).float(), text, model.family, model.default_resolution, head_dim)

    # -- scoring ----------------------------------------------------------------------------------
    def conditioning(self, prompts: list[str]):
        return self.text.encode_prompts(prompts, self.resolution, self.resolution)

    def forward(self, latents: torch.Tensor, cond, t: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        if latents.ndim != 4 or latents.shape[1] != self.latent_channels:
            raise ValueError(f"this latent SPM reads {self.family} latents with {self.latent_channels} channels; got "
                             f"shape {tuple(latents.shape)} (a latent of another model family?)")
        dtype = next(unet.parameters()).dtype
        x = latents.to(dtype)
        t = t.to(x.device).expand(x.shape[0]) if t.ndim == 0 else t.to(x.device)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype))
        kwargs = cond.unet_kwargs()
        hidden = kwargs["encoder_hidden_states"].to(dtype)
        if self.family == "sdxl":
            added = {k: v.to(dtype) for k, v in kwargs["added_cond_kwargs"].items()}
            emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=hidden, added_cond_kwargs=added)
        h = unet.conv_in(x)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=hidden)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        h = unet.mid_block(h, emb, encoder_hidden_states=hidden) if unet.mid_block is not None else h
        return self.head(F.silu(h).mean(dim=(2, 3))).squeeze(-1).float()

    # -- persistence ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """Write the folder format above, atomically (a temporary folder renamed into place)."""
        from safetensors.torch import save_file

        from ..checkpoint_io import atomic_folder

        with atomic_folder(out_dir) as tmp:
            config = {k: v for k, v in dict(self.unet.config).items() if not k.startswith("_")}
            (tmp / "unet_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
            encoder = {k: v.detach().contiguous().cpu() for k, v in self.unet.state_dict().items()}
            save_file(encoder, tmp / "encoder.safetensors", metadata={"format": LSPM_FORMAT})
            save_file({k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()},
                      tmp / "head.safetensors", metadata={"format": LSPM_FORMAT})
            for i, (encoder_model, tokenizer) in enumerate(zip(self.text.text_encoders, self.text.tokenizers)):
                suffix = "" if i == 0 else f"_{i + 1}"
                encoder_model.save_pretrained(tmp / f"text_encoder{suffix}")
                tokenizer.save_pretrained(tmp / f"tokenizer{suffix}")
            meta = {"format": LSPM_FORMAT, "family": self.family, "resolution": self.resolution,
                    "head_dim": self.head[0].out_features, **(extra or {})}
            (tmp / "lspm.json").write_text(json.dumps(meta, indent=2))
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | Path, device=None, dtype=torch.float32) -> "LatentPreferenceModel":
        from diffusers import UNet2DConditionModel
        from safetensors.torch import load_file
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        path = Path(path).expanduser()
        meta = json.loads((path / "lspm.json").read_text())
        if meta.get("format") != LSPM_FORMAT:
            raise ValueError(f"{path / 'lspm.json'}: unknown format {meta.get('format')!r}; expected {LSPM_FORMAT!r}")
        family = meta["family"]
        with torch.device("meta"):
            unet = _encoder_only(UNet2DConditionModel.from_config(json.loads((path / "unet_config.json").read_text())))
        try:
            unet.load_state_dict(load_file(path / "encoder.safetensors"), strict=True, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"{path / 'encoder.safetensors'}: does not fit unet_config.json ({exc})") from exc
        encoders, tokenizers = [], []
        for i, encoder_cls in enumerate([CLIPTextModel] + ([CLIPTextModelWithProjection] if family == "sdxl" else [])):
            suffix = "" if i == 0 else f"_{i + 1}"
            encoders.append(encoder_cls.from_pretrained(path / f"text_encoder{suffix}", dtype=dtype).eval())
            tokenizers.append(CLIPTokenizer.from_pretrained(path / f"tokenizer{suffix}"))
        device = torch.device(device or "cpu")
        text = _text_holder(family, encoders, tokenizers, device, dtype)
        model = cls(unet, text, family, int(meta["resolution"]), int(meta.get("head_dim", 256)))
        model.head.load_state_dict(load_file(path / "head.safetensors"))
        model.to(device=device, dtype=dtype)
        for encoder in encoders:
            encoder.to(device)
        return model.eval()


def _check_family(ours: str, theirs: str, mismatch: str) -> None:
    """A clear error when latents of family `theirs` meet a latent SPM of family `ours`; `mismatch` says whose."""
    if ours != theirs:
        raise ValueError(f"this latent SPM reads {FAMILY_NAMES.get(ours, ours)} latents, but {mismatch}: a latent "
                         f"SPM judges only the latents of the model family it was trained on")


def _text_holder(family, encoders, tokenizers, device, dtype):
    """The prompt encoding of `DiffusionModel` (SD1.5: last hidden state; SDXL: both encoders, pooled, time
    ids) over these encoders, with no UNet or VAE."""
    from ..models import DiffusionModel

    return DiffusionModel(family=family, unet=None, vae=None, text_encoders=list(encoders),
                          tokenizers=list(tokenizers), scheduler=None, source="latent SPM",
                          device=torch.device(device), dtype=dtype)


class LatentScorer:
    """The latent SPM in the scorer role: `score_latents(x_t, prompts, t)` reads noisy latents directly.

    `reads_noisy_latents` tells SPO's rollout to score the candidates x_{t−1} at t−1 themselves (no UNet
    pass on all k, no decode) and the evaluation to hand over x_t instead of a decoded x̂0.
    """

    reads_noisy_latents = True

    def __init__(self, lspm: LatentPreferenceModel, base_model=None, device=None, **_ignored):
        if base_model is not None:
            _check_family(lspm.family, base_model.family, f"the model is {FAMILY_NAMES.get(base_model.family)}")
        if device is None:
            device = base_model.device if base_model else "cpu"
        device = torch.device(device)
        self.spm = lspm.to(device).eval().requires_grad_(False)
        self.base_model = base_model
        self.device = device
        self._cond_cache: dict[str, object] = {}

    def _conditioning(self, prompts: list[str]):
        from ..models import TextConditioning

        missing = [p for p in dict.fromkeys(prompts) if p not in self._cond_cache]
        if missing:
            cond = self.spm.conditioning(missing)
            for i, p in enumerate(missing):
                self._cond_cache[p] = cond.index([i])
        return TextConditioning.cat([self._cond_cache[p] for p in prompts])

    @torch.no_grad()
    def score_latents(self, latents: torch.Tensor, prompts: list[str], t=None,
                      family: str | None = None) -> torch.Tensor:
        """Scores [B] of noisy latents x_t (scaled, as the UNet sees them) at timestep(s) t (None: t = 0);
        `family`, where the caller knows which model made the latents, is checked against the SPM's."""
        if family is not None:
            _check_family(self.spm.family, family, f"the latents are {FAMILY_NAMES.get(family, family)}'s")
        if len(prompts) != latents.shape[0]:
            raise ValueError(f"{latents.shape[0]} latents but {len(prompts)} prompts")
        if t is None:
            t = 0
        t = t.to(self.device) if isinstance(t, torch.Tensor) else torch.full((latents.shape[0],), int(t),
                                                                               device=self.device)
        return self.spm(latents.to(self.device), self._conditioning(prompts), t.long())

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str], t=None) -> torch.Tensor:
        """Clean images [B, 3, H, W] in [0, 1]: VAE-encoded by the base model (a posterior sample), then scored."""
        if self.base_model is None:
            raise ValueError("scoring images with a latent SPM needs the base model (for its VAE)")
        return self.score_latents(self.base_model.encode_images(images.to(self.base_model.device)), prompts,
                                  0 if t is None else t)
