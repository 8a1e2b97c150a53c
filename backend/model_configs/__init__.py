"""Diffusers-layout configs and CLIP tokenizers (no weights) of the supported base models.

`config_dir("sd15")` / `config_dir("sdxl")` is the folder to pass as `config=` to diffusers'
`from_single_file`, so a single `.safetensors` checkpoint loads without fetching anything:

    sd15/  Stable Diffusion 1.5 (stable-diffusion-v1-5/stable-diffusion-v1-5): UNet, VAE (scaling
           0.18215), CLIP ViT-L/14 text encoder + tokenizer (pads with <|endoftext|>)
    sdxl/  SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0): UNet, VAE (scaling 0.13025,
           force_upcast), CLIP ViT-L/14 + OpenCLIP bigG text encoders; tokenizer_2 pads with "!" (id 0)

Both carry a DDIMScheduler config with the training schedule (scaled_linear 0.00085→0.012,
1000 steps, "leading" spacing, steps_offset 1) instead of the repos' PNDM / Euler schedulers,
and SD1.5 has no safety checker or feature extractor.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
FAMILIES = ("sd15", "sdxl")


def config_dir(family: str) -> Path:
    """The shipped diffusers config folder of a model family ("sd15" or "sdxl")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; supported: {', '.join(repr(f) for f in FAMILIES)}")
    return ROOT / family
