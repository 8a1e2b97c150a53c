"""The pocket world's two judges, for evaluation only (never used as a training signal).

Both read pixels only (no ground truth), take uint8 RGB arrays (H, W, 3) or PIL images of any size >= 16 px, and are
deterministic. They share one analysis of the image (`analyse`); colours are RGB in [0, 1], distances Euclidean.

1. **Background.** Work on a 3x3 median-filtered copy (removes speckle, halves Gaussian noise, keeps edges). The
   pixels of a border ring (width ``max(1, side // 32)``) vote for their nearest palette colour; the winner names
   the background and the per-channel median of its voters is the background colour `b`; the median distance of the
   voters to `b` measures the noise.
2. **Object.** Pixels farther than ``tau = max(0.15, 4 sigma_noise)`` from `b` are candidates; after a 3x3 median
   clean-up the largest 8-connected component is the object. The median colour of its 3x3-eroded core is the
   foreground colour `f`; its nearest palette entry other than the background's names it.
3. **Coverage.** Every pixel is projected on the segment b→f, ``alpha = (I - b)·(f - b) / |f - b|^2`` (not
   clipped): the exact inverse of the generator's compositing. The object mask is the largest component of
   ``alpha >= 0.5`` (on the filtered copy). The *edge width* (`edge_width`) is the number of transition pixels
   (0.1 < alpha < 0.9) per unit of boundary length (the total variation of the clipped alpha, which blur does not
   change), both counted within ±3 px of the mask's outline: ≈ 0.8 px for a clean anti-aliased edge, ≈ 2.75 px
   after a Gaussian blur of 1 px; `EDGE_WIDTH_TO_BLUR` turns it into an estimated blur.
4. **Shape** (template matching). For each shape of the grammar its polygon is scaled to the object's area
   (sum of clipped alpha), centred on its alpha-weighted centroid, rasterised (`world.rasterize`) at every rotation
   of its symmetry period in 6° steps and blurred by the estimated blur; the shape with the highest soft IoU
   (``sum(min) / sum(max)``) against the clipped coverage wins.

**Alignment** ``alignment(image, prompt)`` parses the prompt (`world.parse_prompt`; ValueError outside the grammar)
and compares: ``shape_ok``, ``fg_ok``, ``bg_ok``, ``all_ok`` (all three), ``score = (shape_ok + fg_ok + bg_ok) / 3``;
it also reports what it saw (``shape``, ``fg``, ``bg``, ``shape_iou``). Size and position words are not checked.
On 300 generator images covering all 150 combinations it is right every time; measured on 300 more (all ok): 1.00
under Gaussian blur sigma 1 or 1.5 px, noise sigma 0.04 / 0.08 / 0.12, 2 % speckle, smudges and clutter blobs, 0.97
under 2 px halos (small crosses whose notches fill up read as squares). It starts failing at blur sigma ≈ 2 px on
small shapes (≈ 0.86: small crosses look like squares, and the colour of a tiny blurred object drifts).

**Aesthetic** ``aesthetic(image) -> float`` in [0, 1], higher is better, independent of the prompt and of the
layout (which shape, its size, its position; the colours only through the contrast gate): ::

    aesthetic = presence * framing * contrast * exp(-(P_edge + P_halo + P_speckle + P_smudge + P_clutter))

with every penalty ``P = w * max(0, x - x0) / s`` of a raw measure `x` (weights `AESTHETIC_WEIGHTS`, all 1;
``(x0, s)`` in `AESTHETIC_SCALES`). Gates, in [0, 1], demand one dominant object of reasonable size inside the frame:

- ``presence``: object area fraction `a`: 0 below 0.5 %, linear to 1 at 1.5 %, 1 up to 45 %, linear to 0 at 60 %.
  No object at all (a blank image) gives 0.
- ``framing``: fraction `t` of the border ring covered by the object: 1 up to 2 %, linear to 0 at 10 % (two halves,
  checkerboards, stripes and cropped objects fail it; generator objects keep a margin and never touch the border).
- ``contrast``: ``clip((|f - b| - 0.10) / 0.15, 0, 1)``; a barely visible object scores 0 (palette pairs are ≥ 0.44).

Penalties (each 0 for a clean, flat, anti-aliased two-colour image):

=========  =======================================================================================  ======  =====
term       raw measure x                                                                            x0      s
=========  =======================================================================================  ======  =====
edge       soft / blurred edges: the edge width above (px of transition per px of outline)          1.1     1.6
halo       halos, rims, fringes, overshoot: mean over the boundary band (5x5 dilation minus         0.01    0.1
           erosion of the mask) of ``|I - (b + clip(alpha) (f - b))|``, the part of a pixel that
           two flat colours cannot explain
speckle    high-frequency noise / speckle: RMS over flat pixels (outside the band) of               0.005   0.06
           ``|I - median3x3(I)|``
smudge     colour impurity / low-frequency blotches: mean over flat pixels of the distance from     0.005   0.08
           ``median3x3(I)`` to its region's flat colour (`f` inside the object, `b` outside)
clutter    extra objects: over the 8-connected components of ``|I - b| > max(0.2, tau)`` other      0       2.0
           than the object, sum of ``min(1, area / (0.004 H W))`` (a 16 px blob at 64 px counts 1,
           a stray pixel 1/16)
=========  =======================================================================================  ======  =====

Scales were set so that one mild degradation costs about one unit (a factor ≈ 1/e): Gaussian blur of 1 px at
64 px (edge ≈ 1.0), Gaussian noise sigma 0.04 (speckle ≈ 1.0 plus halo and smudge ≈ 0.8), a 2 px halo (≈ 1.2),
smudges of amplitude 0.06 (≈ 1.1); each extra blob costs 0.5. Every measure is normalised per outline length, per
band pixel, per flat pixel or per blob, so the score does not depend on where the object is, how big it is or which
shape it is: clean generator images score 1.0, and under a 1 px blur (score ≈ 0.36) the medians per shape, size and
position agree within ≈ 0.05.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from PIL import Image, ImageFilter

from . import world

logger = logging.getLogger(__name__)

PALETTE_NAMES: tuple[str, ...] = world.COLOUR_NAMES
PALETTE = np.array([world.COLOURS[n] for n in PALETTE_NAMES], dtype=np.float32) / 255.0
ROTATION_STEP_DEG = 6.0
SYMMETRY_PERIOD_DEG: MappingProxyType[str, float] = MappingProxyType(
    {"circle": 0.0, "square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0}
)
AESTHETIC_WEIGHTS: MappingProxyType[str, float] = MappingProxyType(
    {"edge": 1.0, "halo": 1.0, "speckle": 1.0, "smudge": 1.0, "clutter": 1.0}
)
# (x0, s) per penalty: P = max(0, x - x0) / s
AESTHETIC_SCALES: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {"edge": (1.1, 1.6), "halo": (0.01, 0.1), "speckle": (0.005, 0.06), "smudge": (0.005, 0.08), "clutter": (0.0, 2.0)}
)
CLUTTER_THRESHOLD = 0.2  # a pixel this far from the background colour (RGB in [0, 1]) is "something"
CLUTTER_BLOB_AREA = 0.004  # an extra component this big (fraction of the image; 16 px at 64 px) counts as one blob
# Measured edge width (see `edge_width`) of world images blurred by PIL's GaussianBlur(radius), averaged over shapes
# and sizes; interpolated the other way round to estimate an image's blur.
EDGE_WIDTH_TO_BLUR: tuple[tuple[float, ...], tuple[float, ...]] = (
    (0.81, 1.33, 2.22, 2.75, 3.29, 3.87, 4.84, 5.85, 6.68, 8.02),
    (0.0, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0),
)


# --------------------------------------------------------------------------------------------------------------------
# Image helpers


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """A uint8 (H, W, 3) RGB array from a PIL image or a uint8 (H, W, 3) array; raises ValueError otherwise."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if not isinstance(image, np.ndarray):
        raise ValueError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 RGB array of shape (H, W, 3), got dtype {image.dtype} shape {image.shape}")
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image must be at least 16x16 pixels, got {image.shape[1]}x{image.shape[0]}")
    return image


def _filter_mask(mask: np.ndarray, flt: ImageFilter.Filter) -> np.ndarray:
    img = Image.fromarray(mask.astype(np.uint8) * 255)
    return np.asarray(img.filter(flt)) > 127


def dilate(mask: np.ndarray, size: int = 3) -> np.ndarray:
    return _filter_mask(mask, ImageFilter.MaxFilter(size))


def erode(mask: np.ndarray, size: int = 3) -> np.ndarray:
    return _filter_mask(mask, ImageFilter.MinFilter(size))


def _gaussian_blur_float(x: np.ndarray, sigma: float) -> np.ndarray:
    """PIL's Gaussian blur (the same one `degrade.gaussian_blur` uses) of a [0, 1] float map, via 8 bits."""
    img = Image.fromarray(np.rint(np.clip(x, 0.0, 1.0) * 255).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(radius=sigma)), dtype=np.float32) / 255.0


def label_components(mask: np.ndarray, connectivity: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a bool mask (`connectivity` 4 or 8).

    Returns:
        labels (`np.ndarray`): int32 (H, W), 0 for background, components numbered 1..n by decreasing size.
        sizes (`np.ndarray`): int64 (n,), pixel count of component k at index k - 1.
    """
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    h, w = mask.shape
    big = h * w + 1
    lab = np.where(mask, np.arange(1, h * w + 1, dtype=np.int64).reshape(h, w), big)
    # Min-label propagation over the neighbours, accelerated by pointer jumping (labels point at pixels).
    while True:
        new = lab.copy()
        new[1:, :] = np.minimum(new[1:, :], lab[:-1, :])
        new[:-1, :] = np.minimum(new[:-1, :], lab[1:, :])
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        if connectivity == 8:
            new[1:, 1:] = np.minimum(new[1:, 1:], lab[:-1, :-1])
            new[:-1, :-1] = np.minimum(new[:-1, :-1], lab[1:, 1:])
            new[1:, :-1] = np.minimum(new[1:, :-1], lab[:-1, 1:])
            new[:-1, 1:] = np.minimum(new[:-1, 1:], lab[1:, :-1])
        new = np.where(mask, new, big)
        flat = np.append(new.ravel(), big)
        for _ in range(4):
            flat = np.minimum(flat, flat[flat - 1])
        new = flat[:-1].reshape(h, w)
        if np.array_equal(new, lab):
            break
        lab = new
    if not mask.any():
        return np.zeros((h, w), dtype=np.int32), np.zeros(0, dtype=np.int64)
    _, inverse, counts = np.unique(lab[mask], return_inverse=True, return_counts=True)
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    labels = np.zeros((h, w), dtype=np.int32)
    labels[mask] = rank[inverse]
    return labels, counts[order].astype(np.int64)


def _nearest_palette(rgb: np.ndarray, exclude: int | None = None) -> int:
    d = np.linalg.norm(PALETTE - rgb[None, :], axis=1)
    if exclude is not None:
        d[exclude] = np.inf
    return int(np.argmin(d))


# --------------------------------------------------------------------------------------------------------------------
# Shared analysis


@dataclass
class Analysis:
    """What the judges see in an image (colours as float RGB in [0, 1]).

    `fg`, `shape` and the object fields are `None` / empty when no object was found.
    """

    image: np.ndarray  # float32 (H, W, 3) in [0, 1]
    bg_rgb: np.ndarray
    bg: str
    border_noise: float
    fg_rgb: np.ndarray | None = None
    fg: str | None = None
    alpha: np.ndarray | None = None  # float32 (H, W), not clipped
    mask: np.ndarray | None = None  # bool (H, W), the object
    candidates: np.ndarray | None = None  # bool (H, W), |I - b| > max(0.2, tau): "something" (for clutter)
    alpha_smooth: np.ndarray | None = None  # the same, from the 3x3 median-filtered image
    edge_width: float = 0.0  # see `edge_width`, on `alpha_smooth`
    blur_sigma: float = 0.0  # estimated Gaussian blur of the object's edge (PIL GaussianBlur radius), in pixels
    shape: str | None = None
    shape_iou: float = 0.0
    shape_scores: dict[str, float] = field(default_factory=dict)

    @property
    def has_object(self) -> bool:
        return self.mask is not None and bool(self.mask.any())

    @property
    def contrast(self) -> float:
        return 0.0 if self.fg_rgb is None else float(np.linalg.norm(self.fg_rgb - self.bg_rgb))


def _estimate_background(img: np.ndarray) -> tuple[np.ndarray, int, float]:
    h, w, _ = img.shape
    r = max(1, min(h, w) // 32)
    ring = np.ones((h, w), dtype=bool)
    ring[r:-r, r:-r] = False
    border = img[ring]
    votes = np.argmin(np.linalg.norm(border[:, None, :] - PALETTE[None], axis=2), axis=1)
    winner = int(np.bincount(votes, minlength=len(PALETTE)).argmax())
    bg_rgb = np.median(border[votes == winner], axis=0).astype(np.float32)
    noise = float(np.median(np.linalg.norm(border[votes == winner] - bg_rgb, axis=1)))
    return bg_rgb, winner, noise


def edge_width(alpha: np.ndarray, band: np.ndarray | None = None) -> float:
    """Transition pixels (0.1 < alpha < 0.9) per unit of boundary length (total variation of the clipped alpha),
    both counted inside `band` (all pixels when None).

    ≈ 0.8 for a clean anti-aliased edge and grows linearly with blur (see `EDGE_WIDTH_TO_BLUR`).
    """
    clipped = np.clip(alpha, 0.0, 1.0)
    dx = np.diff(clipped, axis=1)[:-1, :]
    dy = np.diff(clipped, axis=0)[:, :-1]
    grad = np.sqrt(dx * dx + dy * dy)
    mid = (clipped > 0.1) & (clipped < 0.9)
    if band is not None:
        grad = grad * band[:-1, :-1]
        mid = mid & band
    return float(mid.sum()) / max(float(grad.sum()), 1.0)


def _classify_shape(alpha: np.ndarray, mask: np.ndarray, blur_sigma: float) -> tuple[str, float, dict[str, float]]:
    """Template matching of the object's coverage against every shape, area-matched and centroid-aligned.

    Templates are blurred by the image's estimated edge blur, so soft edges do not turn stars into circles.
    """
    h, w = mask.shape
    region = dilate(mask, 2 * int(math.ceil(2.0 * blur_sigma)) + 3)
    cover = np.where(region, np.clip(alpha, 0.0, 1.0), 0.0).astype(np.float32)
    area = float(cover.sum())
    ys, xs = np.mgrid[0:h, 0:w]
    cx = float((cover * (xs + 0.5)).sum() / area)
    cy = float((cover * (ys + 0.5)).sum() / area)
    scores: dict[str, float] = {}
    for shape in world.SHAPES:
        unit = world.shape_polygon(shape, circle_vertices=48)
        scale = math.sqrt(area / world.polygon_area(unit))
        # Work in a window around the object: the template and the object both fit in it.
        half = int(math.ceil(1.15 * scale * float(np.abs(unit).max()) + 3.0 * blur_sigma)) + 2
        x0, y0 = max(0, int(cx) - half), max(0, int(cy) - half)
        x1, y1 = min(w, int(cx) + half + 1), min(h, int(cy) + half + 1)
        obj = cover[y0:y1, x0:x1]
        outside = area - float(obj.sum())
        period = SYMMETRY_PERIOD_DEG[shape]
        rotations = np.arange(0.0, period, ROTATION_STEP_DEG) if period else np.zeros(1)
        pts = world.place_polygon(unit, (cx - x0, cy - y0), scale, rotations)
        tmpl = world.rasterize(pts, y1 - y0, x1 - x0, supersample=2)  # (R, h, w)
        if blur_sigma > 0.25:
            tmpl = np.stack([_gaussian_blur_float(t, blur_sigma) for t in tmpl])
        inter = np.minimum(tmpl, obj[None]).sum(axis=(1, 2))
        union = np.maximum(tmpl, obj[None]).sum(axis=(1, 2)) + outside
        scores[shape] = float((inter / np.maximum(union, 1e-6)).max())
    winner = max(scores, key=scores.__getitem__)
    return winner, scores[winner], scores


def analyse(image: np.ndarray | Image.Image, classify_shape: bool = True) -> Analysis:
    """Background, object, coverage and (optionally) shape of an image; see the module docstring."""
    arr = as_rgb_array(image)
    img = arr.astype(np.float32) / 255.0
    # Segment on a 3x3 median-filtered copy: it removes speckle and halves Gaussian noise, and keeps edges.
    smooth = np.asarray(Image.fromarray(arr).filter(ImageFilter.MedianFilter(3)), dtype=np.float32) / 255.0
    bg_rgb, bg_idx, noise = _estimate_background(smooth)
    result = Analysis(image=img, bg_rgb=bg_rgb, bg=PALETTE_NAMES[bg_idx], border_noise=noise)

    dist = np.linalg.norm(smooth - bg_rgb, axis=2)
    # |noise| of 3 channels has median ≈ 1.54 sigma and a 99.9 % quantile ≈ 4 sigma.
    tau = max(0.15, 4.0 * noise / 1.54)
    candidates = _filter_mask(dist > tau, ImageFilter.MedianFilter(3))
    if not candidates.any():
        return result
    labels, _ = label_components(candidates)
    main = labels == 1
    core = erode(main, 3)
    fg_rgb = np.median(smooth[core if core.sum() >= 4 else main], axis=0).astype(np.float32)
    result.fg_rgb = fg_rgb
    result.fg = PALETTE_NAMES[_nearest_palette(fg_rgb, exclude=bg_idx)]

    diff = fg_rgb - bg_rgb
    inv = 1.0 / max(float(diff @ diff), 1e-6)
    result.alpha = (((img - bg_rgb) @ diff) * inv).astype(np.float32)
    alpha_smooth = ((smooth - bg_rgb) @ diff) * inv
    obj = alpha_smooth >= 0.5
    if obj.any():
        labels, _ = label_components(obj)
        result.mask = labels == 1
    else:
        result.mask = main
    result.candidates = np.linalg.norm(img - bg_rgb, axis=2) > max(CLUTTER_THRESHOLD, tau)
    result.alpha_smooth = alpha_smooth.astype(np.float32)
    # Measure edges only near the object's outline (±3 px), so flat-region noise or smudges do not count as blur.
    result.edge_width = edge_width(alpha_smooth, dilate(result.mask, 7) & ~erode(result.mask, 7))
    result.blur_sigma = float(np.interp(result.edge_width, *EDGE_WIDTH_TO_BLUR))
    if classify_shape and result.mask.sum() >= 4:
        shape, iou, scores = _classify_shape(result.alpha, result.mask, result.blur_sigma)
        result.shape, result.shape_iou, result.shape_scores = shape, iou, scores
    return result


# --------------------------------------------------------------------------------------------------------------------
# Alignment judge


def alignment(image: np.ndarray | Image.Image, prompt: str) -> dict[str, float | bool | str | None]:
    """Does the image show the prompt's shape, foreground colour and background colour?

    Returns:
        `dict` with ``shape_ok``, ``fg_ok``, ``bg_ok``, ``all_ok`` (bools), ``score`` (their mean over the three
        checks, in [0, 1]) and what was seen: ``shape``, ``fg``, ``bg`` (names or None) and ``shape_iou``.

    Raises:
        ValueError: the prompt is outside the pocket grammar, or the image is not an RGB image.
    """
    want = world.parse_prompt(prompt)
    a = analyse(image)
    shape_ok = a.shape == want.shape
    fg_ok = a.fg == want.fg
    bg_ok = a.bg == want.bg
    return {
        "shape_ok": shape_ok,
        "fg_ok": fg_ok,
        "bg_ok": bg_ok,
        "all_ok": shape_ok and fg_ok and bg_ok,
        "score": (shape_ok + fg_ok + bg_ok) / 3.0,
        "shape": a.shape,
        "fg": a.fg,
        "bg": a.bg,
        "shape_iou": a.shape_iou,
    }


def alignment_batch(images: list[np.ndarray | Image.Image], prompts: list[str]) -> list[dict]:
    """`alignment` over paired lists."""
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
    return [alignment(i, p) for i, p in zip(images, prompts)]


# --------------------------------------------------------------------------------------------------------------------
# Aesthetic judge


def _ramp(x: float, lo: float, hi: float) -> float:
    return float(np.clip((x - lo) / (hi - lo), 0.0, 1.0))


def aesthetic_terms(image: np.ndarray | Image.Image) -> dict[str, float]:
    """The aesthetic's gates, raw measures and penalties (see the module docstring); ``score`` is the aesthetic."""
    a = analyse(image, classify_shape=False)
    terms = {"presence": 0.0, "framing": 0.0, "contrast": 0.0, "area": 0.0}
    if not a.has_object:
        terms["score"] = 0.0
        return terms
    img, mask, b, f = a.image, a.mask, a.bg_rgb, a.fg_rgb
    h, w, _ = img.shape
    area = float(mask.mean())
    presence = _ramp(area, 0.005, 0.015) * (1.0 - _ramp(area, 0.45, 0.60))
    r = max(1, min(h, w) // 32)
    ring = np.ones((h, w), dtype=bool)
    ring[r:-r, r:-r] = False
    framing = 1.0 - _ramp(float(mask[ring].mean()), 0.02, 0.10)
    contrast = _ramp(a.contrast, 0.10, 0.25)

    # Edge width near the outline, on the median-filtered coverage (so noise neither adds to it nor hides blur).
    x_edge = a.edge_width
    clipped = np.clip(a.alpha, 0.0, 1.0)

    band = dilate(mask, 5) & ~erode(mask, 5)
    flat = ~band
    explained = b + clipped[..., None] * (f - b)
    residual = np.linalg.norm(img - explained, axis=2)
    x_halo = float(residual[band].mean()) if band.any() else 0.0

    med = np.asarray(Image.fromarray(np.rint(img * 255).astype(np.uint8)).filter(ImageFilter.MedianFilter(3)))
    med = med.astype(np.float32) / 255.0
    if flat.any():
        x_speckle = float(np.sqrt((np.linalg.norm(img - med, axis=2)[flat] ** 2).mean()))
        region = np.where(mask[..., None], f, b)
        x_smudge = float(np.linalg.norm(med - region, axis=2)[flat].mean())
    else:
        x_speckle = x_smudge = 0.0

    labels, sizes = label_components(a.candidates | mask)
    main_label = int(np.bincount(labels[mask]).argmax())
    others = np.delete(sizes, main_label - 1)
    x_clutter = float(np.minimum(1.0, others / (CLUTTER_BLOB_AREA * h * w)).sum())

    raw = {"edge": x_edge, "halo": x_halo, "speckle": x_speckle, "smudge": x_smudge, "clutter": x_clutter}
    penalty = 0.0
    for name, x in raw.items():
        x0, s = AESTHETIC_SCALES[name]
        p = max(0.0, x - x0) / s
        terms[f"x_{name}"] = x
        terms[f"P_{name}"] = p
        penalty += AESTHETIC_WEIGHTS[name] * p
    terms.update(presence=presence, framing=framing, contrast=contrast, area=area, penalty=penalty)
    terms["score"] = presence * framing * contrast * math.exp(-penalty)
    return terms


def aesthetic(image: np.ndarray | Image.Image) -> float:
    """The aesthetic score in [0, 1] (higher is better); see the module docstring for the formula."""
    return aesthetic_terms(image)["score"]


def aesthetic_batch(images: list[np.ndarray | Image.Image]) -> list[float]:
    """`aesthetic` over a list."""
    return [aesthetic(i) for i in images]
