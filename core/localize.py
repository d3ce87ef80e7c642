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
from torch import nn

from .attention import token_attention
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


class ResidualGate:
    """Installs the hooks that apply ``residuals`` to ``sites``; ``localized`` selects LAG over global."""

    def __init__(self, sites: list[tuple[TransformerSite, nn.Module]], residuals: ResidualSet,
                 strength: float = 1.0, block_strengths: dict[str, float] | None = None,
                 localized: bool = False, rule: str = "median", mask_fn=None):
        self.sites = [(s, m) for s, m in sites if s.target in residuals.layers]
        self.residuals = residuals
        self.strength = strength
        self.block_strengths = block_strengths or {}
        self.localized = localized
        self.rule = rule
        self.mask_fn = mask_fn  # maps [B, N] -> gate [B, N]; overrides ``rule`` (tests, custom rules)
        self.plan = CallPlan()
        self.last_masks: dict[str, torch.Tensor] = {}  # gates of the last call, for inspection
        self._q: dict[str, torch.Tensor] = {}
        self._maps: dict[str, torch.Tensor] = {}
        self._handles: list = []

    # -------------------------------------------------------------- lifecycle
    def install(self) -> ResidualGate:
        if self._handles:
            return self
        for site, module in self.sites:
            if self.localized:
                for block in module.transformer_blocks:
                    attn = block.attn2
                    self._handles.append(attn.to_q.register_forward_hook(self._q_hook(site.path)))
                    self._handles.append(attn.to_k.register_forward_hook(self._k_hook(site.path, attn.heads)))
            self._handles.append(module.proj_out.register_forward_hook(self._out_hook(site)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._q.clear()
        self._maps.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    # -------------------------------------------------------------- hooks
    def _q_hook(self, path):
        def hook(module, inputs, output):
            if self.plan.active and self.plan.tokens:
                self._q[path] = output
        return hook

    def _k_hook(self, path, heads):
        def hook(module, inputs, output):
            q = self._q.pop(path, None)
            if q is None:
                return
            maps = self._maps.get(path)
            if maps is None:
                maps = self._maps[path] = torch.zeros(q.shape[0], q.shape[1], device=q.device)
            dev = str(q.device)
            for idx, rows in self.plan.tokens.items():
                r = _index(tuple(rows), dev)
                maps[r] += token_attention(q.index_select(0, r), output.index_select(0, r), heads, _index(idx, dev))
        return hook

    def _gate(self, site: TransformerSite, batch: int, positions: int, device) -> torch.Tensor:
        maps = self._maps.pop(site.path, None)
        if maps is None:
            raise LocalizationError(
                f"no cross-attention map reached block {site.path}: another node replaced this block's "
                "cross-attention without calling to_q/to_k; apply the localized residual after that node")
        gate = torch.zeros(batch, positions, device=device)
        own = _index(tuple(r for rs in self.plan.tokens.values() for r in rs), str(device))
        gate[own] = (self.mask_fn or (lambda m: binarize(m, self.rule)))(maps[own])
        for row, src in self.plan.borrow.items():
            gate[row] = gate[src]
        return gate

    def _out_hook(self, site: TransformerSite):
        layer = self.residuals.layers[site.target]
        weight = self.strength * self.block_strengths.get(site.target, 1.0)

        def hook(module, inputs, output):
            if not self.plan.active or weight == 0.0:
                self._maps.pop(site.path, None)
                return None
            delta = residual_forward(layer, inputs[0])
            if not self.localized:
                return output + weight * delta
            if not self.plan.tokens:
                self._maps.pop(site.path, None)
                return None  # no concept prompt in this call: the base model
            b = output.shape[0]
            n = output.shape[2] * output.shape[3] if site.linear is False else output.shape[1]
            gate = self._gate(site, b, n, output.device).to(output.dtype)
            self.last_masks[site.path] = gate.detach()
            gate = gate.view(b, 1, *output.shape[2:]) if not site.linear else gate.view(b, n, 1)
            return output + weight * gate * delta
        return hook
