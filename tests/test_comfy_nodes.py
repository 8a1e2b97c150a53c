"""The ComfyUI nodes' logic, with stand-ins for ComfyUI's objects (`comfyui_nodes.standalone`).

The Step Scorer's per-step scores must equal the backend's own trajectory scores
(`score_trajectory`) for the same model, seed and a matching sampler (spo_ddim + ddim_uniform is
SPO's DDIM-η=1 on the "leading" grid). The real-ComfyUI run is tests/test_comfyui_e2e.py.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from spo_studio.backend import diffusion
from spo_studio.backend.ldm_names import unet_name_map
from spo_studio.backend.lora import LoraError, attach_lora, extract_lora, read_lora, save_lora
from spo_studio.backend.models import load_model
from spo_studio.backend.preference.evaluate import score_trajectory
from spo_studio.backend.preference.scoring import Scorer
from spo_studio.comfyui_nodes import lora_loader, run, sampling, scoring, spm_loader, standalone
from spo_studio.comfyui_nodes.scoring import LatentJudge

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle"


@pytest.fixture(scope="module")
def tiny(tiny_dirs, tiny_spm):
    model = load_model(tiny_dirs["sd15"], device="cpu")
    scorer = Scorer.from_path(tiny_spm)
    patcher, vae = standalone.wrap(model)
    return {"model": model, "scorer": scorer, "patcher": patcher, "vae": vae,
            "positive": standalone.encode(patcher, PROMPT), "negative": standalone.encode(patcher, "")}


def _scorer_run(tiny, seed=7, steps=10, overlap=False, runtime=None):
    rt = runtime or standalone.StandaloneRuntime(overlap=overlap)
    out = run.run_step_scorer(rt, tiny["patcher"], tiny["positive"], tiny["negative"],
                              standalone.empty_latent(tiny["patcher"]), tiny["vae"], tiny["scorer"], PROMPT, seed,
                              steps, 5.0, "spo_ddim", "ddim_uniform")
    return rt, out


# ----------------------------------------------------------------------------------------------
# Step Scorer = backend trajectory scores
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True])
def test_step_scorer_matches_backend_trajectory_scores(tiny, overlap):
    ref = score_trajectory(tiny["model"], tiny["scorer"], PROMPT, seed=7, num_steps=10, cfg_scale=5.0, eta=1.0)
    rt, (latent, plot, strip, trace) = _scorer_run(tiny, overlap=overlap)
    assert trace.timesteps == ref["timesteps"] == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    ours = torch.tensor([s[0] for s in trace.scores])
    assert torch.allclose(ours, torch.tensor(ref["scores"]), atol=1e-4, rtol=1e-4), (ours, ref["scores"])
    assert ours.std() > 1e-3, "scores should vary over the trajectory"
    # the thumbnails are the same decoded x̂0 the backend shows
    assert trace.thumbnails.shape[:2] == (10, 1)
    assert torch.allclose(trace.thumbnails[:, 0], ref["thumbnails"], atol=1e-4)
    # outputs: a latent as KSampler returns it, two IMAGEs, live progress and one message per step
    assert latent["samples"].shape == (1, 4, 16, 16)
    assert plot.ndim == 4 and plot.shape[0] == 1 and plot.shape[-1] == 3
    assert strip.ndim == 4 and strip.shape[-1] == 3
    assert [u[0] for u in rt.bars[0].updates] == list(range(1, 11))
    steps = [d for e, d in rt.messages if e == "spo.step"]
    assert [d["step"] for d in steps] == list(range(10)) and steps[3]["t"] == 601
    assert json.loads(json.dumps(trace.as_dict()))["scores"] == trace.scores


def test_chunked_scoring_thread_scores_each_step_at_its_own_timestep(tiny):
    """The scoring thread batches steps (`chunk`); every row must still be judged at its own t."""
    from spo_studio.comfyui_nodes.scoring import LatentJudge, StepRecorder

    judge = LatentJudge(tiny["scorer"], tiny["vae"], PROMPT, base_model=tiny["patcher"].model)
    sigmas = tiny["patcher"].model.model_sampling.sigmas.flip(0)[::100].tolist() + [0.0]  # 10 steps
    x0s = torch.randn(len(sigmas) - 1, 2, 4, 16, 16, generator=torch.Generator().manual_seed(0))

    def results(overlap, chunk):
        rec = StepRecorder(judge, sigmas, overlap=overlap, chunk=chunk)
        got = []
        for step, x0 in enumerate(x0s):
            rec(step, x0, x0, len(sigmas) - 1)
            got += rec.drain()
        got += rec.finish()
        return got

    inline = results(False, 1)
    assert [r.step for r in inline] == list(range(10)) and len({r.t for r in inline}) == 10
    for chunk in (3, 4):
        batched = results(True, chunk)
        assert [r.step for r in batched] == list(range(10)) and [r.t for r in batched] == [r.t for r in inline]
        for a, b in zip(inline, batched):
            assert torch.allclose(torch.tensor(a.scores), torch.tensor(b.scores), atol=1e-5)
            assert torch.allclose(a.thumbs, b.thumbs, atol=1e-5)
    # one t for all rows would change the scores: the per-row t matters
    one_t = judge.score_images(judge.decode(x0s[:2].flatten(0, 1)), inline[0].t)
    assert not torch.allclose(one_t[2:], torch.tensor(inline[1].scores), atol=1e-4)
    with pytest.raises(ValueError, match="chunk"):
        StepRecorder(judge, sigmas, chunk=0)


def test_step_scorer_final_latent_is_the_trajectory_up_to_the_last_step(tiny):
    """ComfyUI ends at σ = 0 (x = x̂0), diffusers' DDIM at ᾱ_0: the last step differs by design only."""
    gen = torch.Generator().manual_seed(3)
    traj = diffusion.sample(tiny["model"], [PROMPT], num_steps=6, cfg_scale=5.0, eta=1.0, generator=gen)
    _, (latent, *_ ) = _scorer_run(tiny, seed=3, steps=6)
    x0_last = traj.steps[-1].x0_hat / tiny["model"].latent_scale
    assert torch.allclose(latent["samples"], x0_last, rtol=1e-4, atol=1e-4)  # |x| reaches 60: float32 rounding


def test_sigma_timestep_and_latent_space_conversions(tiny):
    ms = tiny["patcher"].get_model_object("model_sampling")
    sigmas = standalone.ddim_uniform(ms, 20)
    assert [int(ms.timestep(s.reshape(1))) for s in sigmas[:-1]] == list(range(951, 0, -50))
    assert float(sigmas[-1]) == 0.0
    alphas = tiny["model"].scheduler.alphas_cumprod
    for t in (951, 501, 1):
        sigma = float(ms.sigmas[t])
        assert sampling.alpha_bar_of_sigma(sigma) == pytest.approx(float(alphas[t]), rel=1e-5)
    # one DDIM-η step in σ-space = the backend's step in x_t space
    x_t, eps = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)).chunk(2)
    t, t_prev = 501, 451
    pred = diffusion.StepPrediction(x_t=x_t, eps=eps, x0_hat=None, t=t, t_prev=t_prev,
                                    alpha_t=float(alphas[t]), alpha_prev=float(alphas[t_prev]))
    pred.x0_hat = (x_t - math.sqrt(1 - pred.alpha_t) * eps) / math.sqrt(pred.alpha_t)
    s, s_prev = float(ms.sigmas[t]), float(ms.sigmas[t_prev])
    x = sampling.from_vp(x_t, s)
    assert torch.allclose(sampling.to_vp(x, s), x_t, atol=1e-6)
    assert torch.allclose(x - eps * s, pred.x0_hat, atol=1e-4)  # EPS.calculate_denoised
    for eta in (0.0, 0.5, 1.0):
        mean, scale = sampling.ddim_mean(x, pred.x0_hat, s, s_prev, eta)
        assert torch.allclose(sampling.to_vp(mean, s_prev), pred.mean(eta), atol=1e-4)
        assert scale / math.sqrt(1 + s_prev**2) == pytest.approx(pred.sigma(eta), rel=1e-4)
    # to σ' = 0 the step is deterministic and lands on x̂0
    mean, scale = sampling.ddim_mean(x, pred.x0_hat, s, 0.0, 1.0)
    assert scale == 0 and torch.allclose(mean, pred.x0_hat, atol=1e-5)


def test_pure_noise_start_only_for_an_empty_latent(tiny):
    rt = standalone.StandaloneRuntime()
    seen = {}

    def capture(model, x, sigmas, extra_args=None, callback=None, disable=None):
        seen["x"] = x
        return x

    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    sigmas = standalone.ddim_uniform(tiny["patcher"].get_model_object("model_sampling"), 10)
    s0 = float(sigmas[0])
    rt.sample(tiny["patcher"], noise, 5.0, rt.ksampler(capture), sigmas, tiny["positive"], tiny["negative"],
              torch.zeros(1, 4, 16, 16))
    assert torch.allclose(seen["x"], noise * math.sqrt(1 + s0**2))
    image = torch.full((1, 4, 16, 16), 0.5)
    rt.sample(tiny["patcher"], noise, 5.0, rt.ksampler(capture), sigmas, tiny["positive"], tiny["negative"], image)
    assert torch.allclose(seen["x"], noise * s0 + image * tiny["patcher"].model.scale, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Pool Preview and Guided Sampler
# ----------------------------------------------------------------------------------------------


def test_pool_preview_candidates_share_x_t_and_are_judged(tiny):
    rt = standalone.StandaloneRuntime()
    _, (_, _, _, trace) = _scorer_run(tiny, seed=5, steps=10)
    grid, candidates, report = run.run_pool_preview(
        rt, tiny["patcher"], tiny["positive"], tiny["negative"], standalone.empty_latent(tiny["patcher"]),
        tiny["vae"], tiny["scorer"], PROMPT, 5, 10, 5.0, "ddim_uniform", pool_step=4, k=4)
    assert report.scores.shape == (1, 4) and report.step == 4 and report.t == trace.timesteps[5] == 401
    # candidate 0 takes the noise the plain trajectory takes at that step: its score is the next step's
    assert float(report.scores[0, 0]) == pytest.approx(trace.scores[5][0], abs=1e-4)
    assert len(set(report.scores[0].tolist())) == 4
    assert report.winner == [int(report.scores[0].argmax())] and report.loser == [int(report.scores[0].argmin())]
    assert candidates["samples"].shape == (4, 4, 16, 16)
    spread = (report.candidates[0] - report.candidates[0].mean(0)).flatten(1).norm(dim=1)
    assert (spread > 0).all()
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and grid.shape[2] > grid.shape[1]
    assert any(e == "spo.pool" for e, _ in rt.messages)
    with pytest.raises(ValueError, match="pool_step"):
        run.run_pool_preview(rt, tiny["patcher"], tiny["positive"], tiny["negative"],
                             standalone.empty_latent(tiny["patcher"]), tiny["vae"], tiny["scorer"], PROMPT, 5, 10,
                             5.0, "ddim_uniform", pool_step=9, k=4)


def test_guided_sampler_keeps_the_best_candidate(tiny):
    rt = standalone.StandaloneRuntime()
    args = (rt, tiny["patcher"], tiny["positive"], tiny["negative"], standalone.empty_latent(tiny["patcher"]),
            tiny["vae"], tiny["scorer"], PROMPT, 11, 8, 5.0, "ddim_uniform")
    plain, _ = run.run_guided(*args, k=1)
    _, (scored_latent, *_rest, plain_trace) = _scorer_run(tiny, seed=11, steps=8)
    assert torch.equal(plain["samples"], scored_latent["samples"]), "k = 1 is spo_ddim exactly"

    guided, trace = run.run_guided(*args, k=4)
    assert not torch.allclose(guided["samples"], plain["samples"])
    assert len(trace.scores) == 7 and trace.timesteps == plain_trace.timesteps[1:]
    record = sampling.GuidedRecord()
    sampler = run.guided_sampler(rt, tiny["vae"], tiny["scorer"], PROMPT, 4, record=record)
    prep = run._prepare(rt, tiny["patcher"], standalone.empty_latent(tiny["patcher"]), 11, 8, "ddim_uniform")
    out = rt.sample(tiny["patcher"], prep.noise, 5.0, sampler, prep.sigmas, tiny["positive"], tiny["negative"],
                    prep.samples, seed=11)
    assert torch.equal(out, guided["samples"]), "the SAMPLER and the one-node sampler agree"
    for step, kept in zip(record.steps, trace.scores):
        assert int(step.chosen[0]) == int(step.scores[0].argmax())
        assert kept[0] == pytest.approx(float(step.scores[0].max()))
    with pytest.raises(ValueError, match="prompt"):
        run.guided_sampler(rt, tiny["vae"], tiny["scorer"], "  ", 4)


# ----------------------------------------------------------------------------------------------
# LoRA loader: our files as ComfyUI keys
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_files(tiny_dirs, tmp_path_factory):
    model = load_model(tiny_dirs["sd15"], device="cpu")
    attach_lora(model.unet, "sd15")
    attach_lora(model.text_encoders[0], "sd15", alpha=8)
    with torch.no_grad():
        for name, p in [*model.unet.named_parameters(), *model.text_encoders[0].named_parameters()]:
            if "lora_B" in name:
                p.normal_(0, 0.05)
    weights = extract_lora(model.unet, model.text_encoders, family="sd15")
    out = tmp_path_factory.mktemp("loras")
    return {"webui": save_lora(weights, out / "l_webui.safetensors", format="webui"),
            "diffusers": save_lora(weights, out / "l_diffusers.safetensors", format="diffusers"),
            "unet_config": dict(model.unet.config)}


def _comfy_unet_key(base: str, names) -> str:
    """ComfyUI's rule for `lora_unet_` keys: LDM names, or diffusers names via unet_to_diffusers."""
    body = base[len("lora_unet_"):]
    table = {}
    for diffusers_name, ldm_name in names.pairs():
        table[diffusers_name.replace(".", "_")] = ldm_name
        table[ldm_name.replace(".", "_")] = ldm_name
    for cut in range(len(body), 0, -1):  # the longest prefix, as NameMap does
        if body[:cut] in table and (cut == len(body) or body[cut] == "_"):
            return table[body[:cut]] + body[cut:].replace("_", ".")
    raise KeyError(base)


def test_both_lora_formats_become_the_same_comfyui_patches(lora_files):
    names = unet_name_map(lora_files["unet_config"])
    patches = {}
    for fmt in ("webui", "diffusers"):
        tensors = lora_loader.comfy_lora_tensors(read_lora(lora_files[fmt]), "sd15")
        unet = tensors["unet"]
        assert all(k.startswith("lora_unet_") for k in unet)
        assert all(k.startswith("lora_te_") for k in tensors["text_encoder"])
        alphas = {float(v) for k, v in tensors["text_encoder"].items() if k.endswith(".alpha")}
        assert alphas == {8.0}, "the true alpha travels explicitly"
        patches[fmt] = {(_comfy_unet_key(k.rsplit(".", 2)[0], names) if not k.endswith(".alpha") else
                         _comfy_unet_key(k.rsplit(".", 1)[0], names) + ".alpha"): v for k, v in unet.items()}
        patches[fmt].update(tensors["text_encoder"])
    assert patches["webui"].keys() == patches["diffusers"].keys()
    for key in patches["webui"]:
        assert torch.equal(patches["webui"][key], patches["diffusers"][key]), key


class FakeRuntime:
    """Just enough of the runtime for the LoRA loader: a family and a key map."""

    def __init__(self, family, key_map):
        self._family, self._key_map, self.applied = family, key_map, None

    def family(self, model):
        return self._family

    def model_name(self, model):
        return "Flux"

    def lora_key_map(self, model, clip):
        return {k: v for k, v in self._key_map.items() if clip is not None or not k.startswith("lora_te")}

    def apply_lora(self, model, clip, tensors, sm, sc):
        self.applied = (tensors, sm, sc)
        return "patched-model", "patched-clip" if clip is not None else None


def test_lora_loader_checks_family_and_keys(lora_files, caplog):
    key_map = {}  # ComfyUI's key map holds both spellings of every UNet layer (LDM and diffusers)
    for fmt in ("webui", "diffusers"):
        tensors = lora_loader.comfy_lora_tensors(read_lora(lora_files[fmt]), "sd15")
        key_map.update({k.rsplit(".", 2)[0]: "w" for part in tensors.values() for k in part if k.endswith(".weight")})

    rt = FakeRuntime("sd15", key_map)
    assert lora_loader.load_spo_lora(rt, "m", "c", lora_files["diffusers"], 0.8, 0.5) == ("patched-model",
                                                                                          "patched-clip")
    assert rt.applied[1:] == (0.8, 0.5)
    # no CLIP connected: only the UNet part goes to ComfyUI (so no "lora key not loaded" lines)
    rt = FakeRuntime("sd15", key_map)
    lora_loader.load_spo_lora(rt, "m", None, lora_files["webui"], 1.0, 1.0)
    assert all(k.startswith("lora_unet_") for k in rt.applied[0])
    # another family: a clear warning, the model passes through untouched
    for family in ("sdxl", None):
        rt = FakeRuntime(family, key_map)
        with caplog.at_level(logging.WARNING):
            assert lora_loader.load_spo_lora(rt, "m", "c", lora_files["webui"], 1.0, 1.0) == ("m", "c")
        assert rt.applied is None and "NOT applied" in caplog.text
    # keys the model does not have: an error naming the file
    rt = FakeRuntime("sd15", {k: v for k, v in key_map.items() if "attn1_to_q" not in k})
    with pytest.raises(LoraError, match="l_webui.safetensors"):
        lora_loader.load_spo_lora(rt, "m", "c", lora_files["webui"], 1.0, 1.0)


# ----------------------------------------------------------------------------------------------
# SPM loader, package import
# ----------------------------------------------------------------------------------------------


def test_spm_loader_lists_and_loads_folders(tiny_spm, tmp_path):
    import shutil

    root = tmp_path / "spo_preference"
    shutil.copytree(tiny_spm, root / "mine" / "spm_a")
    (root / "notes").mkdir()
    (root / "notes" / "readme.txt").write_text("not a model")
    choices = spm_loader.choices([str(root), str(tmp_path / "missing")])
    assert choices == [spm_loader.POCKET, "mine/spm_a"]
    scorer = spm_loader.load_scorer("mine/spm_a", [str(root)])
    assert scorer.score_images(torch.rand(1, 3, 16, 16), [PROMPT], 500).shape == (1,)
    with pytest.raises(FileNotFoundError, match="nope"):
        spm_loader.load_scorer("nope", [str(root)])


def test_spm_loader_lists_and_loads_official_files(official, tmp_path):
    """An official SPO .bin dropped into models/spo_preference next to its PickScore/CLIP folder."""
    import shutil

    root = tmp_path / "spo_preference"
    shutil.copytree(official["clip"], root / "PickScore_v1")
    (root / "PickScore_v1" / "pytorch_model.bin").write_bytes(b"the CLIP's own weights: not listed")
    shutil.copy(official["root"] / "sd-v1-5_step-aware_preference_model.bin", root)
    choices = spm_loader.choices([str(root)])
    assert choices == [spm_loader.POCKET, "PickScore_v1", "sd-v1-5_step-aware_preference_model.bin"]
    scorer = spm_loader.load_scorer("sd-v1-5_step-aware_preference_model.bin", [str(root)])
    assert scorer.spm.preprocess_mode == "official"
    direct = Scorer.from_path(official["root"] / "sd-v1-5_step-aware_preference_model.bin",
                              clip_folder=official["clip"])
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(scorer.score_images(images, [PROMPT] * 2, 500), direct.score_images(images, [PROMPT] * 2, 500))


def test_latent_spm_scores_the_samplers_own_latents(tiny, tmp_path):
    """With a latent SPM the Step Scorer scores every step's x_t (no decode), as `score_trajectory` does."""
    from spo_studio.backend.preference.latent_spm import LatentPreferenceModel

    path = LatentPreferenceModel.from_base(tiny["model"], head_dim=16).save(tmp_path / "lspm")
    root = tmp_path / "spo_preference"
    root.mkdir()
    (root / "mine").symlink_to(path, target_is_directory=True)
    assert spm_loader.choices([str(root)]) == [spm_loader.POCKET, "mine"]
    scorer = spm_loader.load_scorer("mine", [str(root)])
    ref = score_trajectory(tiny["model"], Scorer.from_path(path, tiny["model"]), PROMPT, seed=7, num_steps=10,
                           cfg_scale=5.0, eta=1.0)
    _, (_, _, _, trace) = _scorer_run({**tiny, "scorer": scorer})
    ours = torch.tensor([s[0] for s in trace.scores])
    assert torch.allclose(ours, torch.tensor(ref["scores"]), atol=1e-4, rtol=1e-4), (ours, ref["scores"])
    assert ours.std() > 0
    # the guided sampler's judge reads the candidates themselves: x' / √(1 + σ²) at t(σ)
    judge = LatentJudge(scorer, tiny["vae"], PROMPT, base_model=tiny["patcher"].model)
    x = torch.randn(3, 4, 8, 8)
    expected = scorer.score_latents(x / math.sqrt(1 + 2.0**2), [PROMPT] * 3, judge.timestep(2.0))
    assert torch.allclose(judge(torch.zeros_like(x), 2.0, x), expected)
    # the x̂0 strip costs ONE decode, of the next-to-last step's x̂0 (made on the scoring thread while the
    # sampler takes its last step), for its Latent2RGB map
    calls = []

    class CountingVae:
        def decode(self, latent):
            calls.append(latent.shape[0])
            return tiny["vae"].decode(latent)

    _, (latent, _, strip, trace) = _scorer_run({**tiny, "scorer": scorer, "vae": CountingVae()})
    assert calls == [1]
    assert trace.thumbnails.shape[:3] == (10, 1, 3) and strip.shape[-1] == 3


def test_latent_spm_strip_previews_the_final_image():
    """On the shipped pocket model (a trained VAE; the tiny one is random) the latent SPM's last thumbnail, a
    Latent2RGB preview, is the final decoded image to within a tenth of the image's own spread (measured: 0.07)."""
    model = load_model("pocket", device="cpu")
    patcher, vae = standalone.wrap(model)
    prompt = "a large green triangle on a yellow background"
    latent, _, _, trace = run.run_step_scorer(
        standalone.StandaloneRuntime(), patcher, standalone.encode(patcher, prompt), standalone.encode(patcher, ""),
        standalone.empty_latent(patcher), vae, Scorer.from_path("pocket-latent", model), prompt, 5, 10, 5.0,
        "spo_ddim", "ddim_uniform")
    final = vae.decode(latent["samples"]).movedim(-1, 1)
    err = (trace.thumbnails[-1] - final).abs().mean().item()
    assert err < 0.1 * (final - final.mean()).abs().mean().item(), err


def test_fitted_latent_rgb_map_recovers_a_linear_decoder():
    """`fit_latent_rgb` on a decoder that IS linear (per latent pixel, then 8x nearest upsampling) finds it."""
    gen = torch.Generator().manual_seed(0)
    true = torch.randn(5, 3, generator=gen)
    z = torch.randn(2, 4, 6, 6, generator=gen)
    rgb = (torch.cat([z, torch.ones(2, 1, 6, 6)], 1).movedim(1, -1) @ true).movedim(-1, 1)
    fitted = scoring.fit_latent_rgb(z, F.interpolate(rgb, scale_factor=8, mode="nearest"), ridge=0.0)
    assert torch.allclose(fitted, true, atol=1e-4)
    preview = scoring.latent_rgb(z, fitted, 12)
    assert preview.shape == (2, 3, 12, 12) and preview.min() >= 0 and preview.max() <= 1


def test_pack_imports_without_comfyui():
    code = ("import sys, spo_studio, spo_studio.comfyui_nodes as n\n"
            "from spo_studio.comfyui_nodes import (run, sampling, scoring, render, standalone, lora_loader,\n"
            "    spm_loader)\n"
            "assert n.NODE_CLASS_MAPPINGS == {} and 'comfy' not in sys.modules and 'comfy_api' not in sys.modules\n"
            "print('ok')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_workflows_come_in_both_formats_and_name_only_known_nodes():
    ours = {"SPOLoraLoader", "SPOPreferenceModelLoader", "SPOStepScorer", "SPOPoolPreview", "SPOGuidedSampler",
            "SPOGuidedKSampler"}
    core = {"CheckpointLoaderSimple", "PrimitiveStringMultiline", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
            "VAEDecode", "SaveImage", "LoraLoader", "BasicScheduler", "SamplerCustom"}
    names = {"spo_score_generation", "spo_inspect_pool", "spo_lora_compare", "spo_guided_sampling"}
    for name in names:
        api = json.loads((ROOT / "workflows" / f"{name}.api.json").read_text())
        ui = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
        assert {n["class_type"] for n in api.values()} <= ours | core
        assert {n["type"] for n in ui["nodes"]} == {n["class_type"] for n in api.values()}
        assert len(ui["links"]) == sum(isinstance(v, list) for n in api.values() for v in n["inputs"].values())
        for link_id, src, _slot, dst, _dst_slot, _type in ui["links"]:
            assert str(src) in api and str(dst) in api, (name, link_id)
    used = {n["class_type"] for name in names
            for n in json.loads((ROOT / "workflows" / f"{name}.api.json").read_text()).values()}
    assert ours <= used, ours - used


def test_fast_decode_step_scorer_matches_backend_fast_scores(tiny, tiny_spm):
    """SPM Loader decode = fast: the node and the backend shrink x̂0 to the SPM's size the same way."""
    fast = Scorer.from_path(tiny_spm, tiny["model"], latent_decode=True)
    ref = score_trajectory(tiny["model"], fast, PROMPT, seed=7, num_steps=10, cfg_scale=5.0, eta=1.0)
    full = score_trajectory(tiny["model"], Scorer.from_path(tiny_spm, tiny["model"]), PROMPT, seed=7, num_steps=10,
                            cfg_scale=5.0, eta=1.0)
    _, (_, _, _, trace) = _scorer_run({**tiny, "scorer": fast})
    ours = torch.tensor([s[0] for s in trace.scores])
    assert torch.allclose(ours, torch.tensor(ref["scores"]), atol=1e-4, rtol=1e-4), (ours, ref["scores"])
    assert not torch.allclose(ours, torch.tensor(full["scores"]), atol=1e-4), "fast decode should change the input"
    assert fast.decode(torch.randn(1, 4, 16, 16)).shape[-1] <= fast.spm.image_size
