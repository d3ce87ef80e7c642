"""Multi-Concept T2I-Zero (Tunanyan et al. 2023): training-free Correction by Similarities on the conditioning and
Cross-Token NMS on cross-attention. The nodes return a new conditioning or a clone; no weight is written in place."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import torch
from comfy_api.v0_0_2 import io

from ...core import compose as C
from ...core.patching.comfy import concept_positions, model_sites, prompt_token_ids
from ...core.patching.comfy_compose import apply_nms, nms_patches, word_pool
from ...core.tokens import same_prompt
from .._support import CATEGORY, comma_list, encode_rows, log, sigma_range

COMPOSE = f"{CATEGORY}/compose"


def _concept_positions(clip, text: str, concepts: str) -> list[list[int]]:
    groups = [c.split() for c in comma_list(concepts)]
    if not groups:
        raise ValueError("name the concepts, comma-separated, e.g. 'cat, dog' (a concept may have several words: "
                         "'red car')")
    positions = [concept_positions(clip, text, words) for words in groups]
    for i in range(len(positions)):
        for j in range(i + 1, len(positions)):
            shared = set(positions[i]) & set(positions[j])
            if shared:
                raise ValueError(f"the concepts '{' '.join(groups[i])}' and '{' '.join(groups[j])}' share token "
                                 "positions: give each concept its own words")
    return positions


def _check_conditioning(conditioning, encoded: torch.Tensor, skip: list[int], text: str) -> None:
    """Each conditioning tensor must be ``text``'s encoding (rows outside ``skip`` compared), else positions lie."""
    keep = torch.ones(encoded.shape[0], dtype=torch.bool)
    keep[[p for p in skip if p < encoded.shape[0]]] = False
    for cond, _ in conditioning:
        row = cond[0]
        if row.shape[0] < encoded.shape[0] or not same_prompt(row[:encoded.shape[0]][keep], encoded[keep]):
            raise ValueError(f"the conditioning was not encoded from the text \"{text}\": connect the "
                             "CLIPTextEncode of the same prompt (or copy its text here) so the concepts' token "
                             "positions are right")


class T2IZeroCorrection(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsT2IZeroCorrection",
            display_name="T2I-Zero: Correction by Similarities",
            category=COMPOSE,
            description="Training-free (Multi-Concept T2I-Zero, Tunanyan et al. 2023): each concept token's "
                        "embedding is pulled toward its most similar tokens of the prompt (never another concept's), "
                        "so one concept stops swallowing the other. Changes only the concepts' rows of the "
                        "conditioning.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The positive conditioning, encoded from 'text'."),
                io.Clip.Input("clip", tooltip="The text encoder that made the conditioning."),
                io.String.Input("text", multiline=True, default="a photo of a cat and a dog",
                                tooltip="The prompt the conditioning was encoded from (checked)."),
                io.String.Input("concepts", default="cat, dog",
                                tooltip="The concepts, comma-separated; each may have several words ('red car')."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="How far each concept token moves to its similar tokens' average; 0 leaves "
                                       "the conditioning unchanged."),
                io.Int.Input("top_k", default=5, min=1, max=77,
                             tooltip="How many most similar tokens (the token itself included) are averaged; 1 "
                                     "changes nothing."),
                io.Float.Input("temperature", default=0.1, min=0.001, max=10.0, step=0.01,
                               tooltip="Softmax temperature on the cosine similarities (lower: the most similar "
                                       "tokens dominate)."),
                io.Combo.Input("pool", options=["prompt words", "all positions"], default="prompt words",
                               tooltip="Where similar tokens come from: the prompt's own words, or every position "
                                       "(end and padding tokens too, which summarise the whole prompt)."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="The corrected conditioning.")],
        )

    @classmethod
    def execute(cls, conditioning, clip, text, concepts, strength, top_k, temperature, pool):
        positions = _concept_positions(clip, text, concepts)
        _check_conditioning(conditioning, encode_rows(clip, text), [], text)
        empty = prompt_token_ids(clip, "")
        candidates = word_pool(prompt_token_ids(clip, text), empty[0], empty[1]) if pool == "prompt words" else None
        out = []
        for cond, extra in conditioning:
            if strength == 0.0:
                out.append([cond, dict(extra)])
                continue
            new = C.correction_by_similarities(cond, positions, top_k=top_k, temperature=temperature,
                                               strength=strength, pool=candidates)
            out.append([new, dict(extra)])
        return io.NodeOutput(out)


class T2IZeroNMS(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsT2IZeroNMS",
            display_name="T2I-Zero: Cross-Token NMS",
            category=COMPOSE,
            description="Training-free (Multi-Concept T2I-Zero): during sampling, at each image position only the "
                        "concept whose (smoothed) cross-attention is the largest keeps its tokens' attention; the "
                        "other concepts' tokens are suppressed there, so their features do not mix. A "
                        "cross-attention patch; earlier cross-attention patches still run where NMS is off.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with. It is not changed."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning the sampler gets (plain or "
                                                          "corrected by T2I-Zero: Correction)."),
                io.Clip.Input("clip", tooltip="The text encoder of the conditioning."),
                io.String.Input("text", multiline=True, default="a photo of a cat and a dog",
                                tooltip="The prompt the conditioning was encoded from (checked)."),
                io.String.Input("concepts", default="cat, dog",
                                tooltip="Two or more concepts, comma-separated (one concept: nothing to suppress)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which NMS starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which cross-attention runs unchanged."),
                io.Float.Input("smoothing", default=0.5, min=0.01, max=10.0, step=0.05,
                               tooltip="Sigma of the 3x3 Gaussian applied to each concept's map before comparing."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with NMS (a clone).")],
        )

    @classmethod
    def execute(cls, model, positive, clip, text, concepts, start_percent, end_percent, smoothing):
        positions = _concept_positions(clip, text, concepts)
        window = sigma_range(model, start_percent, end_percent)
        encoded = encode_rows(clip, text)
        _check_conditioning(positive, encoded, [p for c in positions for p in c], text)
        if len(positions) < 2:
            log.info("Cross-Token NMS with one concept changes nothing: the model is returned unpatched")
            return io.NodeOutput(model.clone())
        reference = positive[0][0][0]
        patches = nms_patches(positions, reference, comfy_attention.optimized_attention, window, smoothing,
                              "Connect the same conditioning to this node's 'positive' and to the sampler.")
        paths = [s.path for s, _ in model_sites(model)]
        return io.NodeOutput(apply_nms(model, patches, paths, "comfyui-concepts-nms"))
