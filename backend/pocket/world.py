"""The pocket world: coloured shapes on coloured backgrounds, described by prompts from a small grammar.

This is the synthetic domain of the pocket model: small enough that a 1-6 M-parameter UNet learns it
in minutes on a CPU, rich enough that prompt following, compositional generalisation and image quality can all be
measured. Everything here is pure numpy + PIL and deterministic given a seed.

Grammar (every token is a whole word, so a word-level CLIP tokenizer can be built from `VOCABULARY`)::

    prompt   := "a" [size] <fg colour> <shape> [position] "on" "a" <bg colour> "background"
    size     := "small" | "large"
    position := "at the left" | "at the right" | "at the top" | "at the bottom" | "in the center"

e.g. ``"a red circle on a blue background"`` or ``"a small red circle at the left on a blue background"``. The
foreground colour must differ from the background colour. Size and position words are optional: when a prompt omits
them the renderer draws them at random, so layout is free for the model (and for a simulated crowd's "layout taste")
but never part of what the alignment judge checks.

Rendering: the shape is a polygon in unit coordinates (circles are 96-gons), scaled, rotated (small random jitter)
and translated, then rasterised by `rasterize` into its per-pixel coverage (exact along `supersample` scanlines per
pixel row; unbiased, unlike PIL's polygon fill). The image is composited as ``bg + alpha * (fg - bg)``, so ground
truth comes with a clean anti-aliased edge, the exact coverage `alpha`, a binary `mask` (alpha >= 0.5) and its
`bbox`. Layout: a nominal radius of 15-18 % (small) or 25-29 % (large) of the side, the centre at the middle or
pushed towards one side until the shape is 6 % of the side from the border, ±2 % jitter of the centre, ±10° of
rotation. Rendering a 64 px sample takes ≈ 0.5 ms.

Held-out split: the base combinations (shape, fg, bg) are split once, seeded, into training and held-out sets
(~15 % held out). Held-out combinations never appear in training data, but every word and every *pair* of words
((shape, fg), (shape, bg), (fg, bg)) still appears in training, so held-out prompts test compositional
generalisation rather than unseen vocabulary.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from dataclasses import dataclass, replace
from types import MappingProxyType

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------------------
# Grammar

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")
# Saturated, well separated colours (minimum pairwise RGB distance ≈ 106, blue-purple).
COLOURS: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {
        "red": (220, 45, 45),
        "green": (45, 170, 70),
        "blue": (45, 90, 220),
        "yellow": (245, 210, 50),
        "purple": (150, 65, 190),
        "white": (240, 240, 240),
    }
)
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("center", "left", "right", "top", "bottom")
POSITION_PHRASES: MappingProxyType[str, str] = MappingProxyType(
    {
        "center": "in the center",
        "left": "at the left",
        "right": "at the right",
        "top": "at the top",
        "bottom": "at the bottom",
    }
)
FUNCTION_WORDS: tuple[str, ...] = ("a", "on", "background", "at", "in", "the")
# Every word a prompt may contain; each becomes one token of the pocket text encoder's tokenizer.
VOCABULARY: list[str] = [*FUNCTION_WORDS, *SHAPES, *COLOUR_NAMES, *SIZES, *POSITIONS]

PROMPT_FORM = (
    "a [small|large] <colour> <shape> [at the left|at the right|at the top|at the bottom|in the center] "
    "on a <colour> background"
)

# --------------------------------------------------------------------------------------------------------------------
# Geometry of the layout, as fractions of the image side

SIZE_RADIUS: MappingProxyType[str, tuple[float, float]] = MappingProxyType(
    {"small": (0.15, 0.18), "large": (0.25, 0.29)}  # range of the shape's nominal radius
)
EDGE_MARGIN = 0.06  # an off-centre object stops this far from the image border
POSITION_JITTER = 0.02  # uniform ± jitter of the centre
ROTATION_JITTER_DEG = 10.0  # uniform ± jitter of the rotation
SPLIT_SEED = 0
HELD_OUT_FRACTION = 0.15


@dataclass(frozen=True)
class Attributes:
    """What a prompt says (or, for a rendered sample, what the image shows).

    Args:
        shape (`str`): one of `SHAPES`.
        fg (`str`): foreground colour, one of `COLOUR_NAMES`.
        bg (`str`): background colour, one of `COLOUR_NAMES`, different from `fg`.
        size (`str`, *optional*): one of `SIZES`; `None` when the prompt leaves it free.
        position (`str`, *optional*): one of `POSITIONS`; `None` when the prompt leaves it free.
    """

    shape: str
    fg: str
    bg: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        checks = (("shape", self.shape, SHAPES), ("fg", self.fg, COLOUR_NAMES), ("bg", self.bg, COLOUR_NAMES))
        for name, value, allowed in checks:
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(allowed)}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {list(SIZES)} or None")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {list(POSITIONS)} or None")
        if self.fg == self.bg:
            raise ValueError(f"foreground and background colour must differ; both are {self.fg!r}")

    @property
    def combination(self) -> tuple[str, str, str]:
        """The base combination (shape, fg, bg) on which the train / held-out split is defined."""
        return (self.shape, self.fg, self.bg)

    def prompt(self) -> str:
        """The canonical prompt text, e.g. ``"a small red circle at the left on a blue background"``."""
        words = ["a"]
        if self.size is not None:
            words.append(self.size)
        words += [self.fg, self.shape]
        if self.position is not None:
            words.append(POSITION_PHRASES[self.position])
        words += ["on", "a", self.bg, "background"]
        return " ".join(words)


def parse_prompt(text: str) -> Attributes:
    """Parse a prompt of the pocket grammar into `Attributes` (inverse of `Attributes.prompt`).

    Case, surrounding whitespace, commas and a final full stop are ignored.

    Raises:
        ValueError: the prompt holds words outside `VOCABULARY` (they are named), does not follow the grammar's
            form, or names the same colour for foreground and background.
    """
    if not isinstance(text, str):
        raise ValueError(f"prompt must be a string, got {type(text).__name__}")
    words = re.sub(r"[,.]", " ", text.lower()).split()
    unknown = [w for w in words if w not in VOCABULARY]
    if unknown:
        raise ValueError(
            f"prompt {text!r} is outside the pocket grammar: unknown word(s) {sorted(set(unknown))}; "
            f"known words are {VOCABULARY}"
        )

    def fail(reason: str) -> ValueError:
        return ValueError(f"prompt {text!r} does not follow the pocket grammar ({reason}); expected {PROMPT_FORM!r}")

    i = 0

    def take(allowed: tuple[str, ...] | list[str], what: str, optional: bool = False) -> str | None:
        nonlocal i
        if i < len(words) and words[i] in allowed:
            i += 1
            return words[i - 1]
        if optional:
            return None
        found = repr(words[i]) if i < len(words) else "the end of the prompt"
        raise fail(f"expected {what} at word {i + 1}, found {found}")

    take(("a",), "'a'")
    size = take(SIZES, "a size", optional=True)
    fg = take(COLOUR_NAMES, "a foreground colour")
    shape = take(SHAPES, "a shape")
    position = None
    if i < len(words) and words[i] in ("at", "in"):
        phrase = " ".join(words[i : i + 3])
        matches = [p for p, ph in POSITION_PHRASES.items() if ph == phrase]
        if not matches:
            raise fail(f"unknown position phrase {phrase!r}; expected one of {list(POSITION_PHRASES.values())}")
        position = matches[0]
        i += 3
    take(("on",), "'on'")
    take(("a",), "'a'")
    bg = take(COLOUR_NAMES, "a background colour")
    take(("background",), "'background'")
    if i != len(words):
        raise fail(f"unexpected trailing words {words[i:]}")
    if fg == bg:
        raise ValueError(f"prompt {text!r}: foreground and background colour must differ; both are {fg!r}")
    return Attributes(shape=shape, fg=fg, bg=bg, size=size, position=position)


# --------------------------------------------------------------------------------------------------------------------
# Train / held-out split


def all_combinations() -> list[tuple[str, str, str]]:
    """Every base combination (shape, fg, bg) with fg != bg, in a fixed order (5 x 6 x 5 = 150)."""
    return [(s, f, b) for s, f, b in itertools.product(SHAPES, COLOUR_NAMES, COLOUR_NAMES) if f != b]


def _pairs(combo: tuple[str, str, str]) -> tuple[tuple[str, str, str], ...]:
    shape, fg, bg = combo
    return (("shape-fg", shape, fg), ("shape-bg", shape, bg), ("fg-bg", fg, bg))


@dataclass(frozen=True)
class PromptSplit:
    """A fixed split of the base combinations; `train` and `held_out` are disjoint and cover all combinations."""

    train: tuple[tuple[str, str, str], ...]
    held_out: tuple[tuple[str, str, str], ...]

    def attributes(self, split: str) -> list[Attributes]:
        """The base combinations of `split` ("train" or "held_out") as layout-free `Attributes`."""
        return [Attributes(*c) for c in self.combinations(split)]

    def prompts(self, split: str) -> list[str]:
        """The layout-free prompts of `split`, e.g. ``"a red circle on a blue background"``."""
        return [a.prompt() for a in self.attributes(split)]

    def combinations(self, split: str) -> tuple[tuple[str, str, str], ...]:
        if split == "train":
            return self.train
        if split == "held_out":
            return self.held_out
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'held_out'")

    def split_of(self, attributes: Attributes) -> str:
        """'train' or 'held_out' for the base combination of `attributes`."""
        return "held_out" if attributes.combination in self.held_out else "train"


def prompt_split(seed: int = SPLIT_SEED, held_out_fraction: float = HELD_OUT_FRACTION) -> PromptSplit:
    """The fixed, seeded split of base combinations into training and held-out ones.

    Combinations are visited in a seeded random order and moved to the held-out set while every word pair
    ((shape, fg), (shape, bg), (fg, bg)) keeps at least 3 training combinations and no word is held out more than
    its fair share (+1), until `held_out_fraction` of all combinations are held out.
    """
    if not 0.0 <= held_out_fraction <= 0.3:
        raise ValueError(
            f"held_out_fraction must lie in [0, 0.3] so every word pair stays in training; got {held_out_fraction}"
        )
    combos = all_combinations()
    n_held = int(round(held_out_fraction * len(combos)))
    train_pairs: dict[tuple[str, str, str], int] = {}
    for c in combos:
        for p in _pairs(c):
            train_pairs[p] = train_pairs.get(p, 0) + 1
    per_word_cap = {
        "shape": math.ceil(n_held / len(SHAPES)) + 1,
        "fg": math.ceil(n_held / len(COLOUR_NAMES)) + 1,
        "bg": math.ceil(n_held / len(COLOUR_NAMES)) + 1,
    }
    word_counts: dict[tuple[str, str], int] = {}
    held: set[tuple[str, str, str]] = set()
    order = np.random.default_rng(seed).permutation(len(combos))
    for idx in order:
        if len(held) == n_held:
            break
        c = combos[int(idx)]
        roles = (("shape", c[0]), ("fg", c[1]), ("bg", c[2]))
        if any(word_counts.get(r, 0) >= per_word_cap[r[0]] for r in roles):
            continue
        if any(train_pairs[p] <= 3 for p in _pairs(c)):
            continue
        held.add(c)
        for p in _pairs(c):
            train_pairs[p] -= 1
        for r in roles:
            word_counts[r] = word_counts.get(r, 0) + 1
    if len(held) < n_held:
        raise ValueError(f"could not hold out {n_held} combinations under the coverage constraints (got {len(held)})")
    train = tuple(c for c in combos if c not in held)
    held_out = tuple(c for c in combos if c in held)
    return PromptSplit(train=train, held_out=held_out)


# --------------------------------------------------------------------------------------------------------------------
# Shapes and rendering


def shape_polygon(shape: str, circle_vertices: int = 96) -> np.ndarray:
    """The shape's outline in unit coordinates (x right, y down), centred on its area centroid; shape (N, 2).

    Sizes are balanced so shapes of the same nominal radius look about equally big.
    """
    if shape == "circle":
        t = np.linspace(0.0, 2.0 * np.pi, circle_vertices, endpoint=False)
        return 0.95 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "square":
        h = 0.82
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]], dtype=np.float64)
    if shape == "triangle":  # equilateral, pointing up; its circumcentre is its centroid
        t = -np.pi / 2 + np.arange(3) * 2.0 * np.pi / 3
        return 1.08 * np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "star":  # five points, inner radius 0.45 of the outer
        t = -np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.1, 1.1 * 0.45)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    if shape == "cross":  # a plus sign
        a, w = 0.95, 0.33
        pts = [(-w, -a), (w, -a), (w, -w), (a, -w), (a, w), (w, w), (w, a), (-w, a), (-w, w), (-a, w), (-a, -w)]
        return np.array([*pts, (-w, -w)], dtype=np.float64)
    raise ValueError(f"unknown shape {shape!r}; expected one of {list(SHAPES)}")


def polygon_area(points: np.ndarray) -> float:
    """Area of a simple polygon (shoelace formula)."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def place_polygon(
    points: np.ndarray, centre: tuple[float, float], scale: float, rotation_deg: float | np.ndarray
) -> np.ndarray:
    """Rotate (degrees, counter-clockwise on screen), scale and translate unit-coordinate `points` (N, 2).

    With an array of R rotations the result is a batch (R, N, 2).
    """
    t = np.radians(np.asarray(rotation_deg, dtype=np.float64))
    c, s = np.cos(t)[..., None], np.sin(t)[..., None]
    x, y = points[:, 0], points[:, 1]
    # y points down, so (x, y) -> (c x + s y, -s x + c y) turns counter-clockwise on screen.
    out = np.stack([c * x + s * y, -s * x + c * y], axis=-1)
    return out * scale + np.asarray(centre, dtype=np.float64)


def rasterize(points: np.ndarray, height: int, width: int, supersample: int = 8) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of a simple polygon given in pixel coordinates; float32 (height, width).

    `points` may also be a batch of polygons with the same vertex count, shape (B, N, 2); the result is then
    (B, height, width).

    Pixel (i, j) covers [j, j+1) x [i, i+1). Each pixel row is cut by `supersample` horizontal scanlines; along a
    scanline the covered length inside each pixel is exact: every edge crossing at x adds its winding sign ``s`` as
    ``s * (1 - frac(x))`` to the pixel it falls in and ``s`` to every pixel right of it (a cumulative sum). Unlike
    PIL's polygon fill, which rounds vertices to its grid and includes the outline, this is unbiased: area and
    centroid are exact up to the vertical sampling.
    """
    if supersample < 1:
        raise ValueError(f"supersample must be >= 1, got {supersample}")
    pts = np.asarray(points, dtype=np.float64)
    single = pts.ndim == 2
    if single:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[2] != 2 or pts.shape[1] < 3:
        raise ValueError(f"points must have shape (N >= 3, 2) or (B, N >= 3, 2), got {np.shape(points)}")
    k = supersample
    batch, rows, cols = pts.shape[0], height * k, width + 2
    y = (np.arange(rows) + 0.5) / k
    nxt = np.roll(pts, -1, axis=1)
    xa, ya, xb, yb = pts[..., 0], pts[..., 1], nxt[..., 0], nxt[..., 1]  # (B, N) each
    # Half-open rule (ya <= y < yb or yb <= y < ya) so a vertex on a scanline is counted once.
    crosses = (ya[:, None, :] <= y[None, :, None]) != (yb[:, None, :] <= y[None, :, None])  # (B, R, N)
    b_idx, r_idx, e_idx = np.nonzero(crosses)
    y0, y1 = ya[b_idx, e_idx], yb[b_idx, e_idx]
    x0, x1 = xa[b_idx, e_idx], xb[b_idx, e_idx]
    xc = np.clip(x0 + (y[r_idx] - y0) / (y1 - y0) * (x1 - x0), 0.0, float(width))
    sign = np.where(y1 > y0, 1.0, -1.0)
    col = np.floor(xc).astype(np.int64)
    flat = (b_idx * rows + r_idx) * cols + col
    size = batch * rows * cols
    partial = np.bincount(flat, weights=sign * (1.0 - (xc - col)), minlength=size)
    full = np.bincount(flat + 1, weights=sign, minlength=size + 1)[:size]
    cover = np.cumsum(full.reshape(batch, rows, cols), axis=2) + partial.reshape(batch, rows, cols)
    cover = np.clip(np.abs(cover[:, :, :width]), 0.0, 1.0)
    out = cover.reshape(batch, height, k, width).mean(axis=2).astype(np.float32)
    return out[0] if single else out


def composite(alpha: np.ndarray, fg: tuple[int, int, int], bg: tuple[int, int, int]) -> np.ndarray:
    """``bg + alpha * (fg - bg)`` rounded to uint8 (H, W, 3)."""
    f = np.asarray(fg, dtype=np.float32)
    b = np.asarray(bg, dtype=np.float32)
    img = b + alpha[..., None] * (f - b)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Sample:
    """One rendered image with its ground truth.

    Args:
        image (`np.ndarray`): uint8 (H, W, 3) RGB.
        attributes (`Attributes`): what the image shows, size and position always set.
        prompt (`str`): the prompt it was drawn for (size / position words only if the request named them).
        alpha (`np.ndarray`): float32 (H, W) exact foreground coverage.
        mask (`np.ndarray`): bool (H, W), ``alpha >= 0.5``.
        bbox (`tuple[int, int, int, int]`): (x0, y0, x1, y1) of `mask`, end-exclusive.
        centre (`tuple[float, float]`), radius (`float`), rotation_deg (`float`): the drawn layout, in pixels.
        seed (`int`): the seed the sample was drawn from.
    """

    image: np.ndarray
    attributes: Attributes
    prompt: str
    alpha: np.ndarray
    mask: np.ndarray
    bbox: tuple[int, int, int, int]
    centre: tuple[float, float]
    radius: float
    rotation_deg: float
    seed: int

    def pil(self) -> Image.Image:
        return Image.fromarray(self.image)


def _check_image_size(image_size: int) -> None:
    if not isinstance(image_size, int) or image_size < 16:
        raise ValueError(f"image_size must be an int >= 16, got {image_size!r}")


def render(attributes: Attributes, seed: int, image_size: int = 64, supersample: int = 8) -> Sample:
    """Draw `attributes` with seeded jitter; size and position left as `None` are drawn at random.

    The same (attributes, seed, image_size, supersample) always gives identical image bytes.
    """
    _check_image_size(image_size)
    rng = np.random.default_rng(seed)
    # Draw every random number in a fixed order whether or not it is used, so layout words do not shift the jitter.
    size_pick = SIZES[int(rng.integers(len(SIZES)))]
    pos_pick = POSITIONS[int(rng.integers(len(POSITIONS)))]
    u_radius, u_dx, u_dy, u_rot = rng.uniform(size=4)
    size = attributes.size or size_pick
    position = attributes.position or pos_pick

    lo, hi = SIZE_RADIUS[size]
    radius = (lo + (hi - lo) * u_radius) * image_size
    offset = 0.5 * image_size - EDGE_MARGIN * image_size - 1.1 * radius  # 1.1 = the largest unit extent of a shape
    direction = {"center": (0, 0), "left": (-1, 0), "right": (1, 0), "top": (0, -1), "bottom": (0, 1)}[position]
    jitter = POSITION_JITTER * image_size
    cx = 0.5 * image_size + direction[0] * offset + (2 * u_dx - 1) * jitter
    cy = 0.5 * image_size + direction[1] * offset + (2 * u_dy - 1) * jitter
    rotation = (2 * u_rot - 1) * ROTATION_JITTER_DEG

    points = place_polygon(shape_polygon(attributes.shape), (cx, cy), radius, rotation)
    alpha = rasterize(points, image_size, image_size, supersample)
    image = composite(alpha, COLOURS[attributes.fg], COLOURS[attributes.bg])
    mask = alpha >= 0.5
    ys, xs = np.nonzero(mask)
    bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return Sample(
        image=image,
        attributes=replace(attributes, size=size, position=position),
        prompt=attributes.prompt(),
        alpha=alpha,
        mask=mask,
        bbox=bbox,
        centre=(float(cx), float(cy)),
        radius=float(radius),
        rotation_deg=float(rotation),
        seed=int(seed),
    )


def sample_attributes(
    rng: np.random.Generator, split: str = "train", layout_word_prob: float = 0.5, splits: PromptSplit | None = None
) -> Attributes:
    """A random prompt of `split`: a base combination, plus size and position words each with `layout_word_prob`."""
    if not 0.0 <= layout_word_prob <= 1.0:
        raise ValueError(f"layout_word_prob must lie in [0, 1], got {layout_word_prob}")
    ps = splits or prompt_split()
    combos = ps.combinations(split)
    shape, fg, bg = combos[int(rng.integers(len(combos)))]
    use_size, use_pos = rng.uniform(size=2) < layout_word_prob
    size = SIZES[int(rng.integers(len(SIZES)))]
    position = POSITIONS[int(rng.integers(len(POSITIONS)))]
    return Attributes(shape, fg, bg, size if use_size else None, position if use_pos else None)


def sample(
    seed: int,
    split: str = "train",
    image_size: int = 64,
    layout_word_prob: float = 0.5,
    supersample: int = 8,
    splits: PromptSplit | None = None,
) -> Sample:
    """One random training (or held-out) sample: a prompt of `split` drawn from `seed`, rendered with `seed`."""
    rng = np.random.default_rng([seed, 1])
    attrs = sample_attributes(rng, split, layout_word_prob, splits)
    return render(attrs, seed, image_size=image_size, supersample=supersample)


def samples(
    n: int, seed: int, split: str = "train", image_size: int = 64, layout_word_prob: float = 0.5
) -> list[Sample]:
    """`n` samples of `split` with seeds derived from `seed` (sample i uses seed ``seed * 1_000_003 + i``)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    ps = prompt_split()
    return [sample(seed * 1_000_003 + i, split, image_size, layout_word_prob, splits=ps) for i in range(n)]


def render_grid(attributes: list[Attributes], seed: int, image_size: int = 64, columns: int = 8) -> np.ndarray:
    """A contact sheet (uint8 RGB) of `attributes` rendered with seeds ``seed + i``, for eyeballing the world."""
    if not attributes:
        raise ValueError("render_grid needs at least one Attributes")
    tiles = [render(a, seed + i, image_size).image for i, a in enumerate(attributes)]
    rows = math.ceil(len(tiles) / columns)
    sheet = np.full((rows * image_size, columns * image_size, 3), 128, dtype=np.uint8)
    for i, t in enumerate(tiles):
        r, c = divmod(i, columns)
        sheet[r * image_size : (r + 1) * image_size, c * image_size : (c + 1) * image_size] = t
    return sheet
