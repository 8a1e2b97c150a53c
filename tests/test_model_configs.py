"""The shipped SD1.5 / SDXL configs (backend/model_configs/): real tokenizers, real shapes, the DDIM
schedule. Models are built on the meta device, so nothing is allocated and it runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from spo_studio.backend.model_configs import FAMILIES, config_dir

PROMPT = "a photo of an astronaut riding a horse"
PROMPT_IDS = [49406, 320, 1125, 539, 550, 18376, 6765, 320, 4558, 49407]
# (family, component) -> parameters in millions, as published for SD1.5 and SDXL base 1.0
PARAMS_M = {
    ("sd15", "unet"): 859.52, ("sd15", "vae"): 83.65, ("sd15", "text_encoder"): 123.06,
    ("sdxl", "unet"): 2567.46, ("sdxl", "vae"): 83.65, ("sdxl", "text_encoder"): 123.06,
    ("sdxl", "text_encoder_2"): 694.66,
}
TOKENIZERS = [("sd15", "tokenizer", 49407), ("sdxl", "tokenizer", 49407), ("sdxl", "tokenizer_2", 0)]


def test_config_dir_known_and_unknown_families():
    assert FAMILIES == ("sd15", "sdxl")
    for family in FAMILIES:
        assert (config_dir(family) / "model_index.json").is_file()
    with pytest.raises(ValueError, match=r"unknown model family 'sd21'.*'sd15', 'sdxl'"):
        config_dir("sd21")


@pytest.mark.parametrize("family,sub,pad_id", TOKENIZERS)
def test_tokenizers_are_the_real_clip_bpe(family, sub, pad_id):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(config_dir(family) / sub, local_files_only=True)
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, pad_id)
    assert tok(PROMPT).input_ids == PROMPT_IDS
    padded = tok(PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == PROMPT_IDS + [pad_id] * (77 - len(PROMPT_IDS))
    long = tok("word " * 100, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[0] == 49406 and long[-1] == 49407


def _count(component: str, folder):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if component == "unet":
            model = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder))
        elif component == "vae":
            model = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
        else:
            cls = CLIPTextModelWithProjection if component == "text_encoder_2" else CLIPTextModel
            model = cls(CLIPTextConfig.from_pretrained(folder))
    return model, sum(p.numel() for p in model.parameters()) / 1e6


@pytest.mark.parametrize("family,component", list(PARAMS_M))
def test_parameter_counts_on_meta_device(family, component):
    model, millions = _count(component, config_dir(family) / component)
    assert millions == pytest.approx(PARAMS_M[family, component], abs=0.01)


def test_sdxl_specifics():
    folder = config_dir("sdxl")
    unet = json.loads((folder / "unet" / "config.json").read_text())
    assert unet["addition_embed_type"] == "text_time" and unet["addition_time_embed_dim"] == 256
    assert unet["projection_class_embeddings_input_dim"] == 2816  # 1280 pooled + 6 * 256 time ids
    assert unet["cross_attention_dim"] == 2048  # 768 + 1280
    assert unet["transformer_layers_per_block"] == [1, 2, 10] and unet["use_linear_projection"] is True
    te2 = json.loads((folder / "text_encoder_2" / "config.json").read_text())
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["projection_dim"], te2["hidden_act"]) == (
        1280, 32, 1280, "gelu"
    )
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    sd15 = json.loads((config_dir("sd15") / "model_index.json").read_text())
    assert sd15["_class_name"] == "StableDiffusionPipeline" and sd15["safety_checker"] == [None, None]
    assert sd15["requires_safety_checker"] is False


@pytest.mark.parametrize("family,scaling", [("sd15", 0.18215), ("sdxl", 0.13025)])
def test_vae_scaling_and_ddim_schedule(family, scaling):
    from diffusers import AutoencoderKL, DDIMScheduler

    assert AutoencoderKL.load_config(config_dir(family) / "vae")["scaling_factor"] == scaling
    sched = DDIMScheduler.from_pretrained(config_dir(family), subfolder="scheduler", local_files_only=True)
    assert sched.config.prediction_type == "epsilon" and sched.config.num_train_timesteps == 1000
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
    assert torch.allclose(sched.betas, betas)
    sched.set_timesteps(20)
    assert sched.timesteps.tolist() == list(range(951, 0, -50))
    assert sched.final_alpha_cumprod.item() == pytest.approx(sched.alphas_cumprod[0].item())  # set_alpha_to_one=False


@pytest.mark.parametrize("family,model_type", [("sd15", "v1"), ("sdxl", "xl_base")])
def test_diffusers_maps_a_checkpoint_of_these_shapes_to_this_family(family, model_type):
    """diffusers' own single-file detection (used when no `config=` is given) names the repo these mirror."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type
    from spo_studio.backend.checkpoint_io import single_file_state_dict

    folder = config_dir(family)
    unet, _ = _count("unet", folder / "unet")
    vae, _ = _count("vae", folder / "vae")
    encoders = [_count("text_encoder", folder / "text_encoder")[0]]
    if family == "sdxl":
        encoders.append(_count("text_encoder_2", folder / "text_encoder_2")[0])
    checkpoint = single_file_state_dict(unet, vae, encoders, family)  # meta tensors: names and shapes only
    assert infer_diffusers_model_type(checkpoint) == model_type
    repo = DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    assert repo == {"sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
                    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0"}[family]
