"""Single-file LDM/SGM checkpoints: what we write, diffusers' `from_single_file` reads back exactly."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from spo_studio.backend.checkpoint_io import save_single_file
from tiny_models import tiny_sd15, tiny_sdxl

PIPELINES = {"sd15": (tiny_sd15, StableDiffusionPipeline), "sdxl": (tiny_sdxl, StableDiffusionXLPipeline)}



def components(pipe, family: str) -> dict:
    out = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder}
    if family == "sdxl":
        out["text_encoder_2"] = pipe.text_encoder_2
    return out


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_single_file_round_trip_through_diffusers(tmp_path, tiny_dirs, family):
    make, cls = PIPELINES[family]
    # seed 1 differs from the seed-0 config folder, so every weight must come from our file
    original = make(seed=1)
    encoders = [original.text_encoder] + ([original.text_encoder_2] if family == "sdxl" else [])
    path = save_single_file(original.unet, original.vae, encoders, family, tmp_path / "model.safetensors",
                            dtype=torch.float32, metadata={"spo.test": "yes"})
    assert not (tmp_path / "model.safetensors.tmp").exists()

    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["spo.family"] == family and meta["spo.test"] == "yes"
    prefixes = {"model.diffusion_model.", "first_stage_model."} | (
        {"cond_stage_model.transformer.text_model."} if family == "sd15"
        else {"conditioner.embedders.0.transformer.text_model.", "conditioner.embedders.1.model."})
    assert all(any(k.startswith(p) for p in prefixes) for k in keys)
    assert all(any(k.startswith(p) for k in keys) for p in prefixes)
    if family == "sdxl":
        assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys

    kwargs = {"safety_checker": None} if family == "sd15" else {}
    loaded = cls.from_single_file(str(path), config=str(tiny_dirs[family]), local_files_only=True, **kwargs)
    reference = make(seed=0)
    for name, module in components(original, family).items():
        ours, theirs = module.state_dict(), getattr(loaded, name).state_dict()
        assert set(ours) == set(theirs), name
        bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
        assert not bad, f"{name}: {bad[:3]}"
        # and the config folder's own weights are different, so nothing came from there
        ref = getattr(reference, name).state_dict()
        assert any(not torch.equal(ref[k], ours[k]) for k in ours if ours[k].is_floating_point()), name


def test_fp16_default_and_errors(tmp_path):
    pipe = tiny_sd15()
    path = save_single_file(pipe.unet, pipe.vae, [pipe.text_encoder], "sd15", tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16
        assert f.get_tensor("first_stage_model.decoder.mid.attn_1.q.weight").ndim == 4
    with pytest.raises(ValueError, match="2 text encoder"):
        save_single_file(pipe.unet, pipe.vae, [pipe.text_encoder], "sdxl", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match=r"\.safetensors"):
        save_single_file(pipe.unet, pipe.vae, [pipe.text_encoder], "sd15", tmp_path / "x.ckpt")
    from peft import LoraConfig

    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(ValueError, match="LoRA adapters attached"):
        save_single_file(pipe.unet, pipe.vae, [pipe.text_encoder], "sd15", tmp_path / "y.safetensors")
