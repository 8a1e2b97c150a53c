"""Offline model loading: sources, family detection, dtype/device choice and every bad input's error."""

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file
from spo_studio.backend.models import (
    ModelLoadError,
    detect_family,
    load_model,
    pick_device,
    pick_dtype,
)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_folder_loads_with_detected_family(tiny_dirs, family):
    model = load_model(tiny_dirs[family])
    assert model.family == family
    assert len(model.text_encoders) == (2 if family == "sdxl" else 1)
    assert model.device.type == "cpu" and model.dtype == torch.float32
    assert not any(p.requires_grad for p in model.unet.parameters())
    cond = model.encode_prompts(["a red circle", "a cat"])
    assert cond.hidden.shape[0] == 2
    if family == "sdxl":
        assert cond.pooled.shape == (2, 20) and cond.time_ids.tolist()[0] == [32, 32, 0, 0, 32, 32]
        neg = model.encode_negative(2)
        assert torch.count_nonzero(neg.hidden) == 0 and torch.count_nonzero(neg.pooled) == 0
    else:
        assert cond.pooled is None


def test_explicit_family_must_match(tiny_dirs):
    with pytest.raises(ModelLoadError, match="files are a 'sd15' model, but family 'sdxl'"):
        load_model(tiny_dirs["sd15"], family="sdxl")
    with pytest.raises(ModelLoadError, match="unknown family 'sd3'"):
        load_model(tiny_dirs["sd15"], family="sd3")


def test_fp16_variant_only_folder_loads(tiny_dirs, tmp_path):
    src = tiny_dirs["sd15"]
    dst = tmp_path / "fp16"
    shutil.copytree(src, dst)
    for sub in ("unet", "vae", "text_encoder"):
        f = dst / sub / ("model.safetensors" if sub == "text_encoder" else "diffusion_pytorch_model.safetensors")
        f.rename(f.with_name(f.name.replace(".safetensors", ".fp16.safetensors")))
    model = load_model(dst, dtype="fp16")
    assert model.dtype == torch.float16 and next(model.unet.parameters()).dtype == torch.float16


def test_device_and_dtype_choice():
    cpu = torch.device("cpu")
    assert pick_dtype(cpu) == torch.float32
    assert pick_dtype(cpu, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        pick_dtype(cpu, "fp8")
    if not torch.cuda.is_available():
        assert pick_device(None) == cpu
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            pick_device("cuda")


# --- bad inputs -----------------------------------------------------------------------------


def test_missing_path(tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(ModelLoadError, match=f"{missing}: no such file or folder.*supported"):
        load_model(missing)


def test_corrupt_safetensors(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(ModelLoadError, match=f"{bad}: corrupt or unreadable safetensors"):
        load_model(bad)


def test_not_a_diffusion_checkpoint(tmp_path):
    f = tmp_path / "vae_only.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(2, 2)}, f)
    with pytest.raises(ModelLoadError, match=f"{f}: not a diffusion model checkpoint.*encoder.conv_in.weight"):
        load_model(f)


def test_lora_file_is_not_a_base_model(tmp_path):
    f = tmp_path / "lora.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(2, 2)}, f)
    with pytest.raises(ModelLoadError, match="this is a LoRA, not a base model"):
        load_model(f)


def test_pickled_checkpoint_refused(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"anything")
    with pytest.raises(ModelLoadError, match=f"{f}: only .safetensors single-file checkpoints"):
        load_model(f)


@pytest.mark.parametrize(
    "key, message",
    [
        ("model.diffusion_model.joint_blocks.0.x", "Stable Diffusion 3"),
        ("double_blocks.0.img_attn.qkv.weight", "FLUX"),
        ("cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight", "Stable Diffusion 2.x"),
    ],
)
def test_unsupported_single_file_families(tmp_path, key, message):
    f = tmp_path / "other.safetensors"
    tensors = {key: torch.zeros(1)}
    if "cond_stage_model" in key:
        tensors["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    save_file(tensors, f)
    with pytest.raises(ModelLoadError, match=f"{message}.*supported: Stable Diffusion 1.x"):
        detect_family(f)


def test_sdxl_single_file_detected(tmp_path):
    f = tmp_path / "xl.safetensors"
    save_file({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(1),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(1)}, f)
    assert detect_family(f) == "sdxl"


def test_unsupported_folders(tiny_dirs, tmp_path):
    v_pred = tmp_path / "sd2v"
    shutil.copytree(tiny_dirs["sd15"], v_pred)
    cfg_file = v_pred / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="prediction_type 'v_prediction'.*not supported"):
        load_model(v_pred)

    sd3 = tmp_path / "sd3"
    sd3.mkdir()
    (sd3 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline",
                                                      "transformer": ["diffusers", "SD3Transformer2DModel"]}))
    with pytest.raises(ModelLoadError, match="flow-matching transformer model"):
        load_model(sd3)

    plain = tmp_path / "empty_folder"
    plain.mkdir()
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        load_model(plain)


def test_pocket_missing_is_explained(monkeypatch, tmp_path):
    from spo_studio.backend import models

    monkeypatch.setattr(models, "POCKET_DIR", tmp_path / "absent")
    with pytest.raises(ModelLoadError, match="spo pocket build"):
        load_model("pocket")
