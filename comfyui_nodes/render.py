"""Pictures the SPO nodes output: the score-vs-step plot, the x̂0 strip and the pool grid.

Every function returns a ComfyUI IMAGE: a float tensor [1, H, W, 3] in [0, 1] — except the score
plot, which stays a PIL image (the live preview sends it as is; `to_image_tensor` makes the IMAGE).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

WIN = (40, 170, 70)
LOSE = (210, 60, 50)
INK = (235, 235, 235)
BACKGROUND = (32, 32, 36)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def to_image_tensor(picture: Image.Image) -> torch.Tensor:
    array = np.asarray(picture.convert("RGB"))  # uint8 [H, W, 3]; converted by torch (≈ 5× numpy's float cast)
    return torch.from_numpy(array.copy()).float().div_(255.0)[None]


def _pil(image: torch.Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] → PIL."""
    array = (image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def _font():
    return ImageFont.load_default()


def score_plot_picture(timesteps: list[int], scores: list[list[float]], title: str = "", width: int = 640,
                       height: int = 360) -> Image.Image:
    """Preference score of every step's x̂0 (one line per batch row); x axis: step, labelled with t.

    Drawn with PIL (a few ms; matplotlib would cost about as much as a few UNet passes of a small
    model, and the Step Scorer's overhead budget is tight).
    """
    picture = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(picture)
    font = _font()
    left, right, top, bottom = 58, 16, 28 if title else 12, 44
    x0, x1, y0, y1 = left, width - right, top, height - bottom
    draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
    if title:
        draw.text((left, 8), title[:60], fill=(20, 20, 20), font=font)
    values = np.asarray(scores, dtype=np.float64).reshape(len(scores), -1) if scores else np.zeros((0, 1))
    n = len(values)
    if n:
        lo, hi = float(values.min()), float(values.max())
        pad = (hi - lo) * 0.08 or max(abs(hi), 1.0) * 0.05
        lo, hi = lo - pad, hi + pad

        def px(i: int) -> float:
            return x0 + (x1 - x0) * (i / max(n - 1, 1))

        def py(v: float) -> float:
            return y1 - (y1 - y0) * (v - lo) / (hi - lo)

        for j in range(5):  # y grid and labels
            v = lo + (hi - lo) * j / 4
            draw.line([(x0, py(v)), (x1, py(v))], fill=(225, 225, 225))
            draw.text((4, py(v) - 6), f"{v:.3g}", fill=(60, 60, 60), font=font)
        stride = max(1, n // 10)
        for i in range(0, n, stride):  # x ticks: step and timestep
            draw.line([(px(i), y1), (px(i), y1 + 4)], fill=(120, 120, 120))
            draw.text((px(i) - 6, y1 + 6), str(i), fill=(60, 60, 60), font=font)
            draw.text((px(i) - 14, y1 + 18), f"t={timesteps[i]}", fill=(110, 110, 110), font=font)
        for row in range(values.shape[1]):
            color = PALETTE[row % len(PALETTE)]
            points = [(px(i), py(float(values[i, row]))) for i in range(n)]
            if n > 1:
                draw.line(points, fill=color, width=2)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=color)
        draw.text((x1 - 190, 8), "x: step (t of x0-hat)  y: SPM score", fill=(90, 90, 90), font=font)
    return picture


def x0_strip(thumbs: torch.Tensor, timesteps: list[int], scores: list[list[float]],
             max_columns: int = 20) -> torch.Tensor:
    """Thumbnails [steps, B, 3, h, w] as a strip per batch row, each captioned `t` and score.

    More than `max_columns` steps are thinned evenly (the last step is always shown).
    """
    if thumbs is None or thumbs.shape[0] == 0:
        return to_image_tensor(Image.new("RGB", (64, 16), BACKGROUND))
    n, b = thumbs.shape[:2]
    columns = list(range(n))
    if n > max_columns:
        columns = sorted({round(i * (n - 1) / (max_columns - 1)) for i in range(max_columns)})
    h, w = thumbs.shape[-2:]
    cell_w = max(w, 44)
    caption = 24
    sheet = Image.new("RGB", (cell_w * len(columns), (h + caption) * b), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for row in range(b):
        for col, step in enumerate(columns):
            x0, y0 = col * cell_w, row * (h + caption)
            sheet.paste(_pil(thumbs[step, row]), (x0 + (cell_w - w) // 2, y0))
            draw.text((x0 + 2, y0 + h + 1), f"t={timesteps[step]}", fill=INK, font=font)
            draw.text((x0 + 2, y0 + h + 12), f"{scores[step][row]:.2f}", fill=INK, font=font)
    return to_image_tensor(sheet)


def pool_grid(images: torch.Tensor, scores: torch.Tensor, t: int, min_cell: int = 96) -> torch.Tensor:
    """The pool's candidates [B, k, 3, H, W], one row per batch row, the winner framed green and the
    loser red, each captioned with its score (judged at timestep t)."""
    b, k = images.shape[:2]
    h, w = images.shape[-2:]
    zoom = max(1, -(-min_cell // max(h, w)))  # upscale tiny (pocket) images so captions fit
    ch, cw = h * zoom, w * zoom
    pad, caption = 4, 28
    sheet = Image.new("RGB", (k * (cw + 2 * pad), b * (ch + 2 * pad + caption)), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = _font()
    for row in range(b):
        win, lose = int(scores[row].argmax()), int(scores[row].argmin())
        for j in range(k):
            x0 = j * (cw + 2 * pad)
            y0 = row * (ch + 2 * pad + caption)
            picture = _pil(images[row, j]).resize((cw, ch), Image.NEAREST)
            if j in (win, lose) and k > 1:
                draw.rectangle([x0, y0, x0 + cw + 2 * pad - 1, y0 + ch + 2 * pad - 1], fill=WIN if j == win else LOSE)
            sheet.paste(picture, (x0 + pad, y0 + pad))
            label = f"#{j}  {float(scores[row, j]):.3f}"
            if k > 1 and j == win:
                label += "  winner"
            elif k > 1 and j == lose:
                label += "  loser"
            draw.text((x0 + pad, y0 + ch + 2 * pad + 1), label, fill=INK, font=font)
            draw.text((x0 + pad, y0 + ch + 2 * pad + 13), f"t={t}", fill=INK, font=font)
    return to_image_tensor(sheet)
