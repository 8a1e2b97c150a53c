"""The step-aware preference model (SPM): a CLIP scorer conditioned on the diffusion timestep.

SPO (arXiv 2406.04314, §4.1) judges *intermediate* denoising steps, where a plain image scorer
(PickScore) sees a blurry one-step prediction x̂0 it was never trained on. The SPM is the scorer
with DiT-style adaptive layer norm (Peebles & Xie 2023, "adaLN-Zero") on every vision layer:

    c        = MLP(sinusoidal(t))                                  time condition, t ∈ [0, 1000)
    (β1, γ1, α1, β2, γ2, α2) = Linear_l(SiLU(c))                   per vision layer l
    h ← h + α1 · Attn(LN1(h)·(1+γ1) + β1)
    h ← h + α2 · MLP(LN2(h)·(1+γ2) + β2)
    pooled ← LN_post(h_cls)·(1+γ_p) + β_p                           final modulation (Linear_p)
    s(x, y, t) = exp(τ) · cos(E_img(x, t), E_txt(y))               the PickScore-style score

Initialisation: every modulation Linear has zero weight, and zero bias except the gates α = 1, so
the untrained SPM equals its base scorer exactly, for any t. Symbols: β shift, γ scale, α gate,
τ CLIP's logit scale.

The base scorer is a transformers `CLIPModel`: PickScore_v1 / CLIP-H from a local folder for real
models, or a small CLIP for the pocket world (`pocket_clip_config`). Images arrive as float tensors
in [0, 1] at any resolution and are resized (bicubic, antialiased; or as the official code does,
for an imported official SPM) and CLIP-normalised here, in torch, so the pipeline runs on the GPU
and stays differentiable.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SPM_FORMAT = "spo-studio-spm/1"
# how images reach the CLIP resolution: "antialias" (ours: bicubic with antialiasing, to a square) or
# "official" (the official SPO code: plain bicubic on the shorter side, centre crop, clamp to [0, 1])
PREPROCESS = ("antialias", "official")


def timestep_embedding(t: torch.Tensor, dim: int = 256, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (as in DiT / the Transformer): [B] → [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimeConditioning(nn.Module):
    """The time MLP and the per-layer adaLN modulation Linears, identity-initialised."""

    def __init__(self, hidden: int, num_layers: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList([nn.Linear(hidden, 6 * hidden) for _ in range(num_layers)])
        self.final = nn.Linear(hidden, 2 * hidden)
        self.reset_identity()

    @torch.no_grad()
    def reset_identity(self) -> None:
        """Zero weights and biases, gates α1 = α2 = 1: the modulated CLIP equals the plain CLIP."""
        for lin in [*self.layers, self.final]:
            lin.weight.zero_()
            lin.bias.zero_()
        hidden = self.final.weight.shape[1]
        for lin in self.layers:
            lin.bias[2 * hidden : 3 * hidden] = 1.0  # α1
            lin.bias[5 * hidden : 6 * hidden] = 1.0  # α2

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class StepAwarePreferenceModel(nn.Module):
    """CLIP + time-conditioned adaLN on the vision tower. `score(images, input_ids, t)` → [B]."""

    def __init__(self, clip, tokenizer=None, time: TimeConditioning | None = None, preprocess: str = "antialias"):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}; got {preprocess!r}")
        self.clip = clip
        self.tokenizer = tokenizer
        vcfg = clip.config.vision_config
        self.time = time if time is not None else TimeConditioning(vcfg.hidden_size, vcfg.num_hidden_layers)
        self.image_size = vcfg.image_size
        self.preprocess_mode = preprocess
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    # -- inputs -----------------------------------------------------------------------------------
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] in [0, 1] → CLIP pixel values at the scorer's resolution."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [0, 1]; got shape {tuple(images.shape)}")
        x = images.to(self.mean.device, self.mean.dtype)
        size = self.image_size
        if self.preprocess_mode == "official":
            h, w = x.shape[-2:]
            scale = size / min(h, w)
            x = F.interpolate(x, size=(int(h * scale + 0.5), int(w * scale + 0.5)), mode="bicubic",
                              align_corners=False)
            top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
            x = x[..., top : top + size, left : left + size].clamp(0, 1)
        elif x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        if self.tokenizer is None:
            raise ValueError("this SPM has no tokenizer; pass input_ids instead of prompts")
        return self.tokenizer(prompts, padding="max_length", truncation=True,
                              max_length=self.tokenizer.model_max_length, return_tensors="pt").input_ids

    # -- towers -----------------------------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Projected, L2-normalised image embeddings with the adaLN modulation at timestep t.

        `t=None` skips the modulation entirely (the base scorer).
        """
        vision = self.clip.vision_model
        h = vision.pre_layrnorm(vision.embeddings(pixel_values.to(vision.embeddings.patch_embedding.weight.dtype)))
        cond = None if t is None else F.silu(self.time(t.to(h.device)))
        for i, layer in enumerate(vision.encoder.layers):
            if cond is None:
                h = layer(h, None)
                continue
            shift1, scale1, gate1, shift2, scale2, gate2 = self.time.layers[i](cond)[:, None].chunk(6, dim=-1)
            attn_in = layer.layer_norm1(h) * (1 + scale1) + shift1
            h = h + gate1 * layer.self_attn(hidden_states=attn_in, attention_mask=None)[0]
            h = h + gate2 * layer.mlp(layer.layer_norm2(h) * (1 + scale2) + shift2)
        pooled = vision.post_layernorm(h[:, 0])
        if cond is not None:
            shift, scale = self.time.final(cond).chunk(2, dim=-1)
            pooled = pooled * (1 + scale) + shift
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.clip.text_model(input_ids=input_ids.to(self.clip.text_projection.weight.device))
        return F.normalize(self.clip.text_projection(out.pooler_output), dim=-1)

    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    def score_features(self, image_feats: torch.Tensor, text_feats: torch.Tensor) -> torch.Tensor:
        """s = exp(τ)·cos(image, text), row by row: [B, D] × [B, D] → [B]."""
        return self.logit_scale() * (image_feats * text_feats.to(image_feats.dtype)).sum(-1)

    def forward(self, images: torch.Tensor, input_ids: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Scores [B] of images [B, 3, H, W] in [0, 1] against prompts (token ids [B, L]) at timesteps t [B]."""
        return self.score_features(self.image_features(self.preprocess(images), t), self.text_features(input_ids))

    # -- persistence ------------------------------------------------------------------------------
    def save(self, out_dir: str | Path, extra: dict | None = None) -> Path:
        """Write `clip/` (+ `tokenizer/`), `time_conditioning.safetensors` and `spm.json`, atomically."""
        from safetensors.torch import save_file

        from ..checkpoint_io import atomic_folder

        with atomic_folder(out_dir) as tmp:
            self.clip.save_pretrained(tmp / "clip")
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp / "tokenizer")
            state = {k: v.detach().contiguous().cpu() for k, v in self.time.state_dict().items()}
            save_file(state, tmp / "time_conditioning.safetensors", metadata={"format": SPM_FORMAT})
            meta = {"format": SPM_FORMAT, "freq_dim": self.time.freq_dim, "preprocess": self.preprocess_mode,
                    **(extra or {})}
            (tmp / "spm.json").write_text(json.dumps(meta, indent=2))
        return Path(out_dir)

    @classmethod
    def load(cls, path: str | Path, device=None, dtype=torch.float32,
             clip_folder: str | Path | None = None) -> "StepAwarePreferenceModel":
        """Load an SPM folder written by `save`; initialise an SPM from a plain CLIP folder (e.g.
        PickScore_v1; then the tokenizer comes from the same folder or its `tokenizer/`); or read an
        official SPO checkpoint file (.bin / .safetensors) with the CLIP folder it was initialised
        from (`clip_folder`, or found beside the file; see `official_spm`)."""
        from safetensors.torch import load_file
        from transformers import CLIPModel

        from .official_spm import is_checkpoint_file, load_official_spm

        path = Path(path).expanduser()
        if is_checkpoint_file(path):
            return load_official_spm(path, clip_folder, dtype=dtype, device=device)
        if clip_folder:
            raise ValueError(f"{path}: a CLIP folder is only needed with an official SPM checkpoint file "
                             f"(.bin / .safetensors), not with a preference model folder")
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such preference model folder or file")
        spm_json = path / "spm.json"
        clip_dir = path / "clip" if spm_json.exists() else path
        if not (clip_dir / "config.json").exists():
            raise ValueError(f"{path}: not a preference model: expected spm.json + clip/, or a CLIP model folder "
                             f"(config.json + weights)")
        try:
            clip = CLIPModel.from_pretrained(clip_dir, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{clip_dir}: cannot load the CLIP model ({exc})") from exc
        tokenizer = find_tokenizer(path / "tokenizer", clip_dir, clip_dir / "tokenizer")
        meta = json.loads(spm_json.read_text()) if spm_json.exists() else {}
        if spm_json.exists() and meta.get("format") != SPM_FORMAT:
            raise ValueError(f"{spm_json}: unknown format {meta.get('format')!r}; expected {SPM_FORMAT!r}")
        model = cls(clip, tokenizer, preprocess=meta.get("preprocess", "antialias"))
        if spm_json.exists():
            state = load_file(path / "time_conditioning.safetensors")
            missing, unexpected = model.time.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path / 'time_conditioning.safetensors'}: does not fit this CLIP "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        else:
            logger.info("%s is a plain CLIP model: the SPM starts from it with identity time conditioning", path)
        model.to(dtype=dtype)
        if device is not None:
            model.to(device)
        return model.eval()


def find_tokenizer(*folders: Path):
    """The CLIP tokenizer of the first folder holding tokenizer files (vocab.json or tokenizer.json), or None."""
    from transformers import CLIPTokenizer

    for folder in folders:
        if any((folder / f).exists() for f in ("vocab.json", "tokenizer.json")):
            return CLIPTokenizer.from_pretrained(folder)
    return None


@torch.no_grad()
def average_weights(models: list[StepAwarePreferenceModel], coefficients: list[float]) -> StepAwarePreferenceModel:
    """A copy of `models[-1]` whose every weight is Σ_i c_i·θ_i (floating-point tensors; the others are
    taken from the last model). The models must share one architecture; the coefficients must sum to 1."""
    import copy

    if len(models) != len(coefficients) or not models:
        raise ValueError(f"need one coefficient per model; got {len(models)} models, {len(coefficients)} coefficients")
    if abs(sum(coefficients) - 1.0) > 1e-6:
        raise ValueError(f"the coefficients must sum to 1; got {coefficients}")
    states = [m.state_dict() for m in models]
    last = states[-1]
    if any(st.keys() != last.keys() or any(st[k].shape != v.shape for k, v in last.items()) for st in states):
        raise ValueError("averaging weights needs models of one architecture (SPMs fine-tuned from the same scorer, "
                         "or an SPM and that scorer)")
    out = copy.deepcopy(models[-1])
    out.load_state_dict({k: sum(c * st[k].float() for c, st in zip(coefficients, states)).to(v.dtype)
                         if v.is_floating_point() else v for k, v in last.items()})
    return out


def interpolate_weights(start: StepAwarePreferenceModel, tuned: StepAwarePreferenceModel,
                        alpha: float) -> StepAwarePreferenceModel:
    """WiSE-FT (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models", eq. 1): a copy of `tuned`
    whose every weight is θ_α = (1 − α)·θ_start + α·θ_tuned. `start` is the model fine-tuning began from
    (for an SPM: its base scorer with identity time conditioning), so α = 0 is the base scorer, α = 1
    the fine-tuned SPM, and α in between trades the fine-tune's gains for the start's robustness."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the WiSE-FT alpha must be in [0, 1]; got {alpha}")
    return average_weights([start, tuned], [1.0 - alpha, alpha])


def pocket_clip_config(vocab_size: int, bos: int, eos: int, pad: int, max_tokens: int, image_size: int = 32):
    """A small CLIP (≈0.3 M parameters) for the pocket world: hidden 64, 2 layers per tower."""
    from transformers import CLIPConfig

    text = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_tokens, bos_token_id=bos, eos_token_id=eos,
                pad_token_id=pad)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=4)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=64)
