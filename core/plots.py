"""Tiny raster plots for node previews (no plotting dependency)."""
from __future__ import annotations

import torch


def line_plot(values: list[float], width: int = 320, height: int = 160, margin: int = 8) -> torch.Tensor:
    """A black-on-white line chart of ``values`` as an IMAGE tensor [1, height, width, 3] in [0, 1]."""
    img = torch.ones(height, width, 3)
    img[margin, margin:width - margin] = 0.8  # frame: top and bottom rules
    img[height - margin - 1, margin:width - margin] = 0.6
    if not values:
        return img[None]
    v = torch.tensor(values, dtype=torch.float32)
    lo, hi = float(v.min()), float(v.max())
    span = hi - lo if hi > lo else 1.0
    xs = torch.linspace(margin, width - margin - 1, len(values))
    ys = (height - margin - 1) - (v - lo) / span * (height - 2 * margin - 1)
    for i in range(max(1, len(values) - 1)):
        j = min(i + 1, len(values) - 1)
        n = int(max(abs(xs[j] - xs[i]), abs(ys[j] - ys[i])).item()) + 1
        for s in torch.linspace(0, 1, n):
            x = int(round(float(xs[i] + s * (xs[j] - xs[i]))))
            y = int(round(float(ys[i] + s * (ys[j] - ys[i]))))
            img[max(0, y - 1):y + 1, max(0, x - 1):x + 1] = torch.tensor([0.1, 0.3, 0.8])
    return img[None]
