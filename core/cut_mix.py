"""Cut-Mix training for composing learned concepts (SVDiff, Han et al. 2023), adapted to region-gated residuals.

SVDiff trains one model on images made by cutting two concepts' photos and putting them side by side, captioned
"V1 … and V2 …", so the model sees both concepts in one picture; its Unmix term (``unmix_loss``) also penalises
each concept's cross-attention outside its own half. Here each concept keeps its own residual set: both
sets are fine-tuned together on such images, each gated by its own half (as Apply Regions gates them at sampling
time), so each residual learns its concept while the other one acts on the other half, and what a gated residual
spreads across the image (group norms, self-attention) is trained against instead of left to chance.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .extract import HandleAttention
from .hooks.gate import LowRankGate, resize_mask
from .masks import block_hw
from .residuals import ResidualSet


def object_column(mask: torch.Tensor | None, width: int) -> float:
    """The column the object is centred on (the mask's centroid), or the image's centre for no mask / an empty one."""
    if mask is None or float(mask.sum()) <= 0:
        return (width - 1) / 2
    cols = torch.arange(width, dtype=torch.float32)
    weights = mask.float().sum(0)
    return float((weights * cols).sum() / weights.sum())


def window(image: torch.Tensor, mask: torch.Tensor | None, width: int) -> torch.Tensor:
    """The ``width`` columns of ``image`` [H, W, 3] around its object, shifted to stay inside the image."""
    w = image.shape[1]
    if width > w:
        raise ValueError(f"a half of {width} px is wider than the image ({w} px)")
    left = round(object_column(mask, w) - (width - 1) / 2)
    left = min(max(left, 0), w - width)
    return image[:, left:left + width]


def shrink(images: torch.Tensor, masks: torch.Tensor | None, scale: float):
    """Images [N, H, W, 3] (and masks [N, H, W]) scaled by ``scale`` <= 1 about their centre, the border pixels
    repeated outward to fill the frame: objects become smaller, as they are when two share a picture."""
    if not 0 < scale <= 1:
        raise ValueError(f"scale must be in (0, 1], got {scale}")
    if scale == 1:
        return images, masks
    n, h, w, _ = images.shape
    sh, sw = max(1, round(h * scale)), max(1, round(w * scale))
    top, left = (h - sh) // 2, (w - sw) // 2
    pad = (left, w - sw - left, top, h - sh - top)

    def go(x, antialias):
        x = F.interpolate(x, size=(sh, sw), mode="bilinear", antialias=antialias, align_corners=False)
        return F.pad(x, pad, mode="replicate")
    out = go(images.permute(0, 3, 1, 2).float(), True).permute(0, 2, 3, 1).clamp(0, 1)
    return out, (None if masks is None else go(masks[:, None].float(), False)[:, 0])


def cut_mix(images_a: torch.Tensor, masks_a: torch.Tensor | None, images_b: torch.Tensor,
            masks_b: torch.Tensor | None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every pair (a_i, b_j) cut around its objects and put side by side: a on the left half, b on the right.

    images [N, H, W, 3] (both sets the same H and W); masks [N, H, W] or None (then the image's centre is cut);
    ``scale`` shrinks the images first (``shrink``). Returns (images [Na*Nb, H, W, 3], left half mask [H, W],
    right half mask [H, W]); pair (i, j) is row i * Nb + j."""
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"both concepts' images must have one size, got {tuple(images_a.shape[1:3])} and "
                         f"{tuple(images_b.shape[1:3])}: resize them first (e.g. ImageScale)")
    images_a, masks_a = shrink(images_a, masks_a, scale)
    images_b, masks_b = shrink(images_b, masks_b, scale)
    h, w = images_a.shape[1:3]
    wa = w // 2
    out = []
    for i in range(images_a.shape[0]):
        left = window(images_a[i], None if masks_a is None else masks_a[i], wa)
        for j in range(images_b.shape[0]):
            right = window(images_b[j], None if masks_b is None else masks_b[j], w - wa)
            out.append(torch.cat([left, right], dim=1))
    half = torch.zeros(h, w)
    half[:, :wa] = 1
    return torch.stack(out), half, 1 - half


@contextlib.contextmanager
def gated_residuals(modules: dict[str, nn.Module], sets: list[tuple[ResidualSet, torch.Tensor]]) -> Iterator[None]:
    """Each residual set adds ``gate ⊙ ΔW x`` to its layers' outputs, its gate its own mask [H, W] (image size):
    one mask-gated ``LowRankGate`` per set, differentiable in the sets' factors (for training), removed on exit.
    ``RegionGate`` computes the same at sampling time (tested equal)."""
    with contextlib.ExitStack() as stack:
        for rs, mask in sets:
            stack.enter_context(LowRankGate([], rs, mask=mask, modules=modules))
        yield


def unmix_loss(maps: list[torch.Tensor], regions: list[torch.Tensor], latent_hw: tuple[int, int],
               outside_cache: dict | None = None) -> torch.Tensor:
    """SVDiff's Unmix regularisation: the mean squared cross-attention of each concept's tokens outside its own region.

    ``maps`` one [B, K, N] tensor per attention layer (concept k's token attention at N positions, e.g. from
    ``core.extract.HandleAttention``); ``regions`` K masks [H, W] (concept k's own region, e.g. its half);
    ``latent_hw`` places each layer's N positions; ``outside_cache`` keeps the resized regions between calls.
    Zero exactly when no concept attends outside its region."""
    if not maps:
        raise ValueError("no attention maps were captured: the model has no cross-attention on these layers")
    cache = {} if outside_cache is None else outside_cache
    per_layer = []
    for m in maps:
        key = (m.shape[-1], m.device, m.dtype)
        if key not in cache:
            hw = block_hw(m.shape[-1], latent_hw)
            cache[key] = torch.stack([1 - resize_mask(r, hw) for r in regions]).to(m.device, m.dtype)  # [K, N]
        per_layer.append((m * cache[key]).pow(2).mean())
    return torch.stack(per_layer).mean()


@contextlib.contextmanager
def unmix_term(sites: list, positions: list[list[int]], regions: list[torch.Tensor], latent_hw: tuple[int, int],
               weight: float) -> Iterator[Callable[[], torch.Tensor]]:
    """Captures each concept's token attention (``positions[k]`` in the caption) on every cross-attention of
    ``sites`` and yields the ``extra_loss`` for ``training.train``: ``weight`` x ``unmix_loss`` of the maps the
    last prediction left (then forgotten). Hooks removed on exit."""
    capture = HandleAttention(sites)
    capture.positions = positions
    outside: dict = {}  # each layer size's regions resized once, not at every step

    def term() -> torch.Tensor:
        maps, capture.maps = capture.maps, []
        return weight * unmix_loss(maps, regions, latent_hw, outside)
    with capture:
        yield term


def trainable_copy(rs: ResidualSet, device=None) -> ResidualSet:
    """A copy of a residual set (on ``device``) whose factors can be trained without touching the original's."""
    copy = rs.detached()
    for layer in copy.layers.values():
        layer.down, layer.up = layer.down.to(device), layer.up.to(device)
    return copy


def spread_rows(n: int, limit: int) -> list[int]:
    """At most ``limit`` of ``n`` rows, spread evenly from the first to the last (all of them when n <= limit)."""
    if limit < 1:
        raise ValueError("keep at least one pair")
    if n <= limit:
        return list(range(n))
    return torch.linspace(0, n - 1, limit).round().long().tolist()
