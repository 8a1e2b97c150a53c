"""Tiny random-init SD1.5-shaped and SDXL-shaped pipelines, built offline for tests.

The shapes follow the real families (block types, cross-attention, SDXL's two text encoders,
pooled embeddings and add_time_ids, linear projections), only narrower and shallower, so every
code path that depends on the family runs in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from spo_studio.backend.word_tokenizer import build_word_tokenizer
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

WORDS = ["a", "red", "green", "blue", "circle", "square", "on", "background", "photo", "of", "cat"]


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
        timestep_spacing="leading",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=8, sample_size=32,
    )


def _text_config(tok, hidden: int, projection: int = 32, **kw) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tok.model_max_length, projection_dim=projection,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw,
    )


def tiny_sd15(seed: int = 0) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    )
    te = CLIPTextModel(_text_config(tok, 24))
    return StableDiffusionPipeline(
        vae=_vae(), text_encoder=te.eval(), tokenizer=tok, unet=unet, scheduler=_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_sdxl(seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    tok = build_word_tokenizer(WORDS)
    tok2 = build_word_tokenizer(WORDS)
    te1 = CLIPTextModel(_text_config(tok, 16))
    te2 = CLIPTextModelWithProjection(_text_config(tok2, 24, projection=20))
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(16, 32, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2), cross_attention_dim=16 + 24, attention_head_dim=(2, 4, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=6 * 4 + 20, norm_num_groups=8,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=te1.eval(), text_encoder_2=te2.eval(), tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=True,
    )


def save_tiny(family: str, out_dir: Path, seed: int = 0) -> Path:
    pipe = tiny_sd15(seed) if family == "sd15" else tiny_sdxl(seed)
    pipe.save_pretrained(out_dir)
    return Path(out_dir)


def save_official_spm(root: Path, tok, image_size: int = 16) -> dict:
    """A tiny step-aware preference model in the official SPO release's layout: a CLIP folder
    (`PickScore_v1/`: config + tokenizer) and beside it the checkpoint as the official code saves it
    (`model.` + the time-conditioned CLIP's keys), as `.bin` and `.safetensors`."""
    from safetensors.torch import save_file
    from spo_studio.backend.preference.spm import pocket_clip_config
    from transformers import CLIPModel

    config = pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                tok.model_max_length, image_size=image_size)
    torch.manual_seed(0)
    clip = CLIPModel(config)
    clip.save_pretrained(root / "PickScore_v1")
    tok.save_pretrained(root / "PickScore_v1")
    d, layers = config.vision_config.hidden_size, config.vision_config.num_hidden_layers
    g = torch.Generator().manual_seed(1)

    def rand(*shape, std=0.05):
        return torch.randn(*shape, generator=g) * std

    state = {f"model.{k}": v.clone() for k, v in clip.state_dict().items()}
    state["model.text_model.embeddings.position_ids"] = torch.arange(tok.model_max_length)[None]  # older transformers
    state.update({"model.t_embedder.mlp.0.weight": rand(d, 256, std=0.02), "model.t_embedder.mlp.0.bias": rand(d),
                  "model.t_embedder.mlp.2.weight": rand(d, d, std=0.1), "model.t_embedder.mlp.2.bias": rand(d)})
    for i in range(layers):
        bias = rand(6 * d)
        bias[2 * d: 3 * d] += 1
        bias[5 * d:] += 1  # gates near 1, as after training from the identity init
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.weight"] = rand(6 * d, d, std=0.2)
        state[f"model.vision_model.encoder.layers.{i}.adaLN_modulation.1.bias"] = bias
    state["model.vision_model.adaLN_modulation.1.weight"] = rand(2 * d, d, std=0.2)
    state["model.vision_model.adaLN_modulation.1.bias"] = rand(2 * d)
    torch.save(state, root / "sd-v1-5_step-aware_preference_model.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, str(root / "spm.safetensors"))
    return {"root": root, "clip": root / "PickScore_v1", "state": state, "config": config, "tok": tok}
