"""Every LoRA key layout SD1.5/SDXL users meet, read by our loader exactly as diffusers reads it.

Each layout is built from a peft-attached tiny UNet with diffusers' own converters where diffusers
has one (`convert_state_dict_to_diffusers` + `save_lora_weights` for the legacy layout of the
official SPO LoRAs and diffusers' training scripts, `convert_state_dict_to_kohya` for kohya), by
renaming where it has none (attention processors, raw peft). The references are the peft model the
file came from and diffusers' `load_lora_weights`; `spo lora convert --to webui` of each file must
then give the same output through ComfyUI's key map (`comfy_keys.comfy_patches`).
"""

from __future__ import annotations

import pytest
import torch
from comfy_keys import comfy_patches
from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from spo_studio.backend import lora
from spo_studio.backend.cli import main
from spo_studio.backend.lora_layouts import BASE_MODEL_VERSION
from test_lora import PIPELINE, TOL, base, diffusers_pipe, max_diff, outputs, randomize

RESNET_CONVS = ["conv1", "conv2"]


def source_model(tiny_dirs, family, targets=lora.UNET_TARGETS, te=False, rank=4, seed=0):
    """A model with a random LoRA of alpha = rank (layouts without alpha tensors mean alpha = rank)."""
    model = base(tiny_dirs, family)
    lora.attach_lora(model.unet, rank=rank, target_modules=list(targets))
    encoders = model.text_encoders[:1] if te else []
    for encoder in encoders:
        lora.attach_lora(encoder, family=family, rank=2)
    randomize([model.unet, *encoders], seed)
    return model, encoders


def save_with_diffusers(tmp_path, family, name, unet_sd, te_sd=None) -> str:
    """`save_lora_weights`, what diffusers' training scripts and the official SPO code call."""
    folder = tmp_path / name
    kwargs = {"text_encoder_lora_layers": te_sd} if te_sd else {}
    PIPELINE[family].save_lora_weights(folder, unet_lora_layers=unet_sd, **kwargs)
    return str(folder / "pytorch_lora_weights.safetensors")


def layout_file(tmp_path, family, layout, model, encoders) -> str:
    unet_peft = get_peft_model_state_dict(model.unet)
    te_peft = get_peft_model_state_dict(encoders[0]) if encoders else None
    if layout == "diffusers-legacy":  # the official SPO LoRAs: unet.<path>.lora.down.weight, no alpha
        te = convert_state_dict_to_diffusers(te_peft) if te_peft else None
        return save_with_diffusers(tmp_path, family, layout, convert_state_dict_to_diffusers(unet_peft), te)
    if layout == "peft":
        return save_with_diffusers(tmp_path, family, layout, unet_peft, te_peft)
    path = tmp_path / f"{layout}.safetensors"
    if layout == "peft-raw":  # peft's own spelling: base_model.model. levels, adapter name in the key
        tensors = {"unet.base_model.model." + k.replace(".lora_A.", ".lora_A.default.")
                   .replace(".lora_B.", ".lora_B.default."): v for k, v in unet_peft.items()}
    elif layout.startswith("attn-processor"):  # [unet.]<attention>.processor.to_q_lora (save_attn_procs: bare)
        tensors = {}
        for key, value in unet_peft.items():
            module, role = key.rsplit(".lora_", 1)  # "...attn1.to_q", "A.weight"
            parent, proj = module.rsplit(".", 1)
            if proj == "0":  # to_out.0
                parent, proj = parent.rsplit(".", 1)[0], "to_out"
            prefix = "" if layout.endswith("bare") else "unet."
            kind = "down" if role.startswith("A") else "up"
            tensors[f"{prefix}{parent}.processor.{proj}_lora.{kind}.weight"] = value
    else:  # kohya with diffusers names, alpha = rank written by diffusers' converter; or without any alpha
        prefixed = {f"unet.{k}": v for k, v in unet_peft.items()}
        prefixed.update({f"text_encoder.{k}": v for k, v in (te_peft or {}).items()})
        tensors = convert_state_dict_to_kohya(prefixed)
        if layout == "kohya-no-alpha":
            tensors = {k: v for k, v in tensors.items() if not k.endswith(".alpha")}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return str(path)


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
@pytest.mark.parametrize("layout,conv,te", [
    ("diffusers-legacy", False, True), ("peft", False, True), ("peft-raw", False, False),
    ("attn-processor", False, False), ("attn-processor-bare", False, False), ("kohya", False, True),
    ("kohya-no-alpha", True, False),
])
def test_layout_reads_as_diffusers_reads_it(tmp_path, tiny_dirs, family, layout, conv, te):
    targets = [*lora.UNET_TARGETS, *(RESNET_CONVS if conv else [])]
    te = te and family == "sd15"  # one text-encoder case per layout is enough; the SDXL ones are in test_lora
    model, encoders = source_model(tiny_dirs, family, targets, te=te)
    path = layout_file(tmp_path, family, layout, model, encoders)
    expected = outputs(model.unet, encoders, family)

    fresh = base(tiny_dirs, family)
    weights = lora.load_lora(fresh, path)
    assert len(weights) == len(lora._lora_layers(model.unet)) + sum(len(lora._lora_layers(e)) for e in encoders)
    assert max_diff(outputs(fresh.unet, fresh.text_encoders[: len(encoders)], family), expected) < TOL
    if layout not in ("peft-raw", "attn-processor-bare"):  # diffusers 0.42 reads neither
        unet, text_encoders = diffusers_pipe(tiny_dirs, family, path, 1.0)
        assert max_diff(outputs(unet, text_encoders[: len(encoders)], family), expected) < TOL
    conv_layers = [n for n in weights.modules["unet"] if n.endswith(tuple(RESNET_CONVS))]
    assert bool(conv_layers) == conv and all(weights.modules["unet"][n].down.ndim == 4 for n in conv_layers)

    # `spo lora convert --to webui` of it: the same update through ComfyUI's key map
    out = tmp_path / "as_webui.safetensors"
    assert main(["lora", "convert", path, str(out), "--to", "webui", "--dtype", "fp32", "--family", family,
                 "--unet-config", str(tiny_dirs[family])]) == 0  # LDM names of the tiny UNet, not the shipped one
    patched = base(tiny_dirs, family)
    comfy_patches(load_file(str(out)), patched.unet, patched.text_encoders, family).apply(scale=1.0)
    assert max_diff(outputs(patched.unet, patched.text_encoders[: len(encoders)], family), expected) < TOL


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_legacy_writer_is_the_official_layout(tmp_path, tiny_dirs, family):
    """`--to diffusers-legacy`: the keys of the official SPO LoRAs, no alpha tensors, alpha ≠ rank folded in."""
    model = base(tiny_dirs, family)
    lora.attach_lora(model.unet, rank=4, alpha=6.0)
    randomize([model.unet], 2)
    weights = lora.extract_lora(model.unet)
    path = lora.save_lora(weights, tmp_path / "legacy.safetensors", format="diffusers-legacy", dtype=torch.float32)
    keys = list(load_file(str(path)))
    assert keys and all(k.startswith("unet.") and k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    expected = outputs(model.unet, [], family)
    theirs, _ = diffusers_pipe(tiny_dirs, family, path, 1.0)
    assert max_diff(outputs(theirs, [], family), expected) < TOL
    fresh = base(tiny_dirs, family)
    lora.load_lora(fresh, path)
    assert max_diff(outputs(fresh.unet, [], family), expected) < TOL
    info = lora.lora_info(path)
    assert info["format"] == "diffusers-legacy" and info["alpha"] == info["rank"] == 4 and info["family"] == family
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == BASE_MODEL_VERSION[family]


def test_layout_errors_name_file_and_keys(tmp_path, tiny_dirs):
    sd15 = base(tiny_dirs, "sd15")
    model, _ = source_model(tiny_dirs, "sd15")
    legacy = load_file(layout_file(tmp_path, "sd15", "diffusers-legacy", model, []))

    def write(name, tensors, metadata=None):
        path = tmp_path / name
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(path), metadata=metadata)
        return path

    # recognised layout, modules that do not fit the model: the first ones are named
    ghost = {k.replace("transformer_blocks.0", "transformer_blocks.7"): v for k, v in legacy.items()
             if "down_blocks.0" in k}
    path = write("ghost.safetensors", {**legacy, **ghost})
    with pytest.raises(lora.LoraError, match=r"ghost.safetensors: \d+ unet LoRA keys match no layer") as info:
        lora.load_lora(sd15, path)
    assert "down_blocks.0.attentions.0.transformer_blocks.7.attn1.to_q" in str(info.value)
    # an unknown layout lists its first keys
    path = write("unknown.safetensors", {"foo.bar.weight": torch.zeros(2), "baz.qux": torch.zeros(1)})
    with pytest.raises(lora.LoraError, match="unknown.safetensors: not a LoRA.*first keys: baz.qux, foo.bar.weight"):
        lora.read_lora(path)
    # kohya and diffusers keys in one file
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = write("mixed.safetensors", {**legacy, f"{q}.lora_down.weight": torch.zeros(4, 16),
                                       f"{q}.lora_up.weight": torch.zeros(16, 4)})
    with pytest.raises(lora.LoraError, match="mixed.safetensors: mixes webui"):
        lora.read_lora(path)


def test_nan_and_mislabelled_files_are_refused_by_info_convert_merge(tmp_path, tiny_dirs, capsys):
    model, _ = source_model(tiny_dirs, "sd15")
    good = load_file(layout_file(tmp_path, "sd15", "diffusers-legacy", model, []))
    first = next(iter(good))
    nan = dict(good, **{first: torch.full_like(good[first], float("nan"))})
    save_file(nan, str(tmp_path / "nan.safetensors"))
    # SDXL key names (a second text encoder) under SD1.5 metadata
    te2 = {"lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(2, 24),
           "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.zeros(24, 2)}
    save_file(te2, str(tmp_path / "mislabelled.safetensors"), metadata={"ss_base_model_version": "sd_v1"})
    for name, message in (("nan", "NaN or infinite"), ("mislabelled", "mislabelled")):
        path = str(tmp_path / f"{name}.safetensors")
        for argv in (["lora", "info", path],
                     ["lora", "convert", path, str(tmp_path / "o.safetensors"), "--to", "webui"],
                     ["lora", "merge", "--base", str(tiny_dirs["sd15"]), "--lora", path, str(tmp_path / "m")]):
            assert main(argv) == 2, argv
            err = capsys.readouterr().err
            assert path in err and message in err, err
        assert not (tmp_path / "o.safetensors").exists() and not (tmp_path / "m").exists()
