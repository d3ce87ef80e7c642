"""Cross-attention probabilities from q and k, computed in memory-bounded chunks.

No attention backend exposes its softmax, so the maps are recomputed from the projected q and k
(Hertz et al., Prompt-to-Prompt; Ham et al. 2024, LAG). Only the requested tokens' columns are kept.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_MAX_ELEMENTS = 1 << 24  # per chunk of scores: 16M floats = 64 MiB in fp32


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)  # [B, h, n, dh]


def token_indicator(token_idx: torch.Tensor, heads: int, length: int, head_dim: int, like: torch.Tensor):
    """Values [1, h, L, d] whose column 0 is 1 at the given tokens: attention over them sums those tokens' weights."""
    values = torch.zeros(1, heads, length, head_dim, device=like.device, dtype=like.dtype)
    values[:, :, token_idx.to(like.device), 0] = 1.0
    return values


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, token_idx: torch.Tensor,
                    max_elements: int = DEFAULT_MAX_ELEMENTS, indicator: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over heads and over ``token_idx`` of softmax(q k^T / sqrt(d)): q [B, N, h*d], k [B, L, h*d] -> [B, N]
    (``token_mass`` on the heads split out)."""
    qh = _split_heads(q, heads)
    kh = _split_heads(k, heads)
    if indicator is None:
        indicator = token_indicator(token_idx, heads, kh.shape[2], kh.shape[3], q)
    return token_mass(qh, kh, indicator, max_elements)


def token_mass(qh: torch.Tensor, kh: torch.Tensor, indicator: torch.Tensor,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Probability mass on the indicated tokens, summed over heads: qh [B, h, N, d], kh [B, h, L, d] -> [B, N].

    Computed as fused attention whose values are the tokens' indicator (``token_indicator``: softmax(q k^T) @ 1_idx
    is exactly the probability mass on those tokens), so no [N, L] score matrix is kept and the fast attention
    kernels apply; queries go in chunks of at most ``max_elements`` scores for backends that do materialise them.
    The indicator's other value columns are zero, so summing over heads and value columns is one reduction.
    """
    b, h, n, _ = qh.shape
    values = indicator if indicator.shape[0] == b else indicator.expand(b, -1, -1, -1)
    chunk = max(1, max_elements // max(1, b * h * kh.shape[2]))
    if chunk >= n:
        return F.scaled_dot_product_attention(qh, kh, values).sum(dim=(1, 3), dtype=torch.float32)
    out = torch.empty(b, n, device=qh.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        part = F.scaled_dot_product_attention(qh[:, :, start:start + chunk], kh, values)
        out[:, start:start + chunk] = part.sum(dim=(1, 3), dtype=torch.float32)
    return out


def token_mass_column(qh: torch.Tensor, kh: torch.Tensor, indicator: torch.Tensor,
                      max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """``token_mass`` as a column, [B, N, 1], with a one-column ``indicator`` (``token_indicator(..., head_dim=1,
    ...)``): the column broadcasts over a token-major layer's channels as it is, which saves LAG one reshape per
    block."""
    b, h, n, _ = qh.shape
    values = indicator if indicator.shape[0] == b else indicator.expand(b, -1, -1, -1)
    chunk = max(1, max_elements // max(1, b * h * kh.shape[2]))
    if chunk >= n:
        return F.scaled_dot_product_attention(qh, kh, values).sum(dim=1, dtype=torch.float32)
    out = torch.empty(b, n, 1, device=qh.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        part = F.scaled_dot_product_attention(qh[:, :, start:start + chunk], kh, values)
        out[:, start:start + chunk] = part.sum(dim=1, dtype=torch.float32)
    return out


def all_token_attention(q: torch.Tensor, k: torch.Tensor, heads: int,
                        max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Head-averaged probabilities for every token: q [B, N, h*d], k [B, L, h*d] -> [B, N, L]; rows sum to 1."""
    return token_probabilities(_split_heads(q, heads), _split_heads(k, heads), max_elements)


def token_probabilities(qh: torch.Tensor, kh: torch.Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Head-averaged softmax(q k^T / sqrt(d)) over the given keys: qh [B, h, N, d], kh [B, h, L, d] -> [B, N, L]."""
    qh, kh = qh.float(), kh.float()
    b, h, n, dh = qh.shape
    chunk = max(1, max_elements // max(1, b * h * kh.shape[2]))
    out = torch.empty(b, n, kh.shape[2], device=qh.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        scores = (qh[:, :, start:start + chunk] @ kh.transpose(-1, -2)) * dh ** -0.5
        out[:, start:start + chunk] = scores.softmax(dim=-1).mean(dim=1)
    return out
