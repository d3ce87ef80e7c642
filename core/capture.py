"""The one attention capture of the pack: forward hooks on an attention layer's ``to_q`` and ``to_k``.

Every consumer of attention maps (LAG, heatmaps, extraction) takes q and k here and recomputes the maps it needs
with ``core.attention``: hooking the projections rather than the attention call leaves whichever attention
function or other pack's patch is in charge of the attention output itself, in ComfyUI and diffusers alike.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


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
