"""Evaluate a base model and its LoRAs on a prompt set: `spo eval`, and the table of `spo demo`.

    spo eval --model pocket --lora runs/pocket_spo/lora/spo_lora_diffusers.safetensors \
             --prompts pocket-held-out --seeds 4 --out eval/

Every variant (the base model, and the base with each LoRA at strength 1) samples the same
(prompt, seed) grid with the same sampler (DDIM 20 steps, η = 0, CFG 5: the paper's evaluation
protocol), so differences are paired. Metrics:
  * pocket judges (`alignment`, `aesthetic`) whenever every prompt is in the pocket grammar;
  * `pickscore` (a PickScore/CLIP folder: exp(τ)·cos), `clip_score` (a CLIP folder: 100·max(cos, 0)),
    `laion_aesthetic` (the improved-aesthetic-predictor MLP .pth on a CLIP ViT-L/14 folder),
    `hpsv2` (a HPS_v2*.pt; needs the optional `hpsv2` package) and `image_reward` (an ImageReward.pt;
    needs the optional `image-reward` package) — each only when its weights are given as local paths.
`report.json`: per variant and metric mean, standard error and n; for each LoRA the
paired difference to base (mean, standard error, n); prompts file, seeds, sampler settings; and a
side-by-side grid PNG (one row per prompt, one column per variant).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .config import atomic_write_text

logger = logging.getLogger(__name__)


@dataclass
class EvalSettings:
    num_steps: int = 20
    cfg_scale: float = 5.0
    eta: float = 0.0
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    batch: int = 32


def mean_se(values) -> dict:
    arr = np.asarray(values, dtype=np.float64)
    n = len(arr)
    se = float(arr.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": float(arr.mean()) if n else float("nan"), "stderr": se, "n": n}


def load_eval_prompts(spec: str) -> list[str]:
    """'pocket-held-out' / 'pocket-train' (the pocket split), or a .txt / .json / .parquet prompts file."""
    from . import sources

    return sources.prompts(spec)


# ----------------------------------------------------------------------------------------------
# Metrics: each is a callable (images float [B, 3, H, W] in [0, 1], prompts) → scores [B]
# ----------------------------------------------------------------------------------------------


def pocket_judges() -> dict:
    """The pocket world's two judges as metrics: (images [B, 3, H, W] in [0, 1], prompts) → scores [B]."""
    from .pocket import judges

    def to_uint8(images):
        return list((images.permute(0, 2, 3, 1).float().cpu().numpy() * 255).round().astype(np.uint8))

    return {
        "alignment": lambda images, ps: [float(v["all_ok"]) for v in judges.alignment_batch(to_uint8(images), ps)],
        "aesthetic": lambda images, ps: judges.aesthetic_batch(to_uint8(images)),
    }


def _pocket_metrics(prompts: list[str]) -> dict:
    """The pocket judges, when every prompt is in the pocket grammar (else none)."""
    from .pocket import world

    try:
        for p in prompts:
            world.parse_prompt(p)
    except ValueError:
        return {}
    return pocket_judges()


class _Clip:
    """A CLIP (or PickScore) folder, used without time conditioning."""

    def __init__(self, path: str | Path, device):
        from .preference.scoring import Scorer

        self.scorer = Scorer.from_path(path, None, device=device, half=False)

    def features(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        spm = self.scorer.spm
        img = spm.image_features(spm.preprocess(images.to(self.scorer.device)), None).float()
        return img, self.scorer.text_features(prompts).float()


def pickscore_metric(path, device):
    clip = _Clip(path, device)
    return lambda images, prompts: clip.scorer.score_images(images, prompts, None).tolist()


def clip_score_metric(path, device):
    clip = _Clip(path, device)

    def score(images, prompts):
        img, txt = clip.features(images, prompts)
        return (100 * (img * txt).sum(-1).clamp(min=0)).tolist()

    return score


class LaionAestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head: 768 → 1024 → 128 → 64 → 16 → 1 on unit CLIP ViT-L/14
    image embeddings (dropout layers kept as identities so the state-dict indices 0, 2, 4, 6, 7 match)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Identity(), torch.nn.Linear(1024, 128), torch.nn.Identity(),
            torch.nn.Linear(128, 64), torch.nn.Identity(), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def laion_aesthetic_metric(mlp_path, clip_path, device):
    path = Path(mlp_path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such aesthetic-predictor weights file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a bad file
        raise ValueError(f"{path}: not a readable torch state dict ({exc})") from exc
    state = {k: v for k, v in state.items() if k.startswith("layers.")}
    if "layers.0.weight" not in state:
        raise ValueError(f"{path}: not an improved-aesthetic-predictor state dict (no layers.0.weight)")
    mlp = LaionAestheticMLP(state["layers.0.weight"].shape[1])
    mlp.load_state_dict(state)
    mlp.eval().to(device)
    clip = _Clip(clip_path, device)

    @torch.no_grad()
    def score(images, prompts):
        img, _ = clip.features(images, prompts)
        return mlp(F.normalize(img, dim=-1)).squeeze(-1).tolist()

    return score


def hpsv2_metric(path, device):
    try:
        import hpsv2  # noqa: F401  (optional: needs open_clip_torch and a working torchvision)
    except ImportError as exc:
        raise RuntimeError(f"{path}: HPSv2 scoring needs the optional `hpsv2` package (open_clip_torch + "
                           f"torchvision, a GPU setup): {exc}") from exc
    from hpsv2.src.open_clip import create_model_and_transforms, get_tokenizer

    model, _, preprocess = create_model_and_transforms("ViT-H-14", pretrained=None, device=device)
    model.load_state_dict(torch.load(path, map_location="cpu")["state_dict"])
    model.eval()
    tokenizer = get_tokenizer("ViT-H-14")

    @torch.no_grad()
    def score(images, prompts):
        from PIL import Image

        pix = torch.stack([preprocess(Image.fromarray(a)) for a in
                           (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)]).to(device)
        out = model(pix, tokenizer(prompts).to(device))
        return (out["image_features"] * out["text_features"]).sum(-1).tolist()

    return score


def image_reward_metric(path, device):
    try:
        import ImageReward as RM
    except ImportError as exc:
        raise RuntimeError(f"{path}: ImageReward scoring needs the optional `image-reward` package: {exc}") from exc
    model = RM.load(str(path), device=device)

    def score(images, prompts):
        from PIL import Image

        pils = [Image.fromarray(a) for a in (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)]
        return [float(model.score(p, [im])) for p, im in zip(prompts, pils)]

    return score


# ----------------------------------------------------------------------------------------------
# Sampling the variants
# ----------------------------------------------------------------------------------------------


def _peft_parts(model) -> list:
    parts = [model.unet, *model.text_encoders] if hasattr(model, "text_encoders") else [model.unet]
    return [m for m in parts if getattr(m, "peft_config", None)]


def activate(model, adapter: str | None) -> None:
    """Make `adapter` the only active LoRA of the model, or none (`None`: the base model)."""
    for part in _peft_parts(model):
        if adapter is None or adapter not in part.peft_config:
            part.disable_adapters()
        else:
            part.enable_adapters()
            part.set_adapter(adapter)


@torch.no_grad()
def sample_images(model, prompts: list[str], seeds: list[int], settings: EvalSettings) -> torch.Tensor:
    """Images [N, 3, H, W] in [0, 1] for (prompt, seed) pairs; the starting noise depends only on the seed."""
    from . import diffusion

    out = []
    for i in range(0, len(prompts), settings.batch):
        ps, ss = prompts[i:i + settings.batch], seeds[i:i + settings.batch]
        latents = torch.cat(
            [diffusion.initial_latents(model, 1, generator=torch.Generator().manual_seed(s)) for s in ss]
        )
        traj = diffusion.sample(model, ps, num_steps=settings.num_steps, cfg_scale=settings.cfg_scale,
                                eta=settings.eta, latents=latents, generator=torch.Generator().manual_seed(ss[0]),
                                record=False)
        out.append(model.decode(traj.latents).float().cpu())
    return torch.cat(out)


def write_grid(columns: dict[str, torch.Tensor], prompts: list[str], out_png: Path, scale: int = 1,
               max_rows: int = 12) -> None:
    """One row per prompt (first seed), one column per variant, labelled; written atomically."""
    from PIL import Image, ImageDraw

    names = list(columns)
    rows = min(max_rows, len(prompts))
    size = columns[names[0]].shape[-1] * scale
    label_w, head_h = 300, 18
    sheet = Image.new("RGB", (label_w + len(names) * size, head_h + rows * size), "white")
    draw = ImageDraw.Draw(sheet)
    for c, name in enumerate(names):
        draw.text((label_w + c * size + 4, 3), name, fill="black")
    for r in range(rows):
        draw.text((6, head_h + r * size + size // 2 - 6), prompts[r][:48], fill="black")
        for c, name in enumerate(names):
            arr = (columns[name][r].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            sheet.paste(
                Image.fromarray(arr).resize((size, size), Image.NEAREST), (label_w + c * size, head_h + r * size)
            )
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(out_png.name + ".tmp.png")
    sheet.save(tmp)
    tmp.replace(out_png)


def evaluate(model, loras: dict[str, str | Path], prompts: list[str], settings: EvalSettings, out_dir: str | Path,
             metric_paths: dict[str, object] | None = None, prompts_source: str = "") -> dict:
    """Sample base + each LoRA on prompts × seeds, score every metric, write report.json and grid.png."""
    from .lora import load_lora

    out_dir = Path(out_dir)
    metric_paths = {k: v for k, v in (metric_paths or {}).items() if v}
    device = model.device
    metrics = _pocket_metrics(prompts)
    builders = {"pickscore": pickscore_metric, "clip_score": clip_score_metric, "hpsv2": hpsv2_metric,
                "image_reward": image_reward_metric}
    for name, path in metric_paths.items():
        if name == "laion_aesthetic":
            metrics[name] = laion_aesthetic_metric(path[0], path[1], device)
        else:
            metrics[name] = builders[name](path, device)
    if not metrics:
        raise ValueError("no metric to compute: the prompts are not pocket prompts and no scorer weights were given")
    for i, (name, path) in enumerate(loras.items()):
        load_lora(model, path, adapter_name=f"eval{i}")

    flat_prompts = [p for p in prompts for _ in settings.seeds]
    flat_seeds = [s for _ in prompts for s in settings.seeds]
    variants = {"base": None, **{name: f"eval{i}" for i, name in enumerate(loras)}}
    scores: dict[str, dict[str, list[float]]] = {}
    firsts: dict[str, torch.Tensor] = {}
    for name, adapter in variants.items():
        activate(model, adapter)
        images = sample_images(model, flat_prompts, flat_seeds, settings)
        firsts[name] = images[:: len(settings.seeds)]
        scores[name] = {m: [float(v) for v in fn(images, flat_prompts)] for m, fn in metrics.items()}
        logger.info("%s: %s", name, "  ".join(f"{m} {np.mean(v):.4f}" for m, v in scores[name].items()))
    activate(model, None)

    report = {
        "prompts": prompts_source, "n_prompts": len(prompts), "seeds": list(settings.seeds),
        "sampler": {"name": "ddim", "num_steps": settings.num_steps, "eta": settings.eta,
                    "cfg_scale": settings.cfg_scale},
        "loras": {k: str(v) for k, v in loras.items()},
        "metrics": {name: {m: mean_se(v) for m, v in per.items()} for name, per in scores.items()},
        "vs_base": {name: {m: mean_se(np.asarray(v) - np.asarray(scores["base"][m])) for m, v in per.items()}
                    for name, per in scores.items() if name != "base"},
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2))
    scale = max(1, 128 // firsts["base"].shape[-1])
    write_grid(firsts, prompts, out_dir / "grid.png", scale=scale)
    return report


def format_table(report: dict) -> str:
    """A plain-text table: one row per variant, mean ± standard error per metric (n in the header)."""
    names = list(report["metrics"])
    metric_names = list(report["metrics"][names[0]])
    n = report["metrics"][names[0]][metric_names[0]]["n"]
    lines = [f"{'variant':<10}" + "".join(f"{m:>24}" for m in metric_names) + f"   (n = {n} images each)"]
    for name in names:
        lines.append(f"{name:<10}" + "".join(
            f"{report['metrics'][name][m]['mean']:>15.4f} ± {report['metrics'][name][m]['stderr']:.4f}"
            for m in metric_names))
    for name, per in report.get("vs_base", {}).items():
        lines.append(f"{name + '−base':<10}" + "".join(
            f"{per[m]['mean']:>+15.4f} ± {per[m]['stderr']:.4f}" for m in metric_names))
    return "\n".join(lines)
