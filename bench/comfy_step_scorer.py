"""Benchmark: the SPO Step Scorer node against a plain sampler at the same settings.

    python bench/comfy_step_scorer.py                      # pocket model, CPU, 20 steps, 1 thread
    python bench/comfy_step_scorer.py --steps 20 --repeats 7 --threads 1
    python bench/comfy_step_scorer.py --sides fast latent --repeats 15   # fast pixel path vs the latent SPM

Both run the node code path with ComfyUI's sampling conventions (`comfyui_nodes.standalone`: the
pocket model cannot be loaded by ComfyUI itself — its VAE and text encoder are not SD1.5-sized):

  plain    the same sampler (spo_ddim, ddim_uniform, CFG 5) and nothing else — what KSampler does;
  scorer   `run_step_scorer` (one per `--sides` entry): the same sampling, plus every step's x̂0 decoded
           by the VAE and scored by the SPM at its timestep (a latent SPM: every step's noisy latent
           scored, nothing decoded until the strip's one fitting decode), the score plot and the
           x̂0 strip rendered.

The scorer's decode + SPM work runs on a second thread on a CPU (`overlap`), pipelined with the
next steps' UNet passes, `--chunk` steps per batch; `--no-overlap` measures it inline.
Runs alternate (plain, then each side, the sides' order rotated every repeat) and the medians are
compared, so a background load hits all alike. Prints the per-step costs of the parts, the medians,
each side's ratio to the plain sampler (goal ≤ 1.15) and, with several sides, their ratios to the
first side, all measured in one run.
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


SIDES = {
    "full": "pixel pocket SPM, decode = full",
    "fast": "pixel pocket SPM, decode = fast",
    "latent": "pocket latent SPM (scores the sampler's latents; Latent2RGB strip)",
}


def load_side(name: str, model):
    """The scorer of one side: the pixel pocket SPM with the full or fast decode, or the pocket latent SPM."""
    if name == "latent":
        from spo_studio.backend.preference.scoring import Scorer

        return Scorer.from_path("pocket-latent", model), "pocket latent SPM (shipped)"
    scorer, spm_name = pocket_scorer()
    scorer.latent_decode = name == "fast"
    return scorer, spm_name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="denoising steps")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs of each (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-overlap", action="store_true", help="score inline instead of on a second thread")
    parser.add_argument("--chunk", type=int, default=None,
                        help="steps the scoring thread batches (default: the node's SCORE_CHUNK)")
    parser.add_argument("--sides", nargs="+", choices=list(SIDES), default=["full"],
                        help="the Step Scorers to time against the plain sampler, alternating in one run: "
                             + "; ".join(f"{k}: {v}" for k, v in SIDES.items()))
    parser.add_argument("--prompt", default="a red circle on a blue background")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    from spo_studio.backend.models import load_model
    from spo_studio.comfyui_nodes import render, run, standalone
    from spo_studio.comfyui_nodes.scoring import LatentJudge

    model = load_model("pocket", device="cpu")
    patcher, vae = standalone.wrap(model)
    positive, negative = standalone.encode(patcher, args.prompt), standalone.encode(patcher, "")
    overlap = not args.no_overlap
    chunk = run.SCORE_CHUNK if args.chunk is None else args.chunk
    sides = {name: load_side(name, model) for name in dict.fromkeys(args.sides)}

    def plain(seed: int) -> float:
        rt = standalone.StandaloneRuntime()
        start = time.perf_counter()
        latent = standalone.empty_latent(patcher)
        prep = run._prepare(rt, patcher, latent, seed, args.steps, "ddim_uniform")
        rt.sample(patcher, prep.noise, 5.0, rt.sampler("spo_ddim"), prep.sigmas, positive, negative, prep.samples,
                  None, None, seed)
        return time.perf_counter() - start

    def scorer_node(scorer, seed: int) -> float:
        rt = standalone.StandaloneRuntime(overlap=overlap)
        start = time.perf_counter()
        run.run_step_scorer(rt, patcher, positive, negative, standalone.empty_latent(patcher), vae, scorer,
                            args.prompt, seed, args.steps, 5.0, "spo_ddim", "ddim_uniform", chunk=chunk)
        return time.perf_counter() - start

    def per_call(fn, n=20) -> float:
        fn()
        times = []
        for _ in range(n):
            s = time.perf_counter()
            fn()
            times.append(time.perf_counter() - s)
        return statistics.median(times)

    # the parts, per step (ms)
    x = torch.randn(1, 4, 16, 16)
    sigma = torch.tensor([3.0])
    parts = {"unet_cfg_ms": per_call(lambda: patcher.model.cfg_denoise(x, sigma, positive, negative, 5.0)) * 1e3,
             "plot_and_strip_ms": per_call(lambda: (
                 render.to_image_tensor(render.score_plot_picture(list(range(args.steps)), [[0.1]] * args.steps)),
                 render.x0_strip(torch.rand(args.steps, 1, 3, 64, 64), list(range(args.steps)),
                                 [[0.1]] * args.steps)), 5) * 1e3}
    for name, (scorer, _) in sides.items():
        judge = LatentJudge(scorer, vae, args.prompt, base_model=patcher.model)
        decode = per_call(lambda: judge.decode(x)) * 1e3
        if judge.reads_noisy_latents:  # no decode per step: the strip's one decode is in the run's time
            parts[f"{name}_per_step_ms"] = {"spm": per_call(lambda: judge.score_noisy(x, sigma)) * 1e3}
        else:
            spm = per_call(lambda: judge.score_images(judge.decode(x), 500)) * 1e3 - decode
            parts[f"{name}_per_step_ms"] = {"vae_decode": decode, "spm": spm}

    plain(0)
    for scorer, _ in sides.values():  # warm-up
        scorer_node(scorer, 0)
    t_plain, t_sides = [], {name: [] for name in sides}
    names = list(sides)
    for i in range(args.repeats):  # alternating, the sides' order rotated, so a background load hits all alike
        t_plain.append(plain(i + 1))
        for name in names[i % len(names):] + names[:i % len(names)]:
            t_sides[name].append(scorer_node(sides[name][0], i + 1))
    plain_s = statistics.median(t_plain)
    result = {
        "model": "pocket", "device": "cpu", "threads": args.threads, "steps": args.steps, "overlap": overlap,
        "chunk": chunk if overlap else 1, "repeats": args.repeats, "plain_s": plain_s,
        "plain_all_s": [round(t, 4) for t in t_plain],
        **{k: round(v, 2) if isinstance(v, float) else {a: round(b, 2) for a, b in v.items()}
           for k, v in parts.items()},
        "sides": {name: {"spm": sides[name][1], "setting": SIDES[name], "scorer_s": statistics.median(t),
                         "all_s": [round(v, 4) for v in t]} for name, t in t_sides.items()},
    }
    for side in result["sides"].values():
        side["ratio"] = side["scorer_s"] / plain_s
    print(json.dumps(result, indent=2))
    for name, side in result["sides"].items():
        print(f"Step Scorer ({name}) / plain sampler = {side['ratio']:.3f}  "
              f"(goal <= 1.15; {'met' if side['ratio'] <= 1.15 else 'NOT met'})")
    if len(names) > 1:
        base = names[0]
        for name in names[1:]:
            ratio = result["sides"][name]["scorer_s"] / result["sides"][base]["scorer_s"]
            print(f"Step Scorer {name} / {base} = {ratio:.3f} (same run)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
