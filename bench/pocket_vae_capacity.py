"""Diagnostic: would a pocket VAE with more latent channels make the t = 0 round trip less lossy?

    python bench/pocket_vae_capacity.py [--steps 1500] [--channels 4 8] [--blocks 32,64,64] [--grad-weight 0]

The pocket SPM's t = 0 accuracy is capped by the VAE round trip (README, "What limits it"): an
oracle that knows the crowd's utility gets 0.790 on clean held-out pairs and 0.750 on round-tripped
ones. This trains one VAE per latent-channel count (and `--blocks`, the latent's side) with the *same*
recipe and budget (`train_vae`:
L1 + small KL on 32 px crops; the images a 1 : 1 mix of the pocket model's own samples — the
training pairs' 3,200 images — and as many world renders), then measures on the held-out pairs'
images the round-trip L1 (posterior mean; 1/255 is one grey level) and the oracle's pairwise
accuracy against the crowd's labels on the round-tripped images. A comparison between channel
counts, not with the shipped VAE (trained on renders, then its encoder refit: another budget).
Nothing here is shipped; a bigger latent means rebuilding the whole pocket world (README).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger("bench.pocket_vae_capacity")


def unique_images(path) -> torch.Tensor:
    from spo_studio.backend.preference.data import PickAPicStream
    from spo_studio.backend.preference.train import images_tensor

    unique: dict[bytes, np.ndarray] = {}
    for pair in PickAPicStream(path).iter_epoch(0):
        for image in (pair.image0, pair.image1):
            unique.setdefault(image.tobytes(), image)
    return images_tensor(list(unique.values()), 64)


def to_arrays(images: torch.Tensor) -> list[np.ndarray]:
    return list((images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8))


def oracle_accuracy(pairs, images0: list[np.ndarray], images1: list[np.ndarray]) -> float:
    from spo_studio.backend.pocket.preference_data import crowd_utility

    def utility(image, caption):
        return crowd_utility(image, caption)["utility"]

    correct = [(utility(a, p.caption) > utility(b, p.caption)) == (p.label0 > p.label1)
               for p, a, b in zip(pairs, images0, images1)]
    return sum(correct) / len(correct)


def main() -> None:
    from spo_studio.backend.pocket.base_model import PocketModelConfig, round_trip, train_vae
    from spo_studio.backend.pocket.build import world_dataset
    from spo_studio.backend.pocket.preference_data import HELD_OUT_PAIRS, TRAIN_PAIRS
    from spo_studio.backend.preference.evaluate import load_pairs
    from spo_studio.backend.preference.train import images_tensor

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500, help="VAE training steps per channel count")
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8], help="latent channel counts")
    parser.add_argument("--blocks", default="32,64,64",
                        help="VAE block channels; each block after the first halves the latent's side "
                             "(shipped: 32,64,64, a 16×16 latent for 64 px)")
    parser.add_argument("--grad-weight", type=float, default=0.0,
                        help="add this weight × an L1 loss on image gradients to the VAE's loss (edges, speckle)")
    parser.add_argument("--pairs", type=int, default=0,
                        help="held-out rows read for the oracle (0: all; ties skipped)")
    parser.add_argument("--out", default="runs/pocket_vae_capacity.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    torch.set_num_threads(2)

    size = PocketModelConfig().image_size
    blocks = tuple(int(c) for c in args.blocks.split(","))
    side = size // 2 ** (len(blocks) - 1)
    samples = unique_images(TRAIN_PAIRS)
    renders, _ = world_dataset(len(samples), 2, size)
    train_images = torch.cat([samples, renders])
    pairs = load_pairs(HELD_OUT_PAIRS, args.pairs)
    held = images_tensor([p.image0 for p in pairs] + [p.image1 for p in pairs], size)  # pairs as rows i, n + i
    rows: dict = {"clean": {"oracle": oracle_accuracy(pairs, *map(to_arrays, held.chunk(2)))}}
    logger.info("oracle on %d clean held-out pairs: %.3f", len(pairs), rows["clean"]["oracle"])
    for channels in args.channels:
        cfg = PocketModelConfig(vae_latent_channels=channels, vae_steps=args.steps, vae_channels=blocks,
                                vae_grad_weight=args.grad_weight)
        started = time.time()
        vae = train_vae(cfg, train_images)
        seconds = time.time() - started
        recon = round_trip(vae, held)
        l1 = (recon - held).abs().mean().item()
        acc = oracle_accuracy(pairs, *map(to_arrays, recon.chunk(2)))
        name = f"{channels}×{side}²" + (f" ∇{args.grad_weight:g}" if args.grad_weight else "")
        rows[name] = {"round_trip_l1": l1, "oracle": acc, "train_seconds": round(seconds)}
        logger.info("%s latent: round trip L1 %.4f, oracle %.3f (%.0f s)", name, l1, acc, seconds)
    print(f"{'latent':>12} {'round-trip L1':>14} {'oracle':>8}   "
          f"(n = {len(pairs)} held-out pairs, {args.steps} VAE steps)")
    for name, row in rows.items():
        print(f"{name:>12} {row.get('round_trip_l1', float('nan')):14.4f} {row['oracle']:8.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "n_pairs": len(pairs), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
