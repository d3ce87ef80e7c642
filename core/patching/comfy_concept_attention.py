"""ConceptAttention in ComfyUI (``core.concept_attention``): the concept stream run beside the sampler's model.

Per model call an APPLY_MODEL wrapper puts, into its own copy of ``transformer_options``:

- a ``patches_replace["dit"][("double_block", i)]`` patch for each joint block up to the last recorded one (chained
  to the patch already set for that key, if any). It prepares the concept tokens' q, k, v with the block's
  text-stream modules, runs the block unchanged, then advances the concept stream with the block's text-stream
  output projection and MLP;
- itself as a tap on the pack's one chained attention override (``core.patching.comfy.with_override_tap``): the
  joint attention runs as before and then, inside that block only, the tap takes from it the image tokens' keys
  and values (after QK-norm and, on Flux, RoPE) and their attention output, runs the concept queries over
  [concept keys; image keys] and adds the block's saliency [rows, image tokens, concepts] to the record.

The image never attends to the concepts and nothing the model computes is replaced, so the sampled latent is the
one without recording, bit for bit. Only the conditional rows of each call (the prompts' images) are followed.
"""
from __future__ import annotations

import logging

import torch

from ..concept_attention import STREAMS, ConceptAttentionRecord, concept_attention, concept_saliency, heads_first
from ..families import FAMILIES
from ..heatmaps import step_bin, step_fraction
from ..hooks.plan import source_rows
from .comfy import (
    APPLY_MODEL,
    OUTER_SAMPLE,
    WRAPPER_KEY,
    base_model_family,
    concept_positions,
    model_family,
    with_override_tap,
)

log = logging.getLogger(__name__)

NEEDS_DIT = "concept attention needs a diffusion transformer (Flux, SD3)"


class ConceptAttentionUnsupported(ValueError):
    """A model the concept stream cannot run beside."""


def joint_blocks(diffusion_model, family_key: str):
    """The joint (double-stream) blocks of a Flux or SD3 diffusion model."""
    return diffusion_model.double_blocks if family_key == "Flux" else diffusion_model.joint_blocks


def stream_for(model_patcher):
    """(family key, stream, number of joint blocks) of a model, or ``ConceptAttentionUnsupported``."""
    key = model_family(model_patcher)
    fam = FAMILIES.get(key)
    if fam is None or fam.architecture != "dit":
        label = fam.label if fam is not None else key
        raise ConceptAttentionUnsupported(f"{NEEDS_DIT}; this model is {label}")
    if key not in STREAMS:
        raise ConceptAttentionUnsupported(f"{NEEDS_DIT}; {fam.label} is not supported yet")
    return key, STREAMS[key], len(joint_blocks(model_patcher.model.diffusion_model, key))


def concept_embeddings(clip, concepts: list[str]) -> torch.Tensor:
    """One conditioning row per concept [C, D]: the concept encoded alone (as a prompt of its own), its first
    sub-token's row. Flux: T5's row. SD3: the CLIP-L/G row (the part every SD3 text encoder has)."""
    rows = []
    for concept in concepts:
        cond = clip.encode_from_tokens(clip.tokenize(concept))[0]
        positions = concept_positions(clip, concept, [concept], cond.shape[0])
        if not positions:
            raise ValueError(f"the text encoder gives no token for the concept '{concept}'")
        rows.append(cond[positions[0]].detach().to("cpu", torch.float32))
    return torch.stack(rows)


class _CallState:
    """One model call's concept stream: which batch rows it follows, the concept tokens, the pending block."""

    def __init__(self, record: ConceptAttentionRecord, stream, embeddings: torch.Tensor,
                 rows: dict[int, tuple[int, ...]], text_tokens: int, image_tokens: int, bin_: int):
        self.record, self.stream = record, stream
        self.embeddings = embeddings
        self.rows = sorted({r for rs in rows.values() for r in rs})
        self.per_source = {src: [self.rows.index(r) for r in rs] for src, rs in rows.items()}
        self.text, self.image = text_tokens, image_tokens
        self.bin = bin_
        self.chosen = set(record.blocks)
        self.last = max(record.blocks)
        self.concepts: torch.Tensor | None = None
        self.pending = None  # (block index, Prepared) while a patched block runs
        self.out: torch.Tensor | None = None  # the concepts' attention output of the block that just ran
        self.stopped = False
        self._idx: dict = {}

    def index(self, device) -> torch.Tensor:
        if device not in self._idx:
            self._idx[device] = torch.tensor(self.rows, device=device)
        return self._idx[device]

    def observe(self, args: tuple, kwargs: dict) -> None:
        """Before an attention call: nothing to read (the stream needs the call's output)."""

    def observe_output(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        if self.pending is not None:
            self.on_attention(args, kwargs, out)

    def on_attention(self, args: tuple, kwargs: dict, out: torch.Tensor) -> None:
        """The joint attention of the pending block has run: concept attention over its image keys and values,
        and the block's saliency from its image attention output."""
        q, k, v = args[0], args[1], args[2]
        head_major = bool(kwargs.get("skip_reshape"))
        if (q.shape[2] if head_major else q.shape[1]) < self.text + self.image:
            return  # not the joint call (MMDiT-X's image-only attention)
        i, prepared = self.pending
        self.pending = None
        heads = int(args[3] if len(args) > 3 else kwargs["heads"])
        t0, t1 = self.text, self.text + self.image
        idx = self.index(k.device)
        with torch.no_grad():
            if head_major:
                image_k, image_v = k[:, :, t0:t1].index_select(0, idx), v[:, :, t0:t1].index_select(0, idx)
            else:
                image_k = heads_first(k[:, t0:t1].index_select(0, idx), heads)
                image_v = heads_first(v[:, t0:t1].index_select(0, idx), heads)
            self.out = concept_attention(prepared.q, prepared.k, prepared.v, image_k, image_v)
            if i in self.chosen:
                if out.ndim == 4:  # an attention function asked to keep heads: [B, H, L, d]
                    out = out.transpose(1, 2).flatten(2)
                saliency = concept_saliency(out[:, t0:t1].index_select(0, idx), self.out)
                for src, pos in self.per_source.items():
                    self.record.add(src, self.bin, saliency[pos])

    def block_patch(self, diffusion_model, i: int, previous):
        """The ("double_block", i) patch: prepare the concepts, run the block (or the previous patch), advance."""
        block = joint_blocks(diffusion_model, self.stream.name)[i]

        def patch(args, extra):
            if self.stopped:
                return previous(args, extra) if previous is not None else extra["original_block"](args)
            img = args["img"]
            idx = self.index(img.device)
            with torch.no_grad():
                if self.concepts is None:
                    emb = self.embeddings.to(img.device, img.dtype)
                    self.concepts = self.stream.embed(diffusion_model, emb).unsqueeze(0).repeat(len(self.rows), 1, 1)
                prepared = self.stream.prepare(block, self.concepts, args["vec"].index_select(0, idx))
            self.pending, self.out = (i, prepared), None
            try:
                result = previous(args, extra) if previous is not None else extra["original_block"](args)
            finally:
                self.pending = None
            out, self.out = self.out, None
            if out is None:
                self.stopped = True
                log.warning("Record Concept Attention: joint block %d ran without ComfyUI's attention function "
                            "(another node replaces it?), so the concepts were not followed past it", i)
            elif i < self.last:
                with torch.no_grad():
                    self.concepts = self.stream.advance(block, self.concepts, out, prepared)
            return result

        return patch


def concept_record_wrappers(record: ConceptAttentionRecord, embeddings: torch.Tensor):
    """(OUTER_SAMPLE wrapper, APPLY_MODEL wrapper) that record every sampling run's concept saliency."""
    sources: dict = {}

    def outer(executor, *args, **kwargs):
        record.reset()
        sources.clear()
        return executor(*args, **kwargs)

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        base_model = executor.class_obj
        fam = base_model_family(base_model)
        if fam is None or fam.key not in STREAMS:
            raise ConceptAttentionUnsupported(NEEDS_DIT)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        record.latent_hw = tuple(x.shape[-2:])
        rows = source_rows(record.source_of, sources, c_crossattn, cond_or_uncond, transformer_options.get("uuids"))
        if not rows:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        bin_ = 0
        if "sigmas" in transformer_options and "sample_sigmas" in transformer_options:
            frac = step_fraction(float(transformer_options["sigmas"].max()), transformer_options["sample_sigmas"])
            bin_ = step_bin(frac, record.bins)
        state = _CallState(record, STREAMS[fam.key], embeddings, rows, int(c_crossattn.shape[1]),
                           fam.image_tokens(tuple(x.shape[-2:])), bin_)
        opts = with_override_tap(transformer_options, state)
        replace = dict(opts.get("patches_replace") or {})
        dit = dict(replace.get("dit") or {})
        for i in range(state.last + 1):
            dit[("double_block", i)] = state.block_patch(base_model.diffusion_model, i, dit.get(("double_block", i)))
        replace["dit"] = dit
        opts["patches_replace"] = replace
        return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)

    return outer, wrapper


def apply_concept_recording(model_patcher, record: ConceptAttentionRecord, embeddings: torch.Tensor):
    """A clone that records concept saliency into ``record`` during any sampler run; other wrappers stay."""
    outer, wrapper = concept_record_wrappers(record, embeddings)
    m = model_patcher.clone()
    m.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY + "-concept-attention", outer)
    m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY + "-concept-attention", wrapper)
    return m
