"""Closed-form cross-attention erasure (UCE, Gandikota et al. 2024) with RealEra's neighbour mining (Liu et al.).

Every cross-attention key and value projection W (``attn2.to_k`` / ``attn2.to_v``, [out, d]) reads the text
embeddings. The edit W' solves

    min_W'  sum_e ||W' c_e - W a_e||^2  +  sum_p ||W' c_p - W c_p||^2  +  lam ||W' - W||_F^2

over erase rows c_e (each paired with an anchor row a_e: the empty prompt's or a substitute word's embedding at
the aligned position), preserved rows c_p and a ridge term. Setting the gradient to zero gives

    W' M = W (sum_e a_e c_e^T + sum_p c_p c_p^T + lam I),   M = sum_e c_e c_e^T + sum_p c_p c_p^T + lam I,

so  Delta W = W' - W = W G  with  G = (A - E)^T E M^{-1}  (E, A, P: the rows stacked as matrices).
G is [d, d] and the same for every layer, because all K/V projections read the same text embeddings: the edit
of a whole UNet is one small solve and one matmul per layer.

RealEra's neighbour mining: each erase row also contributes ``neighbours`` random points inside a ball of radius
``radius * ||c_e||`` around it, mapped to the same anchor, so embeddings near the concept (synonyms, misspellings,
learned tokens) lose it too.

Files: Delta W = (W L) R^T with G = L R^T, whose rank is at most the number of erase rows (neighbours
included), so the edit is saved as an ordinary LoRA in the pack's keys (``diffusion_model.<ldm path>.attn2.to_k.
lora_up/lora_down/alpha``, read by the stock LoraLoader): exact at G's numerical rank, or truncated to a
chosen rank with the truncation error reported. (ComfyUI's full-matrix ``.diff`` key would be exact too, but a
full Delta W for every SDXL K/V layer is 0.7 GB in fp16.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .residuals import LowRank

log = logging.getLogger(__name__)

PROJECTIONS = ("to_k", "to_v")
KV_SUFFIXES = tuple(f".attn2.{p}" for p in PROJECTIONS)  # ldm names of the cross-attention K/V layers


@dataclass
class EditRows:
    """Text-embedding rows of one edit: ``erase`` [n, d] mapped to ``anchor`` [n, d]; ``preserve`` [m, d] kept."""

    erase: torch.Tensor
    anchor: torch.Tensor
    preserve: torch.Tensor


def cross_attention_projections(sites) -> list[tuple[str, torch.nn.Module]]:
    """(ldm name, linear layer) of every ``attn2.to_k`` / ``attn2.to_v`` in the transformer sites, forward order."""
    out = []
    for site, module in sites:
        for i, block in enumerate(module.transformer_blocks):
            for proj in PROJECTIONS:
                out.append((f"{site.path}.transformer_blocks.{i}.attn2.{proj}", getattr(block.attn2, proj)))
    return out


def aligned_rows(concept: torch.Tensor, concept_tokens: int, anchor: torch.Tensor, anchor_tokens: int,
                 tail_rows: int = -1):
    """Erase rows of one encoded concept and their anchor rows, as UCE aligns them.

    ``concept`` / ``anchor`` are [L, d] encodings of the bare word(s) (start token at 0, then the word's
    ``*_tokens`` sub-tokens, then end/padding). The tail from each text's last word token to the end carries
    the concept (a causal text encoder's later positions see the word) and is aligned position by position; the
    concept's earlier sub-tokens (a word the tokenizer splits) map to the anchor's last word row (or its start
    row for the empty anchor). ``tail_rows`` >= 0 keeps only that many rows after the last word token (0: the word
    rows only; -1: the whole tail, as UCE).
    """
    if concept_tokens < 1:
        raise ValueError("the word to erase encodes to no tokens; give a word with letters in it")
    length = concept.shape[0]
    c_last, a_last = concept_tokens, anchor_tokens
    tail = length - max(c_last, a_last)
    if tail_rows >= 0:
        tail = min(tail, tail_rows + 1)
    erase = [concept[1:c_last], concept[c_last:c_last + tail]]
    anchors = [anchor[a_last].expand(c_last - 1, -1), anchor[a_last:a_last + tail]]
    return torch.cat(erase), torch.cat(anchors)


def positional_rows(concept: torch.Tensor, anchor: torch.Tensor):
    """Erase rows of one encoded concept and their anchor rows, position by position over the whole sequence: for
    text encoders that are not causal (T5 on SD3 / Flux, and pooled vectors), where every position of the
    concept's encoding carries it. Both encodings have the same length (the text encoder pads them alike)."""
    if concept.shape != anchor.shape:
        raise ValueError(f"the concept and the anchor encode to {tuple(concept.shape)} and {tuple(anchor.shape)} rows;"
                         " they must be padded alike")
    return concept, anchor


def build_rows(encode, erase_words: list[str], anchor_word: str, preserve_words: list[str],
               tail_rows: int = -1, align: str = "causal") -> EditRows:
    """The rows of an edit from ``encode(text) -> ([L, d] embedding, number of word tokens)``.

    ``align`` "causal" pairs the rows as UCE does for CLIP (``aligned_rows``), "positional" position by position
    (``positional_rows``: DiTs' T5 sequences and pooled vectors). Every row of the anchor's encoding and of each
    preserved word's is preserved (the anchor must keep its own mapping, or the erased words would follow a moving
    target; the start row is in every prompt).
    """
    if align not in ("causal", "positional"):
        raise ValueError(f"unknown row alignment {align!r}")
    if not erase_words:
        raise ValueError("give at least one word to erase")
    clash = set(erase_words) & set(preserve_words)
    if clash:
        raise ValueError(f"{sorted(clash)} are both erased and preserved; remove them from one list")
    anchor, anchor_tokens = encode(anchor_word)
    erase, anchors = [], []
    for word in erase_words:
        emb, tokens = encode(word)
        if tokens < 1:
            raise ValueError(f"the word to erase '{word}' encodes to no tokens; give a word with letters in it")
        if align == "causal":
            e, a = aligned_rows(emb, tokens, anchor, anchor_tokens, tail_rows)
        else:
            e, a = positional_rows(emb, anchor)
        erase.append(e)
        anchors.append(a)
    preserve = [anchor] + [encode(w)[0] for w in preserve_words]
    return EditRows(torch.cat(erase), torch.cat(anchors), torch.cat(preserve))


def mine_neighbours(erase: torch.Tensor, anchor: torch.Tensor, count: int, radius: float, seed: int = 0):
    """RealEra neighbour mining: ``count`` points per erase row, uniform in the ball of radius ``radius * ||c||``
    around it, each mapped to that row's anchor. Returns (neighbour rows, their anchors)."""
    if count <= 0 or radius <= 0:
        return erase[:0], anchor[:0]
    gen = torch.Generator().manual_seed(seed)
    n, d = erase.shape
    direction = torch.randn(n, count, d, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=-1, keepdim=True)
    fraction = torch.rand(n, count, 1, generator=gen, dtype=torch.float64) ** (1.0 / d)
    scale = radius * erase.double().norm(dim=-1, keepdim=True)[:, None]
    points = erase.double()[:, None] + direction * fraction * scale
    return points.reshape(n * count, d).to(erase.dtype), anchor[:, None].expand(n, count, d).reshape(n * count, d)


def edit_operator(rows: EditRows, lam: float = 0.1, preserve_weight: float = 1.0) -> torch.Tensor:
    """G [d, d] with Delta W = W G for every K/V projection: G = (A - E)^T E M^{-1} (UCE's closed form, see the
    module docstring); ``preserve_weight`` scales the preserved rows' squared error."""
    if lam <= 0 and rows.erase.shape[0] + rows.preserve.shape[0] < rows.erase.shape[1]:
        raise ValueError("lam must be positive when there are fewer edit rows than embedding dimensions")
    e, a, p = (t.double() for t in (rows.erase, rows.anchor, rows.preserve))
    d = e.shape[1]
    m = e.T @ e + preserve_weight * (p.T @ p) + lam * torch.eye(d, dtype=torch.float64)
    rhs = (a - e).T @ e  # [d, d]
    return torch.linalg.solve(m, rhs, left=False)  # rhs @ M^{-1}; M is symmetric


def edit_deltas(weights: list[tuple[str, torch.Tensor]], operator: torch.Tensor,
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Delta W = W G per named K/V weight [out, d] (new tensors; the weights are only read)."""
    deltas = {}
    for name, weight in weights:
        if weight.shape[-1] != operator.shape[0]:
            raise ValueError(f"{name} reads {weight.shape[-1]}-wide text embeddings but the edit rows are "
                             f"{operator.shape[0]} wide: encode the words with this model's text encoder")
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        deltas[name] = (w @ operator).to(dtype)
    return deltas


def closed_form_operator(rows: EditRows, lam: float = 0.1, preserve_weight: float = 1.0, neighbours: int = 0,
                         radius: float = 0.0, seed: int = 0) -> torch.Tensor:
    """UCE + RealEra: mine neighbours of the erase rows, then solve once for G (Delta W = W G in every layer)."""
    if rows.preserve.shape[0] == 0:
        log.warning("closed-form erase without a preservation list: only the ridge term (lam=%g) keeps other "
                    "concepts' mappings; add words that must survive", lam)
    extra_e, extra_a = mine_neighbours(rows.erase, rows.anchor, neighbours, radius, seed)
    full = EditRows(torch.cat([rows.erase, extra_e]), torch.cat([rows.anchor, extra_a]), rows.preserve)
    return edit_operator(full, lam, preserve_weight)


def closed_form_edit(weights: list[tuple[str, torch.Tensor]], rows: EditRows, lam: float = 0.1,
                     preserve_weight: float = 1.0, neighbours: int = 0, radius: float = 0.0, seed: int = 0):
    """The whole edit as full matrices: {name: Delta W}."""
    return edit_deltas(weights, closed_form_operator(rows, lam, preserve_weight, neighbours, radius, seed))


# ------------------------------------------------------------------------------------------ low-rank file
def factor_operator(operator: torch.Tensor, rank: int = 0, rtol: float = 1e-6):
    """G ~ L R^T with L = U_r S_r, R = V_r from the SVD of G, keeping singular values above ``rtol`` of the largest
    and at most ``rank`` of them (0: no cap). Returns (L [d, r], R [d, r], relative Frobenius error of G)."""
    u, s, vh = torch.linalg.svd(operator.double(), full_matrices=False)
    keep = int((s > rtol * s.max().clamp_min(1e-300)).sum())
    keep = max(1, min(keep, rank) if rank > 0 else keep)
    error = (s[keep:].square().sum() / s.square().sum().clamp_min(1e-300)).sqrt().item()
    return u[:, :keep] * s[:keep], vh[:keep].T, error


def lowrank_edit(weights: list[tuple[str, torch.Tensor]], operator: torch.Tensor, rank: int = 0):
    """Delta W = W G as LoRA factors up = W L [out, r], down = R^T [r, d] (alpha = r, so the scale is 1): exact at
    G's numerical rank, which is at most the number of erase rows. Returns ({name: LowRank}, truncation error)."""
    left, right, error = factor_operator(operator, rank)
    layers = {}
    for name, weight in weights:
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        up, down = (w @ left).float().contiguous(), right.T.float().contiguous()
        layers[name] = LowRank(down, up, float(down.shape[0]), conv=False)
    return layers, error


def split_words(text: str) -> list[str]:
    """Comma-separated words or short phrases, stripped, empty entries dropped, order kept, duplicates removed."""
    return list(dict.fromkeys(w.strip() for w in text.replace("\n", ",").split(",") if w.strip()))


def edit_quality(weights: list[tuple[str, torch.Tensor]], delta_of, rows: EditRows):
    """(erase residual, preserve change), averaged over layers: ||W'E - WA|| / ||WE - WA|| (0 = every erased row
    gives its anchor's keys/values, 1 = untouched) and ||Delta W P|| / ||W P|| (0 = preserved rows unchanged).

    ``delta_of(name)`` gives one layer's Delta W at a time (a whole SDXL edit in full matrices would be gigabytes).
    """
    e, a, p = (t.double() for t in (rows.erase, rows.anchor, rows.preserve))
    residual, change = [], []
    for name, weight in weights:
        w = weight.detach().to("cpu", torch.float64)
        dw = delta_of(name).double()
        gap = (e - a) @ w.T
        residual.append(((e @ (w + dw).T - a @ w.T).norm() / gap.norm().clamp_min(1e-30)).item())
        change.append(((p @ dw.T).norm() / (p @ w.T).norm().clamp_min(1e-30)).item())
    return sum(residual) / len(residual), sum(change) / len(change)
