"""LoRA: attach, save (webui/kohya and diffusers/peft), load, convert, merge.

The reference for "the same effect" is always an independent path: our peft model itself,
diffusers' own `load_lora_weights`, or a weight update computed by hand in the test.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from spo_studio.backend import lora
from spo_studio.backend.cli import main
from spo_studio.backend.models import load_model

PIPELINE = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
TOL = 1e-5



# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def base(tiny_dirs, family):
    return load_model(tiny_dirs[family], device="cpu", dtype="fp32")


def randomize(modules, seed: int = 0) -> None:
    """Give every LoRA tensor random values (peft starts with B = 0, which would hide errors)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, p in module.named_parameters():
                if ".lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def trained(tiny_dirs, family, rank=4, alpha=6.0, te_rank=2, te_alpha=3.0, seed=0):
    """A model with random LoRA on the UNet (alpha ≠ rank) and on every text encoder."""
    model = base(tiny_dirs, family)
    lora.attach_lora(model.unet, rank=rank, alpha=alpha)
    for te in model.text_encoders:
        lora.attach_lora(te, family=family, rank=te_rank, alpha=te_alpha)
    randomize([model.unet, *model.text_encoders], seed)
    return model


def unet_inputs(unet, family):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kwargs = {"encoder_hidden_states": hidden}
    if family == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 20, generator=g),
                                       "time_ids": torch.randn(2, 6, generator=g)}
    return x, kwargs


@torch.no_grad()
def outputs(unet, text_encoders, family) -> list[torch.Tensor]:
    """The UNet's output and each text encoder's last hidden state on fixed inputs."""
    x, kwargs = unet_inputs(unet, family)
    ids = torch.tensor([[0, 3, 4, 5, 6, 1]])
    return [unet(x, 500, **kwargs).sample] + [te(ids)[0] for te in text_encoders]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def diffusers_pipe(tiny_dirs, family, path, scale):
    kwargs = {"safety_checker": None} if family == "sd15" else {}
    pipe = PIPELINE[family].from_pretrained(tiny_dirs[family], **kwargs)
    # StableDiffusionPipeline does not pass unet_config itself; without it LDM names do not map
    extra = {"unet_config": pipe.unet.config} if family == "sd15" else {}
    pipe.load_lora_weights(str(path), adapter_name="spo", **extra)
    pipe.set_adapters(["spo"], adapter_weights=[scale])
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if family == "sdxl" else [])
    return pipe.unet, encoders


# ----------------------------------------------------------------------------------------------
# 1. attach
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,rank", [("sd15", 4), ("sdxl", 64)])
def test_attach_defaults(tiny_dirs, family, rank):
    model = base(tiny_dirs, family)
    before = outputs(model.unet, [], family)
    config = lora.attach_lora(model.unet)
    assert (config.r, config.lora_alpha) == (rank, rank)
    assert set(config.target_modules) == {"to_q", "to_k", "to_v", "to_out.0"}
    layers = lora._lora_layers(model.unet)
    expected = [n for n, _ in model.unet.named_modules() if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))]
    assert sorted(layers) == sorted(expected)
    for layer in layers.values():  # gaussian init: A ~ N(0, 1/r), B = 0, so the model is unchanged
        assert layer.lora_B["default"].weight.abs().max() == 0
        assert layer.lora_A["default"].weight.std() > 0
    assert max_diff(outputs(model.unet, [], family), before) == 0
    te_config = lora.attach_lora(model.text_encoders[0], family=family)
    assert te_config.r == rank and set(te_config.target_modules) == {"q_proj", "k_proj", "v_proj", "out_proj"}
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        lora.attach_lora(model.unet)


# ----------------------------------------------------------------------------------------------
# 2./3. save and load: exact round trip, metadata
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_round_trip_peft_webui_peft_is_exact(tmp_path, tiny_dirs, family):
    model = trained(tiny_dirs, family)
    weights = lora.extract_lora(model.unet, model.text_encoders)
    path = lora.save_lora(weights, tmp_path / "a.safetensors", format="webui", dtype=torch.float32,
                          provenance={"base_model": "tiny", "method": "spo", "config_hash": "abc123", "steps": 7})
    assert not (tmp_path / "a.safetensors.tmp").exists()

    fresh = base(tiny_dirs, family)
    lora.load_lora(fresh, path)
    again = lora.extract_lora(fresh.unet, fresh.text_encoders)
    assert {c: set(m) for c, m in again.modules.items()} == {c: set(m) for c, m in weights.modules.items()}
    for component, name, module in weights.items():
        other = again.modules[component][name]
        assert torch.equal(module.down, other.down) and torch.equal(module.up, other.up), name
        assert module.alpha == other.alpha
    assert max_diff(outputs(fresh.unet, fresh.text_encoders, family),
                    outputs(model.unet, model.text_encoders, family)) == 0

    # loading into an existing adapter of the same shape (continuing training) is exact too
    resume = base(tiny_dirs, family)
    lora.attach_lora(resume.unet, rank=4, alpha=6.0)
    for te in resume.text_encoders:
        lora.attach_lora(te, family=family, rank=2, alpha=3.0)
    lora.load_lora(resume, path)
    assert max_diff(outputs(resume.unet, resume.text_encoders, family),
                    outputs(model.unet, model.text_encoders, family)) == 0

    # fp16 (the default): the file holds the fp16 values, and a second round trip is the identity
    p16 = lora.save_lora(weights, tmp_path / "b.safetensors")
    reread = lora.read_lora(p16)
    fresh16 = base(tiny_dirs, family)
    lora.load_lora(fresh16, reread)
    p16b = lora.save_lora(lora.extract_lora(fresh16.unet, fresh16.text_encoders), tmp_path / "c.safetensors")
    first, second = load_file(str(p16)), load_file(str(p16b))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)

    # the file: LoRA tensors only, webui key names, true alpha, metadata
    tensors = load_file(str(p16))
    assert all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in tensors)
    prefixes = {"lora_unet_", "lora_te_"} if family == "sd15" else {"lora_unet_", "lora_te1_", "lora_te2_"}
    assert {p for p in prefixes for k in tensors if k.startswith(p)} == prefixes
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_up.weight"].dtype == torch.float16
    assert tensors["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.alpha"].item() == 6.0
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "6.0")
    assert meta["ss_base_model_version"] == {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}[family]
    assert meta["modelspec.architecture"].endswith("/lora") and meta["modelspec.sai_model_spec"] == "1.0.0"
    assert (meta["spo.method"], meta["spo.config_hash"], meta["spo.steps"]) == ("spo", "abc123", "7")


# ----------------------------------------------------------------------------------------------
# diffusers' own loader agrees with ours
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("fmt", ["webui", "diffusers"])
def test_diffusers_loader_matches_our_peft_model(tmp_path, tiny_dirs, family, fmt):
    model = trained(tiny_dirs, family)  # alpha 6 ≠ rank 4 on the UNet, alpha 3 ≠ rank 2 on the text encoders
    weights = lora.extract_lora(model.unet, model.text_encoders)
    path = lora.save_lora(weights, tmp_path / f"{fmt}.safetensors", format=fmt, dtype=torch.float32)
    no_lora = outputs(*base_parts(tiny_dirs, family), family)
    for scale in (1.0, 0.7):
        lora.set_lora_scale([model.unet, *model.text_encoders], scale)
        ours = outputs(model.unet, model.text_encoders, family)
        theirs = outputs(*diffusers_pipe(tiny_dirs, family, path, scale), family)
        assert max_diff(ours, theirs) < TOL, (fmt, scale, max_diff(ours, theirs))
        assert max_diff(ours, no_lora) > 1e-2  # the LoRA really changes every output

    # the default fp16 file: diffusers and our loader read the same values
    p16 = lora.save_lora(weights, tmp_path / f"{fmt}16.safetensors", format=fmt)
    fresh = base(tiny_dirs, family)
    lora.load_lora(fresh, p16, scale=0.7)
    theirs = outputs(*diffusers_pipe(tiny_dirs, family, p16, 0.7), family)
    assert max_diff(outputs(fresh.unet, fresh.text_encoders, family), theirs) < TOL


def base_parts(tiny_dirs, family):
    model = base(tiny_dirs, family)
    return model.unet, model.text_encoders


# ----------------------------------------------------------------------------------------------
# hand-built kohya files
# ----------------------------------------------------------------------------------------------


def test_hand_built_kohya_sd15_diffusers_named(tmp_path, tiny_dirs):
    """kohya sd-scripts writes SD1.5 LoRAs with diffusers module names: lora_unet_down_blocks_0_..."""
    model = trained(tiny_dirs, "sd15")
    tensors = {}
    for prefix, module, extra in (("lora_unet_", model.unet, ""), ("lora_te_", model.text_encoders[0], "text_model_")):
        for name, layer in lora._lora_layers(module).items():
            key = prefix + extra + name.replace(".", "_")
            tensors[f"{key}.lora_down.weight"] = layer.lora_A["default"].weight.detach().clone()
            tensors[f"{key}.lora_up.weight"] = layer.lora_B["default"].weight.detach().clone()
            tensors[f"{key}.alpha"] = torch.tensor(layer.lora_alpha["default"])
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in tensors
    path = tmp_path / "kohya_sd15.safetensors"
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"})

    fresh = base(tiny_dirs, "sd15")
    lora.load_lora(fresh, path)
    expected = outputs(model.unet, model.text_encoders, "sd15")
    assert max_diff(outputs(fresh.unet, fresh.text_encoders, "sd15"), expected) < TOL
    assert max_diff(outputs(*diffusers_pipe(tiny_dirs, "sd15", path, 1.0), "sd15"), expected) < TOL


# SGM (LDM) names as kohya writes them for SDXL, spelled out, with the layer each one must reach.
SDXL_KOHYA_KEYS = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
        ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"),
    "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_k":
        ("unet", "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k"),
    "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_out_0":
        ("unet", "mid_block.attentions.0.transformer_blocks.1.attn1.to_out.0"),
    "lora_unet_output_blocks_1_1_transformer_blocks_0_attn2_to_v":
        ("unet", "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_v"),
    "lora_unet_output_blocks_5_1_proj_in": ("unet", "up_blocks.1.attentions.2.proj_in"),
    "lora_te1_text_model_encoder_layers_1_self_attn_k_proj": (0, "encoder.layers.1.self_attn.k_proj"),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1": (1, "text_model.encoder.layers.0.mlp.fc1"),
    # diffusers 0.42 recognises a kohya text-encoder part only if it has an out_proj layer
    # ("Could not automatically infer state dict type" otherwise); real kohya files always do
    "lora_te1_text_model_encoder_layers_0_self_attn_out_proj": (0, "encoder.layers.0.self_attn.out_proj"),
    "lora_te2_text_model_encoder_layers_1_self_attn_out_proj": (1, "text_model.encoder.layers.1.self_attn.out_proj"),
}


def test_hand_built_kohya_sdxl_sgm_named(tmp_path, tiny_dirs):
    model = base(tiny_dirs, "sdxl")
    g = torch.Generator().manual_seed(3)
    tensors, rank, alpha, scale = {}, 3, 1.5, 0.8
    manual = base(tiny_dirs, "sdxl")  # the expected model: ΔW added by hand
    for key, (part, name) in SDXL_KOHYA_KEYS.items():
        module = manual.unet if part == "unet" else manual.text_encoders[part]
        layer = dict(module.named_modules())[name]
        down = torch.randn(rank, layer.weight.shape[1], generator=g) * 0.2
        up = torch.randn(layer.weight.shape[0], rank, generator=g) * 0.2
        tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                        f"{key}.alpha": torch.tensor(alpha)})
        with torch.no_grad():
            layer.weight += scale * alpha / rank * up @ down
    path = tmp_path / "kohya_sdxl.safetensors"
    save_file(tensors, str(path), metadata={"ss_base_model_version": "sdxl_base_v1-0"})

    expected = outputs(manual.unet, manual.text_encoders, "sdxl")
    lora.load_lora(model, path, scale=scale)
    assert max_diff(outputs(model.unet, model.text_encoders, "sdxl"), expected) < TOL
    assert max_diff(outputs(*diffusers_pipe(tiny_dirs, "sdxl", path, scale), "sdxl"), expected) < TOL
    info = lora.lora_info(path)
    assert (info["format"], info["family"], info["rank"], info["alpha"]) == ("webui", "sdxl", 3, 1.5)
    assert info["components"] == {"unet": 5, "text_encoder": 2, "text_encoder_2": 2}


# ----------------------------------------------------------------------------------------------
# merge
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_merge_equals_applying(tmp_path, tiny_dirs, family):
    model = trained(tiny_dirs, family)
    path = lora.save_lora(lora.extract_lora(model.unet, model.text_encoders), tmp_path / "l.safetensors",
                          dtype=torch.float32)
    applied = base(tiny_dirs, family)
    lora.load_lora(applied, path, scale=0.6)
    merged = base(tiny_dirs, family)
    lora.merge_lora(merged, path, scale=0.6)
    expected = outputs(applied.unet, applied.text_encoders, family)
    assert max_diff(outputs(merged.unet, merged.text_encoders, family), expected) < TOL

    # the CLI writes the merged model as one LDM/SGM file or as a diffusers folder
    out = tmp_path / ("merged.safetensors" if family == "sd15" else "merged_folder")
    assert main(["lora", "merge", "--base", str(tiny_dirs[family]), "--lora", str(path), "--scale", "0.6",
                 "--save-dtype", "fp32", str(out)]) == 0
    kwargs = {"config_dir": tiny_dirs[family]} if family == "sd15" else {}
    reloaded = load_model(out, device="cpu", dtype="fp32", **kwargs)
    assert reloaded.family == family
    assert max_diff(outputs(reloaded.unet, reloaded.text_encoders, family), expected) < TOL
    assert main(["lora", "merge", "--base", str(tiny_dirs[family]), "--lora", str(path), str(out)]) == 2  # exists


# ----------------------------------------------------------------------------------------------
# 4. CLI: convert and info
# ----------------------------------------------------------------------------------------------


def test_cli_convert_and_info(tmp_path, tiny_dirs, capsys):
    model = trained(tiny_dirs, "sdxl")
    webui = lora.save_lora(lora.extract_lora(model.unet, model.text_encoders), tmp_path / "w.safetensors",
                           provenance={"method": "spo", "steps": 12})
    as_diffusers, back = tmp_path / "d.safetensors", tmp_path / "w2.safetensors"
    assert main(["lora", "convert", str(webui), str(as_diffusers), "--to", "diffusers"]) == 0
    assert main(["lora", "convert", str(as_diffusers), str(back), "--to", "webui"]) == 0
    first, second = load_file(str(webui)), load_file(str(back))
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)
    converted = load_file(str(as_diffusers))
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in converted
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight" in converted
    with safe_open(str(as_diffusers), "pt") as f:
        meta = f.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    assert (config["unet.r"], config["unet.lora_alpha"], config["text_encoder.lora_alpha"]) == (4, 6.0, 3.0)
    assert meta["spo.method"] == "spo" and meta["spo.steps"] == "12"  # provenance carried over

    capsys.readouterr()
    assert main(["lora", "info", str(webui), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["format"], info["family"], info["layers"]) == ("webui", "sdxl", len(first) // 3)
    assert info["rank"] == {"2": 16, "4": 136}  # {rank: layers}: text encoders r=2, UNet r=4
    assert info["alpha"] == {"3.0": 16, "6.0": 136}
    assert info["targets"]["unet"] == ["to_k", "to_out.0", "to_q", "to_v"]
    assert info["targets"]["text_encoder_2"] == ["k_proj", "out_proj", "q_proj", "v_proj"]
    assert info["metadata"]["ss_base_model_version"] == "sdxl_base_v1-0"
    assert main(["lora", "info", str(as_diffusers)]) == 0
    text = capsys.readouterr().out
    assert "diffusers" in text and "sdxl" in text

    # a kohya file without our metadata needs the UNet config for the non-standard tiny UNet
    tensors = {k: v for k, v in first.items() if k.startswith("lora_unet_output_blocks_1_1")}
    bare = tmp_path / "bare.safetensors"
    save_file(tensors, str(bare), metadata={"ss_base_model_version": "sdxl_base_v1-0"})
    out = tmp_path / "bare_d.safetensors"
    assert main(["lora", "convert", str(bare), str(out), "--to", "diffusers",
                 "--unet-config", str(tiny_dirs["sdxl"])]) == 0
    assert "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.lora_A.weight" in load_file(str(out))


# ----------------------------------------------------------------------------------------------
# 5. bad input
# ----------------------------------------------------------------------------------------------


def test_bad_input_errors(tmp_path, tiny_dirs):
    sd15 = base(tiny_dirs, "sd15")
    good = trained(tiny_dirs, "sd15", seed=1)
    good_path = lora.save_lora(lora.extract_lora(good.unet), tmp_path / "good.safetensors")
    q = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"

    def write(name, tensors, metadata=None):
        path = tmp_path / name
        save_file({k: v.clone() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    def error(path, **kwargs):
        with pytest.raises(lora.LoraError) as info:
            lora.load_lora(kwargs.pop("model", sd15), path, **kwargs)
        message = str(info.value)
        assert str(path) in message
        return message

    # not a LoRA
    assert "not a LoRA" in error(write("x.safetensors", {"weight": torch.zeros(2)}))
    checkpoint = write("ckpt.safetensors", {"model.diffusion_model.out.2.weight": torch.zeros(2)})
    assert "full model checkpoint" in error(checkpoint)
    # corrupt files: garbage, and a good file cut short
    (tmp_path / "garbage.safetensors").write_bytes(b"\x00\x01 this is not safetensors")
    assert "corrupt" in error(tmp_path / "garbage.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good_path.read_bytes()[:-100])
    assert "corrupt" in error(tmp_path / "cut.safetensors")
    assert "no such file" in error(tmp_path / "missing.safetensors")
    (tmp_path / "old.ckpt").write_bytes(b"x")
    assert ".safetensors" in error(tmp_path / "old.ckpt")
    # SDXL LoRA into an SD1.5 model
    xl = trained(tiny_dirs, "sdxl")
    xl_path = lora.save_lora(lora.extract_lora(xl.unet), tmp_path / "xl.safetensors")
    message = error(xl_path)
    assert "for SDXL" in message and "ss_base_model_version=sdxl_base_v1-0" in message and "model is SD1.5" in message
    # keys that match nothing: listed
    down, up = torch.zeros(4, 16), torch.zeros(16, 4)
    ghost = "lora_unet_input_blocks_1_1_transformer_blocks_7_attn1_to_q"
    path = write("ghost.safetensors", {f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up,
                                       f"{ghost}.lora_down.weight": down, f"{ghost}.lora_up.weight": up})
    message = error(path)
    assert "1 unet LoRA keys match no layer" in message
    assert "input_blocks_1_1_transformer_blocks_7_attn1_to_q" in message
    # rank mismatch inside the file, and against an existing adapter
    assert "rank mismatch" in error(write("r.safetensors", {f"{q}.lora_down.weight": torch.zeros(4, 16),
                                                             f"{q}.lora_up.weight": torch.zeros(16, 8)}))
    other = base(tiny_dirs, "sd15")
    lora.attach_lora(other.unet, rank=2, alpha=6.0)
    message = error(good_path, model=other)
    assert "rank mismatch" in message and "rank 4" in message and "rank 2" in message
    # a layer of the wrong size (a LoRA for a different SD1.5-family model)
    assert "[16, 99] in the LoRA but [16, 16]" in error(write("wide.safetensors", {
        f"{q}.lora_down.weight": torch.zeros(4, 99), f"{q}.lora_up.weight": torch.zeros(16, 4)}))
    # unsupported variants and stray keys
    assert "LoHa" in error(write("loha.safetensors", {f"{q}.hada_w1_a": torch.zeros(2, 2)}))
    assert "not LoRA weights" in error(write("extra.safetensors", {f"{q}.lora_down.weight": down,
                                                                   f"{q}.lora_up.weight": up, f"{q}.foo": down}))
    # and the CLI prints these as one clear line, exit code 2
    assert main(["lora", "info", str(tmp_path / "garbage.safetensors")]) == 2
