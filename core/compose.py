"""Multi-concept composition, pure tensor math (no hooks, no ComfyUI).

- Custom Diffusion's closed-form merge of several fine-tuned cross-attention K/V weights (Kumari et al. 2023);
- Multi-Concept T2I-Zero's Correction by Similarities and Cross-Token Non-Maximum Suppression (Tunanyan et al.
  2023, "Multi-Concept T2I-Zero: Tweaking Only the Text Embeddings and Nothing Else");
- FreeCustom's multi-reference self-attention with weighted masks (Ding et al., CVPR 2024);
- the overlap rule when several concept masks gate residuals in one pass (multi-concept LAG).

Shapes: conditioning [B, L, D]; attention probabilities [B, N, L] (N image positions, L tokens); masks/maps
[K, B, N] (K concepts). A concept is a list of token positions (its sub-tokens, e.g. V* and the class word).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OVERLAP_RULES = ("argmax", "sum", "error")


class OverlapError(ValueError):
    """Two concepts' masks cover the same positions and the overlap rule is ``error``."""


# ------------------------------------------------------------------------------------------ Custom Diffusion
@dataclass
class MergeProjector:
    """The parts of the closed-form merge shared by every layer with the same input width (all K/V of attn2):
    ``c`` [s, in] the constrained features, ``d`` = C A^-1 [s, in], ``g_inv`` = (C A^-1 C^T)^-1 [s, s]."""

    c: torch.Tensor
    d: torch.Tensor
    g_inv: torch.Tensor


def merge_projector(c: torch.Tensor, c_reg: torch.Tensor, ridge: float = 1e-6) -> MergeProjector:
    """C A^-1 and (C A^-1 C^T)^-1 with A = C_reg^T C_reg + ridge * mean(diag) * I (Kumari et al. 2023, Eq. 6).

    The ridge keeps A invertible when the regularisation features do not span the input space (fewer rows than
    ``in``); it is relative to A's scale. (C A^-1 C^T) is inverted with the pseudo-inverse, so duplicated
    constraint rows with equal targets are harmless. Computed in float64.
    """
    c64, r64 = c.double(), c_reg.double()
    a = r64.T @ r64
    a = a + ridge * a.diagonal().mean().clamp_min(1e-12) * torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    d = torch.linalg.solve(a, c64.T).T  # A symmetric: (A^-1 C^T)^T = C A^-1
    g_inv = torch.linalg.pinv(d @ c64.T, hermitian=True)
    return MergeProjector(c64, d, g_inv)


def custom_diffusion_merge(w0: torch.Tensor, weights: Sequence[torch.Tensor], feats: Sequence[torch.Tensor],
                           c_reg: torch.Tensor, ridge: float = 1e-6,
                           projector: MergeProjector | None = None) -> torch.Tensor:
    """Closed-form multi-concept merge of one K or V projection (Kumari et al. 2023, Sec. 3.2, Eq. 5-6).

    W = argmin_W ||(W - W0) C_reg^T||_F^2  subject to  W C^T = V,
    with C = [C_1; ...; C_K] [s, in] stacking each concept's text features and V = [W_1 C_1^T, ..., W_K C_K^T]
    [out, s] their fine-tuned outputs. The Lagrangian ||(W - W0) C_reg^T||^2 - 2 tr(Lambda^T (W C^T - V)) has
    gradient 2 (W - W0) A - 2 Lambda C with A = C_reg^T C_reg, so W = W0 + Lambda C A^-1, and the constraint
    gives Lambda = (V - W0 C^T) (C A^-1 C^T)^-1:

        W = W0 + (V - W0 C^T) (C A^-1 C^T)^-1 C A^-1.

    ``w0`` [out, in]; ``weights[i]`` the concept's fine-tuned W_i [out, in] (W0 + its K/V residual);
    ``feats[i]`` C_i [n_i, in], the text-encoder outputs the concept must keep (the paper: its target words,
    V* and the class word, in the concepts' captions); ``c_reg`` [m, in] features of generic captions (the paper:
    ~1000 captions). No concepts: W0. Returns ``w0``'s dtype.
    """
    if len(weights) != len(feats):
        raise ValueError(f"{len(weights)} fine-tuned weights but {len(feats)} feature sets: give one per concept")
    if not weights:
        return w0.clone()
    w0d = w0.double()
    v = torch.cat([wi.double() @ ci.double().T for wi, ci in zip(weights, feats, strict=True)], dim=1)
    p = projector or merge_projector(torch.cat(list(feats), dim=0), c_reg, ridge)
    lam = (v - w0d @ p.c.T) @ p.g_inv
    return (w0d + lam @ p.d).to(w0.dtype)


def custom_diffusion_merge_layers(base: dict[str, torch.Tensor], concepts: Sequence[dict[str, torch.Tensor]],
                                  feats: Sequence[torch.Tensor], c_reg: torch.Tensor,
                                  ridge: float = 1e-6) -> dict[str, torch.Tensor]:
    """``custom_diffusion_merge`` for every layer of ``base`` ({path: W0}, the attn2 to_k/to_v weights), with
    ``concepts[i]`` {path: W_i}; a concept without a layer keeps W0 there. One projector per input width."""
    c_all = torch.cat(list(feats), dim=0)
    projectors: dict[int, MergeProjector] = {}
    merged = {}
    for path, w0 in base.items():
        width = w0.shape[1]
        if width != c_all.shape[1]:
            raise ValueError(f"'{path}' takes {width}-wide inputs but the text features are {c_all.shape[1]} wide")
        if width not in projectors:
            projectors[width] = merge_projector(c_all, c_reg, ridge)
        ws = [c.get(path, w0) for c in concepts]
        merged[path] = custom_diffusion_merge(w0, ws, feats, c_reg, projector=projectors[width])
    return merged


def merge_objective(w: torch.Tensor, w0: torch.Tensor, c_reg: torch.Tensor) -> torch.Tensor:
    """||(W - W0) C_reg^T||_F^2, the quantity the closed-form merge minimises (Kumari et al. 2023, Eq. 5)."""
    return ((w.double() - w0.double()) @ c_reg.double().T).pow(2).sum()


# ------------------------------------------------------------------------------------------ T2I-Zero
def correction_by_similarities(cond: torch.Tensor, concepts: Sequence[Sequence[int]], top_k: int = 5,
                               temperature: float = 0.1, strength: float = 1.0, skip_first: bool = True,
                               keep_norm: bool = True, pool: Sequence[int] | None = None) -> torch.Tensor:
    """Each concept token's embedding pulled toward its most similar tokens (Multi-Concept T2I-Zero, Correction
    by Similarities); returns a new [B, L, D] tensor, every non-concept position untouched.

    For a concept token e_p the pool is ``pool`` (default: every position, EOT and padding included) less the other
    concepts' tokens (so no concept borrows another's tokens) and, with ``skip_first``, less the start token (CLIP's
    BOS output is the same for every prompt); pass ``pool=range(1, eot)`` to draw from the prompt's words only
    (EOT/padding outputs summarise the whole prompt, other concepts included).
    With s_j = cos(e_p, e_j) over the pool, N_k(p) the ``top_k`` most similar (e_p itself always a candidate, s = 1) and
    a_j = softmax_{j in N_k}(s_j / temperature):

        e_p' = e_p + strength * (sum_{j in N_k} a_j e_j - e_p),  rescaled to ||e_p|| when ``keep_norm``.

    The paper states the idea (collect features from the most similar tokens), not these constants: top_k,
    temperature, the pool and the norm rescaling are our choices. ``top_k=1`` or ``strength=0`` is the identity.
    """
    out = cond.clone()
    if strength == 0 or not concepts:
        return out
    b, length, _ = cond.shape
    x = cond.float()
    unit = F.normalize(x, dim=-1)
    for i, positions in enumerate(concepts):
        others = {q for j, other in enumerate(concepts) if j != i for q in other}
        allowed = [j for j in (range(length) if pool is None else pool) if j not in others]
        allowed = [j for j in allowed if not (skip_first and j == 0)]
        for p in positions:
            if p in others:
                raise ValueError(f"token position {p} belongs to two concepts")
            pool_p = sorted(set(allowed) | {p})  # the token itself is always a candidate
            pool_t = torch.tensor(pool_p, device=cond.device)
            k = min(top_k, len(pool_p))
            sims = torch.einsum("bd,bjd->bj", unit[:, p], unit[:, pool_t])  # [B, |pool|]
            top, idx = sims.topk(k, dim=1)
            weights = (top / temperature).softmax(dim=1)  # [B, k]
            neigh = x[:, pool_t][torch.arange(b, device=cond.device)[:, None], idx]  # [B, k, D]
            target = torch.einsum("bk,bkd->bd", weights, neigh)
            new = x[:, p] + strength * (target - x[:, p])
            if keep_norm:
                new = new * (x[:, p].norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp_min(1e-12))
            out[:, p] = new.to(cond.dtype)
    return out


def gaussian_smooth(maps: torch.Tensor, hw: tuple[int, int], sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """[..., N] maps blurred on their (h, w) grid by a normalised ``size`` x ``size`` Gaussian, reflect padding
    (the smoothing Attend-and-Excite and T2I-Zero's NMS apply before comparing maps)."""
    h, w = hw
    lead = maps.shape[:-1]
    x = maps.reshape(-1, 1, h, w).float()
    ax = torch.arange(size, dtype=torch.float32, device=maps.device) - (size - 1) / 2
    g = torch.exp(-ax ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    pad = size // 2
    mode = "reflect" if h > pad and w > pad else "replicate"
    x = F.pad(x, (pad, pad, pad, pad), mode=mode)
    x = F.conv2d(F.conv2d(x, g.view(1, 1, 1, size)), g.view(1, 1, size, 1))
    return x.reshape(*lead, h * w)


def _square_hw(n: int) -> tuple[int, int]:
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"{n} positions are not a square grid: pass hw=(h, w)")
    return side, side


def nms_winners(probs: torch.Tensor, concepts: Sequence[Sequence[int]], hw: tuple[int, int] | None = None,
                sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """[B, N] index of the concept whose Gaussian-smoothed map (sum of its tokens' columns of ``probs`` [B, N, L])
    is the largest at each position, ties to the lower index (Multi-Concept T2I-Zero, Cross-Token NMS)."""
    hw = hw or _square_hw(probs.shape[1])
    maps = torch.stack([probs[:, :, list(c)].float().sum(-1) for c in concepts])  # [K, B, N]
    return gaussian_smooth(maps, hw, sigma, size).argmax(dim=0)  # first maximum: ties to the lower index


def cross_token_nms(probs: torch.Tensor, concepts: Sequence[Sequence[int]], hw: tuple[int, int] | None = None,
                    sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Cross-Token Non-Maximum Suppression (Multi-Concept T2I-Zero): at each position, only the concept whose
    smoothed map is the largest keeps its tokens' attention; the other concepts' token columns become 0 there.

    ``probs`` [B, N, L] attention probabilities, or [B, h, N, L] per head (the winner then comes from the head
    mean); a concept's map is the sum of its tokens' columns, Gaussian-smoothed on the (h, w) grid (``hw``; square
    if None); ties go to the lower concept index. Non-concept columns are untouched and rows are not renormalised
    (the suppressed mass is removed, our reading of "excludes the overlap of contributions"). One concept: identity.
    """
    if len(concepts) < 2:
        return probs.clone()
    per_head = probs.dim() == 4
    winner = nms_winners(probs.mean(dim=1) if per_head else probs, concepts, hw, sigma, size)  # [B, N]
    if per_head:
        winner = winner[:, None]
    out = probs.clone()
    for i, positions in enumerate(concepts):
        keep = (winner == i).to(probs.dtype)[..., None]
        out[..., list(positions)] = probs[..., list(positions)] * keep
    return out


def nms_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                  concepts: Sequence[Sequence[int]], hw: tuple[int, int] | None = None, sigma: float = 0.5,
                  size: int = 3) -> torch.Tensor:
    """Cross-attention with Cross-Token NMS applied to its probabilities (Multi-Concept T2I-Zero): q [B, N, h*d],
    k/v [B, L, h*d] -> [B, N, h*d]; the softmax is formed explicitly (in float32), so use it only where NMS is on."""
    qh, kh, vh = (_heads(t.float(), heads) for t in (q, k, v))
    probs = ((qh @ kh.transpose(-1, -2)) * qh.shape[-1] ** -0.5).softmax(dim=-1)  # [B, h, N, L]
    out = cross_token_nms(probs, concepts, hw, sigma, size) @ vh
    return out.transpose(1, 2).reshape(q.shape).to(q.dtype)


# ------------------------------------------------------------------------------------------ FreeCustom
def mrsa_bias(mask: torch.Tensor, weight: float, mode: str = "add") -> torch.Tensor:
    """Logit bias on one reference's kept keys from its weighted mask M_w = w * M (FreeCustom, weighted mask).

    ``add`` (the official code, freecustom/mrsa.py): bias = w * M on keys with M > 0, so each kept key's
    unnormalised attention is multiplied by e^{w M}; ``log``: bias = log(w * M), multiplying it by w M (w = 1
    neutral). Keys with M = 0 get -inf in both (``mrsa_attention`` drops them instead).
    """
    mw = mask.float() * weight
    if mode == "log" and weight < 0:
        raise ValueError(f"reference weight {weight} < 0 has no logarithm; use a weight >= 0 with mode 'log'")
    if mode == "add":
        return mw.masked_fill(mw == 0, float("-inf"))
    if mode == "log":
        return mw.log()
    raise ValueError(f"unknown weight mode {mode!r}; choose 'add' (official FreeCustom code) or 'log'")


def mrsa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   refs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]] = (), heads: int = 1,
                   mode: str = "add") -> torch.Tensor:
    """Multi-reference self-attention (Ding et al. 2024, MRSA): the generated image's queries attend to its own
    keys and to every reference's masked keys, one softmax over the concatenation.

    q, k, v [B, N, h*d]; ``refs`` a list of (k_r [N_r, h*d] or [B, N_r, h*d], v_r alike, mask [N_r] in [0, 1],
    weight w_r), per head: out = softmax([q k^T / sqrt(d), q k_r^T / sqrt(d) + bias_r, ...]) [v; v_r; ...] with
    bias_r = ``mrsa_bias(mask_r, w_r, mode)`` (the same for every query and head). Keys whose mask is 0
    would get -inf, i.e. exactly zero weight, so they are dropped before the call: no references, or all-zero
    masks, run exactly plain SDPA. A binary mask gives every kept key of a reference the same bias.
    """
    b, n, width = q.shape
    extra_k, extra_v, bias = [], [], []
    for k_r, v_r, mask, w in refs:
        keep = (mask > 0).nonzero().flatten()
        kept_bias = mrsa_bias(mask[keep], w, mode).to(q.device)  # w = 0: all -inf, dropped below
        if keep.numel() == 0 or w == 0:
            continue
        k_r = k_r if k_r.dim() == 3 else k_r.unsqueeze(0)
        v_r = v_r if v_r.dim() == 3 else v_r.unsqueeze(0)
        extra_k.append(k_r[:, keep.to(k_r.device)].expand(b, -1, -1).to(k.dtype))
        extra_v.append(v_r[:, keep.to(v_r.device)].expand(b, -1, -1).to(v.dtype))
        bias.append(kept_bias)

    if not extra_k:
        out = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads))
        return out.transpose(1, 2).reshape(b, n, width)
    keys = torch.cat([k, *extra_k], dim=1)
    values = torch.cat([v, *extra_v], dim=1)
    zeros = torch.zeros(k.shape[1], device=q.device)
    attn_bias = torch.cat([zeros, *bias]).to(q.dtype)[None, None, None]  # [1, 1, 1, N + sum N_r], broadcast
    out = F.scaled_dot_product_attention(_heads(q, heads), _heads(keys, heads), _heads(values, heads),
                                         attn_mask=attn_bias)
    return out.transpose(1, 2).reshape(b, n, width)


def reference_mass(q: torch.Tensor, k: torch.Tensor,
                   refs: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]], heads: int = 1,
                   mode: str = "add") -> torch.Tensor:
    """[B, N] share of each query's MRSA attention (Ding et al. 2024) on reference keys, mean over heads; an
    explicit softmax over all keys, for tests and heatmaps (``mrsa_attention`` never forms it)."""
    qh = _heads(q.float(), heads)
    scale = qh.shape[-1] ** -0.5
    own = (qh @ _heads(k.float(), heads).transpose(-1, -2)) * scale
    logits = [own]
    for k_r, _, mask, w in refs:
        k_r = (k_r if k_r.dim() == 3 else k_r.unsqueeze(0)).expand(q.shape[0], -1, -1)
        logits.append((qh @ _heads(k_r.float(), heads).transpose(-1, -2)) * scale + mrsa_bias(mask, w, mode))
    probs = torch.cat(logits, dim=-1).softmax(dim=-1)
    return probs[..., own.shape[-1]:].sum(dim=-1).mean(dim=1)


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, h*d] -> [B, h, N, d]."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


# ------------------------------------------------------------------------------------------ overlaps
def resolve_overlaps(masks: torch.Tensor, rule: str = "argmax", scores: torch.Tensor | None = None,
                     names: Sequence[str] | None = None) -> torch.Tensor:
    """Masks [K, B, N] of K concepts made compatible where more than one is non-zero (multi-concept LAG).

    ``argmax``: an overlapped position keeps only the concept with the largest ``scores`` there (its attention map;
    ``masks`` when None), ties to the lower index; ``sum``: masks returned unchanged, so the concepts' residuals
    add up where they overlap; ``error``: OverlapError naming the first overlapping pair. Positions covered by at
    most one mask are never changed.
    """
    if rule not in OVERLAP_RULES:
        raise ValueError(f"unknown overlap rule {rule!r}; choose one of {', '.join(OVERLAP_RULES)}")
    on = masks > 0
    overlap = on.sum(dim=0) > 1  # [B, N]
    if rule == "sum" or masks.shape[0] < 2:
        return masks.clone()
    if rule == "error":  # the only rule that reads the masks on the host (argmax stays on the device, no sync)
        labels = list(names) if names else [f"concept {i + 1}" for i in range(masks.shape[0])]
        for i in range(masks.shape[0]):
            for j in range(i + 1, masks.shape[0]):
                both = (on[i] & on[j]).sum().item()
                if both:
                    raise OverlapError(
                        f"the masks of '{labels[i]}' and '{labels[j]}' overlap on {both} position(s); draw disjoint "
                        "masks or choose the overlap rule 'argmax' (larger attention wins) or 'sum' (both apply)")
    s = (masks if scores is None else scores).float().masked_fill(~on, float("-inf"))
    winner = s.argmax(dim=0)  # first maximum among the concepts whose mask is on
    keep = winner.unsqueeze(0) == torch.arange(masks.shape[0], device=masks.device)[:, None, None]
    return torch.where(overlap.unsqueeze(0) & ~keep, torch.zeros_like(masks), masks)
