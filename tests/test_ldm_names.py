"""The diffusers ↔ LDM/SGM name maps, checked against diffusers' own LDM→diffusers converters.

Real SD1.5 / SDXL shapes are built on the meta device (no weights), so the full-size name sets are
checked in well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from spo_studio.backend.ldm_names import (
    canonical_clip_name,
    is_vae_attention_weight,
    openclip_name_map,
    openclip_qkv,
    unet_name_map,
    vae_name_map,
)

CONFIG_ROOT = Path(__file__).resolve().parents[1] / "backend" / "model_configs"

# The published diffusers configs of SD1.5 and SDXL base 1.0 (used when the shipped copies are absent).
SD15_UNET = {
    "act_fn": "silu", "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False, "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "act_fn": "silu", "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
    "center_input_sample": False, "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32, "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816, "sample_size": 128, "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "use_linear_projection": True,
}
SD_VAE = {
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
    "sample_size": 512,
}


def real_config(family: str, component: str) -> dict:
    shipped = CONFIG_ROOT / family / component / "config.json"
    if shipped.exists():
        return json.loads(shipped.read_text())
    return {("sd15", "unet"): SD15_UNET, ("sdxl", "unet"): SDXL_UNET}.get((family, component), SD_VAE)


def meta_state_dict(cls, config: dict) -> dict[str, torch.Tensor]:
    with torch.device("meta"):
        return cls.from_config(config).state_dict()


def unet_configs() -> dict:
    from tiny_models import tiny_sd15, tiny_sdxl

    return {
        "tiny_sd15": dict(tiny_sd15().unet.config), "tiny_sdxl": dict(tiny_sdxl().unet.config),
        "sd15": real_config("sd15", "unet"), "sdxl": real_config("sdxl", "unet"),
    }


@pytest.fixture(scope="module")
def configs():
    return unet_configs()


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl", "sd15", "sdxl"])
def test_unet_map_round_trip_and_diffusers_converter(configs, name):
    config = configs[name]
    state = meta_state_dict(UNet2DConditionModel, config)
    names = unet_name_map(config)
    ldm = {names.to_ldm(k): v for k, v in state.items()}
    assert len(ldm) == len(state)  # one-to-one
    assert all(names.to_diffusers(names.to_ldm(k)) == k for k in state)  # diffusers → LDM → diffusers = identity
    # diffusers' own LDM → diffusers converter maps our LDM names back to the very same tensors
    back = convert_ldm_unet_checkpoint({"model.diffusion_model." + k: v for k, v in ldm.items()}, config)
    assert set(back) == set(state)
    assert all(back[k] is state[k] for k in state)


def test_unet_landmark_names(configs):
    sd15 = {unet_name_map(configs["sd15"]).to_ldm(k) for k in meta_state_dict(UNet2DConditionModel, configs["sd15"])}
    for key in ["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight", "input_blocks.3.0.op.weight",
                "middle_block.1.proj_in.weight", "middle_block.2.emb_layers.1.weight", "time_embed.2.bias",
                "output_blocks.11.0.skip_connection.weight", "output_blocks.2.1.conv.weight",
                "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight", "out.2.weight"]:
        assert key in sd15, key
    assert not any(k.startswith("output_blocks.2.2.") for k in sd15)
    sdxl = {unet_name_map(configs["sdxl"]).to_ldm(k) for k in meta_state_dict(UNet2DConditionModel, configs["sdxl"])}
    for key in ["label_emb.0.0.weight", "label_emb.0.2.bias",
                "input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight",
                "input_blocks.7.1.transformer_blocks.9.ff.net.2.weight",
                "middle_block.1.transformer_blocks.9.norm3.bias",
                "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight",
                "output_blocks.8.0.in_layers.2.weight"]:
        assert key in sdxl, key
    assert not any(k.startswith("input_blocks.1.1.") for k in sdxl)  # no attention in SDXL's first level


def test_unknown_names_raise(configs):
    names = unet_name_map(configs["sd15"])
    with pytest.raises(KeyError):
        names.to_ldm("down_blocks.9.attentions.0.proj_in.weight")
    with pytest.raises(KeyError):
        names.to_diffusers("input_blocks.99.1.proj_in.weight")
    with pytest.raises(ValueError, match="class_embed_type"):
        unet_name_map({**configs["sd15"], "class_embed_type": "timestep"})


@pytest.mark.parametrize("source", ["tiny", "real"])
def test_vae_map_matches_diffusers_converter(source):
    from tiny_models import tiny_sd15

    config = dict(tiny_sd15().vae.config) if source == "tiny" else real_config("sd15", "vae")
    state = meta_state_dict(AutoencoderKL, config)
    names = vae_name_map(config)
    ldm = {names.to_ldm(k): v for k, v in state.items()}
    assert len(ldm) == len(state)
    if source == "real":  # channel changes: 128→256 in encoder level 1, 256→128 in the last decoder level
        assert {"encoder.down.1.block.0.nin_shortcut.weight", "decoder.up.0.block.0.nin_shortcut.weight"} <= set(ldm)
    attention = sorted(k for k in ldm if is_vae_attention_weight(k))
    assert len(attention) == 8  # q, k, v, proj_out in encoder and decoder
    ldm = {k: (v[:, :, None, None] if is_vae_attention_weight(k) else v) for k, v in ldm.items()}
    back = convert_ldm_vae_checkpoint({"first_stage_model." + k: v for k, v in ldm.items()}, config)
    assert set(back) == set(state)
    assert all(back[k].shape == state[k].shape for k in state)
    assert all(names.to_diffusers(names.to_ldm(k)) == k for k in state)


def test_text_encoder_names():
    assert canonical_clip_name("encoder.layers.0.mlp.fc1.weight") == "text_model.encoder.layers.0.mlp.fc1.weight"
    assert canonical_clip_name("text_projection.weight") == "text_projection.weight"
    oc = openclip_name_map(32)
    assert oc.to_ldm("text_model.encoder.layers.31.mlp.fc2.bias") == "transformer.resblocks.31.mlp.c_proj.bias"
    assert oc.to_ldm("text_model.embeddings.position_embedding.weight") == "positional_embedding"
    assert oc.to_diffusers("ln_final.weight") == "text_model.final_layer_norm.weight"
    assert openclip_qkv("text_model.encoder.layers.3.self_attn.k_proj.bias") == (
        "transformer.resblocks.3.attn.in_proj_bias", 1)
    assert openclip_qkv("text_model.encoder.layers.3.self_attn.out_proj.bias") is None
