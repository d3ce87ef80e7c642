"""Small raster plots for node previews and the main job's report (Pillow draws the text; no plotting library)."""
from __future__ import annotations

import math

import numpy as np
import torch


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering [lo, hi]: steps of 1, 2 or 5 times a power of ten, about ``count`` of them."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, count - 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def line_plot(values: list[float], width: int = 480, height: int = 280, xlabel: str = "training step",
              ylabel: str = "loss", title: str = "", smooth: int = 0) -> torch.Tensor:
    """A line chart of ``values`` (x = 1, 2, ...) with axes, tick numbers and axis labels, as an IMAGE tensor
    [1, height, width, 3] in [0, 1]. ``smooth`` > 1 also draws the moving average over that many points.
    Non-finite values are left out of the line and the axis range."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 58, width - 14, 26 if title else 12, height - 40
    if title:
        draw.text((left, 6), title, fill="black", font=font)
    v = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(v)
    draw.rectangle((left, top, right, bottom), outline=(90, 90, 90))
    draw.text(((left + right) // 2, height - 14), xlabel, fill="black", font=font, anchor="mm")
    label = Image.new("RGB", (bottom - top, 16), "white")
    ImageDraw.Draw(label).text(((bottom - top) // 2, 8), ylabel, fill="black", font=font, anchor="mm")
    img.paste(label.rotate(90, expand=True), (2, top))
    if not finite.any():
        draw.text(((left + right) // 2, (top + bottom) // 2), "no finite values", fill="gray", font=font,
                  anchor="mm")
        return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
    lo, hi = float(v[finite].min()), float(v[finite].max())
    if hi <= lo:
        lo, hi = lo - 0.5 * (abs(lo) or 1.0), hi + 0.5 * (abs(hi) or 1.0)
    n = len(v)

    def at(i: float, y: float) -> tuple[float, float]:
        x = left + (right - left) * ((i - 1) / max(1, n - 1))
        return x, bottom - (bottom - top) * (y - lo) / (hi - lo)

    for y in nice_ticks(lo, hi):
        py = at(1, y)[1]
        draw.line((left - 4, py, left, py), fill="black")
        draw.line((left + 1, py, right - 1, py), fill=(232, 232, 232))
        draw.text((left - 6, py), _label(y), fill="black", font=font, anchor="rm")
    for x in nice_ticks(1, max(1, n)):
        if x < 1 or x > n:
            continue
        px = at(x, lo)[0]
        draw.line((px, bottom, px, bottom + 4), fill="black")
        draw.text((px, bottom + 6), _label(x), fill="black", font=font, anchor="mt")

    def polyline(series: np.ndarray, colour, widthpx: int) -> None:
        pts = [at(i + 1, y) for i, y in enumerate(series) if math.isfinite(y)]
        if len(pts) == 1:
            draw.ellipse((pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 2, pts[0][1] + 2), fill=colour)
        elif pts:
            draw.line(pts, fill=colour, width=widthpx)

    polyline(v, (120, 160, 220) if smooth > 1 else (30, 80, 200), 1)
    if smooth > 1 and n >= smooth:
        kernel = np.ones(smooth) / smooth
        avg = np.full(n, np.nan)
        avg[smooth - 1:] = np.convolve(np.where(finite, v, 0.0), kernel, mode="valid")
        polyline(avg, (20, 40, 140), 2)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
