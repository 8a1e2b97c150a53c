"""Step inspector and pool explorer: glue between the page and `backend` (no gradio import here).

    lab = Inspector()
    result = lab.score_steps("pocket", "pocket", ["runs/…/spo_lora_webui.safetensors"], "a red circle …",
                             seed=0, steps=20, cfg_scale=5.0, eta=1.0)
    pool = lab.pool("pocket", "pocket", None, "a red circle …", seed=0, steps=20, step=10, k=4)

The per-step scores come from `preference.evaluate.score_trajectory`; the pool is drawn exactly as an
SPO rollout draws it (`diffusion.sample_pool` from the shared x_t, candidates scored by the SPM on
their one-step x̂0 at t−1, winner = argmax, loser = argmin, kept when p_w − p_l > threshold).
Models, scorers and LoRA adapters are cached; one lock serialises the work.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

THUMB = 128  # thumbnails are at most this many pixels wide


def to_uint8(images, size: int = THUMB) -> list[np.ndarray]:
    """Images [B, 3, H, W] in [0, 1] → HWC uint8 arrays, downscaled to at most `size` pixels."""
    import torch.nn.functional as F

    images = images.float().cpu().clamp(0, 1)
    if images.shape[-1] > size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return [(img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for img in images]


@dataclass
class _Loaded:
    model: object
    adapters: dict[str, tuple[str, float]] = field(default_factory=dict)  # key → (adapter name, mtime)


class Inspector:
    def __init__(self, device: str | None = None, max_models: int = 1):
        self.device = device
        self.max_models = max_models
        self._models: OrderedDict[str, _Loaded] = OrderedDict()
        self._scorers: dict[tuple[str, str], object] = {}
        self.lock = threading.Lock()

    # -- caches -------------------------------------------------------------------------------------

    def _model(self, source: str) -> _Loaded:
        from ..backend.models import load_model

        source = (source or "pocket").strip()
        if source in self._models:
            self._models.move_to_end(source)
            return self._models[source]
        while len(self._models) >= self.max_models:  # one big model at a time
            old, _ = self._models.popitem(last=False)
            self._scorers = {k: v for k, v in self._scorers.items() if k[1] != old}
        loaded = _Loaded(load_model(source, device=self.device))
        self._models[source] = loaded
        return loaded

    def _scorer(self, spm: str, source: str, loaded: _Loaded):
        from ..backend.preference.scoring import Scorer

        key = ((spm or "pocket").strip(), source)
        if key not in self._scorers:
            self._scorers[key] = Scorer.from_path(key[0], loaded.model)
        return self._scorers[key]

    def _adapter(self, loaded: _Loaded, lora: str, scale: float) -> str:
        """Attach a LoRA file once per (file, mtime) as its own adapter; returns the adapter name."""
        from ..backend import lora as lora_io

        path = Path(lora).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{lora}: no such LoRA file")
        key, mtime = str(path.resolve()), path.stat().st_mtime
        name, seen = loaded.adapters.get(key, (None, None))
        if name is not None and seen != mtime:  # the file changed: load it again
            self._components_with_adapter(loaded.model, name, delete=True)
            name = None
        if name is None:
            name = f"lora{len(loaded.adapters)}_{int(mtime)}"
            lora_io.load_lora(loaded.model, path, adapter_name=name, scale=scale)
            loaded.adapters[key] = (name, mtime)
        for module in self._components_with_adapter(loaded.model, name):
            lora_io.set_lora_scale(module, scale, name)
        return name

    @staticmethod
    def _components_with_adapter(model, name: str, delete: bool = False) -> list:
        out = []
        for module in [model.unet, *model.text_encoders]:
            if name in (getattr(module, "peft_config", None) or {}):
                if delete:
                    module.delete_adapters(name) if hasattr(module, "delete_adapters") else module.delete_adapter(name)
                else:
                    out.append(module)
        return out

    @staticmethod
    def _activate(model, name: str | None) -> None:
        """Only adapter `name` active (None: the base model, every adapter off)."""
        for module in [model.unet, *model.text_encoders]:
            config = getattr(module, "peft_config", None) or {}
            if not config:
                continue
            if name is not None and name in config:
                module.set_adapter(name)
                module.enable_adapters()
            else:
                module.disable_adapters()

    # -- the two tools ------------------------------------------------------------------------------

    def score_steps(self, model: str, spm: str, loras: list[str] | None, prompt: str, seed: int = 0,
                    steps: int = 20, cfg_scale: float = 5.0, eta: float = 1.0, lora_scale: float = 1.0) -> dict:
        """Per-step scores and x̂0 thumbnails of one trajectory, for the base and for each LoRA (same seed)."""
        from ..backend.preference.evaluate import score_trajectory

        prompt = _check_prompt(prompt)
        steps = _check_steps(steps)
        with self.lock:
            loaded = self._model(model)
            scorer = self._scorer(spm, (model or "pocket").strip(), loaded)
            series = [("base", None)] + [(Path(p).stem, p) for p in (loras or []) if p]
            out = {"timesteps": None, "series": []}
            try:
                for label, path in series:
                    name = self._adapter(loaded, path, lora_scale) if path else None
                    self._activate(loaded.model, name)
                    res = score_trajectory(loaded.model, scorer, prompt, seed=int(seed), num_steps=steps,
                                           cfg_scale=float(cfg_scale), eta=float(eta))
                    out["timesteps"] = res["timesteps"]
                    out["series"].append({"label": label, "scores": res["scores"],
                                          "thumbnails": to_uint8(res["thumbnails"]),
                                          "final": to_uint8(res["final"], size=256)[0]})
            finally:
                self._activate(loaded.model, None)
        return out

    def pool(self, model: str, spm: str, lora: str | None, prompt: str, seed: int = 0, steps: int = 20,
             step: int = 10, k: int = 4, cfg_scale: float = 5.0, eta: float = 1.0, threshold: float = 0.3,
             lora_scale: float = 1.0) -> dict:
        """The k candidates an SPO rollout would draw at `step` of the trajectory with this seed, scored."""
        import torch

        from ..backend import diffusion
        from ..backend.train.spo import select_pairs

        prompt = _check_prompt(prompt)
        steps = _check_steps(steps)
        step, k = int(step), int(k)
        if not 0 <= step < steps:
            raise ValueError(f"step must lie in [0, {steps - 1}] for a {steps}-step trajectory; got {step}")
        if k < 2:
            raise ValueError(f"a pool needs k >= 2 candidates; got {k}")
        if float(eta) <= 0:
            raise ValueError("a pool needs eta > 0: with eta = 0 every candidate is the same point")
        with self.lock, torch.no_grad():
            loaded = self._model(model)
            m = loaded.model
            scorer = self._scorer(spm, (model or "pocket").strip(), loaded)
            try:
                self._activate(m, self._adapter(loaded, lora, lora_scale) if lora else None)
                # the trajectory up to x_t: the same draws as the step inspector's (diffusion.sample)
                traj = diffusion.sample(m, [prompt], num_steps=steps, cfg_scale=float(cfg_scale), eta=float(eta),
                                        generator=torch.Generator().manual_seed(int(seed)))
                rec = traj.steps[step]
                cond, negative = m.encode_prompts([prompt]), m.encode_negative(1)
                pred = diffusion.predict(m, rec.x_t, rec.t, rec.t_prev, cond, negative, float(cfg_scale))
                gen = torch.Generator().manual_seed(int(seed) * 1000 + step)
                pool = diffusion.sample_pool(pred, k, float(eta), gen)
                flat = pool.candidates.reshape(k, *rec.x_t.shape[1:])
                if rec.t_prev >= 0:  # score each candidate's one-step x̂0 at t−1, as the rollout does
                    grid = diffusion.timesteps(m.scheduler, steps)
                    t_next, t_next_prev = grid[step + 1], diffusion.prev_timestep(m.scheduler, grid[step + 1], steps)
                    nxt = diffusion.predict(m, flat, t_next, t_next_prev, cond.repeat_interleave(k),
                                            negative.repeat_interleave(k), float(cfg_scale))
                    shown, t_scored = nxt.x0_hat, t_next
                else:  # the last step's candidates are clean images, scored at t = 0
                    shown, t_scored = flat, 0
                if getattr(scorer, "reads_noisy_latents", False):  # a latent SPM reads the candidates themselves
                    scores = scorer.score_latents(flat, [prompt] * k, max(rec.t_prev, 0)).float().cpu()
                else:
                    scores = scorer.score_latents(shown, [prompt] * k, t_scored).float().cpu()
                win, lose, keep = select_pairs(scores[None], float(threshold))
                images = to_uint8(m.decode(shown), size=192)
                shared = to_uint8(m.decode(pred.x0_hat), size=192)[0]
            finally:
                self._activate(m, None)
        s_w, s_l = scores[win[0]].item(), scores[lose[0]].item()
        return {"t": rec.t, "t_prev": rec.t_prev, "t_scored": t_scored, "scores": scores.tolist(),
                "winner": int(win[0]), "loser": int(lose[0]), "gap": float(torch.tanh(torch.tensor((s_w - s_l) / 2))),
                "kept": bool(keep[0]), "threshold": float(threshold), "candidates": images, "shared_x0": shared}


def _check_prompt(prompt: str) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise ValueError("enter a prompt")
    if len(prompt) > 2000:
        raise ValueError("the prompt is longer than 2000 characters")
    return prompt


def _check_steps(steps) -> int:
    steps = int(steps)
    if not 2 <= steps <= 200:
        raise ValueError(f"steps must lie in [2, 200]; got {steps}")
    return steps
