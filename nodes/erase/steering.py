"""Steer away from a concept during sampling: negative guidance or Safe Latent Diffusion, as a post-CFG patch."""
from __future__ import annotations

import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy_api.v0_0_2 import io

from ...core.patching.comfy_erase import add_steering, steering_post_cfg, word_encoder
from ...core.steering import MODES, word_summary
from .._support import CATEGORY, lines, log, sigma_range

ERASE = f"{CATEGORY}/erase"


class SteerAwayFromConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsSteerAway",
            display_name="Steer Away From Concept",
            category=ERASE,
            description="Training-free: each step also predicts the concept prompt and pushes the guided result "
                        "away from it (negative guidance, or Safe Latent Diffusion's elementwise version). A "
                        "post-CFG patch: other CFG patches keep working. Costs one more prediction per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with. It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder; the concept below is encoded with it."),
                io.String.Input("concept", default="red", tooltip="The concept to steer away from."),
                io.Float.Input("scale", default=3.0, min=0.0, max=10000.0, step=0.1,
                               tooltip="Steering strength; 0 gives the unpatched model exactly. negative: like a "
                                       "CFG scale (1-7); sld: SLD's guidance scale s_S (weak 20, medium 1000, "
                                       "strong 2000, max 5000)."),
                io.Combo.Input("mode", options=list(MODES), default="negative",
                               tooltip="negative: subtract scale x (concept - unconditional); sld: Safe Latent "
                                       "Diffusion, only where the prompt leans towards the concept, bounded."),
                io.Float.Input("threshold", default=0.01, min=-1.0, max=1.0, step=0.001,
                               tooltip="sld only: where prompt - concept is below this, steering acts "
                                       "(SLD weak 0, medium 0.01, strong 0.025, max 1)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Steer from this point of the schedule (SLD's warm-up, in steps of 50: "
                                       "weak 15, medium 10, strong 7, max 0; about 0.3 / 0.2 / 0.15 / 0)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Stop steering after this point of the schedule."),
                io.String.Input("neutral", default="", optional=True,
                                tooltip="The concept prompt without the concept (e.g. 'a car' for the concept 'a red "
                                        "car'): steering then pushes away from what the concept adds to it only, "
                                        "not from the rest (one more prediction per step). Or a prompt to steer "
                                        "towards instead (e.g. 'a blue car': a push that does not fade where "
                                        "the concept is already drawn; pair it with preserve). Empty: from the "
                                        "unconditional prediction, as in the papers."),
                io.Float.Input("momentum", default=0.0, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="sld only: SLD's momentum scale s_m (weak 0, medium 0.3, strong and max "
                                       "0.5). It builds up from the first step, the warm-up included (one more "
                                       "prediction per step there). 0: no momentum."),
                io.Float.Input("momentum_beta", default=0.0, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="sld only: SLD's momentum beta, how long the momentum remembers (weak 0, "
                                       "medium 0.4, strong and max 0.7)."),
                io.String.Input("preserve", default="", multiline=True, optional=True,
                                tooltip="Prompts to keep, one per line (e.g. 'a blue car', 'a green car'): prompts "
                                        "that ask for them are left alone. With preserve_by prediction an image is "
                                        "steered at a step only while the model's prediction for it is nearer in "
                                        "direction to the concept's than to each of these (whole image, from their "
                                        "mean; one more prediction per line and step); with preserve_by prompt, "
                                        "see there. Empty: always steer."),
                io.Float.Input("preserve_margin", default=0.0, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="With preserve: steer only where the prediction is nearer the concept than "
                                       "every kept prompt by more than this (a cosine difference); higher keeps "
                                       "more, lower steers more."),
                io.Combo.Input("preserve_by", options=["prediction", "prompt"], default="prediction", optional=True,
                               tooltip="How preserve decides. prediction: at every step, from the model's "
                                       "predictions (one more per line and step). prompt: once, from the text: "
                                       "the image is steered only if a word of its prompt is nearer the concept "
                                       "than each kept prompt by prompt_margin (catches synonyms the text encoder "
                                       "places near the concept; a prompt far from it in text space passes; no "
                                       "extra prediction when it does not steer)."),
                io.Float.Input("prompt_margin", default=0.25, min=-2.0, max=2.0, step=0.01, optional=True,
                               tooltip="preserve_by prompt: how much nearer the concept (a cosine difference) a "
                                       "word of the prompt must be. Near 0, prompts that only share words with "
                                       "the concept prompt tip over."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the steering patch (a clone).")],
        )

    @classmethod
    def execute(cls, model, clip, concept, scale, mode, threshold, start_percent, end_percent, neutral="",
                momentum=0.0, momentum_beta=0.0, preserve="", preserve_margin=0.0, preserve_by="prediction",
                prompt_margin=0.25):
        if not concept.strip():
            raise ValueError("give the concept to steer away from")
        kept = lines(preserve)
        if concept.strip() in kept:
            raise ValueError(f"'{concept.strip()}' is both the concept and a preserved prompt: a prompt cannot be "
                             "steered away from and kept; remove it from preserve")
        if neutral.strip() and neutral.strip() == concept.strip():
            raise ValueError(f"the neutral prompt is the concept itself ('{concept}'): give the concept prompt "
                             "without the concept (e.g. 'a car' for 'a red car'), or leave neutral empty")
        if momentum and mode != "sld":
            log.warning("Steer Away From Concept: momentum is SLD's; mode %s ignores it", mode)
        if preserve_by not in ("prediction", "prompt"):
            raise ValueError(f"preserve_by is 'prediction' or 'prompt', not {preserve_by!r}")
        if preserve_by == "prompt" and not kept:
            raise ValueError("preserve_by 'prompt' tells the concept from the preserved prompts: give at least one "
                             "line in preserve, or set preserve_by to 'prediction'")
        window = sigma_range(model, start_percent, end_percent)

        def encode(text):
            return comfy.sampler_helpers.convert_cond(clip.encode_from_tokens_scheduled(clip.tokenize(text)))
        summaries = None
        if preserve_by == "prompt":
            words = word_encoder(clip)
            found = [word_summary(*words(text)) for text in (concept.strip(), *kept)]
            summaries = (found[0], torch.stack(found[1:]), prompt_margin)
        post_cfg = steering_post_cfg(encode(concept), scale, mode, threshold, window,
                                     comfy.samplers.calc_cond_batch, comfy.samplers.encode_model_conds,
                                     encode(neutral) if neutral.strip() else None, (momentum, momentum_beta),
                                     [encode(text) for text in kept] if summaries is None else [],
                                     preserve_margin, summaries)
        return io.NodeOutput(add_steering(model, post_cfg, active=scale != 0.0))
