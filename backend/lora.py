"""LoRA for SD1.5 and SDXL: attach with peft, save and read the diffusers and webui/kohya formats,
load into a model, convert, merge.

    from spo_studio.backend import lora
    lora.attach_lora(model.unet, "sd15")              # DESIGN §5: r=4 (SDXL 64), alpha=r, to_q/k/v/out.0, gaussian
    ...train...
    weights = lora.extract_lora(model.unet, family="sd15")
    lora.save_lora(weights, "run/lora.safetensors", format="webui", provenance={"method": "spo", "steps": "1000"})
    lora.save_lora(weights, "run/lora_diffusers.safetensors", format="diffusers")

    lora.load_lora(model, "any_lora.safetensors", scale=0.8)    # either format → a peft adapter on the model
    lora.merge_lora(model, "any_lora.safetensors", scale=0.8)   # folded into the base weights

Formats (one `.safetensors` file each):

  webui / kohya — what ComfyUI, A1111 and kohya sd-scripts read:
      lora_unet_<LDM module path, dots → _>.lora_down.weight  [r, in(, kh, kw)]
      lora_unet_<...>.lora_up.weight                          [out, r(, 1, 1)]
      lora_unet_<...>.alpha                                   scalar, the true alpha
      lora_te_<...> (SD1.5) / lora_te1_<...>, lora_te2_<...> (SDXL) for the text encoders
    with kohya's `ss_*` and `modelspec.*` metadata. The effective update is
    ΔW = scale · alpha / r · up @ down. On reading, kohya's diffusers-named variant
    (`lora_unet_down_blocks_0_attentions_0_...`, what sd-scripts writes for SD1.5) is accepted too.

  diffusers / peft — what `pipe.load_lora_weights` reads:
      unet.<diffusers module path>.lora_A.weight / .lora_B.weight
      text_encoder.<...>, text_encoder_2.<...>
    with the peft config (r, lora_alpha, target_modules, rank/alpha patterns) in the
    `lora_adapter_metadata` metadata entry, so alpha ≠ rank survives. A file without that entry
    means alpha = rank (the diffusers/peft convention).

We always write the true alpha (diffusers' own kohya converter assumes alpha = rank) and our
provenance as `spo.*` metadata. Nothing but LoRA tensors goes into a file (diffusers' converter
rejects leftover keys). Every problem with a file raises `LoraError` naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint_io import save_safetensors_atomic
from .ldm_names import canonical_clip_name, unet_name_map

logger = logging.getLogger(__name__)

FAMILIES = ("sd15", "sdxl")
FORMATS = ("webui", "diffusers")
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FAMILY_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}

# DESIGN §5 defaults
DEFAULT_RANK = {"sd15": 4, "sdxl": 64}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
INITS = {"gaussian": "gaussian", "kaiming": True}  # our name → peft's init_lora_weights

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
_GENERATED_METADATA = {
    "format", DIFFUSERS_METADATA_KEY, "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args",
    "ss_base_model_version", "ss_v2", "modelspec.sai_model_spec", "modelspec.architecture",
    "modelspec.implementation", "modelspec.prediction_type", "spo.format", "spo.family", "spo.unet_config",
}
# keys of LoRA variants we do not read (regex searched in each key)
_UNSUPPORTED = {
    r"\.hada_": "LyCORIS LoHa", r"\.lokr_": "LyCORIS LoKr", r"\.lora_mid\.": "LyCORIS LoCon (lora_mid)",
    r"\.dora_scale$": "DoRA", r"\.lora_magnitude_vector": "DoRA", r"\.diff(_b)?$": "LyCORIS full diff",
    r"\.oft_": "OFT", r"_lora\.(down|up)\.weight$": "old diffusers attention-processor LoRA",
}


class LoraError(ValueError):
    """A LoRA file or model that cannot be used; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# The format-independent LoRA
# ----------------------------------------------------------------------------------------------


@dataclass
class LoraModule:
    """One adapted layer: ΔW = alpha / rank · up @ down (times the strength)."""

    down: torch.Tensor  # peft lora_A: [r, in] or [r, in, kh, kw]
    up: torch.Tensor  # peft lora_B: [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float = 1.0) -> torch.Tensor:
        """The weight update ΔW, in float32, shaped like the adapted layer's weight."""
        up = self.up.float().reshape(self.up.shape[0], self.up.shape[1])
        return torch.einsum("or,r...->o...", up, self.down.float()) * (scale * self.alpha / self.rank)


@dataclass
class LoraWeights:
    """A LoRA as `{component: {module name: LoraModule}}`.

    Module names are diffusers names for the UNet and transformers names *with* the `text_model.`
    level for text encoders (`canonical_clip_name`). Read from a webui file, names stay unresolved
    (`resolved=False`: the underscored key after the prefix) until matched against a model or a
    reference UNet config (`resolve_names`).
    """

    modules: dict[str, dict[str, LoraModule]]
    family: str | None = None
    family_evidence: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = "<memory>"
    format: str | None = None
    resolved: bool = True
    unet_config: dict | None = None  # of the UNet the names were taken from or matched to, if known

    def items(self):
        for component in COMPONENTS:
            for name, module in self.modules.get(component, {}).items():
                yield component, name, module

    def __len__(self) -> int:
        return sum(len(m) for m in self.modules.values())

    def ranks(self) -> collections.Counter:
        return collections.Counter(m.rank for _, _, m in self.items())

    def alphas(self) -> collections.Counter:
        return collections.Counter(m.alpha for _, _, m in self.items())


def family_of_unet(unet_or_config) -> str:
    """`sdxl` for a UNet with SDXL's text_time added conditioning, else `sd15`."""
    config = getattr(unet_or_config, "config", unet_or_config)
    return "sdxl" if dict(config).get("addition_embed_type") == "text_time" else "sd15"


def _is_unet(module) -> bool:
    config = getattr(module, "config", None)
    return config is not None and "down_block_types" in config


# ----------------------------------------------------------------------------------------------
# 1. Attach (training)
# ----------------------------------------------------------------------------------------------


def attach_lora(
    module: torch.nn.Module,
    family: str | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    target_modules: list[str] | tuple[str, ...] | None = None,
    init: str = "gaussian",
    adapter_name: str = "default",
):
    """Add a trainable peft LoRA adapter to a UNet or a CLIP text encoder, in place.

    Args:
        module: a diffusers `UNet2DConditionModel` or a transformers CLIP text encoder.
        family (`str`, *optional*): "sd15" or "sdxl", for the default rank; read from a UNet's config
            when omitted; needed for a text encoder unless `rank` is given.
        rank (`int`, *optional*, defaults to 4 for sd15, 64 for sdxl): LoRA rank r.
        alpha (`float`, *optional*, defaults to `rank`): LoRA alpha; the update is scaled by alpha / r.
        target_modules (`list[str]`, *optional*): layer names (suffixes) to adapt; defaults to
            to_q, to_k, to_v, to_out.0 (UNet) or q_proj, k_proj, v_proj, out_proj (text encoder).
        init (`str`, *optional*, defaults to "gaussian"): "gaussian" (A ~ N(0, 1/r), B = 0) or
            "kaiming" (peft's default); both start with ΔW = 0.
        adapter_name (`str`, *optional*, defaults to "default").

    Returns:
        The `peft.LoraConfig` that was applied.
    """
    from peft import LoraConfig

    is_unet = _is_unet(module)
    if family is None and is_unet:
        family = family_of_unet(module)
    if family is not None and family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if rank is None:
        if family is None:
            raise ValueError("attach_lora on a text encoder needs `family` or an explicit `rank`")
        rank = DEFAULT_RANK[family]
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if init not in INITS:
        raise ValueError(f"unknown LoRA init {init!r}; expected one of {sorted(INITS)}")
    targets = list(target_modules or (UNET_TARGETS if is_unet else TEXT_ENCODER_TARGETS))
    config = LoraConfig(
        r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets,
        init_lora_weights=INITS[init],
    )
    if adapter_name in (getattr(module, "peft_config", None) or {}):
        raise ValueError(f"the model already has a LoRA adapter named {adapter_name!r}")
    module.add_adapter(config, adapter_name=adapter_name)
    logger.info("attached LoRA %r (r=%d, alpha=%g, targets=%s) to %s", adapter_name, rank, config.lora_alpha,
                ",".join(targets), type(module).__name__)
    return config


def _lora_layers(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The peft LoRA layers of a model by module name."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def set_lora_scale(modules, scale: float, adapter_name: str = "default") -> None:
    """Set the strength of a peft LoRA adapter: ΔW = scale · alpha / r · B A (1.0 = as trained)."""
    for module in modules if isinstance(modules, (list, tuple)) else [modules]:
        for layer in _lora_layers(module).values():
            layer.set_scale(adapter_name, scale)


def extract_lora(
    unet: torch.nn.Module | None = None,
    text_encoders: list | None = None,
    family: str | None = None,
    adapter_name: str = "default",
) -> LoraWeights:
    """The weights of a peft adapter (rank and the true alpha of every layer), detached, on CPU."""
    if family is None:
        if unet is None:
            raise ValueError("extract_lora needs `family` when no UNet is given")
        family = family_of_unet(unet)
    parts = [("unet", unet)] + list(zip(COMPONENTS[1:], text_encoders or []))
    modules: dict[str, dict[str, LoraModule]] = {}
    for component, model in parts:
        if model is None:
            continue
        found = {}
        for name, layer in _lora_layers(model).items():
            if adapter_name not in layer.lora_A:
                continue
            if layer.use_rslora.get(adapter_name, False):
                raise ValueError(f"{component}.{name}: rank-stabilised LoRA (use_rslora) has no webui equivalent")
            if adapter_name in getattr(layer, "lora_magnitude_vector", {}):
                raise ValueError(f"{component}.{name}: DoRA adapters are not supported")
            key = name if component == "unet" else canonical_clip_name(name)
            found[key] = LoraModule(
                down=layer.lora_A[adapter_name].weight.detach().cpu().clone(),
                up=layer.lora_B[adapter_name].weight.detach().cpu().clone(),
                alpha=float(layer.lora_alpha[adapter_name]),
            )
        if found:
            modules[component] = found
    if not modules:
        raise ValueError(f"no LoRA adapter {adapter_name!r} found on the given model(s)")
    return LoraWeights(
        modules, family=family, family_evidence="the model it was extracted from",
        unet_config=dict(unet.config) if unet is not None else None,
    )


# ----------------------------------------------------------------------------------------------
# 2. Save
# ----------------------------------------------------------------------------------------------


def _most_common(counter: collections.Counter):
    return counter.most_common(1)[0][0]


def _standard_metadata(weights: LoraWeights, fmt: str) -> dict[str, str]:
    """kohya's `ss_*` and Stability's `modelspec.*` entries (what A1111/ComfyUI/civitai read), plus ours."""
    family = weights.family
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(_most_common(weights.ranks())),
        "ss_network_alpha": str(float(_most_common(weights.alphas()))),
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


def _peft_config_dict(component: str, modules: dict[str, LoraModule]) -> dict:
    """The LoraConfig kwargs that recreate these layers exactly (ranks and alphas per layer).

    Text-encoder names are written without `text_model.`, so they match flattened (transformers 5)
    and non-flattened CLIP models alike (peft matches names by dotted suffix).
    """
    def target(name: str) -> str:
        return name[len("text_model."):] if component != "unet" and name.startswith("text_model.") else name

    ranks = collections.Counter(m.rank for m in modules.values())
    alphas = collections.Counter(m.alpha for m in modules.values())
    r, alpha = _most_common(ranks), _most_common(alphas)
    return {
        "r": r,
        "lora_alpha": alpha,
        "target_modules": sorted(target(n) for n in modules),
        "rank_pattern": {re.escape(target(n)): m.rank for n, m in modules.items() if m.rank != r},
        "alpha_pattern": {re.escape(target(n)): m.alpha for n, m in modules.items() if m.alpha != alpha},
    }


def _webui_tensors(weights: LoraWeights, unet_config) -> dict[str, torch.Tensor]:
    names = unet_name_map(unet_config) if "unet" in weights.modules else None
    tensors = {}
    for component, name, module in weights.items():
        prefix = WEBUI_PREFIXES.get((weights.family, component))
        if prefix is None:
            raise ValueError(f"a {weights.family} LoRA cannot have a {component} part")
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


def _diffusers_tensors(weights: LoraWeights) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, config = {}, {}
    for component in COMPONENTS:
        modules = weights.modules.get(component)
        if not modules:
            continue
        for name, module in modules.items():
            tensors[f"{component}.{name}.lora_A.weight"] = module.down
            tensors[f"{component}.{name}.lora_B.weight"] = module.up
        for key, value in _peft_config_dict(component, modules).items():
            config[f"{component}.{key}"] = value
    return tensors, config


def save_lora(
    weights: LoraWeights,
    path: str | Path,
    format: str = "webui",
    dtype: torch.dtype | None = torch.float16,
    provenance: dict | None = None,
    unet_config=None,
) -> Path:
    """Write a LoRA as one `.safetensors` file, atomically.

    Args:
        weights (`LoraWeights`): from `extract_lora` or `read_lora`.
        path (`str | Path`): the output file (`.safetensors`).
        format (`str`, *optional*, defaults to "webui"): "webui" (kohya, LDM names; for ComfyUI and
            A1111) or "diffusers" (peft names; for `pipe.load_lora_weights`).
        dtype (`torch.dtype`, *optional*, defaults to `torch.float16`): of the up/down tensors
            (`None` keeps them); alphas are stored as float32 scalars.
        provenance (`dict`, *optional*): e.g. base_model, method, config_hash, steps; written as
            `spo.<key>` metadata (values become strings).
        unet_config (*optional*): the UNet config for LDM names; defaults to the config of the UNet
            the LoRA was extracted from or matched to, else the family's shipped config.
    """
    path = Path(path)
    if format not in FORMATS:
        raise ValueError(f"unknown LoRA format {format!r}; expected one of {FORMATS}")
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if weights.family not in FAMILIES:
        raise LoraError(f"{weights.source}: the LoRA's family is unknown; say which it is (family='sd15' or 'sdxl')")
    if not len(weights):
        raise LoraError(f"{weights.source}: the LoRA is empty")
    unet_config = unet_config or weights.unet_config
    if not weights.resolved:
        weights = resolve_names(weights, unet_config=unet_config)
        unet_config = weights.unet_config
    if unet_config is None and format == "webui" and "unet" in weights.modules:
        unet_config = _reference_unet_config(weights.family, weights.source)

    metadata = {k: v for k, v in weights.metadata.items() if k not in _GENERATED_METADATA}
    metadata.update(_standard_metadata(weights, format))
    if unet_config is not None:  # lets a later convert name the layers of a non-standard UNet
        metadata["spo.unet_config"] = json.dumps(
            {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}, sort_keys=True
        )
    metadata.setdefault("ss_output_name", path.stem)
    metadata.setdefault("modelspec.title", path.stem)
    metadata.update({f"spo.{k}": str(v) for k, v in (provenance or {}).items()})
    if format == "webui":
        tensors = _webui_tensors(weights, unet_config)
    else:
        tensors, config = _diffusers_tensors(weights)
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    metadata["format"] = "pt"
    tensors = {
        k: v.detach().to("cpu", dtype) if dtype is not None and not k.endswith(".alpha") else v.detach().cpu()
        for k, v in tensors.items()
    }
    logger.info("writing %s LoRA (%s, %d layers, rank %s) to %s", weights.family, format, len(weights),
                metadata["ss_network_dim"], path)
    return save_safetensors_atomic(tensors, path, metadata)


# ----------------------------------------------------------------------------------------------
# 3. Read
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


def read_lora(path: str | Path) -> LoraWeights:
    """Read a LoRA file in either format; checks it, does not yet match it to a model.

    Raises `LoraError` for a missing, corrupt or non-LoRA file, an unsupported LoRA variant
    (LoHa, LoKr, DoRA, ...), keys outside the format, or down/up tensors whose ranks disagree.
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
    is_webui = any(k.endswith((".lora_down.weight", ".lora_up.weight")) for k in keys)
    is_diffusers = any(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    if not (is_webui or is_diffusers):
        if any(k.startswith(("model.diffusion_model.", "first_stage_model.")) for k in keys):
            raise LoraError(
                f"{path}: not a LoRA: this is a full model checkpoint (it has model.diffusion_model.* weights)"
            )
        raise LoraError(
            f"{path}: not a LoRA: no lora_down/lora_up (webui) or lora_A/lora_B (diffusers) tensors "
            f"(first keys: {', '.join(keys[:3])})"
        )
    if is_webui and is_diffusers:
        raise LoraError(f"{path}: mixes webui (lora_down/lora_up) and diffusers (lora_A/lora_B) keys")
    weights = _parse_webui(path, tensors) if is_webui else _parse_diffusers(path, tensors, metadata)
    weights.metadata = metadata
    if metadata.get("spo.unet_config"):
        try:
            weights.unet_config = json.loads(metadata["spo.unet_config"])
        except json.JSONDecodeError as exc:
            raise LoraError(f"{path}: unreadable spo.unet_config metadata ({exc})") from exc
    family, evidence = _family_from_metadata(metadata)
    if family is None:
        family, evidence = _family_from_names(weights)
    if family in ("sd2", "other"):
        raise LoraError(f"{path}: this LoRA is for another model ({evidence}); supported: SD1.5 and SDXL")
    weights.family, weights.family_evidence = family, evidence
    return weights


def _group(path: Path, tensors: dict, suffixes: dict[str, str]) -> dict[str, dict[str, torch.Tensor]]:
    """`{layer key: {"down"|"up"|"alpha": tensor}}`; any other key is an error."""
    layers: dict[str, dict[str, torch.Tensor]] = collections.defaultdict(dict)
    leftovers = []
    for key, value in tensors.items():
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                layers[key[: -len(suffix)]][role] = value
                break
        else:
            leftovers.append(key)
    if leftovers:
        raise LoraError(f"{path}: keys that are not LoRA weights: {', '.join(leftovers[:5])}"
                        + (f" and {len(leftovers) - 5} more" if len(leftovers) > 5 else ""))
    return layers


def _check_pair(path: Path, key: str, parts: dict[str, torch.Tensor]) -> None:
    if "down" not in parts or "up" not in parts:
        missing = "down (lora_down / lora_A)" if "down" not in parts else "up (lora_up / lora_B)"
        raise LoraError(f"{path}: layer {key} has no {missing} weight")
    down, up = parts["down"], parts["up"]
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraError(f"{path}: layer {key}: unsupported shapes down {list(down.shape)}, up {list(up.shape)}")
    if up.shape[1] != down.shape[0]:
        raise LoraError(
            f"{path}: layer {key}: rank mismatch between down {list(down.shape)} (rank {down.shape[0]}) "
            f"and up {list(up.shape)} (rank {up.shape[1]})"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraError(f"{path}: layer {key}: the up weight of a conv LoRA must be 1x1, got {list(up.shape)}")


def _parse_webui(path: Path, tensors: dict) -> LoraWeights:
    layers = _group(path, tensors, {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"})
    modules: dict[str, dict[str, LoraModule]] = collections.defaultdict(dict)
    no_alpha = []
    for key, parts in layers.items():
        prefix = next((p for p in WEBUI_READ_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            raise LoraError(
                f"{path}: key {key!r} has no webui prefix (expected one of {', '.join(WEBUI_READ_PREFIXES)})"
            )
        _check_pair(path, key, parts)
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        else:  # kohya's convention for a missing alpha: alpha = rank (scale 1)
            alpha = float(parts["down"].shape[0])
            no_alpha.append(key)
        modules[WEBUI_READ_PREFIXES[prefix]][key[len(prefix):]] = LoraModule(parts["down"], parts["up"], alpha)
    if no_alpha:
        logger.info("%s: %d layers have no .alpha; alpha = rank for them (kohya convention)", path, len(no_alpha))
    return LoraWeights(dict(modules), source=str(path), format="webui", resolved=False)


def _parse_diffusers(path: Path, tensors: dict, metadata: dict[str, str]) -> LoraWeights:
    layers = _group(path, tensors, {".lora_A.weight": "down", ".lora_B.weight": "up"})
    configs = {}
    if metadata.get(DIFFUSERS_METADATA_KEY):
        try:
            flat = json.loads(metadata[DIFFUSERS_METADATA_KEY])
        except json.JSONDecodeError as exc:
            raise LoraError(f"{path}: unreadable {DIFFUSERS_METADATA_KEY} metadata ({exc})") from exc
        for key, value in flat.items():
            component, _, field_name = key.partition(".")
            configs.setdefault(component, {})[field_name] = value
    modules: dict[str, dict[str, LoraModule]] = collections.defaultdict(dict)
    for key, parts in layers.items():
        component, _, name = key.partition(".")
        if component not in COMPONENTS or not name:
            raise LoraError(
                f"{path}: key {key!r} does not start with a component name ({', '.join(c + '.' for c in COMPONENTS)})"
            )
        _check_pair(path, key, parts)
        if component != "unet":
            name = canonical_clip_name(name)
        alpha = _diffusers_alpha(configs.get(component), name, component, rank=int(parts["down"].shape[0]))
        modules[component][name] = LoraModule(parts["down"], parts["up"], alpha)
    return LoraWeights(dict(modules), source=str(path), format="diffusers")


def _diffusers_alpha(config: dict | None, name: str, component: str, rank: int) -> float:
    """A layer's alpha from a peft config (alpha_pattern, then lora_alpha); alpha = rank without one."""
    if not config:
        return float(rank)
    short = name[len("text_model."):] if component != "unet" and name.startswith("text_model.") else name
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", short):
            return float(value)
    return float(config.get("lora_alpha", rank))


# ----------------------------------------------------------------------------------------------
# Names: webui keys → module names
# ----------------------------------------------------------------------------------------------


def _reference_unet_config(family: str, source: str) -> dict:
    """The shipped UNet config of a family (`backend/model_configs/<family>/unet/config.json`)."""
    try:
        from .model_configs import config_dir

        config_file = Path(config_dir(family)) / "unet" / "config.json"
        return json.loads(config_file.read_text())
    except (ImportError, OSError, json.JSONDecodeError) as exc:
        raise LoraError(
            f"{source}: no shipped {FAMILY_NAMES[family]} UNet config to name the LoRA's layers ({exc}); "
            f"give the UNet config of the base model"
        ) from exc


def _reference_unet_modules(unet_config) -> list[str]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(unet_config))
    return [n for n, m in unet.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _reference_clip_modules(num_layers: int) -> list[str]:
    layers = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"]
    return [f"text_model.encoder.layers.{i}.{layer}" for i in range(num_layers) for layer in layers]


def _lookup_table(component: str, module_names: list[str], unet_config) -> dict[str, str]:
    """Underscored key → module name. For the UNet both LDM and diffusers spellings are entries."""
    table: dict[str, str] = {}

    def add(key: str, name: str) -> None:
        if table.setdefault(key, name) != name:
            raise ValueError(f"ambiguous webui name {key!r}: {table[key]} or {name}")

    if component == "unet":
        names = unet_name_map(unet_config)
        for name in module_names:
            add(name.replace(".", "_"), name)
            try:
                add(names.to_ldm(name).replace(".", "_"), name)
            except KeyError:  # container modules (e.g. "down_blocks.0") have no own LDM name
                pass
    else:
        for name in module_names:
            add(canonical_clip_name(name).replace(".", "_"), canonical_clip_name(name))
    return table


def _unmatched_error(
    weights: LoraWeights, component: str, missing: list[str], target: str, reference: bool = False
) -> LoraError:
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    hint = "; if the LoRA is for a non-standard UNet, give that UNet's config" if reference else ""
    return LoraError(
        f"{weights.source}: {len(missing)} {component} LoRA keys match no layer of {target}: {shown}{hint}"
    )


def resolve_names(
    weights: LoraWeights,
    module_names: dict[str, list[str]] | None = None,
    unet_config=None,
    target: str = "the reference model",
) -> LoraWeights:
    """Match the layers of a LoRA to module names; every key must match.

    Args:
        weights (`LoraWeights`): as read.
        module_names (`dict[str, list[str]]`, *optional*): per component, the module names of the
            model the LoRA is for (canonical names for text encoders). Defaults to a reference
            model built on the meta device from `unet_config` (and 12 / 32 CLIP layers).
        unet_config (*optional*): the UNet config for LDM names; defaults to the family's shipped one.
    """
    if weights.family not in FAMILIES:
        raise LoraError(f"{weights.source}: the LoRA's family is unknown; say which it is (family='sd15' or 'sdxl')")
    unet_config = unet_config or weights.unet_config or _reference_unet_config(weights.family, weights.source)
    reference = module_names is None
    if reference:
        module_names = {
            "unet": _reference_unet_modules(unet_config),
            "text_encoder": _reference_clip_modules(12),
            "text_encoder_2": _reference_clip_modules(32),
        }
    resolved: dict[str, dict[str, LoraModule]] = {}
    for component, modules in weights.modules.items():
        names = module_names.get(component)
        if names is None:
            raise LoraError(f"{weights.source}: the LoRA has a {component} part, but {target} has no {component}")
        if weights.resolved:
            known = set(names) if component == "unet" else {canonical_clip_name(n) for n in names}
            missing = [n for n in modules if n not in known]
            mapping = {n: n for n in modules}
        else:
            table = _lookup_table(component, names, unet_config)
            missing = [k for k in modules if k not in table]
            mapping = {k: table.get(k) for k in modules}
        if missing:
            raise _unmatched_error(weights, component, missing, target, reference)
        out: dict[str, LoraModule] = {}
        for key, module in modules.items():
            name = mapping[key]
            if name in out:
                raise LoraError(f"{weights.source}: two keys name the same layer {component}.{name}")
            out[name] = module
        resolved[component] = out
    return LoraWeights(resolved, weights.family, weights.family_evidence, dict(weights.metadata), weights.source,
                       weights.format, resolved=True, unet_config=dict(unet_config))


# ----------------------------------------------------------------------------------------------
# Matching a LoRA to a model
# ----------------------------------------------------------------------------------------------


def _model_parts(model, text_encoders: list | None = None) -> tuple[str, dict[str, torch.nn.Module]]:
    """(family, {component: module}) from a DiffusionModel-like object or a bare UNet."""
    if hasattr(model, "unet") and hasattr(model, "text_encoders"):
        unet, encoders, family = model.unet, list(model.text_encoders), getattr(model, "family", None)
    else:
        unet, encoders, family = model, list(text_encoders or []), None
    family = family or family_of_unet(unet)
    parts = {"unet": unet}
    parts.update(zip(COMPONENTS[1:], encoders))
    return family, parts


def _plain_modules(module: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Linear/Conv2d layers (and peft LoRA layers, as one layer) by name, peft internals skipped."""
    lora_names = tuple(n + "." for n in _lora_layers(module))
    out = {}
    for name, m in module.named_modules():
        if lora_names and name.startswith(lora_names):
            continue
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) or name + "." in lora_names:
            out[name] = m
    return out


def _match(weights: LoraWeights, family: str, parts: dict[str, torch.nn.Module]):
    """Check family and shapes; returns (resolved weights, {component: {canonical name: (module name, module)}})."""
    if weights.family is not None and weights.family != family:
        raise LoraError(
            f"{weights.source}: this LoRA is for {FAMILY_NAMES.get(weights.family, weights.family)} "
            f"({weights.family_evidence}), but the model is {FAMILY_NAMES[family]}"
        )
    if weights.family is None:
        weights = dataclasses.replace(weights, family=family, family_evidence="assumed: the file does not say")
    layers: dict[str, dict[str, tuple[str, torch.nn.Module]]] = {}
    for component, module in parts.items():
        plain = _plain_modules(module)
        if component == "unet":
            layers[component] = {n: (n, m) for n, m in plain.items()}
        else:
            layers[component] = {canonical_clip_name(n): (n, m) for n, m in plain.items()}
    model_name = f"the {FAMILY_NAMES[family]} model"
    resolved = resolve_names(
        weights, {c: list(v) for c, v in layers.items()}, unet_config=parts["unet"].config, target=model_name
    )
    for component, name, lm in resolved.items():
        _, layer = layers[component][name]
        base = getattr(layer, "base_layer", layer)
        expected = (lm.up.shape[0], *lm.down.shape[1:])
        if tuple(base.weight.shape) != expected:
            raise LoraError(
                f"{weights.source}: layer {component}.{name} is {list(expected)} in the LoRA but "
                f"{list(base.weight.shape)} in {model_name}; the LoRA was made for a different model"
            )
    return resolved, layers


# ----------------------------------------------------------------------------------------------
# 3b. Load into a model (as a peft adapter)
# ----------------------------------------------------------------------------------------------


def load_lora(
    model,
    lora: str | Path | LoraWeights,
    text_encoders: list | None = None,
    adapter_name: str = "default",
    scale: float = 1.0,
) -> LoraWeights:
    """Attach a LoRA file (either format) to a model as a peft adapter, at strength `scale`.

    `model` is a `DiffusionModel` (UNet and text encoders) or a bare UNet (then pass
    `text_encoders` for a LoRA with text-encoder parts). If the model already has an adapter named
    `adapter_name` (e.g. from `attach_lora`, to continue training), the file's weights are copied
    into it; every layer, rank and alpha must then agree. The model is changed in place.
    """
    from peft import LoraConfig

    weights = read_lora(lora) if isinstance(lora, (str, Path)) else lora
    family, parts = _model_parts(model, text_encoders)
    resolved, layers = _match(weights, family, parts)
    for component, modules in resolved.modules.items():
        module = parts[component]
        names = {layers[component][n][0]: lm for n, lm in modules.items()}  # module's own names
        existing = (getattr(module, "peft_config", None) or {}).get(adapter_name)
        if existing is not None:
            _check_existing_adapter(weights, component, module, names, adapter_name)
        else:
            config = _peft_config_dict(component, modules)
            module.add_adapter(LoraConfig(**config, init_lora_weights=False), adapter_name=adapter_name)
        lora_layers = _lora_layers(module)
        with torch.no_grad():
            for name, lm in names.items():
                layer = lora_layers[name]
                if layer.r[adapter_name] != lm.rank or layer.lora_alpha[adapter_name] != lm.alpha:
                    raise RuntimeError(f"peft built {component}.{name} with r={layer.r[adapter_name]}, "
                                       f"alpha={layer.lora_alpha[adapter_name]}; expected {lm.rank}, {lm.alpha}")
                a, b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
                a.copy_(lm.down.to(a.device, a.dtype))
                b.copy_(lm.up.to(b.device, b.dtype))
        set_lora_scale(module, scale, adapter_name)
    logger.info("loaded %s LoRA %s (%d layers) as adapter %r at scale %g", family, weights.source, len(resolved),
                adapter_name, scale)
    return resolved


def _check_existing_adapter(weights, component, module, names: dict[str, LoraModule], adapter_name: str) -> None:
    layers = {n: m for n, m in _lora_layers(module).items() if adapter_name in m.lora_A}
    only_model = sorted(set(layers) - set(names))
    only_file = sorted(set(names) - set(layers))
    if only_file:
        raise _unmatched_error(weights, component, only_file, f"the model's adapter {adapter_name!r}")
    if only_model:
        raise LoraError(
            f"{weights.source}: the model's adapter {adapter_name!r} adapts {len(only_model)} {component} layers "
            f"the file has no weights for: {', '.join(only_model[:5])}"
        )
    for name, lm in names.items():
        r, alpha = layers[name].r[adapter_name], layers[name].lora_alpha[adapter_name]
        if r != lm.rank:
            raise LoraError(
                f"{weights.source}: rank mismatch at {component}.{name}: the file has rank {lm.rank}, "
                f"the model's adapter {adapter_name!r} has rank {r}"
            )
        if float(alpha) != lm.alpha:
            raise LoraError(
                f"{weights.source}: alpha mismatch at {component}.{name}: the file has alpha {lm.alpha:g}, "
                f"the model's adapter {adapter_name!r} has alpha {alpha:g}"
            )


# ----------------------------------------------------------------------------------------------
# Merge
# ----------------------------------------------------------------------------------------------


def merge_lora(
    model,
    lora: str | Path | LoraWeights,
    scale: float = 1.0,
    text_encoders: list | None = None,
) -> LoraWeights:
    """Fold a LoRA into the base weights, in place: W ← W + scale · alpha / r · up @ down.

    The model must not carry peft adapters on the layers the LoRA touches (merge into a plain model).
    """
    weights = read_lora(lora) if isinstance(lora, (str, Path)) else lora
    family, parts = _model_parts(model, text_encoders)
    resolved, layers = _match(weights, family, parts)
    with torch.no_grad():
        for component, name, lm in resolved.items():
            module_name, layer = layers[component][name]
            if hasattr(layer, "base_layer"):
                raise LoraError(
                    f"{weights.source}: {component}.{module_name} has a peft adapter attached; "
                    f"merge into a plain model"
                )
            layer.weight += lm.delta(scale).to(layer.weight.device, layer.weight.dtype)
    logger.info("merged %s LoRA %s (%d layers) at scale %g", family, weights.source, len(resolved), scale)
    return resolved


# ----------------------------------------------------------------------------------------------
# 4. Convert and describe files
# ----------------------------------------------------------------------------------------------


def convert_lora(
    src: str | Path,
    dst: str | Path,
    to: str,
    family: str | None = None,
    unet_config=None,
    dtype: torch.dtype | None = torch.float16,
) -> Path:
    """Rewrite a LoRA file in the other format (`to` = "webui" or "diffusers"); metadata is carried over."""
    weights = read_lora(src)
    if family is not None:
        if weights.family is not None and weights.family != family:
            raise LoraError(
                f"{src}: the file says {FAMILY_NAMES[weights.family]} ({weights.family_evidence}), "
                f"not {FAMILY_NAMES.get(family, family)}"
            )
        weights.family = family
    if weights.family is None:
        raise LoraError(f"{src}: cannot tell whether this LoRA is for SD1.5 or SDXL; pass the family")
    if not weights.resolved:
        weights = resolve_names(weights, unet_config=unet_config)
    return save_lora(weights, dst, format=to, dtype=dtype, unet_config=unet_config)


def _layer_kind(key: str) -> str:
    """A short layer name for summaries: `to_q`, `to_out.0`, `q_proj`, `ff.net.0.proj`, ..."""
    known = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
             "q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "conv1", "conv2", "conv_shortcut",
             "time_emb_proj", "in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection"]
    for kind in sorted(known, key=len, reverse=True):
        if key.endswith("." + kind) or key.endswith("_" + kind.replace(".", "_")):
            return kind
    return key.replace("_", ".").split(".")[-1]


def lora_info(path: str | Path) -> dict:
    """What a LoRA file holds: format, family, ranks, alphas, targets per component, metadata."""
    weights = read_lora(path)
    ranks, alphas = weights.ranks(), weights.alphas()
    return {
        "path": str(path),
        "format": weights.format,
        "family": weights.family or "unknown",
        "family_evidence": weights.family_evidence or "no metadata and no telling layers",
        "layers": len(weights),
        "rank": _most_common(ranks) if len(ranks) == 1 else dict(sorted(ranks.items())),
        "alpha": _most_common(alphas) if len(alphas) == 1 else dict(sorted(alphas.items())),
        "components": {c: len(m) for c, m in weights.modules.items()},
        "targets": {c: sorted({_layer_kind(k) for k in m}) for c, m in weights.modules.items()},
        "metadata": {k: v for k, v in weights.metadata.items() if k != DIFFUSERS_METADATA_KEY},
    }
