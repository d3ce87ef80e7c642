"""ConceptAttention (Helbling et al., ICML 2025): where each concept word lies in the image, from a DiT's attention.

Training-free and read-only. Concept words (they need not be in the prompt) are encoded by the text encoder, one
token per concept, and run as an extra token stream through the joint (double-stream) blocks with the blocks' own
TEXT-stream weights: the block's text modulation of the same ``vec``, norm, qkv and QK-norm give their queries,
keys and values; their queries attend one way, over [concept keys; image keys], so the image never sees them and the
model's output is unchanged; the text stream's output projection and MLP, with its gates, update the concept
residual stream for the next block.

A block's saliency is, per image token, the softmax over concepts of the dot products between the image token's
attention output and each concept's attention output (the "attention output space"): both taken where the joint
attention returns them, heads concatenated, BEFORE the output projection (what the reference implementation's
``output_space_*_vectors`` are). Maps are averaged over a chosen set of blocks and steps.

Concept positions for RoPE: the text tokens' (Flux gives every text token the ids (0, 0, 0)), which makes RoPE the
identity rotation, so the concepts' q and k are used as the text stream makes them; the image keys come with their
RoPE, as the joint attention used them.

Everything here takes tensors and duck-typed block modules: ``FLUX`` reads a Flux ``DoubleStreamBlock``'s
``txt_mod``, ``txt_norm1``, ``txt_attn.{qkv, norm, proj}``, ``txt_norm2``, ``txt_mlp``; ``MMDIT`` an SD3
``JointBlock``'s ``context_block`` (``pre_attention`` / ``post_attention``). The ComfyUI glue that feeds them is
``core.patching.comfy_concept_attention``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .heatmaps import AttentionRecord

DEFAULT_LAST_BLOCKS = 4  # the reference pipeline's default: Flux.1 double blocks 15-18 (the last four of 19)


@dataclass
class ConceptAttentionRecord(AttentionRecord):
    """An ``AttentionRecord`` whose columns are concepts, not prompt tokens: ``sums[(source, n_image, bin)]`` is
    [rows, image tokens, concepts] of per-block saliency (softmax over concepts), ``counts`` the blocks summed."""

    concepts: tuple[str, ...] = ()
    blocks: tuple[int, ...] = ()
    family: str = ""

    def columns(self, names: list[str]) -> list[list[int]]:
        """Per name, its column ([[index]]); an unknown name is an error listing the recorded concepts."""
        missing = [n for n in names if n not in self.concepts]
        if missing:
            raise ValueError(f"{', '.join(repr(m) for m in missing)} was not recorded; the recorded concepts are: "
                             f"{', '.join(self.concepts)}")
        return [[self.concepts.index(n)] for n in names]


# ------------------------------------------------------------------------------------------------ the math
def concept_saliency(image_out: torch.Tensor, concept_out: torch.Tensor) -> torch.Tensor:
    """Softmax over concepts of image·concept dot products: image_out [B, N, D], concept_out [B, C, D] -> [B, N, C]
    (float32; each row sums to 1)."""
    scores = torch.einsum("bnd,bcd->bnc", image_out.float(), concept_out.float())
    return scores.softmax(dim=-1)


def concept_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, image_k: torch.Tensor,
                      image_v: torch.Tensor) -> torch.Tensor:
    """Concept queries attending one way over [concept keys; image keys]: q, k, v [B, H, C, d], image_k/v
    [B, H, N, d] -> attention output [B, C, H*d] (heads concatenated, before any output projection)."""
    keys = torch.cat((k, image_k.to(k.dtype)), dim=2)
    values = torch.cat((v, image_v.to(v.dtype)), dim=2)
    out = F.scaled_dot_product_attention(q, keys, values)
    return out.transpose(1, 2).flatten(2)


def heads_first(t: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*d] or [B, L, H, d] -> [B, H, L, d]."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _modulate(x: torch.Tensor, mod) -> torch.Tensor:
    return torch.addcmul(mod.shift, x, 1 + mod.scale)


@dataclass
class Prepared:
    """A block's concept queries, keys and values [B, H, C, d] and what the update after attention needs."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    rest: tuple = field(default_factory=tuple)


class FluxStream:
    """The text stream of a Flux ``DoubleStreamBlock`` applied to concept tokens (``vec`` [B, D] as the block gets
    it; Chroma's precomputed modulations are not handled)."""

    name = "Flux"

    @staticmethod
    def embed(diffusion_model, embeddings: torch.Tensor) -> torch.Tensor:
        return diffusion_model.txt_in(embeddings)

    @staticmethod
    def prepare(block, concepts: torch.Tensor, vec: torch.Tensor) -> Prepared:
        mod1, mod2 = block.txt_mod(vec)
        qkv = block.txt_attn.qkv(_modulate(block.txt_norm1(concepts), mod1))
        b, c = qkv.shape[:2]
        q, k, v = qkv.view(b, c, 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = block.txt_attn.norm(q, k, v)
        return Prepared(q, k, v, (mod1, mod2))

    @staticmethod
    def advance(block, concepts: torch.Tensor, out: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        mod1, mod2 = prepared.rest
        concepts = concepts + mod1.gate * block.txt_attn.proj(out)
        return concepts + mod2.gate * block.txt_mlp(_modulate(block.txt_norm2(concepts), mod2))


class MMDiTStream:
    """The context (text) half of an SD3 ``JointBlock``: ``context_block.pre_attention`` / ``post_attention``. The
    last block's context half has no post-attention part (``pre_only``): its saliency is recorded, nothing after."""

    name = "SD3"

    @staticmethod
    def embed(diffusion_model, embeddings: torch.Tensor) -> torch.Tensor:
        return diffusion_model.context_embedder(embeddings)

    @staticmethod
    def prepare(block, concepts: torch.Tensor, vec: torch.Tensor) -> Prepared:
        ctx = block.context_block
        (q, k, v), rest = ctx.pre_attention(concepts, vec)
        heads = ctx.attn.num_heads
        return Prepared(heads_first(q, heads), heads_first(k, heads), heads_first(v, heads), rest or ())

    @staticmethod
    def advance(block, concepts: torch.Tensor, out: torch.Tensor, prepared: Prepared) -> torch.Tensor:
        if block.context_block.pre_only:
            return concepts
        return block.context_block.post_attention(out, *prepared.rest)


STREAMS = {"Flux": FluxStream, "SD3": MMDiTStream}


def block_step(stream, block, concepts: torch.Tensor, vec: torch.Tensor, image_k: torch.Tensor,
               image_v: torch.Tensor, image_out: torch.Tensor | None = None):
    """One block of the concept stream without ComfyUI: (new concepts [B, C, D], saliency [B, N, C] or None).

    ``image_k``/``image_v`` [B, H, N, d] are the image keys and values as the block's joint attention used them,
    ``image_out`` [B, N, H*d] the image tokens' joint attention output (for the saliency)."""
    prepared = stream.prepare(block, concepts, vec)
    out = concept_attention(prepared.q, prepared.k, prepared.v, image_k, image_v)
    saliency = None if image_out is None else concept_saliency(image_out, out)
    return stream.advance(block, concepts, out, prepared), saliency


# ------------------------------------------------------------------------------------------------ choices
def parse_concepts(text: str) -> list[str]:
    """Comma-separated concept words; at least two (the saliency is a softmax over them), no duplicates."""
    words = [w.strip() for w in (text or "").split(",") if w.strip()]
    if len(words) < 2:
        raise ValueError("name at least two concepts, comma-separated (e.g. 'dog, sky, grass'): each pixel's "
                         "saliency is shared among them, so one concept alone would cover the whole image")
    dupes = sorted({w for w in words if words.count(w) > 1})
    if dupes:
        raise ValueError(f"concept {', '.join(repr(d) for d in dupes)} is named twice")
    return words


def default_blocks(n_blocks: int) -> tuple[int, ...]:
    """The last four joint blocks (Flux.1: 15-18 of 0-18, the reference pipeline's default)."""
    return tuple(range(max(0, n_blocks - DEFAULT_LAST_BLOCKS), n_blocks))


def parse_blocks(text: str, n_blocks: int) -> tuple[int, ...]:
    """Joint-block indices from 'auto' (``default_blocks``), 'all', or numbers and ranges like '10-18' or '3, 5'."""
    text = (text or "").strip().lower()
    if text in ("", "auto"):
        return default_blocks(n_blocks)
    if text == "all":
        return tuple(range(n_blocks))
    chosen: set[int] = set()
    for part in re.split(r"[,\s]+", text):
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if m is None:
            raise ValueError(f"blocks must be 'auto', 'all' or indices and ranges like '10-18' or '3, 5', not "
                             f"'{text}'")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if lo > hi:
            raise ValueError(f"block range '{part}' runs backwards")
        chosen.update(range(lo, hi + 1))
    bad = sorted(i for i in chosen if i >= n_blocks)
    if bad:
        raise ValueError(f"this model has {n_blocks} joint blocks (0-{n_blocks - 1}); there is no block "
                         f"{', '.join(map(str, bad))}")
    return tuple(sorted(chosen))
