"""LoRA for SD1.5 and SDXL: attach with peft, save and read every file layout, load into a model,
convert, merge.

    from spo_studio.backend import lora
    lora.attach_lora(model.unet, "sd15")              # r=4 (SDXL 64), alpha=r, to_q/k/v/out.0, gaussian
    ...train...
    weights = lora.extract_lora(model.unet, family="sd15")
    lora.save_lora(weights, "run/lora.safetensors", format="webui", provenance={"method": "spo", "steps": "1000"})
    lora.save_lora(weights, "run/lora_diffusers.safetensors", format="diffusers")

    lora.load_lora(model, "any_lora.safetensors", scale=0.8)    # any layout → a peft adapter on the model
    lora.merge_lora(model, "any_lora.safetensors", scale=0.8)   # folded into the base weights

The update is ΔW = scale · alpha / r · up @ down. File layouts (webui/kohya, diffusers/peft,
diffusers legacy as the official SPO LoRAs, attention processors) are read and written by
`lora_layouts`; webui names are matched to a model's modules by `lora_names`. We always write the
true alpha (diffusers' own kohya converter assumes alpha = rank) and our provenance as `spo.*`
metadata. Nothing but LoRA tensors goes into a file (diffusers' converter rejects leftover keys).
Every problem with a file raises `LoraError` naming the file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from .checkpoint_io import save_safetensors_atomic
from .ldm_names import canonical_clip_name
from .lora_layouts import (
    DIFFUSERS_METADATA_KEY,
    FORMATS,
    GENERATED_METADATA,
    LAYOUT_NAMES,
    diffusers_tensors,
    legacy_tensors,
    peft_config_dict,
    read_lora,
    standard_metadata,
    webui_tensors,
)
from .lora_names import reference_unet_config, resolve_names, unmatched_error
from .lora_types import (
    COMPONENTS,
    FAMILIES,
    FAMILY_NAMES,
    LoraError,
    LoraModule,
    LoraWeights,
    family_of_unet,
    most_common,
)

__all__ = [
    "COMPONENTS", "DEFAULT_RANK", "FAMILIES", "FAMILY_NAMES", "FORMATS", "LoraError", "LoraModule", "LoraWeights",
    "TEXT_ENCODER_TARGETS", "UNET_TARGETS", "attach_lora", "convert_lora", "extract_lora", "family_of_unet",
    "load_lora", "lora_info", "merge_lora", "read_lora", "resolve_names", "save_lora", "set_lora_scale",
]

logger = logging.getLogger(__name__)

# the paper's LoRA: rank 4 (SD1.5) / 64 (SDXL), alpha = rank, on the attention projections
DEFAULT_RANK = {"sd15": 4, "sdxl": 64}
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
INITS = {"gaussian": "gaussian", "kaiming": True}  # our name → peft's init_lora_weights


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
            A1111), "diffusers" (peft names; for `pipe.load_lora_weights`) or "diffusers-legacy" (the
            official SPO LoRAs' layout, alpha folded into up; loads wherever those do).
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
        unet_config = reference_unet_config(weights.family, weights.source)

    metadata = {k: v for k, v in weights.metadata.items() if k not in GENERATED_METADATA}
    metadata.update(standard_metadata(weights, format))
    if unet_config is not None:  # lets a later convert name the layers of a non-standard UNet
        metadata["spo.unet_config"] = json.dumps(
            {k: v for k, v in dict(unet_config).items() if not k.startswith("_")}, sort_keys=True
        )
    metadata.setdefault("ss_output_name", path.stem)
    metadata.setdefault("modelspec.title", path.stem)
    metadata.update({f"spo.{k}": str(v) for k, v in (provenance or {}).items()})
    if format == "webui":
        tensors = webui_tensors(weights, unet_config)
    elif format == "diffusers":
        tensors, config = diffusers_tensors(weights)
        metadata[DIFFUSERS_METADATA_KEY] = json.dumps(config, indent=2, sort_keys=True)
    else:
        tensors = legacy_tensors(weights)
    metadata["format"] = "pt"
    tensors = {
        k: v.detach().to("cpu", dtype) if dtype is not None and not k.endswith(".alpha") else v.detach().cpu()
        for k, v in tensors.items()
    }
    logger.info("writing %s LoRA (%s, %d layers, rank %s) to %s", weights.family, format, len(weights),
                metadata["ss_network_dim"], path)
    return save_safetensors_atomic(tensors, path, metadata)


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
# 3. Load into a model (as a peft adapter)
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
            config = peft_config_dict(component, modules)
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
        raise unmatched_error(weights, component, only_file, f"the model's adapter {adapter_name!r}")
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
        "layout": LAYOUT_NAMES.get(weights.format, weights.format),
        "family": weights.family or "unknown",
        "family_evidence": weights.family_evidence or "no metadata and no telling layers",
        "layers": len(weights),
        "rank": most_common(ranks) if len(ranks) == 1 else dict(sorted(ranks.items())),
        "alpha": most_common(alphas) if len(alphas) == 1 else dict(sorted(alphas.items())),
        "components": {c: len(m) for c, m in weights.modules.items()},
        "targets": {c: sorted({_layer_kind(k) for k in m}) for c, m in weights.modules.items()},
        "metadata": {k: v for k, v in weights.metadata.items() if k != DIFFUSERS_METADATA_KEY},
    }
