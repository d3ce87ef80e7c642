"""Residual gating: add ``strength * gate * Delta W x`` at each transformer's proj_out, with the gate either 1
(global residual) or LAG's mask (Ham et al. 2024, Sec. 3.3): that same block's cross-attention maps for the
concept's tokens, summed, binarised at the median, in the same UNet pass.

One mechanism for both backends: forward hooks on ``attn2.to_q``/``attn2.to_k`` (maps) and ``proj_out``
(residual), installed by ``ResidualGate`` for as long as a ``with`` block or a single UNet call lasts.
Hooking the projections rather than the attention call keeps any other attention patch in charge of the
attention output itself.

CFG decision: an unconditional row has no V* token, so it borrows the mask of the conditional row of the same
latent. The model is then one spatially mixed model for both halves of CFG: an all-ones mask reproduces the
global residual and an all-zeros mask the base model exactly, for the guided result too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from .attention import token_attention, token_indicator
from .capture import qk_hooks, remove_hooks
from .layouts import TransformerSite
from .masks import binarize
from .residuals import ResidualSet, residual_forward


class LocalizationError(RuntimeError):
    """LAG could not compute a mask where it needed one."""


@dataclass
class CallPlan:
    """Which batch rows compute their own concept map and which borrow another row's mask, for one UNet call.

    Rows in neither get no residual. ``active=False`` turns the residual off for the call (outside start/end).
    """

    tokens: dict[tuple[int, ...], list[int]] = field(default_factory=dict)  # token positions -> rows
    borrow: dict[int, int] = field(default_factory=dict)  # row -> row whose mask it uses
    active: bool = True


def cfg_plan(batch: int, cond_or_uncond: list[int], token_idx: list[int] | list[list[int] | None],
             active: bool = True) -> CallPlan:
    """Plan for a batch made of ``len(cond_or_uncond)`` equal chunks (0 = conditional, 1 = unconditional).

    ``token_idx`` is one position list for all conditional chunks, or one entry per chunk (None: the chunk is
    not the concept's prompt and borrows like an unconditional one). Unconditional rows borrow the first
    concept chunk's row of the same latent.
    """
    n = len(cond_or_uncond)
    if batch % n:
        raise ValueError(f"batch {batch} is not a multiple of {n} chunks")
    size = batch // n
    per_chunk = token_idx if token_idx and isinstance(token_idx[0], (list, tuple, type(None))) else None
    plan = CallPlan(active=active)
    source_chunk = None
    for c, kind in enumerate(cond_or_uncond):
        idx = (per_chunk[c] if per_chunk is not None else token_idx) if kind == 0 else None
        if idx:
            plan.tokens.setdefault(tuple(idx), []).extend(range(c * size, (c + 1) * size))
            if source_chunk is None:
                source_chunk = c
    if source_chunk is not None:
        for c in range(n):
            if not any(c * size in rows for rows in plan.tokens.values()):
                for i in range(size):
                    plan.borrow[c * size + i] = source_chunk * size + i
    return plan


@lru_cache(maxsize=256)
def _index(values: tuple[int, ...], device: str) -> torch.Tensor:
    """A constant index tensor on ``device``, made once: a fresh host-to-device copy per block would stall the GPU."""
    return torch.tensor(values, dtype=torch.long, device=device)


def _take_rows(t: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    """``t[rows]``: a view when the rows are consecutive (the usual CFG chunk), else a gather."""
    if rows == tuple(range(rows[0], rows[0] + len(rows))):
        return t[rows[0]:rows[0] + len(rows)]
    return t.index_select(0, _index(rows, str(t.device)))


class ResidualGate:
    """Installs the hooks that apply ``residuals`` to ``sites``; ``localized`` selects LAG over global."""

    def __init__(self, sites: list[tuple[TransformerSite, nn.Module]], residuals: ResidualSet,
                 strength: float = 1.0, block_strengths: dict[str, float] | None = None,
                 localized: bool = False, rule: str = "median", mask_fn=None, cache: dict | None = None):
        self.sites = [(s, m) for s, m in sites if s.target in residuals.layers]
        self.residuals = residuals
        self.strength = strength
        self.block_strengths = block_strengths or {}
        self.localized = localized
        self.rule = rule
        self.mask_fn = mask_fn  # maps [B, N] -> gate [B, N]; overrides ``rule`` (tests, custom rules)
        self.plan = CallPlan()
        # constants made on first use and shareable across calls: Delta W per layer/dtype/device (one 1x1 conv
        # instead of two when sampling) and the token-indicator values of the map attention
        self.cache = cache if cache is not None else {}
        self.last_masks: dict[str, torch.Tensor] = {}  # gates of the last call, for inspection
        self._maps: dict[tuple, torch.Tensor] = {}  # (block path, token positions) -> summed maps
        self._handles: list = []

    # -------------------------------------------------------------- lifecycle
    def install(self) -> ResidualGate:
        if self._handles:
            return self
        for site, module in self.sites:
            if self.localized:
                for block in module.transformer_blocks:
                    self._handles += qk_hooks(block.attn2, self._on_qk(site.path, block.attn2.heads), self._wanted)
            self._handles.append(module.proj_out.register_forward_hook(self._out_hook(site)))
        return self

    def remove(self) -> None:
        remove_hooks(self._handles)
        self._maps.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    # -------------------------------------------------------------- hooks
    def _wanted(self) -> bool:
        return self.plan.active and bool(self.plan.tokens)

    def _on_qk(self, path, heads):
        def on_qk(q, k):
            for idx, rows in self.plan.tokens.items():
                key = ("indicator", idx, heads, k.shape[1], k.shape[2], k.dtype, k.device)
                ind = self.cache.get(key)
                if ind is None:
                    ind = self.cache[key] = token_indicator(
                        _index(idx, str(q.device)), heads, k.shape[1], k.shape[2] // heads, k)
                m = token_attention(_take_rows(q, tuple(rows)), _take_rows(k, tuple(rows)), heads,
                                    _index(idx, str(q.device)), indicator=ind)
                key = (path, idx)
                prev = self._maps.get(key)
                self._maps[key] = m if prev is None else prev + m  # depth > 1 (SDXL): sum the block's maps
        return on_qk

    def _gate(self, site: TransformerSite, batch: int, positions: int, dtype) -> torch.Tensor:
        """[batch, positions] gate: each row's own mask, the mask it borrows, or zeros."""
        masks, own_rows = [], []
        for idx, rows in self.plan.tokens.items():
            maps = self._maps.pop((site.path, idx), None)
            if maps is None:
                raise LocalizationError(
                    f"no cross-attention map reached block {site.path}: another node replaced this block's "
                    "cross-attention without calling to_q/to_k; apply the localized residual after that node")
            masks.append(self.mask_fn(maps).to(dtype) if self.mask_fn else binarize(maps, self.rule, dtype))
            own_rows.extend(rows)
        mask = masks[0] if len(masks) == 1 else torch.cat(masks)
        where = {r: i for i, r in enumerate(own_rows)}
        row_map = tuple(where.get(r, where.get(self.plan.borrow.get(r, -1), -1)) for r in range(batch))
        if len(own_rows) == 1 and all(i == 0 for i in row_map):
            return mask.expand(batch, positions)  # one concept row, the rest borrow it: a view
        if -1 in row_map:  # rows with no concept get the zero row
            mask = torch.cat([mask, mask.new_zeros(1, positions)])
            row_map = tuple(len(own_rows) if i == -1 else i for i in row_map)
        return mask.index_select(0, _index(row_map, str(mask.device)))

    def _delta(self, site: TransformerSite, layer, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and layer.up.requires_grad:
            return residual_forward(layer, x)  # training: keep the low-rank factors in the graph
        key = (site.target, x.dtype, x.device)
        w = self.cache.get(key)
        if w is None:
            w = layer.delta().to(device=x.device, dtype=x.dtype)
            w = self.cache[key] = w[:, :, None, None].contiguous() if layer.conv else w
        return F.conv2d(x, w) if layer.conv else F.linear(x, w)

    def _drop_maps(self, path):
        for idx in self.plan.tokens:
            self._maps.pop((path, idx), None)

    def _out_hook(self, site: TransformerSite):
        layer = self.residuals.layers[site.target]
        weight = self.strength * self.block_strengths.get(site.target, 1.0)

        def hook(module, inputs, output):
            if not self.plan.active or weight == 0.0:
                self._drop_maps(site.path)
                return None
            if self.localized and not self.plan.tokens:
                return None  # no concept prompt in this call: the base model
            delta = self._delta(site, layer, inputs[0])
            if not self.localized:
                return output + weight * delta
            b = output.shape[0]
            n = output.shape[1] if site.linear else output.shape[2] * output.shape[3]
            gate = self._gate(site, b, n, output.dtype)
            self.last_masks[site.path] = gate
            gate = gate.view(b, n, 1) if site.linear else gate.view(b, 1, *output.shape[2:])
            return torch.addcmul(output, gate, delta, value=weight)
        return hook
