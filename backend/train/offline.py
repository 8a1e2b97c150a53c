"""Offline preference pairs for Diffusion-DPO and Diffusion-RPO: Pick-a-Pic parquet → latent pairs.

A round takes the next `pairs_per_round` good pairs of this process's share of the epoch (ties
dropped, winner first, images centre-cropped and resized to the model's resolution, VAE-encoded),
and draws ONE timestep t and ONE noise ε per pair, shared by winner and loser (as the official
Diffusion-DPO code does). t and ε are drawn when the round is made and travel with the round's
pending pairs in a checkpoint, so a resumed run repeats exactly what an uninterrupted one does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..preference.data import PickAPicStream

logger = logging.getLogger(__name__)


@dataclass
class LatentPairs:
    """Offline training pairs: winner/loser latents of one prompt, their shared t and noise."""

    z_w: torch.Tensor  # [N, C, H, W] scaled latents of the preferred image
    z_l: torch.Tensor
    t: torch.Tensor  # [N] long
    noise: torch.Tensor  # [N, C, H, W], shared by winner and loser
    emb: torch.Tensor  # [N, D] joint CLIP embeddings (Diffusion-RPO's similarity weights; [N, 0] if unused)
    prompts: list[str]

    def __len__(self) -> int:
        return self.z_w.shape[0]

    _TENSORS = ("z_w", "z_l", "t", "noise", "emb")

    def index(self, idx) -> "LatentPairs":
        idx_list = idx.tolist() if isinstance(idx, torch.Tensor) else list(idx)
        sel = torch.as_tensor(idx_list, dtype=torch.long)
        return LatentPairs(*(getattr(self, f)[sel] for f in self._TENSORS), [self.prompts[i] for i in idx_list])

    @staticmethod
    def cat(parts: list["LatentPairs"]) -> "LatentPairs":
        return LatentPairs(*(torch.cat([getattr(p, f) for p in parts]) for f in LatentPairs._TENSORS),
                           [s for p in parts for s in p.prompts])

    def to_state(self) -> dict:
        return {**{f: getattr(self, f).cpu() for f in self._TENSORS}, "prompts": list(self.prompts)}

    @staticmethod
    def from_state(state: dict) -> "LatentPairs":
        return LatentPairs(*(state[f] for f in LatentPairs._TENSORS), state["prompts"])


def to_tensor(image: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [H, W, 3] → float [3, size, size] in [0, 1]: centre crop to a square, then resize."""
    from PIL import Image

    h, w = image.shape[:2]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    pil = Image.fromarray(image[top:top + side, left:left + side])
    if side != size:
        pil = pil.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1).float() / 255.0


class OfflineSource:
    """This process's stream of good (non-tie) pairs, winner first, one epoch at a time.

    Rank k of W takes the good pairs whose position in the epoch's shuffled order is ≡ k (mod W).
    The iterator is kept open between rounds; asking for another position (a resume) reopens it.
    """

    def __init__(self, path: str | Path, pairs_per_round: int, rank: int, world: int, seed: int,
                 shuffle_buffer: int = 1024):
        self.stream = PickAPicStream(path, shuffle_buffer=shuffle_buffer, seed=seed, drop_ties=True)
        self.pairs_per_round, self.rank, self.world = pairs_per_round, rank, world
        self.good = self._count_good()
        if self.good < world:
            raise ValueError(f"{self.stream.path}: only {self.good} usable (non-tie) pairs; need at least {world}")
        self._iter, self._at = None, None

    def _count_good(self) -> int:
        """Non-tie rows with a caption and valid labels, read from the label columns only."""
        table = self.stream.file.read(columns=["caption", "label_0", "label_1"]).to_pandas()
        ok = table["caption"].astype(str).str.strip().astype(bool) & table["label_0"].between(0, 1) & \
            table["label_1"].between(0, 1) & ((table["label_0"] + table["label_1"] - 1).abs() <= 1e-6) & \
            (table["label_0"] != table["label_1"])
        return int(ok.sum())

    def rounds_per_epoch(self) -> int:
        return max(1, -(-self.good // (self.pairs_per_round * self.world)))

    def take(self, epoch: int, round_in_epoch: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        """(caption, winner image, loser image) of this rank's share of round `round_in_epoch`."""
        first = round_in_epoch * self.pairs_per_round * self.world
        want = (epoch, first)
        if self._at != want:
            self._iter = self.stream.iter_epoch(epoch, start=first)
            self._at = want
        out = []
        for pos in range(first, first + self.pairs_per_round * self.world):
            pair = next(self._iter, None)
            if pair is None:
                break
            if pos % self.world == self.rank:
                win_first = pair.label0 > pair.label1
                out.append((pair.caption, *((pair.image0, pair.image1) if win_first else (pair.image1, pair.image0))))
        self._at = (epoch, first + self.pairs_per_round * self.world)
        return out


@torch.no_grad()
def make_latent_pairs(model, rows: list[tuple[str, np.ndarray, np.ndarray]], generator: torch.Generator,
                      scorer=None, batch: int = 16) -> LatentPairs:
    """VAE-encode the round's images (posterior samples), draw the shared t ~ U{0…T−1} and ε per pair,
    and (for Diffusion-RPO) the joint CLIP embedding of the winner image and its prompt."""
    size = model.default_resolution
    prompts = [r[0] for r in rows]
    z_w, z_l, emb = [], [], []
    for i in range(0, len(rows), batch):
        chunk = rows[i:i + batch]
        img_w = torch.stack([to_tensor(r[1], size) for r in chunk])
        img_l = torch.stack([to_tensor(r[2], size) for r in chunk])
        z = model.encode_images(torch.cat([img_w, img_l]), generator=generator).float().cpu()
        z_w.append(z[:len(chunk)])
        z_l.append(z[len(chunk):])
        if scorer is not None:
            emb.append(scorer.joint_embedding(img_w, [r[0] for r in chunk]).cpu())
    n = len(rows)
    z_w_t = torch.cat(z_w) if z_w else torch.zeros(0)
    z_l_t = torch.cat(z_l) if z_l else torch.zeros(0)
    t = torch.randint(0, model.scheduler.config.num_train_timesteps, (n,), generator=generator)
    noise = torch.randn(z_w_t.shape, generator=generator) if n else torch.zeros(0)
    emb_t = torch.cat(emb) if emb else torch.zeros(n, 0)
    return LatentPairs(z_w_t, z_l_t, t, noise, emb_t, prompts)


def denoising_errors(model, unet, batch: LatentPairs, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair ‖ε − ε_θ(x_t, t, c)‖² (mean over C·H·W) of winner and loser, from ONE batched UNet pass;
    x_t = √ᾱ_t·z + √(1−ᾱ_t)·ε with the pair's shared t and ε (DDPM eq. 4; Diffusion-DPO eq. 14)."""
    from .. import diffusion

    device = model.device
    a = diffusion.alpha_bar_tensor(model.scheduler, batch.t).to(device, torch.float32).view(-1, 1, 1, 1)
    eps = batch.noise.to(device)
    x_w = a.sqrt() * batch.z_w.to(device) + (1 - a).sqrt() * eps
    x_l = a.sqrt() * batch.z_l.to(device) + (1 - a).sqrt() * eps
    from ..models import TextConditioning

    both = TextConditioning.cat([cond, cond])
    t2 = torch.cat([batch.t, batch.t]).to(device)
    pred = unet(torch.cat([x_w, x_l]).to(model.dtype), t2, **both.unet_kwargs(), return_dict=False)[0].float()
    err = (pred - torch.cat([eps, eps])).pow(2).mean(dim=(1, 2, 3))
    return err[:len(batch)], err[len(batch):]
