"""Benchmark: our SPO round against the official implementation's compute pattern, in one run.

    python bench/spo_step.py                          # pocket model + pocket SPM, CPU
    python bench/spo_step.py --model random:sd15 --spm random:h14 --prompts 10   # on a GPU
    python bench/spo_step.py --model random:sdxl --spm random:h14 --pool 2 --prompts 2

One round = on-policy rollout with pools (k candidates per step, scored by the SPM) + training on
the round's pairs. Both sides use the same model, prompts, seeds and settings; they differ only in
the compute pattern:

  ours      one policy pass (grad) + one reference pass (adapters disabled, no_grad) per pair batch,
            since winner and loser share x_t; text features cached per prompt; SPM in bf16 on GPU.
  official  (RockeyCoss/SPO, spo_official.md W2–W4) policy and reference each run twice per pair
            (winner and loser separately, with CFG); the reference is a deep copy of the UNet; the
            SPM runs in fp32 and re-encodes the prompt on every call; x̂0 decoded at full resolution.

With `--fast-decode` ours also runs a third time with `fast_decode` (x̂0 latents shrunk to the SPM's
input size before the VAE instead of full-resolution decodes; the SPM's accuracy on the pocket
pairs is unchanged by it, see bench/RESULTS.md). With `--lspm` ours also runs with the latent SPM
(`pocket-latent`, a latent SPM folder, or `random`: a fresh one from the model's own UNet encoder,
for the real-size shapes), which scores the pool's candidates x_{t−1} themselves: no UNet pass on all
k candidates, no decode. It reports rollout and whole-round pairs per second against the pixel SPM.

Prints pairs per second and peak memory of each, and the ratio ours / official.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from pathlib import Path

import torch


def random_model(family: str, device, dtype):
    """A full-size SD1.5- or SDXL-shaped model with random weights, from the shipped configs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from spo_studio.backend.model_configs import config_dir
    from spo_studio.backend.models import DiffusionModel, ddim_scheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = config_dir(family)
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(root / "unet"))
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(root / "vae"))
    encoders = [CLIPTextModel(CLIPTextConfig.from_pretrained(root / "text_encoder"))]
    tokenizers = [CLIPTokenizer.from_pretrained(root / "tokenizer")]
    if family == "sdxl":
        encoders.append(CLIPTextModelWithProjection(CLIPTextConfig.from_pretrained(root / "text_encoder_2")))
        tokenizers.append(CLIPTokenizer.from_pretrained(root / "tokenizer_2"))
    for m in [unet, vae, *encoders]:
        m.to(device, dtype).eval().requires_grad_(False)
    return DiffusionModel(family=family, unet=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                          scheduler=ddim_scheduler(None), source=f"random:{family}", device=torch.device(device),
                          dtype=dtype, zero_negative=family == "sdxl")


def random_h14_spm(tokenizer):
    """A CLIP ViT-H/14-shaped SPM (PickScore_v1's architecture) with random weights."""
    from spo_studio.backend.preference.spm import StepAwarePreferenceModel
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, max_position_embeddings=77),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=1024)
    return StepAwarePreferenceModel(CLIPModel(cfg), tokenizer)


class PeakMemory:
    """Peak memory of a block: CUDA max_memory_allocated, or sampled process RSS on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            import psutil

            self.proc = psutil.Process()
            self.base = self.proc.memory_info().rss
            self.peak = self.base
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.result = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.result = self.peak
        self.result_mb = self.result / 2**20


class OfficialScorer:
    """The official scoring pattern: fp32 SPM, full-resolution decode, prompt re-encoded every call."""

    def __init__(self, spm, model):
        from spo_studio.backend.preference.scoring import Scorer

        self.inner = Scorer(spm, model, half=False)

    @torch.no_grad()
    def score_latents(self, latents, prompts, t=None):
        s = self.inner
        images = s.base_model.decode(latents)
        pixels = s.spm.preprocess(images)
        feats = s.spm.image_features(pixels.to(s.dtype), s._t(t, len(prompts)))
        text = s.spm.text_features(s.spm.tokenize(prompts).to(s.device))
        return s.spm.score_features(feats, text).float()


def train_pairs(model, unet, raw_unet, ref_unet, pairs, cfg, optimizer, official: bool, autocast):
    from spo_studio.backend.train.method import reference_pass
    from spo_studio.backend.train.spo import Pairs, pair_log_probs, spo_loss

    for i in range(0, len(pairs), cfg.train_batch_size):
        batch = pairs.index(range(i, min(i + cfg.train_batch_size, len(pairs))))
        cond = model.encode_prompts(batch.prompts)
        negative = model.encode_negative(len(batch))
        with autocast():
            if official:  # winner and loser through policy and reference separately, reference = a copy
                as_w = Pairs(batch.x_t, batch.x_w, batch.x_w, batch.t, batch.t_prev, batch.prompts)
                as_l = Pairs(batch.x_t, batch.x_l, batch.x_l, batch.t, batch.t_prev, batch.prompts)
                lp_w = pair_log_probs(model, unet, as_w, cond, negative, cfg)[0]
                lp_l = pair_log_probs(model, unet, as_l, cond, negative, cfg)[0]
                with torch.no_grad():
                    ref_w = pair_log_probs(model, ref_unet, as_w, cond, negative, cfg)[0]
                    ref_l = pair_log_probs(model, ref_unet, as_l, cond, negative, cfg)[0]
            else:
                lp_w, lp_l = pair_log_probs(model, unet, batch, cond, negative, cfg)
                ref_w, ref_l = reference_pass(raw_unet, lambda: pair_log_probs(model, raw_unet, batch, cond,
                                                                              negative, cfg))
        loss, _ = spo_loss(lp_w, lp_l, ref_w, ref_l, cfg.beta, cfg.clip_range)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_side(official: bool, args, device, dtype, fast_decode: bool = False, latent: bool = False) -> dict:
    import gc

    from spo_studio.backend.models import load_model
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.preference.spm import StepAwarePreferenceModel
    from spo_studio.backend.sources import prompts as load_prompts
    from spo_studio.backend.train.loop import attach_trainable_lora
    from spo_studio.backend.train.spo import SPOConfig, rollout

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    with PeakMemory(device) as mem:
        if args.model.startswith("random:"):
            torch.manual_seed(0)
            model = random_model(args.model.split(":", 1)[1], device, dtype)
        else:
            model = load_model(args.model, device=device, dtype=dtype)
        if latent:
            from spo_studio.backend.preference.latent_spm import LatentPreferenceModel, LatentScorer

            lspm = LatentPreferenceModel.from_base(model, seed=1) if args.lspm == "random" else \
                Scorer.from_path(args.lspm, model).spm
            spm = None
        elif args.spm == "random:h14":
            torch.manual_seed(1)
            spm = random_h14_spm(model.tokenizers[0])
        else:
            spm = StepAwarePreferenceModel.load(_spm_path(args.spm))
        ref_unet = copy.deepcopy(model.unet) if official else None
        cfg = SPOConfig(pool_size=args.pool, threshold=0.0, prompts_per_round=args.prompts,
                        train_batch_size=args.prompts, num_steps=args.steps, lora_rank=args.rank,
                        lora_alpha=float(args.rank), mixed_precision="no" if dtype == torch.float32 else "bf16",
                        trunk=args.trunk,
                        **({"lora_targets": args.lora_targets.split(",")} if args.lora_targets else {}))
        params = attach_trainable_lora(model.unet, model.family, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, 0)
        optimizer = torch.optim.AdamW(params, lr=1e-5)
        if latent:
            scorer = LatentScorer(lspm.to(device, dtype), model)
        else:
            scorer = OfficialScorer(spm, model) if official else Scorer(spm, model, latent_decode=fast_decode)
        prompts_all = load_prompts("pocket") if args.model == "pocket" else ["a beautiful lake at sunset"] * 64
        autocast = (lambda: torch.autocast(device_type=torch.device(device).type, dtype=dtype)) \
            if dtype != torch.float32 else torch.enable_grad  # noqa: E731
        pairs_done, seconds, t_roll, t_train = 0, 0.0, 0.0, 0.0
        for r in range(args.warmup + args.rounds):
            prompts = prompts_all[r * args.prompts % len(prompts_all):][:args.prompts]
            gen = torch.Generator().manual_seed(r)
            _sync(device)
            t0 = time.perf_counter()
            model.unet.eval()
            with autocast():
                pairs, _ = rollout(model, model.unet, scorer, prompts, cfg, gen)
            _sync(device)
            t1 = time.perf_counter()
            model.unet.train()
            train_pairs(model, model.unet, model.unet, ref_unet, pairs, cfg, optimizer, official, autocast)
            _sync(device)
            t2 = time.perf_counter()
            if r >= args.warmup:
                pairs_done += len(pairs)
                seconds += t2 - t0
                t_roll += t1 - t0
                t_train += t2 - t1
    return {"pairs_per_s": pairs_done / seconds, "pairs": pairs_done, "seconds": round(seconds, 2),
            "rollout_s": round(t_roll, 2), "train_s": round(t_train, 2), "peak_mb": round(mem.result_mb, 1)}


def _spm_path(spec):
    if spec == "pocket":
        from spo_studio.backend.sources import POCKET_SPM_DIR

        return POCKET_SPM_DIR
    return spec


def resolve_dtype(name: str | None, device) -> torch.dtype:
    """--dtype: fp32 or bf16; by default bf16 on a GPU, fp32 on a CPU."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, None: None}[name]
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return dtype


def device_name(device) -> str:
    return torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "cpu"


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    from spo_studio.backend.train.spo_levers import TRUNKS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="pocket", help="'pocket', a model folder, or random:sd15 / random:sdxl")
    p.add_argument("--spm", default="pocket", help="'pocket', an SPM folder, or random:h14")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="fp32 or bf16 (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--prompts", type=int, default=10, help="prompts per round (= micro-batch of pairs)")
    p.add_argument("--pool", type=int, default=4, help="k candidates per step")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank")
    p.add_argument("--trunk", default="candidate", choices=TRUNKS,
                   help="SPOConfig.trunk for every side: 'ddim' costs the pixel SPM one more UNet pass per step")
    p.add_argument("--lora-targets", default=None,
                   help="SPOConfig.lora_targets for every side, comma-separated (default: SPOConfig's, attention "
                        "only); the pocket preset's LoCon: to_q,to_k,to_v,to_out.0,conv1,conv2")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--fast-decode", action="store_true", help="also run ours with fast_decode (SPOConfig.fast_decode)")
    p.add_argument("--lspm", default=None,
                   help="also run ours with a latent SPM: 'pocket-latent', a latent SPM folder, or 'random'")
    p.add_argument("--json", default=None, help="also write the result here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dtype = resolve_dtype(args.dtype, args.device)
    result = {"official": run_side(True, args, args.device, dtype), "ours": run_side(False, args, args.device, dtype)}
    if args.fast_decode:
        result["ours_fast_decode"] = run_side(False, args, args.device, dtype, fast_decode=True)
    result["speedup_pairs_per_s"] = result["ours"]["pairs_per_s"] / result["official"]["pairs_per_s"]
    result["memory_ratio"] = result["ours"]["peak_mb"] / result["official"]["peak_mb"]
    if args.fast_decode:
        result["speedup_fast_decode"] = result["ours_fast_decode"]["pairs_per_s"] / result["official"]["pairs_per_s"]
    if args.lspm:
        result["ours_latent"] = run_side(False, args, args.device, dtype, latent=True)
        lat, pix = result["ours_latent"], result["ours"]
        result["latent_vs_pixel_rollout"] = (lat["pairs"] / lat["rollout_s"]) / (pix["pairs"] / pix["rollout_s"])
        result["latent_vs_pixel_round"] = lat["pairs_per_s"] / pix["pairs_per_s"]
        result["latent_vs_official_round"] = lat["pairs_per_s"] / result["official"]["pairs_per_s"]
    result["settings"] = {k: v for k, v in vars(args).items() if k != "json"}
    result["device_name"] = device_name(args.device)
    result["torch"] = torch.__version__
    print(json.dumps(result, indent=2))
    print(f"ours / official: {result['speedup_pairs_per_s']:.2f}x pairs per second, "
          f"{result['memory_ratio']:.2f}x peak memory")
    if args.fast_decode:
        print(f"ours with fast_decode / official: {result['speedup_fast_decode']:.2f}x pairs per second")
    if args.lspm:
        print(f"latent SPM / pixel SPM: rollouts {result['latent_vs_pixel_rollout']:.2f}x, whole round "
              f"{result['latent_vs_pixel_round']:.2f}x pairs per second; latent / official "
              f"{result['latent_vs_official_round']:.2f}x; peak memory {result['ours_latent']['peak_mb']:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
