"""The scoring API used by the SPO trainer, the ComfyUI nodes and the page.

    scorer = Scorer.from_path("pocket", base_model)           # or an SPM / PickScore folder
    s = scorer.score_latents(x0_hat, prompts, t)               # [B] scores of one-step predictions
    s = scorer.score_images(images, prompts, t)                # images [B, 3, H, W] in [0, 1]

Batched; text features are cached per prompt (a prompt is encoded once per scorer); on a GPU the
SPM runs in half precision (bf16 where supported). `t` is an int for the whole batch, a tensor [B],
or None for the base scorer's behaviour (no time conditioning). `decode_size` scores a
lower-resolution decode (the SPM sees 224 px, or the pocket SPM 32 px, anyway). `latent_decode`
is the fast path: the x̂0 latent is first shrunk (area average) to the SPM's input size ÷ the VAE's
scale factor and only that is decoded, ≈ (image size / SPM size)² less VAE work; the scores are
an approximation of the full-decode ones (`spo eval-spm --latent-decode` measures the accuracy).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F

from .spm import StepAwarePreferenceModel

logger = logging.getLogger(__name__)


def shrink_latents(latents: torch.Tensor, image_size: int, vae_scale_factor: int) -> torch.Tensor:
    """Latents [B, C, h, w] → area-averaged latents whose decode is about `image_size` px on the longer
    side (never enlarged): the cheap preview decode of `latent_decode`."""
    h, w = latents.shape[-2:]
    scale = image_size / (vae_scale_factor * max(h, w))
    if scale >= 1:
        return latents
    size = (max(1, round(h * scale)), max(1, round(w * scale)))
    return F.interpolate(latents.float(), size=size, mode="area").to(latents.dtype)


class Scorer:
    def __init__(self, spm: StepAwarePreferenceModel, base_model=None, device=None, half: bool | None = None,
                 decode_size: int = 0, latent_decode: bool = False):
        if device is None:
            device = base_model.device if base_model else "cpu"
        device = torch.device(device)
        if half is None:
            half = device.type == "cuda"
        dtype = torch.float32
        if half:
            dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float16
        self.spm = spm.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.base_model = base_model
        self.device = device
        self.dtype = dtype
        self.decode_size = decode_size
        self.latent_decode = latent_decode
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_path(cls, path: str | Path, base_model=None, clip_folder: str | Path | None = None,
                  **kwargs) -> "Scorer":
        """'pocket' (the shipped pocket SPM), an SPM folder, a CLIP/PickScore folder, or an official SPO
        checkpoint file with the CLIP folder it was initialised from (`clip_folder`, or found beside it).
        A latent SPM folder (lspm.json) gives a `latent_spm.LatentScorer`, which reads noisy latents."""
        from .. import sources
        from .latent_spm import LatentPreferenceModel, LatentScorer, is_latent_spm

        path = sources.spm(path)
        if is_latent_spm(path):
            if clip_folder:
                raise ValueError(f"{path}: a latent SPM takes no CLIP folder")
            device = kwargs.get("device") or (base_model.device if base_model else None)
            return LatentScorer(LatentPreferenceModel.load(path, device=device), base_model, device=device)
        return cls(StepAwarePreferenceModel.load(path, clip_folder=clip_folder or None), base_model, **kwargs)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            ids = self.spm.tokenize(missing).to(self.device)
            for p, f in zip(missing, self.spm.text_features(ids)):
                self._text_cache[p] = f
        return torch.stack([self._text_cache[p] for p in prompts])

    def _t(self, t, batch: int) -> torch.Tensor | None:
        if t is None:
            return None
        if isinstance(t, torch.Tensor) and t.ndim == 1:
            return t.to(self.device)
        return torch.full((batch,), int(t), device=self.device, dtype=torch.long)

    @torch.no_grad()
    def score_images(self, images: torch.Tensor, prompts: list[str], t=None) -> torch.Tensor:
        """Scores [B] (float32) of images [B, 3, H, W] in [0, 1] for their prompts at timestep(s) t."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(prompts)} prompts")
        pixels = self.spm.preprocess(images.to(self.device))
        feats = self.spm.image_features(pixels.to(self.dtype), self._t(t, len(prompts)))
        return self.spm.score_features(feats, self.text_features(prompts)).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.base_model is None:
            raise ValueError("scoring latents needs the base model (for its VAE)")
        if self.latent_decode:
            latents = shrink_latents(latents, self.spm.image_size, self.base_model.vae_scale_factor)
        images = self.base_model.decode(latents)
        if self.decode_size:
            images = F.interpolate(images, size=(self.decode_size, self.decode_size), mode="bicubic",
                                   align_corners=False, antialias=True).clamp(0, 1)
        return images

    @torch.no_grad()
    def score_latents(self, latents: torch.Tensor, prompts: list[str], t=None) -> torch.Tensor:
        """Scores [B] of (one-step x̂0) latents, decoded by the base model's VAE first."""
        return self.score_images(self.decode(latents), prompts, t)

    @torch.no_grad()
    def joint_embedding(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Unit vectors [B, D] of image and prompt in CLIP's shared space: normalize(ê_image + ê_text),
        with ê the unit CLIP projections (no time conditioning). Diffusion-RPO weighs pairs by these."""
        pixels = self.spm.preprocess(images.to(self.device))
        img = F.normalize(self.spm.image_features(pixels.to(self.dtype), None).float(), dim=-1)
        txt = F.normalize(self.text_features(prompts).float(), dim=-1)
        return F.normalize(img + txt, dim=-1)
