"""Localize: localized attention-guided (LAG) sampling with personalized residuals (Ham et al., CVPR 2024)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..core.masks import RULES
from ..core.patching.comfy import apply_localized, concept_positions, lag_wrapper
from ._support import CATEGORY, Residuals, checked_sites, sigma_range, strengths_for


class ApplyResidualsLocalized(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsApplyResidualsLocalized",
            display_name="Apply Residuals Localized (LAG)",
            category=f"{CATEGORY}/localize",
            description="Applies residuals only where attention finds the concept: in each transformer "
                        "block, the maps of the token and the class word (their text->image attention; on SD3 and "
                        "Flux the text part of joint attention) are summed and binarised at the median, and the "
                        "residual is added there alone, in the same model pass. Encodes the prompt too: connect "
                        "'positive' to the sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the residuals were trained on."),
                io.Clip.Input("clip", tooltip="The text encoder; the prompt below is encoded with it."),
                Residuals.Input("residuals", tooltip="Residuals from Train or Load Residuals."),
                io.String.Input("text", multiline=True, default="a photo of a sks dog on the beach",
                                tooltip="The positive prompt. It must contain the token and the class word."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on the residual inside the mask; 0 gives the base model."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which the residual starts (0 = first step)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which the base model runs alone (1 = last step)."),
                io.Combo.Input("mask_rule", options=list(RULES), default="median",
                               tooltip="median: the paper's rule, half of each block's positions; mean: above the "
                                       "map's mean; soft: the normalised map as a soft mask."),
                io.String.Input("token", default="", optional=True,
                                tooltip="The concept's token; empty: the one stored in the residual file."),
                io.String.Input("class_word", default="", optional=True,
                                tooltip="The class word; empty: the one stored in the residual file."),
                io.String.Input("block_strengths", default="", optional=True,
                                tooltip="Optional per-block multipliers, e.g. 'input=1, middle=0.5'."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Conditioning.Output(display_name="positive",
                                       tooltip="The encoded prompt; connect it to the sampler's positive input."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, residuals, text, strength, start_percent, end_percent, mask_rule, token="",
                class_word="", block_strengths=""):
        checked_sites(model, residuals)
        token = (token or "").strip() or residuals.metadata.get("token", "")
        class_word = (class_word or "").strip() or residuals.metadata.get("class_word", "")
        words = [w for w in (token, class_word) if w]
        if not words:
            raise ValueError("the residual file names no token or class word: fill in 'token' and 'class_word'")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        positions = concept_positions(clip, text, words, context_length=positive[0][0].shape[1])
        wrapper = lag_wrapper(residuals, positions, positive[0][0][0], strength,
                              strengths_for(block_strengths, residuals), mask_rule,
                              sigma_range(model, start_percent, end_percent))
        return io.NodeOutput(apply_localized(model, wrapper), positive)
