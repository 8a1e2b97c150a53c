"""Writes the example workflows in both ComfyUI formats from one description each.

    python workflows/build_workflows.py --object-info http://127.0.0.1:8188   # a ComfyUI running this pack
    python workflows/build_workflows.py --object-info object_info.json

`<name>.api.json` is the API format (POST /prompt; the end-to-end test runs these) and
`<name>.json` the UI format (drag into ComfyUI). The UI format needs every node's input order,
widget types and outputs, which come from ComfyUI's /object_info.
"""

from __future__ import annotations

import argparse
import json
import logging
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger("build_workflows")
HERE = Path(__file__).resolve().parent

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
LORA_WEBUI = "spo_sd15_lora.safetensors"
LORA_DIFFUSERS = "spo_sd15_lora_diffusers.safetensors"
SPM = "pocket (shipped)"
PROMPT = "a red fox sitting in fresh snow, golden hour, highly detailed photograph"
SEED = 42
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


@dataclass
class Node:
    id: int
    class_type: str
    inputs: dict
    title: str | None = None
    column: int = 0


@dataclass
class Graph:
    name: str
    nodes: list[Node] = field(default_factory=list)

    def add(self, id: int, class_type: str, column: int, title: str | None = None, **inputs) -> int:
        self.nodes.append(Node(id, class_type, inputs, title, column))
        return id


def link(node_id: int, slot: int = 0) -> list:
    return [str(node_id), slot]


def common(g: Graph) -> None:
    """Checkpoint, one prompt node feeding CLIP and the SPM, conditionings, latent, SPM."""
    g.add(1, "CheckpointLoaderSimple", 0, ckpt_name=CHECKPOINT)
    g.add(2, "PrimitiveStringMultiline", 0, "Prompt (CLIP and SPM)", value=PROMPT)
    g.add(3, "CLIPTextEncode", 1, "Positive", text=link(2), clip=link(1, 1))
    g.add(4, "CLIPTextEncode", 1, "Negative (empty, as SPO)", text="", clip=link(1, 1))
    g.add(5, "EmptyLatentImage", 1, width=512, height=512, batch_size=1)
    g.add(6, "SPOPreferenceModelLoader", 0, spm_name=SPM)


def sampling(**extra) -> dict:
    return dict(model=link(1), positive=link(3), negative=link(4), latent_image=link(5), seed=SEED, steps=20,
                cfg=5.0, **extra)


def scoring() -> dict:
    return dict(vae=link(1, 2), spm=link(6), spm_prompt=link(2))


def score_generation() -> Graph:
    g = Graph("spo_score_generation")
    common(g)
    g.add(7, "SPOStepScorer", 2, **sampling(sampler_name="spo_ddim", scheduler="ddim_uniform", denoise=1.0),
          **scoring())
    g.add(8, "VAEDecode", 3, samples=link(7), vae=link(1, 2))
    g.add(9, "SaveImage", 4, images=link(8), filename_prefix="spo/score_generation")
    return g


def inspect_pool() -> Graph:
    g = Graph("spo_inspect_pool")
    common(g)
    g.add(7, "SPOPoolPreview", 2, **sampling(scheduler="ddim_uniform", pool_step=8, k=4, eta=1.0), **scoring())
    g.add(8, "SaveImage", 3, images=link(7), filename_prefix="spo/pool_grid")
    return g


def lora_compare() -> Graph:
    g = Graph("spo_lora_compare")
    common(g)
    g.nodes = [n for n in g.nodes if n.class_type != "SPOPreferenceModelLoader"]

    def branch(first: int, label: str, model, clip) -> None:
        pos = g.add(first, "CLIPTextEncode", 3, f"Positive ({label})", text=link(2), clip=clip)
        neg = g.add(first + 1, "CLIPTextEncode", 3, f"Negative ({label})", text="", clip=clip)
        g.add(first + 2, "KSampler", 4, f"KSampler ({label})", model=model, seed=SEED, steps=20, cfg=5.0,
              sampler_name="euler", scheduler="normal", positive=link(pos), negative=link(neg),
              latent_image=link(5), denoise=1.0)
        g.add(first + 3, "VAEDecode", 5, samples=link(first + 2), vae=link(1, 2))
        g.add(first + 4, "SaveImage", 6, f"{label}", images=link(first + 3), filename_prefix=f"spo/compare_{label}")

    branch(10, "base", link(1), link(1, 1))
    g.add(20, "SPOLoraLoader", 2, "SPO LoRA Loader (webui file)", model=link(1), clip=link(1, 1),
          lora_name=LORA_WEBUI, strength_model=1.0, strength_clip=1.0)
    branch(21, "webui", link(20), link(20, 1))
    g.add(30, "SPOLoraLoader", 2, "SPO LoRA Loader (diffusers file)", model=link(1), clip=link(1, 1),
          lora_name=LORA_DIFFUSERS, strength_model=1.0, strength_clip=1.0)
    branch(31, "diffusers", link(30), link(30, 1))
    g.add(40, "LoraLoader", 2, "ComfyUI's own Load LoRA (webui file)", model=link(1), clip=link(1, 1),
          lora_name=LORA_WEBUI, strength_model=1.0, strength_clip=1.0)
    branch(41, "comfy_loader", link(40), link(40, 1))
    return g


def guided_sampling() -> Graph:
    g = Graph("spo_guided_sampling")
    common(g)
    g.add(7, "SPOGuidedSampler", 2, k=4, eta=1.0, **scoring())
    g.add(8, "BasicScheduler", 2, model=link(1), scheduler="ddim_uniform", steps=20, denoise=1.0)
    g.add(9, "SamplerCustom", 3, model=link(1), add_noise=True, noise_seed=SEED, cfg=5.0, positive=link(3),
          negative=link(4), sampler=link(7), sigmas=link(8), latent_image=link(5))
    g.add(10, "VAEDecode", 4, samples=link(9), vae=link(1, 2))
    g.add(11, "SaveImage", 5, "SamplerCustom + SPO Guided Sampler", images=link(10),
          filename_prefix="spo/guided_samplercustom")
    g.add(12, "SPOGuidedKSampler", 3, **sampling(scheduler="ddim_uniform", k=4, eta=1.0, denoise=1.0), **scoring())
    g.add(13, "VAEDecode", 4, samples=link(12), vae=link(1, 2))
    g.add(14, "SaveImage", 5, "SPO Guided KSampler", images=link(13), filename_prefix="spo/guided_ksampler")
    return g


GRAPHS = [score_generation, inspect_pool, lora_compare, guided_sampling]


# ----------------------------------------------------------------------------------------------
# Formats
# ----------------------------------------------------------------------------------------------


def api_format(g: Graph) -> dict:
    out = {}
    for n in g.nodes:
        out[str(n.id)] = {"class_type": n.class_type, "inputs": dict(n.inputs),
                          "_meta": {"title": n.title or n.class_type}}
    return out


def _input_spec(info: dict, name: str):
    for section in ("required", "optional"):
        if name in info["input"].get(section, {}):
            return info["input"][section][name]
    raise KeyError(name)


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def ui_format(g: Graph, object_info: dict) -> dict:
    """The frontend's workflow JSON (version 0.4): nodes with widgets_values, links by id."""
    links, nodes = [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    rows: dict[int, int] = {}
    order = {n.id: i for i, n in enumerate(g.nodes)}
    for n in g.nodes:
        info = object_info.get(n.class_type)
        if info is None:
            raise KeyError(f"{g.name}: {n.class_type} is not in /object_info (is the pack loaded?)")
        names = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
        unknown = set(n.inputs) - set(names)
        if unknown:
            raise KeyError(f"{g.name}: {n.class_type} has no inputs {sorted(unknown)}")
        inputs, widgets = [], []
        for name in names:
            spec = _input_spec(info, name)
            value = n.inputs.get(name)
            linked = isinstance(value, list)
            if linked:
                link_id = len(links) + 1
                src, slot = int(value[0]), value[1]
                src_info = object_info[next(m.class_type for m in g.nodes if m.id == src)]
                links.append([link_id, src, slot, n.id, len(inputs), src_info["output"][slot]])
                out_links.setdefault((src, slot), []).append(link_id)
                entry = {"name": name, "type": "COMBO" if isinstance(spec[0], list) else spec[0], "link": link_id}
                if _is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
            elif not _is_widget(spec):
                if name in info["input_order"].get("required", []):
                    raise ValueError(f"{g.name}: {n.class_type}.{name} ({spec[0]}) must be linked")
                inputs.append({"name": name, "type": spec[0], "link": None})
            if _is_widget(spec):
                default = spec[1].get("default", "") if len(spec) > 1 else ""
                widgets.append(value if not linked and value is not None else ("" if linked else default))
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
        column_row = rows.get(n.column, 0)
        rows[n.column] = column_row + 1
        outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                   for i, (kind, name) in enumerate(zip(info["output"], info["output_name"]))]
        height = 90 + 26 * (len(widgets) + len(inputs))
        node = {"id": n.id, "type": n.class_type, "pos": [40 + 380 * n.column, 40 + 10 + column_row * 300],
                "size": [340, min(height, 520)], "flags": {}, "order": order[n.id], "mode": 0, "inputs": inputs,
                "outputs": outputs, "properties": {"Node name for S&R": n.class_type}, "widgets_values": widgets}
        if n.title:
            node["title"] = n.title
        nodes.append(node)
    for node in nodes:
        for i, out in enumerate(node["outputs"]):
            out["links"] = out_links.get((node["id"], i), [])
    workflow_id = str(uuid.uuid5(uuid.NAMESPACE_URL, f"spo-studio/workflows/{g.name}"))
    return {"id": workflow_id, "revision": 0, "last_node_id": max(n.id for n in g.nodes),
            "last_link_id": len(links), "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def load_object_info(source: str) -> dict:
    if source.startswith("http"):
        with urllib.request.urlopen(source.rstrip("/") + "/object_info", timeout=60) as r:
            return json.loads(r.read())
    return json.loads(Path(source).read_text())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--object-info", required=True, help="URL of a ComfyUI with this pack, or a saved "
                                                             "/object_info JSON file")
    parser.add_argument("--out", default=str(HERE), help="output folder (default: this folder)")
    args = parser.parse_args()
    info = load_object_info(args.object_info)
    out = Path(args.out)
    for make in GRAPHS:
        g = make()
        (out / f"{g.name}.api.json").write_text(json.dumps(api_format(g), indent=2) + "\n")
        (out / f"{g.name}.json").write_text(json.dumps(ui_format(g, info), indent=2) + "\n")
        logger.info("wrote %s(.api).json", g.name)


if __name__ == "__main__":
    main()
