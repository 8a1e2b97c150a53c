"""End to end in a real ComfyUI: start it on the CPU with this pack, POST every API workflow in
workflows/, check the results over /history and /view, and that ComfyUI loaded every key of our
LoRA files (no "lora key not loaded" lines).

    COMFYUI_DIR=/path/to/ComfyUI [COMFYUI_PYTHON=/path/to/python] pytest tests/test_comfyui_e2e.py -m comfyui

Skipped unless COMFYUI_DIR names a ComfyUI checkout. The interpreter (COMFYUI_PYTHON, default
this one) needs ComfyUI's requirements; if it has no importable torchvision (none works with the
CPU torch here), a `sitecustomize.py` on ComfyUI's PYTHONPATH for this run puts a stand-in
torchvision that fails only when used into sys.modules — SD1.5 never calls torchvision.
Everything the workflows load is written at test time into a temporary folder passed with
--extra-model-paths-config: a tiny random SD1.5-detectable checkpoint
(UNet 320 channels / one level / context 768; full-size VAE and CLIP-L, as ComfyUI builds those
from fixed configs), one random LoRA in both file formats, and a tiny random SPM.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / "workflows"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")

pytestmark = [
    pytest.mark.comfyui,
    pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the end-to-end test"),
]

CKPT = "spo_tiny_sd15.safetensors"
LORA_WEBUI = "spo_tiny_lora_webui.safetensors"
LORA_DIFFUSERS = "spo_tiny_lora_diffusers.safetensors"
LORA_OFFICIAL = "spo_tiny_lora_official_layout.safetensors"  # unet.<path>.lora.down.weight, as the SPO release
OFFICIAL_SPM = "official/sd-v1-5_step-aware_preference_model.bin"
SPM = "spo_tiny_spm"
TORCHVISION_STUB = '''"""Test-only (tests/test_comfyui_e2e.py): ComfyUI imports torchvision at start-up, SD1.5 never
uses it, and no torchvision works with the CPU torch here. A stand-in module that fails when used is
put into sys.modules after transformers and diffusers have recorded torchvision as absent, so they
keep their PIL code paths."""
import importlib.abc
import importlib.machinery
import sys
import types

try:
    import torchvision  # noqa: F401  (a working one wins)
except Exception:
    try:
        from transformers.utils import import_utils as _transformers_imports
        _transformers_imports.is_torchvision_available()
        import diffusers.utils.import_utils  # noqa: F401
    except Exception:
        pass

    class _Missing:
        def __init__(self, name):
            self._name = name

        def __getattr__(self, item):
            if item.startswith("__"):
                raise AttributeError(item)
            return _Missing(self._name + "." + item)

        def __call__(self, *args, **kwargs):
            raise RuntimeError(self._name + ": torchvision is a stand-in in this test run")

    class _StandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
        """Serves torchvision and every torchvision.* submodule as a stand-in."""

        def find_spec(self, name, path=None, target=None):
            if name == "torchvision" or name.startswith("torchvision."):
                return importlib.machinery.ModuleSpec(name, self, is_package=True)
            return None

        def create_module(self, spec):
            module = types.ModuleType(spec.name)
            module.__path__ = []

            def missing(item):
                if item.startswith("__"):
                    raise AttributeError(item)
                return _Missing(spec.name + "." + item)

            module.__getattr__ = missing
            return module

        def exec_module(self, module):
            pass

    sys.meta_path.insert(0, _StandIn())
'''


# ----------------------------------------------------------------------------------------------
# Test assets
# ----------------------------------------------------------------------------------------------


def build_assets(root: Path) -> None:
    """Checkpoint, LoRAs (our two formats, the official SPO layout) and SPMs (ours, an official file beside
    its CLIP folder) under root/models, plus the pack under root/custom_nodes."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from spo_studio.backend import lora
    from spo_studio.backend.checkpoint_io import save_single_file
    from spo_studio.backend.model_configs import config_dir
    from spo_studio.backend.preference.spm import StepAwarePreferenceModel, pocket_clip_config
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = config_dir("sd15")
    models = root / "models"
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(320,),
        down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
        cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
    ).eval()
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(cfg / "vae")).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder")).eval()
    save_single_file(unet, vae, [text_encoder], "sd15", models / "checkpoints" / CKPT)

    lora.attach_lora(unet, "sd15")
    lora.attach_lora(text_encoder, "sd15")
    with torch.no_grad():
        for name, p in [*unet.named_parameters(), *text_encoder.named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, 0.05)
    weights = lora.extract_lora(unet, [text_encoder], family="sd15")
    lora.save_lora(weights, models / "loras" / LORA_WEBUI, format="webui")
    lora.save_lora(weights, models / "loras" / LORA_DIFFUSERS, format="diffusers")
    # the official SPO LoRAs' layout, written by diffusers' own converter and saver as the SPO code does
    official = models / "loras" / "official"
    StableDiffusionPipeline.save_lora_weights(
        official, unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)))
    (official / "pytorch_lora_weights.safetensors").rename(models / "loras" / LORA_OFFICIAL)
    official.rmdir()

    tok = CLIPTokenizer.from_pretrained(cfg / "tokenizer")
    clip_config: CLIPConfig = pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                                 tok.model_max_length, image_size=32)
    spm = StepAwarePreferenceModel(CLIPModel(clip_config), tok)
    with torch.no_grad():
        for p in spm.time.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spm.save(models / "spo_preference" / SPM)
    from tiny_models import save_official_spm

    (models / "spo_preference" / "official").mkdir()
    save_official_spm(models / "spo_preference" / "official", tok, image_size=32)

    (root / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (root / "custom_nodes" / "ComfyUI-SPO").symlink_to(ROOT, target_is_directory=True)
    (root / "extra_model_paths.yaml").write_text(
        "spo_e2e:\n"
        f"  base_path: {root}\n"
        "  checkpoints: models/checkpoints\n"
        "  loras: models/loras\n"
        "  spo_preference: models/spo_preference\n"
        "  custom_nodes: custom_nodes\n"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _has_torchvision(python: str) -> bool:
    return subprocess.run([python, "-c", "import torchvision"], capture_output=True).returncode == 0


class ComfyServer:
    def __init__(self, root: Path):
        self.root = root
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = root / "comfyui.log"
        self.client_id = uuid.uuid4().hex
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("COMFYUI_DIR", None)
        if not _has_torchvision(python):
            (root / "stubs").mkdir(exist_ok=True)
            (root / "stubs" / "sitecustomize.py").write_text(TORCHVISION_STUB)
            env["PYTHONPATH"] = os.pathsep.join([str(root / "stubs"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        for d in ("output", "temp", "input"):
            (root / d).mkdir(exist_ok=True)
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--extra-model-paths-config", str(root / "extra_model_paths.yaml"),
               "--output-directory", str(root / "output"), "--temp-directory", str(root / "temp"),
               "--input-directory", str(root / "input"), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=COMFYUI_DIR, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, payload: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"POST {path} -> {exc.code}: {exc.read().decode()[:2000]}") from exc

    def wait_ready(self, timeout: float = 180.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                self.get("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        raise AssertionError(f"ComfyUI did not start in {timeout:.0f} s:\n{self.log_text()[-4000:]}")

    def run_prompt(self, prompt: dict, timeout: float = 600.0) -> dict:
        pid = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{pid}")
            if pid in history and history[pid].get("status", {}).get("completed") is not None:
                entry = history[pid]
                if entry["status"].get("status_str") == "error" or not entry["status"]["completed"]:
                    raise AssertionError(f"prompt failed: {json.dumps(entry['status'])[:3000]}\n"
                                         f"{self.log_text()[-3000:]}")
                return entry
            time.sleep(0.5)
        raise AssertionError(f"prompt {pid} did not finish in {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def view(self, image: dict) -> bytes:
        query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
        return self.get(f"/view?{query}", raw=True)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("comfyui_e2e")
    build_assets(root)
    srv = ComfyServer(root)
    try:
        srv.wait_ready()
        yield srv
    finally:
        srv.stop()


# ----------------------------------------------------------------------------------------------
# Workflows, shrunk for a CPU run
# ----------------------------------------------------------------------------------------------

SMALL = {"width": 64, "height": 64, "batch_size": 1, "steps": 4, "pool_step": 1}


def shrink(prompt: dict) -> dict:
    """The prompt, in place, at a small size with few steps."""
    for node in prompt.values():
        inputs = node["inputs"]
        for key, value in SMALL.items():
            if key in inputs and not isinstance(inputs[key], list):
                inputs[key] = value
    return prompt


def load_api_workflow(name: str) -> dict:
    """An API workflow with our test assets' names and a small size, few steps."""
    prompt = shrink(json.loads((WORKFLOWS / f"{name}.api.json").read_text()))
    for node in prompt.values():
        inputs = node["inputs"]
        if "ckpt_name" in inputs:
            inputs["ckpt_name"] = CKPT
        if "lora_name" in inputs:
            inputs["lora_name"] = LORA_DIFFUSERS if "diffusers" in inputs["lora_name"] else LORA_WEBUI
        if "spm_name" in inputs:
            inputs["spm_name"] = SPM
    return prompt


def _images(entry: dict, node_id: str) -> list[dict]:
    return entry["outputs"].get(node_id, {}).get("images", [])


def _by_class(prompt: dict, class_type: str) -> list[str]:
    return [i for i, n in prompt.items() if n["class_type"] == class_type]


API_WORKFLOWS = sorted(p.name[: -len(".api.json")] for p in WORKFLOWS.glob("*.api.json"))


def test_pack_loaded(server):
    info = server.get("/object_info")
    for node in ("SPOLoraLoader", "SPOPreferenceModelLoader", "SPOStepScorer", "SPOPoolPreview",
                 "SPOGuidedSampler", "SPOGuidedKSampler"):
        assert node in info, f"{node} missing from /object_info"
        assert info[node]["category"].startswith("SPO/")
    spm_options = info["SPOPreferenceModelLoader"]["input"]["required"]["spm_name"][1]["options"]
    assert "pocket (shipped)" in spm_options and SPM in spm_options


@pytest.mark.parametrize("name", API_WORKFLOWS)
def test_api_workflow_runs(server, name):
    prompt = load_api_workflow(name)
    entry = server.run_prompt(prompt)
    saved = [img for node_id in prompt for img in _images(entry, node_id)]
    assert saved, f"{name}: no images in /history outputs"
    pngs = {}
    for img in saved:
        data = server.view(img)
        assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{name}: /view did not return a PNG for {img}"
        pngs[img["filename"]] = data

    for node_id in _by_class(prompt, "SPOStepScorer"):
        out = entry["outputs"][node_id]
        trace = out["spo_trace"][0]
        steps = prompt[node_id]["inputs"]["steps"]
        assert len(trace["scores"]) == steps and len(trace["timesteps"]) == steps
        assert trace["timesteps"] == sorted(trace["timesteps"], reverse=True)
        assert all(isinstance(s[0], float) for s in trace["scores"])
        assert len(out["images"]) == 2  # score plot and x̂0 strip
    for node_id in _by_class(prompt, "SPOPoolPreview"):
        pool = entry["outputs"][node_id]["spo_pool"][0]
        k = prompt[node_id]["inputs"]["k"]
        assert len(pool["scores"][0]) == k and pool["winner"][0] != pool["loser"][0]
    if name == "spo_lora_compare":
        by_prefix = {}
        for node_id in _by_class(prompt, "SaveImage"):
            prefix = prompt[node_id]["inputs"]["filename_prefix"]
            by_prefix[prefix] = server.view(_images(entry, node_id)[0])
        base = next(v for k, v in by_prefix.items() if k.endswith("base"))
        webui = next(v for k, v in by_prefix.items() if k.endswith("webui"))
        diffusers = next(v for k, v in by_prefix.items() if k.endswith("diffusers"))
        assert webui != base, "the LoRA changed nothing"
        assert webui == diffusers, "the same LoRA in webui and diffusers format must give the same image"
        if any(k.endswith("comfy_loader") for k in by_prefix):
            assert by_prefix[next(k for k in by_prefix if k.endswith("comfy_loader"))] == webui
    if name == "spo_guided_sampling":
        images = [server.view(_images(entry, i)[0]) for i in _by_class(prompt, "SaveImage")]
        assert len(images) == 2 and images[0] == images[1], \
            "SamplerCustom + SPO Guided Sampler and SPO Guided KSampler must agree for the same seed"


def test_fast_decode_step_scorer_runs(server):
    """The SPM Loader's decode = fast through a real ComfyUI VAE (integer downscale ratio)."""
    prompt = load_api_workflow("spo_score_generation")
    loaders = _by_class(prompt, "SPOPreferenceModelLoader")
    assert loaders
    for node_id in loaders:
        prompt[node_id]["inputs"]["decode"] = "fast"
    entry = server.run_prompt(prompt)
    for node_id in _by_class(prompt, "SPOStepScorer"):
        trace = entry["outputs"][node_id]["spo_trace"][0]
        assert len(trace["scores"]) == prompt[node_id]["inputs"]["steps"]
        assert all(math.isfinite(s[0]) for s in trace["scores"])


def test_no_lora_key_warnings(server):
    for name in API_WORKFLOWS:  # make sure every LoRA workflow ran in this server, even when run alone
        if any(n["class_type"] in ("SPOLoraLoader", "LoraLoader") for n in load_api_workflow(name).values()):
            server.run_prompt(load_api_workflow(name))
    log = server.log_text()
    assert "lora key not loaded" not in log, [ln for ln in log.splitlines() if "lora key not loaded" in ln][:5]
    assert "NOT LOADED" not in log
    assert "SPO LoRA Loader" in log  # our loader did run
    assert "IMPORT FAILED" not in "\n".join(ln for ln in log.splitlines() if "SPO" in ln)


def test_official_layout_lora_through_spo_loader(server):
    """The official SPO LoRA layout in the SPO LoRA Loader: every key loaded, and it changes the image."""
    prompt = load_api_workflow("spo_lora_compare")
    loaders = {prompt[i]["inputs"]["lora_name"]: i for i in _by_class(prompt, "SPOLoraLoader")}
    full, zero = loaders[LORA_WEBUI], loaders[LORA_DIFFUSERS]
    for node_id in (full, zero):
        prompt[node_id]["inputs"]["lora_name"] = LORA_OFFICIAL
    prompt[zero]["inputs"].update(strength_model=0.0, strength_clip=0.0)
    start = len(server.log_text())
    entry = server.run_prompt(prompt)
    by_prefix = {prompt[i]["inputs"]["filename_prefix"].rsplit("_", 1)[-1]: server.view(_images(entry, i)[0])
                 for i in _by_class(prompt, "SaveImage")}
    assert by_prefix["webui"] != by_prefix["diffusers"], "the official-layout LoRA at strength 1 = at strength 0"
    log = server.log_text()[start:]
    assert "lora key not loaded" not in log and LORA_OFFICIAL in log


def test_official_spm_file_in_the_preference_loader(server):
    """An official SPO .bin dropped into models/spo_preference beside its CLIP folder scores every step."""
    info = server.get("/object_info/SPOPreferenceModelLoader")
    assert OFFICIAL_SPM in info["SPOPreferenceModelLoader"]["input"]["required"]["spm_name"][1]["options"]
    prompt = load_api_workflow("spo_score_generation")
    for node_id in _by_class(prompt, "SPOPreferenceModelLoader"):
        prompt[node_id]["inputs"]["spm_name"] = OFFICIAL_SPM
    entry = server.run_prompt(prompt)
    for node_id in _by_class(prompt, "SPOStepScorer"):
        trace = entry["outputs"][node_id]["spo_trace"][0]
        assert len(trace["scores"]) == prompt[node_id]["inputs"]["steps"]
        assert all(math.isfinite(s[0]) for s in trace["scores"])
