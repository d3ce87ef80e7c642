"""Attention maps to masks (LAG's binarisation) and block resolutions."""
from __future__ import annotations

import torch

RULES = ("median", "mean", "soft")


def binarize(maps: torch.Tensor, rule: str = "median", dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row mask from maps [B, N]: ``median`` (Ham et al. 2024: 1 above the spatial median, so half the
    positions), ``mean`` (1 above the mean), or ``soft`` (min-max normalised map in [0, 1]); in ``dtype``."""
    dtype = dtype or maps.dtype
    if rule == "median":
        return (maps > maps.median(dim=1, keepdim=True).values).to(dtype)
    if rule == "mean":
        return (maps > maps.mean(dim=1, keepdim=True)).to(dtype)
    if rule == "soft":
        lo = maps.amin(dim=1, keepdim=True)
        hi = maps.amax(dim=1, keepdim=True)
        return ((maps - lo) / (hi - lo).clamp_min(1e-12)).to(dtype)
    raise ValueError(f"unknown mask rule {rule!r}; choose one of {', '.join(RULES)}")


def block_hw(positions: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of a block with ``positions`` tokens inside a UNet whose latent is ``latent_hw``.

    Each level halves the size, rounding up (a stride-2 conv with padding 1), so try the factors in turn.
    """
    h, w = latent_hw
    for _ in range(8):
        if h * w == positions:
            return h, w
        h, w = (h + 1) // 2, (w + 1) // 2
    raise ValueError(f"{positions} positions do not match a downsampled {latent_hw} latent")
