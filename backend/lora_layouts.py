"""LoRA file layouts: every key layout SD1.5/SDXL users meet, read into `LoraWeights`, and the three we write.

Read (one `.safetensors` file; the layout is told by each key's ending, so files that mix the
diffusers spellings, as diffusers' own converters write them, read too):

  webui / kohya    lora_unet_<LDM or diffusers module path, dots → _>.lora_down.weight / .lora_up.weight
                   [.alpha], lora_te_ (SD1.5), lora_te1_ / lora_te2_ (SDXL) for the text encoders;
                   LoCon convolution layers (down [r, in, kh, kw], up [out, r, 1, 1]) included.
  diffusers/peft   unet.<diffusers module path>.lora_A.weight / .lora_B.weight, text_encoder(_2).<...>;
                   raw peft spellings too (`base_model.model.` levels, `.lora_A.default.weight`).
  diffusers-legacy unet.<path>.lora.down.weight / .lora.up.weight and text_encoder.<path>.lora_linear_layer
                   .down.weight / .up.weight: what `convert_state_dict_to_diffusers` + `save_lora_weights`
                   write, the layout of diffusers' training scripts and of the official SPO LoRAs.
  attn-processor   [unet.]<attention path>.processor.to_q_lora.down.weight (to_k, to_v, to_out_lora), the
                   oldest diffusers layout (`save_attn_procs`); keys without a component prefix are UNet keys.

Alpha: kohya's `.alpha` tensor, the peft config in the `lora_adapter_metadata` entry, or a `.alpha`
tensor beside a diffusers layer; where a layout stores none, alpha = rank (scale 1).

Write: "webui" (kohya keys with LDM names, the true alpha, kohya/modelspec metadata: what ComfyUI
and A1111 read), "diffusers" (peft keys + the peft config in metadata, so alpha ≠ rank survives)
and "diffusers-legacy" (the official SPO layout: no alpha tensors, so α / r is folded into `up`).
"""

from __future__ import annotations

import collections
import json
import logging
import re
from pathlib import Path

import torch

from .ldm_names import canonical_clip_name, unet_name_map
from .lora_types import COMPONENTS, FAMILIES, FAMILY_NAMES, LoraError, LoraModule, LoraWeights, most_common

logger = logging.getLogger(__name__)

FORMATS = ("webui", "diffusers", "diffusers-legacy")

# webui key prefixes per (family, component); reading also accepts lora_te_ / lora_te1_ for the first encoder
WEBUI_PREFIXES = {
    ("sd15", "unet"): "lora_unet_",
    ("sd15", "text_encoder"): "lora_te_",
    ("sdxl", "unet"): "lora_unet_",
    ("sdxl", "text_encoder"): "lora_te1_",
    ("sdxl", "text_encoder_2"): "lora_te2_",
}
WEBUI_READ_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                       "lora_te2_": "text_encoder_2"}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}
MODELSPEC_ARCHITECTURE = {"sd15": "stable-diffusion-v1/lora", "sdxl": "stable-diffusion-xl-v1-base/lora"}
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"
# metadata keys we regenerate on every write; everything else (provenance, kohya training info) is carried over
GENERATED_METADATA = {
    "format", DIFFUSERS_METADATA_KEY, "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "modelspec.prediction_type", "spo.format", "spo.family", "spo.unet_config",
}
# keys of LoRA variants we do not read (regex searched in each key)
_UNSUPPORTED = {
    r"\.hada_": "LyCORIS LoHa", r"\.lokr_": "LyCORIS LoKr", r"\.lora_mid\.": "LyCORIS LoCon (lora_mid)",
    r"\.dora_scale$": "DoRA", r"\.lora_magnitude_vector": "DoRA", r"\.diff(_b)?$": "LyCORIS full diff",
    r"\.oft_": "OFT",
}
# key ending → (role, layout); a key is classified by the first ending it has
_ENDINGS = (
    (".lora_linear_layer.down.weight", "down", "diffusers-legacy"),
    (".lora_linear_layer.up.weight", "up", "diffusers-legacy"),
    (".lora_A.default.weight", "down", "diffusers"),
    (".lora_B.default.weight", "up", "diffusers"),
    ("_lora.down.weight", "down", "attn-processor"),
    ("_lora.up.weight", "up", "attn-processor"),
    (".lora.down.weight", "down", "diffusers-legacy"),
    (".lora.up.weight", "up", "diffusers-legacy"),
    (".lora_down.weight", "down", "webui"),
    (".lora_up.weight", "up", "webui"),
    (".lora_A.weight", "down", "diffusers"),
    (".lora_B.weight", "up", "diffusers"),
    (".alpha", "alpha", None),
)
LAYOUT_NAMES = {
    "webui": "webui/kohya (lora_down/lora_up)",
    "diffusers": "diffusers/peft (lora_A/lora_B)",
    "diffusers-legacy": "diffusers legacy (lora.down/lora.up, lora_linear_layer)",
    "attn-processor": "diffusers attention-processor (processor.to_q_lora)",
}
# attention-processor names: UNet (diffusers Attention) and text encoder (CLIP attention) projections
_PROCESSOR_UNET = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "to_out": "to_out.0"}
_PROCESSOR_CLIP = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


# ----------------------------------------------------------------------------------------------
# Read
# ----------------------------------------------------------------------------------------------


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    if not path.exists():
        raise LoraError(f"{path}: no such file")
    if path.is_dir():
        raise LoraError(f"{path}: is a folder; give the LoRA .safetensors file inside it")
    if path.suffix.lower() != ".safetensors":
        raise LoraError(
            f"{path}: only .safetensors LoRA files are read (pickled .ckpt/.pt/.bin files can run code when loaded)"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise LoraError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc
    return tensors, metadata


def _family_from_metadata(metadata: dict[str, str]) -> tuple[str | None, str]:
    version = metadata.get("ss_base_model_version", "")
    if version.startswith("sdxl_"):
        return "sdxl", f"metadata ss_base_model_version={version}"
    if version.startswith("sd_v1"):
        return "sd15", f"metadata ss_base_model_version={version}"
    if version.startswith("sd_v2") or metadata.get("ss_v2") == "True":
        return "sd2", "metadata ss_v2/ss_base_model_version"
    arch = metadata.get("modelspec.architecture", "")
    if arch.startswith("stable-diffusion-xl-v1-base"):
        return "sdxl", f"metadata modelspec.architecture={arch}"
    if arch.startswith("stable-diffusion-v1"):
        return "sd15", f"metadata modelspec.architecture={arch}"
    if arch:
        return "other", f"metadata modelspec.architecture={arch}"
    if metadata.get("spo.family") in FAMILIES:
        return metadata["spo.family"], f"metadata spo.family={metadata['spo.family']}"
    return None, ""


def _family_from_names(weights: LoraWeights) -> tuple[str | None, str]:
    if "text_encoder_2" in weights.modules:
        return "sdxl", "it has a second text encoder part (lora_te2_ / text_encoder_2)"
    unet = weights.modules.get("unet", {})
    # SD1.5 has cross-attention in the first down block, SDXL does not; SDXL has 2+ transformer blocks
    first_block = ("down_blocks.0.attentions.", "input_blocks_1_1_", "down_blocks_0_attentions_", "input_blocks.1.1.")
    if any(n.startswith(first_block) for n in unet):
        return "sd15", "its UNet layers (attention in the first down block)"
    if any("transformer_blocks.1." in n or "transformer_blocks_1_" in n for n in unet):
        return "sdxl", "its UNet layers (more than one transformer block per attention)"
    return None, ""


def _classify(path: Path, keys: list[str]) -> dict[str, dict]:
    """`{layer stem: {"layout", "down", "up", "alpha": key}}`; a key outside every layout is an error."""
    layers: dict[str, dict] = collections.defaultdict(dict)
    leftovers = []
    for key in keys:
        for ending, role, layout in _ENDINGS:
            if key.endswith(ending):
                stem = key[: -len(ending)]
                layer = layers[stem]
                if layout is not None:
                    if layer.setdefault("layout", layout) != layout:
                        raise LoraError(f"{path}: layer {stem} mixes {LAYOUT_NAMES[layer['layout']]} and "
                                        f"{LAYOUT_NAMES[layout]} keys")
                layer[role] = key
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise LoraError(f"{path}: keys that are not LoRA weights: {', '.join(leftovers[:5])}"
                        + (f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""))
    alpha_only = [stem for stem, layer in layers.items() if "layout" not in layer]
    if alpha_only:
        raise LoraError(f"{path}: .alpha without LoRA weights for {', '.join(alpha_only[:5])}")
    return layers


def _check_pair(path: Path, key: str, down: torch.Tensor | None, up: torch.Tensor | None) -> None:
    if down is None or up is None:
        missing = "down (lora_down / lora_A / lora.down)" if down is None else "up (lora_up / lora_B / lora.up)"
        raise LoraError(f"{path}: layer {key} has no {missing} weight")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraError(f"{path}: layer {key}: unsupported shapes down {list(down.shape)}, up {list(up.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoraError(
            f"{path}: layer {key}: rank mismatch between down {list(down.shape)} (rank {down.shape[0]}) "
            f"and up {list(up.shape)} (rank {up.shape[1]})"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraError(f"{path}: layer {key}: the up weight of a conv LoRA must be 1x1, got {list(up.shape)}")
    for role, tensor in (("down", down), ("up", up)):
        if not torch.isfinite(tensor).all():
            raise LoraError(f"{path}: layer {key}: the {role} weight holds NaN or infinite values")


def _diffusers_name(path: Path, stem: str, layout: str) -> tuple[str, str]:
    """(component, module name) of a diffusers-family layer stem."""
    component, rest = "unet", stem
    head, _, tail = stem.partition(".")
    if head in COMPONENTS:
        component, rest = head, tail
    elif stem.startswith(("text_model.", "base_model.model.text_model.")):
        component = "text_encoder"
    rest = rest.removeprefix("base_model.model.")
    if not rest:
        raise LoraError(f"{path}: key {stem!r} names no layer")
    if layout == "attn-processor":
        parent, _, proj = rest.replace(".processor.", ".").rpartition(".")
        table = _PROCESSOR_UNET if component == "unet" else _PROCESSOR_CLIP
        if proj not in table:
            raise LoraError(f"{path}: attention-processor key {stem!r}: unknown projection {proj!r} "
                            f"(expected {', '.join(p + '_lora' for p in table)})")
        rest = f"{parent}.{table[proj]}"
    rest = rest.replace(".processor.", ".")
    return component, (rest if component == "unet" else canonical_clip_name(rest))


def _peft_configs(path: Path, metadata: dict[str, str]) -> dict[str, dict]:
    if not metadata.get(DIFFUSERS_METADATA_KEY):
        return {}
    try:
        flat = json.loads(metadata[DIFFUSERS_METADATA_KEY])
    except json.JSONDecodeError as exc:
        raise LoraError(f"{path}: unreadable {DIFFUSERS_METADATA_KEY} metadata ({exc})") from exc
    configs: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field_name = key.partition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def _peft_alpha(config: dict, name: str, component: str, rank: int) -> float:
    """A layer's alpha from a peft config: alpha_pattern, then lora_alpha."""
    short = name[len("text_model."):] if component != "unet" and name.startswith("text_model.") else name
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", short):
            return float(value)
    return float(config.get("lora_alpha", rank))


def parse_layers(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> LoraWeights:
    """The layers of a LoRA file in any layout above, checked (pairs, ranks, finiteness), names not yet matched."""
    layers = _classify(path, list(tensors))
    layouts = collections.Counter(layer["layout"] for layer in layers.values())
    if "webui" in layouts and len(layouts) > 1:
        raise LoraError(f"{path}: mixes webui (lora_down/lora_up) and diffusers "
                        f"({', '.join(sorted(set(layouts) - {'webui'}))}) keys")
    configs = _peft_configs(path, metadata)
    modules: dict[str, dict[str, LoraModule]] = collections.defaultdict(dict)
    no_alpha = 0
    for stem, layer in layers.items():
        down, up = tensors.get(layer.get("down")), tensors.get(layer.get("up"))
        _check_pair(path, stem, down, up)
        if layer["layout"] == "webui":
            prefix = next((p for p in WEBUI_READ_PREFIXES if stem.startswith(p)), None)
            if prefix is None:
                raise LoraError(
                    f"{path}: key {stem!r} has no webui prefix (expected one of {', '.join(WEBUI_READ_PREFIXES)})"
                )
            component, name = WEBUI_READ_PREFIXES[prefix], stem[len(prefix):]
        else:
            component, name = _diffusers_name(path, stem, layer["layout"])
        if "alpha" in layer:
            alpha = tensors[layer["alpha"]].float()
            if alpha.numel() != 1 or not torch.isfinite(alpha).all():
                raise LoraError(f"{path}: layer {stem}: alpha must be one finite number, got {alpha.tolist()}")
            alpha = float(alpha.item())
        elif component in configs:
            alpha = _peft_alpha(configs[component], name, component, rank=int(down.shape[0]))
        else:  # kohya's and diffusers' convention for a missing alpha: alpha = rank (scale 1)
            alpha = float(down.shape[0])
            no_alpha += 1
        if name in modules[component]:
            raise LoraError(f"{path}: two keys name the same layer {component}.{name}")
        modules[component][name] = LoraModule(down, up, alpha)
    if no_alpha:
        logger.info("%s: %d layers store no alpha; alpha = rank for them", path, no_alpha)
    fmt = "webui" if "webui" in layouts else most_common(layouts)
    return LoraWeights(dict(modules), source=str(path), format=fmt, resolved=fmt != "webui")


def read_lora(path: str | Path) -> LoraWeights:
    """Read a LoRA file in any layout above; checks it, does not yet match it to a model.

    Raises `LoraError` for a missing, corrupt or non-LoRA file, an unsupported LoRA variant
    (LoHa, LoKr, DoRA, ...), keys outside every layout, down/up tensors whose ranks disagree,
    NaN or infinite values, or metadata whose model family contradicts the file's layers.
    """
    path = Path(path)
    tensors, metadata = _open(path)
    keys = list(tensors)
    if not keys:
        raise LoraError(f"{path}: not a LoRA: the file holds no tensors")
    for pattern, what in _UNSUPPORTED.items():
        hit = next((k for k in keys if re.search(pattern, k)), None)
        if hit is not None:
            raise LoraError(f"{path}: {what} files are not supported, only plain LoRA (found key {hit!r})")
    if not any(k.endswith(tuple(e for e, _, layout in _ENDINGS if layout)) for k in keys):
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
            raise LoraError(
                f"{path}: not a LoRA: this is a full model checkpoint (it has model.diffusion_model.* weights)"
            )
        raise LoraError(
            f"{path}: not a LoRA: no key of a known LoRA layout ({'; '.join(LAYOUT_NAMES.values())}); "
            f"first keys: {', '.join(keys[:5])}"
        )
    weights = parse_layers(path, tensors, metadata)
    weights.metadata = metadata
    if metadata.get("spo.unet_config"):
        try:
            weights.unet_config = json.loads(metadata["spo.unet_config"])
        except json.JSONDecodeError as exc:
            raise LoraError(f"{path}: unreadable spo.unet_config metadata ({exc})") from exc
    family, evidence = _family_from_metadata(metadata)
    by_names, names_evidence = _family_from_names(weights)
    if family in FAMILIES and "text_encoder_2" in weights.modules and family != by_names:
        raise LoraError(f"{path}: the metadata says {FAMILY_NAMES[family]} ({evidence}), but {names_evidence}, "
                        f"which only SDXL has; the file is mislabelled")
    if family is None:
        family, evidence = by_names, names_evidence
    if family in ("sd2", "other"):
        raise LoraError(f"{path}: this LoRA is for another model ({evidence}); supported: SD1.5 and SDXL")
    weights.family, weights.family_evidence = family, evidence
    return weights


# ----------------------------------------------------------------------------------------------
# Write
# ----------------------------------------------------------------------------------------------


def standard_metadata(weights: LoraWeights, fmt: str) -> dict[str, str]:
    """kohya's `ss_*` and Stability's `modelspec.*` entries (what A1111/ComfyUI/civitai read), plus ours."""
    family = weights.family
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(most_common(weights.ranks())),
        "ss_network_alpha": str(float(most_common(weights.alphas()))),
        "ss_network_args": "{}",
        "ss_base_model_version": BASE_MODEL_VERSION[family],
        "ss_v2": "False",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE[family],
        "modelspec.implementation": "diffusers",
        "modelspec.prediction_type": "epsilon",
        "spo.format": fmt,
        "spo.family": family,
    }


def peft_config_dict(component: str, modules: dict[str, LoraModule]) -> dict:
    """The LoraConfig kwargs that recreate these layers exactly (ranks and alphas per layer).

    Text-encoder names are written without `text_model.`, so they match flattened (transformers 5)
    and non-flattened CLIP models alike (peft matches names by dotted suffix).
    """
    def target(name: str) -> str:
        return name[len("text_model."):] if component != "unet" and name.startswith("text_model.") else name

    ranks = collections.Counter(m.rank for m in modules.values())
    alphas = collections.Counter(m.alpha for m in modules.values())
    r, alpha = most_common(ranks), most_common(alphas)
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(target(n) for n in modules),
        "rank_pattern": {re.escape(target(n)): m.rank for n, m in modules.items() if m.rank != r},
        "alpha_pattern": {re.escape(target(n)): m.alpha for n, m in modules.items() if m.alpha != alpha},
    }


def webui_tensors(weights: LoraWeights, unet_config) -> dict[str, torch.Tensor]:
    names = unet_name_map(unet_config) if "unet" in weights.modules else None
    tensors = {}
    for component, name, module in weights.items():
        prefix = WEBUI_PREFIXES.get((weights.family, component))
        if prefix is None:
            raise LoraError(f"{weights.source}: a {FAMILY_NAMES[weights.family]} LoRA cannot have a {component} part")
        try:
            dotted = names.to_ldm(name) if component == "unet" else name
        except KeyError as exc:
            raise LoraError(
                f"{weights.source}: layer unet.{name} has no LDM name under the UNet config used ({exc}); "
                f"give the config of the UNet the LoRA was made for"
            ) from exc
        key = prefix + dotted.replace(".", "_")
        tensors[f"{key}.lora_down.weight"] = module.down
        tensors[f"{key}.lora_up.weight"] = module.up
        tensors[f"{key}.alpha"] = torch.tensor(float(module.alpha), dtype=torch.float32)
    return tensors


def diffusers_tensors(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, config = {}, {}
    for component in COMPONENTS:
        modules = weights.modules.get(component)
        if not modules:
            continue
        for name, module in modules.items():
            tensors[f"{component}.{name}.lora_A.weight"] = module.down
            tensors[f"{component}.{name}.lora_B.weight"] = module.up
        for key, value in peft_config_dict(component, modules).items():
            config[f"{component}.{key}"] = value
    return tensors, config


def legacy_tensors(weights: LoraWeights) -> dict[str, torch.Tensor]:
    """The official SPO / diffusers-training-script layout. It stores no alpha, so readers take
    alpha = r; the true scale α / r is folded into `up` so that ΔW = up' @ down is unchanged."""
    tensors = {}
    for component, name, module in weights.items():
        kind = "lora" if component == "unet" else "lora_linear_layer"
        tensors[f"{component}.{name}.{kind}.down.weight"] = module.down
        tensors[f"{component}.{name}.{kind}.up.weight"] = module.up.float() * (module.alpha / module.rank)
    return tensors
