"""One attention recorder: every consumer of text->image (or self-) attention maps listens to a tap.

A tap reports each attention call of the model as an ``AttentionEvent``: the projected queries and keys exactly
as the model uses them (after QK-norm, and after RoPE on Flux), the index of the site (block) the call belongs
to, and where image and text tokens sit in them. Consumers (LAG's gates, heatmaps, extraction, regions)
recompute just the maps they need from q and k (``core.attention``), so whichever attention function or other
pack's patch is in charge of the attention output stays in charge.

Taps per backend: ``UNetTap`` (forward hooks on ``attn2``/``attn1``'s ``to_q``/``to_k``, ComfyUI and diffusers
UNets alike); ``core.patching.comfy.OverrideTap`` (ComfyUI's model-agnostic ``optimized_attention_override``, for
joint attention in DiTs); ``core.patching.diffusers_dit`` (attention processors of diffusers' DiTs).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionEvent:
    """One attention call. ``q``/``k`` are laid out ``[B, L, heads*d]`` (token-major) or ``[B, heads, L, d]``
    (``head_major``); the image queries are tokens ``image`` = (start, count) of ``q``, the text keys tokens
    ``text`` = (start, count) of ``k`` (cross-attention: all of q, all of k)."""

    site: int
    q: torch.Tensor
    k: torch.Tensor
    heads: int
    head_major: bool = False
    image: tuple[int, int] | None = None
    text: tuple[int, int] | None = None

    @property
    def image_tokens(self) -> int:
        return self.image[1] if self.image else (self.q.shape[2] if self.head_major else self.q.shape[1])

    @property
    def text_tokens(self) -> int:
        return self.text[1] if self.text else (self.k.shape[2] if self.head_major else self.k.shape[1])

    def queries(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Image queries of batch rows start..start+count as ``[rows, heads, N, d]`` (one strided view)."""
        return heads_view(self.q, self.heads, self.head_major, rows, self.image)

    def keys(self, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Text keys of batch rows start..start+count as ``[rows, heads, L, d]`` (one strided view)."""
        return heads_view(self.k, self.heads, self.head_major, rows, self.text)


def heads_view(t: torch.Tensor, heads: int, head_major: bool, rows: tuple[int, int] | None,
               tokens: tuple[int, int] | None) -> torch.Tensor:
    """``t`` restricted to batch rows and tokens, split into heads: ``[rows, heads, tokens, d]``.

    A contiguous ``t`` gives one ``as_strided`` view (one tensor operation instead of slice, reshape and
    transpose: at 512 px a UNet step is bound by how many small operations run, not by arithmetic)."""
    if head_major:
        b, h, n, d = t.shape
    else:
        b, n, hd = t.shape
        h, d = heads, hd // heads
    r0, rn = rows if rows is not None else (0, b)
    t0, tn = tokens if tokens is not None else (0, n)
    if t.is_contiguous():
        if head_major:
            stride = (h * n * d, n * d, d, 1)
        else:
            stride = (n * h * d, d, h * d, 1)
        offset = t.storage_offset() + r0 * stride[0] + t0 * stride[2]
        return t.as_strided((rn, h, tn, d), stride, offset)
    if head_major:
        return t[r0:r0 + rn, :, t0:t0 + tn]
    return t[r0:r0 + rn, t0:t0 + tn].unflatten(-1, (h, d)).transpose(1, 2)


def qk_hooks(attn: nn.Module, on_qk: Callable[[torch.Tensor, torch.Tensor], None],
             wanted: Callable[[], bool] = lambda: True) -> list:
    """Hooks on ``attn.to_q``/``attn.to_k`` calling ``on_qk(q, k)`` once per attention call; returns the handles.

    ``wanted()`` is asked when q is computed; a call it declines costs nothing further. Both projections run in
    this order in ComfyUI's ``CrossAttention`` and diffusers' ``Attention``.
    """
    pending: dict[str, torch.Tensor] = {}

    def q_hook(module, inputs, output):
        if wanted():
            pending["q"] = output

    def k_hook(module, inputs, output):
        q = pending.pop("q", None)
        if q is not None:
            on_qk(q, output)

    return [attn.to_q.register_forward_hook(q_hook), attn.to_k.register_forward_hook(k_hook)]


def remove_hooks(handles: list) -> None:
    for h in handles:
        h.remove()
    handles.clear()


Listener = Callable[[AttentionEvent], None]


class Tap:
    """A list of listeners; ``wanted()`` is asked before an event is built (a declined call costs nothing)."""

    def __init__(self):
        self.listeners: list[tuple[Listener, Callable[[], bool]]] = []

    def listen(self, listener: Listener, wanted: Callable[[], bool] = lambda: True) -> Tap:
        self.listeners.append((listener, wanted))
        return self

    def unlisten(self, listener: Listener) -> None:
        self.listeners = [(f, w) for f, w in self.listeners if f is not listener]

    def wanted(self) -> bool:
        return any(w() for _, w in self.listeners)

    def emit(self, event: AttentionEvent) -> None:
        for listener, wanted in self.listeners:
            if wanted():
                listener(event)


class UNetTap(Tap):
    """Forward hooks on ``to_q``/``to_k`` of every transformer block's ``attn2`` (cross) or ``attn1`` (self) in
    ``sites`` (``[(site, transformer module)]``); the event's site is the index into ``sites``. Hooks live for a
    ``with`` block."""

    def __init__(self, sites: list, kind: str = "cross"):
        super().__init__()
        if kind not in ("cross", "self"):
            raise ValueError(f"kind must be 'cross' or 'self', got {kind!r}")
        self.sites, self.kind = sites, kind
        self._handles: list = []

    def install(self) -> UNetTap:
        if not self._handles:
            name = "attn2" if self.kind == "cross" else "attn1"
            for i, (_, module) in enumerate(self.sites):
                for block in module.transformer_blocks:
                    attn = getattr(block, name)
                    self._handles += qk_hooks(attn, self._on_qk(i, attn.heads), self.wanted)
        return self

    def remove(self) -> None:
        remove_hooks(self._handles)

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    def _on_qk(self, site: int, heads: int):
        def on_qk(q, k):
            self.emit(AttentionEvent(site, q, k, heads))
        return on_qk
