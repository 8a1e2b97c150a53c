"""The official SPO step-aware preference model files, read as they are.

A state dict in the official layout (`model.` + time-conditioned CLIP keys) is built at a tiny CLIP
size and scored two ways: by our loader, and by an independent forward written here from the
adaLN equations (SPO, arXiv 2406.04314, §4.1, with DiT's adaLN: h ← h + α·f(LN(h)·(1+γ) + β)) and
the official definition's facts (time condition c = MLP([cos, sin](t·ω)), SiLU(c) into every
modulation Linear, chunk order β1 γ1 α1 β2 γ2 α2, final (β_p, γ_p) on the post-layernorm pooled
token; images bicubic-resized without antialiasing on the shorter side, centre-cropped, clamped).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from spo_studio.backend.cli import main
from spo_studio.backend.preference.scoring import Scorer
from spo_studio.backend.preference.spm import CLIP_MEAN, CLIP_STD, StepAwarePreferenceModel
from transformers import CLIPModel

TIMESTEPS = (0, 250, 500, 750, 950)
PROMPTS = ["a red circle", "a blue square on green background"]


def reference_scores(official, images: torch.Tensor, prompts: list[str], t: int) -> torch.Tensor:
    """Scores [B] of images [B, 3, H, W] in [-1, 1], written from the equations, reading the raw state dict."""
    sd = {k[len("model."):]: v.double() for k, v in official["state"].items() if v.is_floating_point()}
    vcfg = official["config"].vision_config
    d, heads, size = vcfg.hidden_size, vcfg.num_attention_heads, vcfg.image_size

    # the official preprocessing
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(images.double(), size=(int(h * scale + 0.5), int(w * scale + 0.5)), mode="bicubic",
                      align_corners=False)
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = (x[..., top: top + size, left: left + size] / 2 + 0.5).clamp(0, 1)
    x = (x - torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD, dtype=x.dtype).view(
        1, 3, 1, 1)

    # time condition c = MLP(sinusoid(t)); every modulation reads SiLU(c)
    half = 128
    freqs = torch.exp(-math.log(10_000) * torch.arange(half, dtype=torch.float64) / half)
    args = torch.full((images.shape[0], 1), float(t), dtype=torch.float64) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    c = F.linear(F.silu(F.linear(emb, sd["t_embedder.mlp.0.weight"], sd["t_embedder.mlp.0.bias"])),
                 sd["t_embedder.mlp.2.weight"], sd["t_embedder.mlp.2.bias"])
    c = F.silu(c)

    def ln(v, name):
        return F.layer_norm(v, (d,), sd[f"{name}.weight"], sd[f"{name}.bias"], eps=vcfg.layer_norm_eps)

    def lin(v, name):
        return F.linear(v, sd[f"{name}.weight"], sd.get(f"{name}.bias"))

    v = "vision_model."
    patches = F.conv2d(x, sd[f"{v}embeddings.patch_embedding.weight"], stride=vcfg.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = sd[f"{v}embeddings.class_embedding"].expand(x.shape[0], 1, d)
    hid = torch.cat([cls, patches], dim=1) + sd[f"{v}embeddings.position_embedding.weight"][None]
    hid = ln(hid, f"{v}pre_layrnorm")
    for i in range(vcfg.num_hidden_layers):
        p = f"{v}encoder.layers.{i}."
        mod = lin(c, f"{p}adaLN_modulation.1")
        b1, g1, a1, b2, g2, a2 = (m[:, None] for m in mod.chunk(6, dim=-1))
        a_in = ln(hid, f"{p}layer_norm1") * (1 + g1) + b1
        q, k, val = (lin(a_in, f"{p}self_attn.{n}_proj").view(*a_in.shape[:2], heads, -1).transpose(1, 2)
                     for n in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ val
        hid = hid + a1 * lin(att.transpose(1, 2).reshape(a_in.shape), f"{p}self_attn.out_proj")
        m_in = ln(hid, f"{p}layer_norm2") * (1 + g2) + b2
        f1 = lin(m_in, f"{p}mlp.fc1")
        hid = hid + a2 * lin(f1 * torch.sigmoid(1.702 * f1), f"{p}mlp.fc2")  # CLIP's quick_gelu
    pooled = ln(hid[:, 0], f"{v}post_layernorm")
    shift, scale_p = lin(c, f"{v}adaLN_modulation.1").chunk(2, dim=-1)
    image = F.normalize(F.linear(pooled * (1 + scale_p) + shift, sd["visual_projection.weight"]), dim=-1)

    # the text tower is plain CLIP: transformers' own model with the file's text weights
    text_model = CLIPModel(official["config"]).double().eval()
    text_model.load_state_dict({k: v for k, v in sd.items() if "adaLN" not in k and "t_embedder" not in k},
                               strict=False)
    ids = official["tok"](prompts, padding="max_length", truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        text = F.normalize(text_model.text_projection(text_model.text_model(input_ids=ids).pooler_output), dim=-1)
    return sd["logit_scale"].exp() * (image * text).sum(-1)


def pairs():
    g = torch.Generator().manual_seed(5)
    return (torch.rand(2, 3, 20, 27, generator=g) * 2.4 - 1.2).clamp(-1, 1)  # non-square: resize + crop


@pytest.mark.parametrize("name", ["sd-v1-5_step-aware_preference_model.bin", "spm.safetensors"])
def test_official_file_scores_as_the_equations(official, name):
    images = pairs()
    scorer = Scorer(StepAwarePreferenceModel.load(official["root"] / name, clip_folder=official["clip"]))
    for t in TIMESTEPS:
        ours = scorer.score_images((images + 1) / 2, PROMPTS, t).double()
        expected = reference_scores(official, images, PROMPTS, t)
        assert torch.allclose(ours, expected, atol=1e-5, rtol=0), (t, ours, expected)
    spread = torch.stack([scorer.score_images((images + 1) / 2, PROMPTS, t) for t in TIMESTEPS])
    assert spread.std(0).min() > 1e-3, "the time conditioning must matter"


def test_found_beside_imported_and_half_precision(official, tmp_path, capsys):
    images = (pairs() + 1) / 2
    file = official["root"] / "sd-v1-5_step-aware_preference_model.bin"
    expected = torch.stack([reference_scores(official, pairs(), PROMPTS, t) for t in TIMESTEPS]).float()
    beside = Scorer.from_path(file)  # the one CLIP folder next to the file is found
    assert torch.allclose(torch.stack([beside.score_images(images, PROMPTS, t) for t in TIMESTEPS]), expected,
                          atol=1e-5)
    # `spo spm import`: once to our folder format, which keeps the official preprocessing
    assert main(["spm", "import", str(file), str(tmp_path / "spm")]) == 0
    imported = Scorer.from_path(tmp_path / "spm")
    assert imported.spm.preprocess_mode == "official"
    assert torch.allclose(torch.stack([imported.score_images(images, PROMPTS, t) for t in TIMESTEPS]), expected,
                          atol=1e-5)
    # half precision where asked
    half = StepAwarePreferenceModel.load(file, dtype=torch.float16)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="CLIP folder is only needed"):
        StepAwarePreferenceModel.load(tmp_path / "spm", clip_folder=official["clip"])


def test_official_file_errors_name_the_file(official, tmp_path):
    lonely = tmp_path / "alone" / "spm.bin"
    lonely.parent.mkdir()
    torch.save(official["state"], lonely)
    with pytest.raises(ValueError, match=r"alone/spm.bin: an official SPO preference model needs the CLIP folder"):
        StepAwarePreferenceModel.load(lonely)
    plain = tmp_path / "plain.bin"
    torch.save({k[len("model."):]: v for k, v in official["state"].items()}, plain)
    with pytest.raises(ValueError, match=r"plain.bin: not an official SPO preference model: every key should start"):
        StepAwarePreferenceModel.load(plain, clip_folder=official["clip"])
    no_time = tmp_path / "no_time.bin"
    torch.save({k: v for k, v in official["state"].items() if "adaLN" not in k and "t_embedder" not in k}, no_time)
    with pytest.raises(ValueError, match="no_time.bin: has no time conditioning"):
        StepAwarePreferenceModel.load(no_time, clip_folder=official["clip"])
    (tmp_path / "pickle.bin").write_bytes(b"\x80\x04not a torch file")
    with pytest.raises(ValueError, match="pickle.bin: cannot read the checkpoint"):
        StepAwarePreferenceModel.load(tmp_path / "pickle.bin", clip_folder=official["clip"])
