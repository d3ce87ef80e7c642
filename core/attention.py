"""Cross-attention probabilities from q and k, computed in memory-bounded chunks.

No attention backend exposes its softmax, so the maps are recomputed from the projected q and k
(Hertz et al., Prompt-to-Prompt; Ham et al. 2024, LAG). Only the requested tokens' columns are kept.
"""
from __future__ import annotations

import torch

DEFAULT_MAX_ELEMENTS = 1 << 24  # per chunk of scores: 16M floats = 64 MiB in fp32


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = t.shape
    return t.reshape(b, n, heads, d // heads).transpose(1, 2)  # [B, h, n, dh]


def token_attention(q: torch.Tensor, k: torch.Tensor, heads: int, token_idx: torch.Tensor,
                    max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Sum over heads and over ``token_idx`` of softmax(q k^T / sqrt(d)): q [B, N, h*d], k [B, L, h*d] -> [B, N].

    The softmax runs over all L keys, in fp32 (the product q k^T in the inputs' dtype, as attention itself does);
    queries are processed in chunks so no more than ``max_elements`` scores exist at once.
    """
    qh = _split_heads(q, heads)
    kh = _split_heads(k, heads)
    b, h, n, dh = qh.shape
    scale = dh ** -0.5
    idx = token_idx.to(q.device)
    chunk = max(1, max_elements // max(1, b * h * kh.shape[2]))
    out = torch.empty(b, n, device=q.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        scores = (qh[:, :, start:start + chunk] @ kh.transpose(-1, -2)).float() * scale  # [B, h, c, L]
        probs = scores.softmax(dim=-1)
        out[:, start:start + chunk] = probs.index_select(-1, idx).sum(dim=(1, 3))
    return out


def all_token_attention(q: torch.Tensor, k: torch.Tensor, heads: int,
                        max_elements: int = DEFAULT_MAX_ELEMENTS) -> torch.Tensor:
    """Head-averaged probabilities for every token: [B, N, L]; each row sums to 1."""
    qh = _split_heads(q, heads).float()
    kh = _split_heads(k, heads).float()
    b, h, n, dh = qh.shape
    chunk = max(1, max_elements // max(1, b * h * kh.shape[2]))
    out = torch.empty(b, n, kh.shape[2], device=q.device, dtype=torch.float32)
    for start in range(0, n, chunk):
        scores = (qh[:, :, start:start + chunk] @ kh.transpose(-1, -2)) * dh ** -0.5
        out[:, start:start + chunk] = scores.softmax(dim=-1).mean(dim=1)
    return out
