"""Seeded image degradations of the kinds the pocket model's samples show (halos, soft or wobbly edges, smudges,
speckle), for testing the aesthetic judge and for illustrating what it penalises.

Every function takes a uint8 (H, W, 3) RGB array and returns a new one; the random ones take a seeded
`np.random.Generator`. Strengths are in intuitive units: pixels for widths and radii, [0, 1] RGB for amplitudes.
Functions that need to know where the object is (`halo`, `soft_edges`) take its coverage `alpha` (float (H, W) in
[0, 1], e.g. `world.Sample.alpha`).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from .world import COLOURS


def _check(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"expected a uint8 RGB array (H, W, 3), got {getattr(image, 'dtype', type(image))} "
            f"{getattr(image, 'shape', '')}"
        )
    return image


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """Gaussian blur of standard deviation `sigma` pixels."""
    _check(image)
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


def gaussian_noise(image: np.ndarray, rng: np.random.Generator, sigma: float = 0.04) -> np.ndarray:
    """Additive i.i.d. Gaussian noise of standard deviation `sigma` (RGB in [0, 1])."""
    _check(image)
    x = image.astype(np.float32) / 255.0 + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return _to_uint8(x)


def speckle(image: np.ndarray, rng: np.random.Generator, fraction: float = 0.01) -> np.ndarray:
    """Replace a `fraction` of the pixels by random colours (salt-and-pepper in colour)."""
    _check(image)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    out = image.copy()
    hit = rng.uniform(size=image.shape[:2]) < fraction
    out[hit] = rng.integers(0, 256, size=(int(hit.sum()), 3), dtype=np.uint8)
    return out


def clutter(
    image: np.ndarray,
    rng: np.random.Generator,
    n_blobs: int = 2,
    radius: tuple[float, float] = (1.5, 3.0),
    alpha: np.ndarray | None = None,
) -> np.ndarray:
    """Add `n_blobs` small discs (extra, unwanted objects) at random places, each in a random palette colour that
    stands out from the pixel under its centre. With the object's coverage `alpha`, blobs keep clear of the object.
    """
    _check(image)
    h, w, _ = image.shape
    k = 4
    big = Image.fromarray(image).resize((w * k, h * k), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    palette = np.array(list(COLOURS.values()), dtype=np.float64)
    grow = ImageFilter.MaxFilter(2 * int(np.ceil(radius[1])) + 5)
    keep_out = None if alpha is None else np.asarray(Image.fromarray(_to_uint8(np.clip(alpha, 0, 1))).filter(grow)) > 0
    for _ in range(n_blobs):
        r = rng.uniform(*radius)
        for _attempt in range(50):
            cx, cy = rng.uniform(r, w - r), rng.uniform(r, h - r)
            if keep_out is None or not keep_out[int(cy), int(cx)]:
                break
        under = image[int(cy), int(cx)].astype(np.float64)
        choices = palette[np.linalg.norm(palette - under, axis=1) > 80]
        colour = tuple(int(v) for v in choices[int(rng.integers(len(choices)))])
        draw.ellipse([(cx - r) * k, (cy - r) * k, (cx + r) * k, (cy + r) * k], fill=colour)
    return np.asarray(big.reduce(k))


def halo(
    image: np.ndarray,
    alpha: np.ndarray,
    width: float = 2.0,
    strength: float = 0.5,
    colour: tuple[int, int, int] | None = None,
) -> np.ndarray:
    """A soft rim just outside the object, `width` pixels wide, blended with `strength` at its peak.

    `colour` defaults to white on dark backgrounds and black on light ones (a visible rim, as in diffusion samples).
    """
    _check(image)
    a = np.clip(alpha, 0.0, 1.0)
    x = image.astype(np.float32) / 255.0
    if colour is None:
        outside = a < 0.01
        bg = np.median(x[outside], axis=0) if outside.any() else x.reshape(-1, 3).mean(axis=0)
        colour = (0, 0, 0) if float(bg.mean()) > 0.6 else (255, 255, 255)
    grown = np.asarray(Image.fromarray(_to_uint8(a)).filter(ImageFilter.GaussianBlur(radius=width)), dtype=np.float32)
    rim = np.clip(2.0 * grown / 255.0, 0.0, 1.0) * (1.0 - a)
    c = np.asarray(colour, dtype=np.float32) / 255.0
    return _to_uint8(x + strength * rim[..., None] * (c - x))


def soft_edges(image: np.ndarray, alpha: np.ndarray, radius: float = 1.5) -> np.ndarray:
    """Feather the object's edge: re-composite the object's own colours with a blurred coverage."""
    _check(image)
    a = np.clip(alpha, 0.0, 1.0)
    x = image.astype(np.float32) / 255.0
    inside, outside = a > 0.99, a < 0.01
    if not inside.any() or not outside.any():
        raise ValueError("soft_edges needs an object with both pure inside and pure outside pixels")
    f = np.median(x[inside], axis=0)
    b = np.median(x[outside], axis=0)
    soft = np.asarray(Image.fromarray(_to_uint8(a)).filter(ImageFilter.GaussianBlur(radius=radius)), dtype=np.float32)
    soft = soft / 255.0
    return _to_uint8(b + soft[..., None] * (f - b))


def smudge(image: np.ndarray, rng: np.random.Generator, amplitude: float = 0.06, scale: float = 6.0) -> np.ndarray:
    """Low-frequency colour blotches: smooth random noise (correlation length ≈ `scale` px) of given `amplitude`."""
    _check(image)
    h, w, _ = image.shape
    lh, lw = max(2, round(h / scale)), max(2, round(w / scale))
    noise = rng.normal(0.0, 1.0, size=(lh, lw, 3)).astype(np.float32)
    smooth = np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(ch)).resize((w, h), Image.BICUBIC))
            for ch in np.moveaxis(noise, 2, 0)
        ],
        axis=2,
    )
    smooth = smooth / max(float(smooth.std()), 1e-6) * amplitude
    return _to_uint8(image.astype(np.float32) / 255.0 + smooth)
