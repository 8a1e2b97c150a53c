"""ComfyUI adapters over `backend`. Thin, stateless, V3 schema.

Nodes (category SPO/…): SPO LoRA Loader, SPO Preference Model Loader, SPO Step Scorer, SPO Pool
Preview, SPO Guided Sampler (a SAMPLER for SamplerCustom) and SPO Guided KSampler (one node).

Inside ComfyUI (`comfy_api` importable) the node classes are registered in NODE_CLASS_MAPPINGS —
ComfyUI reads that first and accepts V3 classes there — and `comfy_entrypoint` returns the same
nodes as a `ComfyExtension`. Outside ComfyUI the mappings are empty, so the pack imports cleanly
standalone; the node logic (`run.py`, `sampling.py`, `scoring.py`, …) never imports ComfyUI at
module level.
"""

from __future__ import annotations

import importlib.util

NODE_CLASS_MAPPINGS: dict[str, type] = {}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {}


def _in_comfyui() -> bool:
    try:
        return importlib.util.find_spec("comfy_api.latest") is not None and \
            importlib.util.find_spec("folder_paths") is not None
    except (ImportError, ValueError):
        return False


if _in_comfyui():
    from .nodes import NODES, comfy_entrypoint  # noqa: F401  (ComfyUI's V3 entry point)

    for _node in NODES:
        _schema = _node.define_schema()
        NODE_CLASS_MAPPINGS[_schema.node_id] = _node
        NODE_DISPLAY_NAME_MAPPINGS[_schema.node_id] = _schema.display_name
