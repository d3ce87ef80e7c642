"""See: record cross-attention during any sampler run and turn it into per-word masks and overlays."""
from __future__ import annotations

import re

from comfy_api.v0_0_2 import io, ui

from ..core.concept_attention import ConceptAttentionRecord, parse_blocks, parse_concepts
from ..core.heatmaps import AttentionRecord, RecordError, overlay, word_maps
from ..core.patching.comfy import apply_recording, concept_positions
from ..core.patching.comfy_concept_attention import apply_concept_recording, concept_embeddings, stream_for
from ..core.tokens import TokenNotFoundError, same_prompt
from ._support import CATEGORY

Record = io.Custom("CONCEPT_ATTENTION_RECORD")


def parse_words(text: str) -> list[str]:
    return [w.strip() for w in (text or "").split(",") if w.strip()]


def parse_widths(text: str) -> list[int] | None:
    text = (text or "").strip().lower()
    if text in ("", "all"):
        return None
    try:
        return [int(w) for w in re.split(r"[,\s]+", text) if w]
    except ValueError:
        raise ValueError(f"resolutions must be 'all' or map widths like '16, 32', not '{text}'") from None


def prompt_words(text: str) -> list[str]:
    return [w for w in re.findall(r"[\w'-]+", text.lower())]


def word_token_positions(clip, text: str, words: list[str], context_length: int | None = None) -> list[list[int]]:
    """Per word, the sequence positions of all its sub-tokens (every occurrence; SD3: in CLIP's and T5's parts);
    a missing word lists the prompt's."""
    out = []
    for word in words:
        try:
            out.append(concept_positions(clip, text, [word], context_length))
        except TokenNotFoundError as e:
            if "T5 splits" in str(e):
                raise
            raise ValueError(f"the word '{word}' is not in the prompt; its words are: "
                             f"{', '.join(prompt_words(text))}") from None
    return out


class RecordAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsRecordAttention",
            display_name="Record Cross-Attention",
            category=f"{CATEGORY}/see",
            description="Records the cross-attention of every prompt token while any sampler runs with the "
                        "returned model (KSampler, SamplerCustomAdvanced, ...). Memory is fixed: maps are summed on "
                        "the fly per resolution and per tenth of the run. Read the record with Attention Heatmaps "
                        "after the sampler.",
            inputs=[io.Model.Input("model", tooltip="The model to sample with; it is not changed.")],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Connect to the sampler whose attention you want."),
                Record.Output(display_name="record", tooltip="Connect to Attention Heatmaps."),
            ],
        )

    @classmethod
    def execute(cls, model):
        record = AttentionRecord()
        return io.NodeOutput(apply_recording(model, record), record)


class RecordConceptAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsRecordConceptAttention",
            display_name="Record Concept Attention",
            category=f"{CATEGORY}/see",
            description="ConceptAttention (Helbling et al., ICML 2025) on Flux and SD3: while any sampler runs with "
                        "the returned model, concept words (they need not be in the prompt) go through the joint "
                        "blocks with the text stream's weights, attending to the image one way, and each image "
                        "token's attention output is compared with each concept's (softmax over the concepts). The "
                        "image is not changed. Read the record with Attention Heatmaps (words = the concepts).",
            inputs=[
                io.Model.Input("model", tooltip="A Flux or SD3 model to sample with; it is not changed."),
                io.Clip.Input("clip", tooltip="The model's text encoder: encodes each concept on its own."),
                io.String.Input("concepts", default="dog, beach, sky",
                                tooltip="Comma-separated concept words, at least two; they need not be in the prompt "
                                        "(a pixel's saliency is shared among them, so add a background concept)."),
                io.String.Input("blocks", default="auto",
                                tooltip="Joint blocks to average: 'auto' (the last four; Flux.1: 15-18), 'all', or "
                                        "indices and ranges such as '10-18'."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="Connect to the sampler whose image you want mapped."),
                Record.Output(display_name="record", tooltip="Connect to Attention Heatmaps."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concepts, blocks):
        family, _, n_blocks = stream_for(model)
        names = parse_concepts(concepts)
        record = ConceptAttentionRecord(concepts=tuple(names), blocks=parse_blocks(blocks, n_blocks), family=family)
        embeddings = concept_embeddings(clip, names)
        return io.NodeOutput(apply_concept_recording(model, record, embeddings), record)


class AttentionHeatmaps(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsAttentionHeatmaps",
            display_name="Attention Heatmaps",
            category=f"{CATEGORY}/see",
            description="Turns a cross-attention record into one mask and one overlay per word: averaged over heads, "
                        "layers, the chosen resolutions and step range, upsampled to the image and normalised per "
                        "word (sub-tokens of a word are summed).",
            inputs=[
                Record.Input("record", tooltip="From Record Cross-Attention or Record Concept Attention (the last "
                                               "sampler run with its model)."),
                io.Image.Input("images", tooltip="The decoded images of that run; they set the size and get the "
                                                 "overlay, and make this node run after the sampler."),
                io.Clip.Input("clip", tooltip="The text encoder used for the positive prompt."),
                io.String.Input("text", multiline=True, default="a photo of a dog on the beach",
                                tooltip="The positive prompt exactly as sampled (used to find each word's tokens; "
                                        "for a concept record, only to pick the prompt when several were sampled)."),
                io.String.Input("words", default="dog, beach",
                                tooltip="Comma-separated words (or phrases) of the prompt to map; for a concept "
                                        "record, recorded concepts (empty: all of them)."),
                io.String.Input("resolutions", default="all",
                                tooltip="'all', or the attention-map widths to use, e.g. '16, 32' (SD1.5 at 512 px "
                                        "has 8, 16, 32, 64; an error lists what was recorded)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.1,
                               tooltip="First part of the run to include (0 = first step; steps are kept in tenths)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.1,
                               tooltip="Last part of the run to include (1 = last step)."),
                io.Float.Input("overlay_alpha", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Opacity of the heatmap over the image."),
            ],
            outputs=[
                io.Mask.Output(display_name="masks", tooltip="One mask per word and image, word-major, in [0, 1]."),
                io.Image.Output(display_name="overlays", tooltip="The images with each word's heatmap on top."),
            ],
        )

    @classmethod
    def execute(cls, record, images, clip, text, words, resolutions, start_percent, end_percent, overlay_alpha):
        if isinstance(record, ConceptAttentionRecord):
            return cls.concept_maps(record, images, clip, text, words, resolutions, start_percent, end_percent,
                                    overlay_alpha)
        chosen = parse_words(words)
        if not chosen:
            raise ValueError("name at least one word of the prompt in 'words'")
        if not record.contexts:
            raise RecordError("nothing was recorded: connect Record Cross-Attention's model to the sampler that made "
                              "these images, and its record here")
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0][0]
        positions = word_token_positions(clip, text, chosen, cond.shape[0])
        source = next((i for i, ref in enumerate(record.contexts) if same_prompt(ref, cond[: ref.shape[0]])), None)
        if source is None:
            raise RecordError("the prompt typed here is not a positive prompt of the recorded run: paste the exact "
                              "prompt the sampler used")
        maps = word_maps(record, source, positions, parse_widths(resolutions), start_percent, end_percent,
                         size=tuple(images.shape[1:3]))
        return cls.output(maps, images, overlay_alpha)

    @classmethod
    def concept_maps(cls, record, images, clip, text, words, resolutions, start_percent, end_percent, overlay_alpha):
        """A concept record: the words are concepts; the prompt only picks the source when several were sampled."""
        if not record.contexts:
            raise RecordError("nothing was recorded: connect Record Concept Attention's model to the sampler that "
                              "made these images, and its record here")
        positions = record.columns(parse_words(words) or list(record.concepts))
        source = 0
        if len(record.contexts) > 1:
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0][0]
            source = next((i for i, ref in enumerate(record.contexts) if same_prompt(ref, cond[: ref.shape[0]])),
                          None)
            if source is None:
                raise RecordError("the run sampled several prompts and the one typed here is none of them: paste "
                                  "the exact positive prompt whose image you want mapped")
        maps = word_maps(record, source, positions, parse_widths(resolutions), start_percent, end_percent,
                         size=tuple(images.shape[1:3]))
        return cls.output(maps, images, overlay_alpha)

    @classmethod
    def output(cls, maps, images, overlay_alpha):
        if maps.shape[1] != images.shape[0]:
            raise ValueError(f"the record holds {maps.shape[1]} images but {images.shape[0]} were given: connect the "
                             "decoded output of the recorded sampler")
        overlays = overlay(images, maps, overlay_alpha)
        masks = maps.reshape(-1, *maps.shape[2:]).clamp(0, 1)
        return io.NodeOutput(masks, overlays, ui=ui.PreviewImage(overlays, cls=cls))
