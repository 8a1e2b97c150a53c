"""Names of Stable Diffusion weights in diffusers/transformers layout and in LDM/SGM layout.

    from spo_studio.backend.ldm_names import unet_name_map
    names = unet_name_map(unet.config)
    names.to_ldm("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    # -> "input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    names.to_diffusers("middle_block.0.in_layers.2.weight")   # -> "mid_block.resnets.0.conv1.weight"

Single-file checkpoints (A1111, ComfyUI, the original CompVis/Stability code) and webui/kohya LoRA
files name every module by the original LDM/SGM code; diffusers and transformers use their own
names. This module holds the renaming only — no tensors — derived from the model configs, so it
holds for SD1.5, SDXL and the tiny test models alike. `checkpoint_io.py` uses it for whole
checkpoints and `lora.py` for LoRA keys.

Each map is a table of module-path prefixes (diffusers ↔ LDM); a name is renamed by its longest
matching prefix, the rest of the name is kept. Names work at any depth: a parameter
(`...to_q.weight`) or a module (`...to_q`). Unknown names raise `KeyError`, never pass through.

UNet (L = layers per block; LDM counts blocks in one running index, like the original code):

    conv_in                                   input_blocks.0.0
    time_embedding.linear_{1,2}               time_embed.{0,2}
    add_embedding.linear_{1,2} (SDXL)         label_emb.0.{0,2}
    down_blocks.b.resnets.i / .attentions.i   input_blocks.n.0 / input_blocks.n.1   (n = 1, 2, ...)
    down_blocks.b.downsamplers.0.conv         input_blocks.n.0.op                  (its own slot n)
    mid_block.resnets.0, .attentions.0, .resnets.1    middle_block.0, .1, .2
    up_blocks.b.resnets.i / .attentions.i     output_blocks.m.0 / output_blocks.m.1 (m = 0, 1, ...; L+1 per block)
    up_blocks.b.upsamplers.0.conv             output_blocks.<last m of b>.{2 if b has attention else 1}.conv
    conv_norm_out / conv_out                  out.0 / out.2
    resnet norm1, conv1, time_emb_proj, norm2, conv2, conv_shortcut
                                              in_layers.0, in_layers.2, emb_layers.1, out_layers.0,
                                              out_layers.3, skip_connection
    inside attentions (norm, proj_in, transformer_blocks.t.attn1.to_q, ...)   unchanged

VAE (AutoencoderKL; the decoder's up blocks are numbered in reverse in LDM):

    encoder.down_blocks.i.resnets.j           encoder.down.i.block.j        (conv_shortcut ↔ nin_shortcut)
    encoder.down_blocks.i.downsamplers.0.conv encoder.down.i.downsample.conv
    {en,de}coder.mid_block.resnets.{0,1}      {en,de}coder.mid.block_{1,2}
    {en,de}coder.mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}
                                              {en,de}coder.mid.attn_1.{norm,q,k,v,proj_out}  (1x1 convs in LDM)
    decoder.up_blocks.i.resnets.j             decoder.up.(n-1-i).block.j
    decoder.up_blocks.i.upsamplers.0.conv     decoder.up.(n-1-i).upsample.conv
    {en,de}coder.conv_norm_out                {en,de}coder.norm_out

Text encoders: SD1.5's CLIP-L and SDXL's first encoder keep transformers' names under a prefix
(`cond_stage_model.transformer.` / `conditioner.embedders.0.transformer.`); SDXL's second encoder
(OpenCLIP bigG) is stored in OpenCLIP's layout under `conditioner.embedders.1.model.`, see
`openclip_name_map`. transformers 5 stores `CLIPTextModel` without the `text_model.` level; the
canonical names here always carry it (`canonical_clip_name`), as checkpoints and LoRA files do.

Checked against diffusers' own LDM→diffusers converters (`diffusers.loaders.single_file_utils`)
by tests/test_checkpoint_io.py.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

# Sub-layers of a UNet resnet (diffusers ResnetBlock2D → LDM ResBlock).
UNET_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}

# The VAE mid-block attention: diffusers Linear layers ↔ LDM 1x1 convolutions.
VAE_ATTENTION_LAYERS = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}

# Where each text encoder lives in a single-file checkpoint, per family.
CLIP_PREFIXES = {
    "sd15": ["cond_stage_model.transformer."],
    "sdxl": ["conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."],
}

# OpenCLIP stacks q, k, v into one in_proj tensor, in this order along dim 0.
OPENCLIP_QKV = ("q_proj", "k_proj", "v_proj")


class NameMap:
    """A one-to-one renaming of module paths between diffusers and LDM names, by longest prefix.

    Args:
        pairs (`Iterable[tuple[str, str]]`): (diffusers prefix, LDM prefix) pairs.
        what (`str`): what the names belong to, for error messages ("UNet", "VAE", ...).
    """

    def __init__(self, pairs: Iterable[tuple[str, str]], what: str):
        self.what = what
        self._to_ldm: dict[str, str] = {}
        self._to_diffusers: dict[str, str] = {}
        for diffusers_name, ldm_name in pairs:
            if diffusers_name in self._to_ldm or ldm_name in self._to_diffusers:
                raise ValueError(f"{what} name map: duplicate entry {diffusers_name!r} ↔ {ldm_name!r}")
            self._to_ldm[diffusers_name] = ldm_name
            self._to_diffusers[ldm_name] = diffusers_name

    @staticmethod
    def _rename(name: str, table: Mapping[str, str], what: str, side: str) -> str:
        parts = name.split(".")
        for cut in range(len(parts), 0, -1):
            prefix = ".".join(parts[:cut])
            if prefix in table:
                return ".".join([table[prefix], *parts[cut:]])
        raise KeyError(f"{what}: {name!r} is not a known {side} name")

    def to_ldm(self, name: str) -> str:
        """The LDM/SGM name of a diffusers name (parameter or module path)."""
        return self._rename(name, self._to_ldm, self.what, "diffusers")

    def to_diffusers(self, name: str) -> str:
        """The diffusers name of an LDM/SGM name (parameter or module path)."""
        return self._rename(name, self._to_diffusers, self.what, "LDM")

    def pairs(self) -> list[tuple[str, str]]:
        return list(self._to_ldm.items())


def _get(config, key: str, default=None):
    """Config value from a diffusers FrozenDict / dict / config object."""
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def _per_block(value, n: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * n


# ----------------------------------------------------------------------------------------------
# UNet
# ----------------------------------------------------------------------------------------------


def _resnet_pairs(diffusers_prefix: str, ldm_prefix: str) -> list[tuple[str, str]]:
    return [(f"{diffusers_prefix}.{ours}", f"{ldm_prefix}.{theirs}") for ours, theirs in UNET_RESNET_LAYERS.items()]


def unet_name_map(config) -> NameMap:
    """The diffusers ↔ LDM/SGM name map of a `UNet2DConditionModel`, from its config.

    Args:
        config (`dict` or `FrozenDict`): `unet.config` or the dict in `unet/config.json`.
    """
    unsupported = {
        "class_embed_type": None, "encoder_hid_dim_type": None, "time_cond_proj_dim": None,
    }
    for key, expected in unsupported.items():
        if _get(config, key) != expected:
            raise ValueError(f"UNet config has {key}={_get(config, key)!r}: no LDM/SGM layout is defined for it")
    mid_type = _get(config, "mid_block_type", "UNetMidBlock2DCrossAttn")
    if mid_type != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"UNet config has mid_block_type={mid_type!r}; only UNetMidBlock2DCrossAttn is supported")
    add_type = _get(config, "addition_embed_type")
    if add_type not in (None, "text_time"):
        raise ValueError(f"UNet config has addition_embed_type={add_type!r}; only SDXL's 'text_time' is supported")

    down_types = list(_get(config, "down_block_types"))
    up_types = list(_get(config, "up_block_types"))
    layers = _per_block(_get(config, "layers_per_block"), len(down_types))

    pairs: list[tuple[str, str]] = [
        ("conv_in", "input_blocks.0.0"),
        ("time_embedding.linear_1", "time_embed.0"),
        ("time_embedding.linear_2", "time_embed.2"),
        ("conv_norm_out", "out.0"),
        ("conv_out", "out.2"),
    ]
    if add_type == "text_time":
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]

    # input_blocks: slot 0 is conv_in, then each resnet (+ attention) and each downsampler takes a slot
    slot = 1
    for b, block_type in enumerate(down_types):
        has_attention = "Attn" in block_type
        for i in range(layers[b]):
            pairs += _resnet_pairs(f"down_blocks.{b}.resnets.{i}", f"input_blocks.{slot}.0")
            if has_attention:
                pairs.append((f"down_blocks.{b}.attentions.{i}", f"input_blocks.{slot}.1"))
            slot += 1
        if b < len(down_types) - 1:  # every down block but the last halves the resolution
            pairs.append((f"down_blocks.{b}.downsamplers.0.conv", f"input_blocks.{slot}.0.op"))
            slot += 1

    # middle_block: resnet, attention, resnet
    pairs += _resnet_pairs("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    pairs += _resnet_pairs("mid_block.resnets.1", "middle_block.2")

    # output_blocks: L+1 slots per up block; the upsampler sits in the block's last slot
    up_layers = [n + 1 for n in reversed(layers)]
    slot = 0
    for b, block_type in enumerate(up_types):
        has_attention = "Attn" in block_type
        for i in range(up_layers[b]):
            pairs += _resnet_pairs(f"up_blocks.{b}.resnets.{i}", f"output_blocks.{slot}.0")
            if has_attention:
                pairs.append((f"up_blocks.{b}.attentions.{i}", f"output_blocks.{slot}.1"))
            slot += 1
        if b < len(up_types) - 1:  # every up block but the last doubles the resolution
            inner = 2 if has_attention else 1  # after the resnet (and the attention)
            pairs.append((f"up_blocks.{b}.upsamplers.0.conv", f"output_blocks.{slot - 1}.{inner}.conv"))
    return NameMap(pairs, "UNet")


# ----------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------


def _vae_resnet_pairs(diffusers_prefix: str, ldm_prefix: str) -> list[tuple[str, str]]:
    return [
        (diffusers_prefix, ldm_prefix),
        (f"{diffusers_prefix}.conv_shortcut", f"{ldm_prefix}.nin_shortcut"),
    ]


def _vae_attention_pairs(part: str) -> list[tuple[str, str]]:
    return [
        (f"{part}.mid_block.attentions.0.{ours}", f"{part}.mid.attn_1.{theirs}")
        for ours, theirs in VAE_ATTENTION_LAYERS.items()
    ]


def vae_name_map(config) -> NameMap:
    """The diffusers ↔ LDM name map of an `AutoencoderKL`, from its config."""
    n = len(_get(config, "down_block_types"))
    if len(_get(config, "up_block_types")) != n:
        raise ValueError("VAE config: as many up blocks as down blocks are needed for the LDM layout")
    layers = int(_get(config, "layers_per_block"))
    if not _get(config, "mid_block_add_attention", True):
        raise ValueError("VAE config has mid_block_add_attention=False; the LDM VAE always has a mid attention")

    pairs: list[tuple[str, str]] = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [
            (f"{part}.conv_in", f"{part}.conv_in"),
            (f"{part}.conv_norm_out", f"{part}.norm_out"),
            (f"{part}.conv_out", f"{part}.conv_out"),
        ]
        for j in (0, 1):
            pairs += _vae_resnet_pairs(f"{part}.mid_block.resnets.{j}", f"{part}.mid.block_{j + 1}")
        pairs += _vae_attention_pairs(part)
    for i in range(n):
        for j in range(layers):
            pairs += _vae_resnet_pairs(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    for i in range(n):
        ldm_i = n - 1 - i
        for j in range(layers + 1):
            pairs += _vae_resnet_pairs(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_i}.block.{j}")
        if i < n - 1:
            pairs.append((f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_i}.upsample.conv"))
    return NameMap(pairs, "VAE")


def is_vae_attention_weight(ldm_name: str) -> bool:
    """Whether an LDM VAE parameter is one of the mid-attention 1x1 conv weights ([C, C, 1, 1] in LDM)."""
    parts = ldm_name.split(".")
    return len(parts) >= 4 and parts[-4:-2] == ["mid", "attn_1"] and parts[-2] in ("q", "k", "v", "proj_out") \
        and parts[-1] == "weight"


# ----------------------------------------------------------------------------------------------
# Text encoders
# ----------------------------------------------------------------------------------------------


def canonical_clip_name(name: str) -> str:
    """A transformers CLIP text-encoder name with the `text_model.` level, as checkpoints store it.

    transformers 5 flattens `CLIPTextModel` (`encoder.layers.0...`), `CLIPTextModelWithProjection`
    keeps `text_model.encoder.layers.0...` plus `text_projection`.
    """
    if name.startswith("text_model.") or name.startswith("text_projection"):
        return name
    return "text_model." + name


def module_clip_name(canonical: str, flattened: bool) -> str:
    """The inverse of `canonical_clip_name` for a given model (`flattened`: no `text_model` attribute)."""
    if flattened and canonical.startswith("text_model."):
        return canonical[len("text_model."):]
    return canonical


def openclip_name_map(num_layers: int) -> NameMap:
    """transformers `CLIPTextModelWithProjection` ↔ OpenCLIP names (SDXL's second text encoder).

    Not covered here (they are not one-to-one renamings): the q/k/v projections, which OpenCLIP
    stacks into `attn.in_proj_weight` / `in_proj_bias` (see `openclip_qkv`), and the shape of
    `text_projection` (OpenCLIP's [hidden, proj] is the transpose of transformers' Linear weight).
    """
    pairs: list[tuple[str, str]] = [
        ("text_model.embeddings.token_embedding", "token_embedding"),
        ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
        ("text_model.final_layer_norm", "ln_final"),
        ("text_projection.weight", "text_projection"),
    ]
    for i in range(num_layers):
        hf, oc = f"text_model.encoder.layers.{i}", f"transformer.resblocks.{i}"
        pairs += [
            (f"{hf}.layer_norm1", f"{oc}.ln_1"),
            (f"{hf}.layer_norm2", f"{oc}.ln_2"),
            (f"{hf}.self_attn.out_proj", f"{oc}.attn.out_proj"),
            (f"{hf}.mlp.fc1", f"{oc}.mlp.c_fc"),
            (f"{hf}.mlp.fc2", f"{oc}.mlp.c_proj"),
        ]
    return NameMap(pairs, "OpenCLIP text encoder")


def openclip_qkv(canonical_name: str) -> tuple[str, int] | None:
    """For a q/k/v projection parameter, its stacked OpenCLIP name and slot (0, 1, 2); else None.

    `text_model.encoder.layers.3.self_attn.k_proj.bias` → (`transformer.resblocks.3.attn.in_proj_bias`, 1)
    """
    parts = canonical_name.split(".")
    if len(parts) == 7 and parts[:3] == ["text_model", "encoder", "layers"] and parts[4] == "self_attn" \
            and parts[5] in OPENCLIP_QKV:
        return f"transformer.resblocks.{parts[3]}.attn.in_proj_{parts[6]}", OPENCLIP_QKV.index(parts[5])
    return None
