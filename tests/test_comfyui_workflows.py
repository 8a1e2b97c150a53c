"""The example workflows as a user opens them: each UI-format file in workflows/ (`<name>.json`, what
one drags onto ComfyUI's canvas) is turned into a prompt the way ComfyUI's frontend does it
(widgets_values matched to the node's widget inputs in /object_info order, a seed's "control after
generate" value skipped, links replacing widget values), then

  * compared with its API-format twin (`<name>.api.json`, which the end-to-end test runs), and
  * POSTed to a real ComfyUI with this pack and run to the end, every SaveImage giving a PNG.

The model file names stay as the workflows ship them: the tiny checkpoint and LoRA that
tests/test_comfyui_e2e.py builds are also linked under the workflows' own names. Only image size,
batch size and step counts are shrunk for the CPU.

    COMFYUI_DIR=/path/to/ComfyUI pytest tests/test_comfyui_workflows.py    # see docs/testing.md

Skipped unless COMFYUI_DIR names a ComfyUI checkout, like the end-to-end test.
"""

from __future__ import annotations

import json
import os

import pytest
from test_comfyui_e2e import (
    CKPT,
    COMFYUI_DIR,
    LORA_DIFFUSERS,
    LORA_WEBUI,
    SPM,
    WORKFLOWS,
    server,  # noqa: F401  (the module-scoped ComfyUI fixture; this module gets its own server)
    shrink,
)

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the workflow tests"),
]

UI_WORKFLOWS = sorted(p.name[: -len(".json")] for p in WORKFLOWS.glob("*.json") if not p.name.endswith(".api.json"))
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
# input name -> (model folder, the tiny file that stands in for any name there)
MODEL_INPUTS = {
    "ckpt_name": ("checkpoints", lambda name: CKPT),
    "lora_name": ("loras", lambda name: LORA_DIFFUSERS if "diffusers" in name else LORA_WEBUI),
    "spm_name": ("spo_preference", lambda name: SPM),
}


def _specs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of a node's inputs in the order the frontend creates its widgets."""
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
    return [(name, specs[name]) for name in order]


def _is_widget(spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not options.get("forceInput")


def _has_control_widget(name: str, spec: list) -> bool:
    """The frontend gives these a second widget ("fixed", "randomize", ...) that the backend never sees."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return bool(options.get("control_after_generate")) or name in ("seed", "noise_seed")


def _combo_options(spec: list) -> list:
    return spec[0] if isinstance(spec[0], list) else spec[1].get("options", [])


def _widget_default(spec: list):
    """The value the frontend gives a new widget."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list) or spec[0] == "COMBO":
        return (_combo_options(spec) or [None])[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[spec[0]]


def ui_to_prompt(workflow: dict, object_info: dict, label: str) -> dict:
    """A UI-format workflow as the API prompt ComfyUI's frontend would POST."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        where = f"{label}: node {node['id']} ({node['type']})"
        assert node.get("mode", 0) == 0, f"{where} is muted or bypassed; the example workflows run every node"
        info = object_info.get(node["type"])
        assert info is not None, f"{where} is not a node of this ComfyUI (frontend-only, or the pack not loaded)"
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in _specs(info):
            if not _is_widget(spec):
                continue
            # Like the frontend, a widget past the end of widgets_values (one the node gained after
            # the file was written) keeps its default.
            inputs[name] = values.pop(0) if values else _widget_default(spec)
            if _has_control_widget(name, spec) and values:
                values.pop(0)
        assert not values, f"{where}: widgets_values has {len(values)} values more than the node has widgets"
        for entry in node.get("inputs", []):
            if entry.get("link") is not None:
                _, source, slot, target, _, _ = links[entry["link"]]
                assert target == node["id"], f"{where}: link {entry['link']} ends at node {target}"
                inputs[entry["name"]] = [str(source), slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def load_ui_workflow(srv, name: str) -> dict:
    """workflows/<name>.json as the prompt the frontend would POST to `srv`."""
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text())
    return ui_to_prompt(workflow, srv.get("/object_info"), f"{name}.json")


@pytest.fixture(scope="module")
def workflow_server(server):  # noqa: F811
    """The ComfyUI server, with the tiny models also under every file name the workflows use."""
    object_info = server.get("/object_info")
    models = server.root / "models"
    for name in UI_WORKFLOWS:
        for node in load_ui_workflow(server, name).values():
            spec = dict(_specs(object_info[node["class_type"]]))
            for key, (folder, stand_in) in MODEL_INPUTS.items():
                wanted = node["inputs"].get(key)
                if not isinstance(wanted, str) or wanted in _combo_options(spec[key]):
                    continue
                alias = models / folder / wanted
                if not alias.exists():
                    alias.parent.mkdir(parents=True, exist_ok=True)
                    os.symlink(models / folder / stand_in(wanted), alias)
    return server


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_matches_api_workflow(workflow_server, name):
    """What a user opens (the UI file) is what the end-to-end test runs (the API file)."""
    object_info = workflow_server.get("/object_info")
    ui = load_ui_workflow(workflow_server, name)
    api = json.loads((WORKFLOWS / f"{name}.api.json").read_text())
    assert sorted(ui) == sorted(api), f"{name}: the two formats have different nodes"
    for node_id, node in ui.items():
        assert node["class_type"] == api[node_id]["class_type"], f"{name}: node {node_id}"
        info = object_info[node["class_type"]]
        api_inputs = api[node_id]["inputs"]
        for key in set(node["inputs"]) | set(api_inputs):
            expected = api_inputs[key] if key in api_inputs else _widget_default(dict(_specs(info))[key])
            assert node["inputs"].get(key) == expected, f"{name}: node {node_id} ({node['class_type']}).{key}"


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_ui_workflow_runs(workflow_server, name):
    prompt = shrink(load_ui_workflow(workflow_server, name))
    for node in prompt.values():  # the workflows' own model names, untouched
        for key in MODEL_INPUTS:
            assert not str(node["inputs"].get(key, "")).startswith("spo_tiny"), node
    entry = workflow_server.run_prompt(prompt)
    save_nodes = [i for i, n in prompt.items() if n["class_type"] == "SaveImage"]
    assert save_nodes, f"{name}: no SaveImage node"
    for node_id in save_nodes:
        images = entry["outputs"].get(node_id, {}).get("images", [])
        assert images, f"{name}: SaveImage node {node_id} saved nothing"
        for image in images:
            assert workflow_server.view(image)[:8] == b"\x89PNG\r\n\x1a\n", f"{name}: {image} is not a PNG"
    for node_id, node in prompt.items():
        if node["class_type"] == "SPOStepScorer":
            assert len(entry["outputs"][node_id]["spo_trace"][0]["scores"]) == node["inputs"]["steps"]
        if node["class_type"] == "SPOPoolPreview":
            assert len(entry["outputs"][node_id]["spo_pool"][0]["scores"][0]) == node["inputs"]["k"]
