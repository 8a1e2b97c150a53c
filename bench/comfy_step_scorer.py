"""Benchmark: the SPO Step Scorer node against a plain sampler at the same settings.

    python bench/comfy_step_scorer.py                      # pocket model, CPU, 20 steps, 1 thread
    python bench/comfy_step_scorer.py --steps 20 --repeats 7 --threads 1

Both run the node code path with ComfyUI's sampling conventions (`comfyui_nodes.standalone`: the
pocket model cannot be loaded by ComfyUI itself — its VAE and text encoder are not SD1.5-sized):

  plain    the same sampler (spo_ddim, ddim_uniform, CFG 5) and nothing else — what KSampler does;
  scorer   `run_step_scorer`: the same sampling, plus every step's x̂0 decoded by the VAE and scored
           by the SPM at its timestep, the score plot and the x̂0 strip rendered.

The scorer's decode + SPM work runs on a second thread on a CPU (`overlap`), pipelined with the
next steps' UNet passes, `--chunk` steps per batch; `--no-overlap` measures it inline.
Runs alternate (plain, scorer, plain, …)
and the medians are compared, so a background load hits both alike. Prints the per-step costs of
the parts, the medians and the ratio scorer / plain (goal ≤ 1.15).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

import torch

logger = logging.getLogger("bench.comfy_step_scorer")


def pocket_scorer():
    """The shipped pocket SPM, or a random one of its size when it is not built yet."""
    from spo_studio.backend.preference.scoring import Scorer
    from spo_studio.backend.sources import POCKET_SPM_DIR

    if (POCKET_SPM_DIR / "spm.json").exists():
        return Scorer.from_path("pocket"), "pocket SPM (shipped)"
    from spo_studio.backend.models import POCKET_DIR
    from spo_studio.backend.preference.spm import StepAwarePreferenceModel, pocket_clip_config
    from transformers import AutoTokenizer, CLIPModel

    tok = AutoTokenizer.from_pretrained(POCKET_DIR / "tokenizer")
    torch.manual_seed(0)
    clip = CLIPModel(pocket_clip_config(len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id,
                                        tok.model_max_length))
    return Scorer(StepAwarePreferenceModel(clip, tok)), "random SPM of the pocket SPM's size (not built yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-overlap", action="store_true", help="score inline instead of on a second thread")
    parser.add_argument("--chunk", type=int, default=None,
                        help="steps the scoring thread batches (default: the node's SCORE_CHUNK)")
    parser.add_argument("--decode", choices=["full", "fast"], default="full",
                        help="the SPM Loader's decode setting: full VAE decode, "
                             "or the latent shrunk to the SPM's size")
    parser.add_argument("--spm", choices=["pocket", "pocket-latent"], default="pocket",
                        help="the pixel pocket SPM, or the latent one (scores the sampler's latents and decodes "
                             "nothing while sampling; the x̂0 strip is a Latent2RGB preview fitted to one decode "
                             "of the final x̂0)")
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from spo_studio.backend.models import load_model
    from spo_studio.comfyui_nodes import run, sampling, standalone

    model = load_model("pocket", device="cpu")
    if args.spm == "pocket-latent":
        from spo_studio.backend.preference.scoring import Scorer

        scorer, spm_name = Scorer.from_path("pocket-latent", model), "pocket latent SPM (shipped)"
    else:
        scorer, spm_name = pocket_scorer()
        scorer.latent_decode = args.decode == "fast"
    patcher, vae = standalone.wrap(model)
    positive, negative = standalone.encode(patcher, args.prompt), standalone.encode(patcher, "")
    overlap = not args.no_overlap
    chunk = run.SCORE_CHUNK if args.chunk is None else args.chunk

    def plain(seed: int) -> float:
        rt = standalone.StandaloneRuntime()
        start = time.perf_counter()
        latent = standalone.empty_latent(patcher)
        prep = run._prepare(rt, patcher, latent, seed, args.steps, "ddim_uniform")
        rt.sample(patcher, prep.noise, 5.0, rt.sampler("spo_ddim"), prep.sigmas, positive, negative, prep.samples,
                  None, None, seed)
        return time.perf_counter() - start

    def scorer_node(seed: int) -> float:
        rt = standalone.StandaloneRuntime(overlap=overlap)
        start = time.perf_counter()
        run.run_step_scorer(rt, patcher, positive, negative, standalone.empty_latent(patcher), vae, scorer,
                            args.prompt, seed, args.steps, 5.0, "spo_ddim", "ddim_uniform", chunk=chunk)
        return time.perf_counter() - start

    # the parts, per step
    from spo_studio.comfyui_nodes import render
    from spo_studio.comfyui_nodes.scoring import LatentJudge

    judge = LatentJudge(scorer, vae, args.prompt, base_model=patcher.model)
    x = torch.randn(1, 4, 16, 16)
    sigma = torch.tensor([3.0])

    def per_call(fn, n=20) -> float:
        fn()
        times = []
        for _ in range(n):
            s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - s)
        return statistics.median(times)

    parts = {
        "unet_cfg_ms": per_call(lambda: patcher.model.cfg_denoise(x, sigma, positive, negative, 5.0)) * 1e3,
        "vae_decode_ms": per_call(lambda: judge.decode(x)) * 1e3,
        "spm_ms": (per_call(lambda: judge.score_noisy(x, 3.0)) * 1e3 if judge.reads_noisy_latents
                   else per_call(lambda: judge.score_images(judge.decode(x), 500)) * 1e3),
        "plot_and_strip_ms": per_call(lambda: (render.to_image_tensor(render.score_plot_picture(
                                                   list(range(args.steps)), [[0.1]] * args.steps)),
                                               render.x0_strip(torch.rand(args.steps, 1, 3, 64, 64),
                                                               list(range(args.steps)),
                                                               [[0.1]] * args.steps)), 5) * 1e3,
    }
    parts["spm_ms"] -= parts["vae_decode_ms"]
    del sampling

    plain(0), scorer_node(0)  # warm-up
    t_plain, t_scorer = [], []
    for i in range(args.repeats):
        t_plain.append(plain(i + 1))
        t_scorer.append(scorer_node(i + 1))
    result = {
        "model": "pocket", "spm": spm_name, "device": "cpu", "threads": args.threads, "steps": args.steps,
        "overlap": overlap, "chunk": chunk if overlap else 1, "repeats": args.repeats,
        "decode": "none (latent SPM; Latent2RGB strip)" if judge.reads_noisy_latents else args.decode,
        "plain_s": statistics.median(t_plain), "scorer_s": statistics.median(t_scorer),
        "plain_all_s": [round(t, 4) for t in t_plain], "scorer_all_s": [round(t, 4) for t in t_scorer],
        **{k: round(v, 2) for k, v in parts.items()},
    }
    result["ratio"] = result["scorer_s"] / result["plain_s"]
    print(json.dumps(result, indent=2))
    print(f"Step Scorer / plain sampler = {result['ratio']:.3f}  (goal <= 1.15; "
          f"{'met' if result['ratio'] <= 1.15 else 'NOT met'})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
