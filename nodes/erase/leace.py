"""Erase from the conditioning: a LEACE eraser fitted on prompts with and without a concept. No model change."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io

from ...core import leace
from ...core.patching.comfy import concept_positions
from ...core.tokens import TokenNotFoundError
from .._support import CATEGORY, lines, log

ERASE = f"{CATEGORY}/erase"


class EraseFromConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsEraseLeace",
            display_name="Erase From Conditioning (LEACE)",
            category=ERASE,
            description="Fits a LEACE eraser (Belrose et al. 2023) on the text encodings of prompts with and "
                        "without a concept and applies it to a conditioning: afterwards no linear function of a "
                        "token's embedding tells whether the concept was in the prompt. No model change.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The conditioning to clean (e.g. the positive prompt)."),
                io.Clip.Input("clip", tooltip="The text encoder that made the conditioning."),
                io.String.Input("concept_prompts", multiline=True,
                                default="a red car\na red dress\na red apple\na red house\na red bird\na red cup",
                                tooltip="Prompts containing the concept, one per line (4 or more, varied)."),
                io.String.Input("neutral_prompts", multiline=True,
                                default="a blue car\na green dress\na yellow apple\na white house\na black bird"
                                        "\na grey cup",
                                tooltip="Matching prompts without it, one per line."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: full LEACE erasure; 0: the conditioning unchanged; between: a blend."),
                io.Boolean.Input("per_position", default=False,
                                 tooltip="Off: one eraser for every token row, for prompts of any wording. On: one "
                                         "eraser per token position, much stronger when the prompt follows the "
                                         "fitting prompts' template (same words at the same places)."),
                io.Combo.Input("centre", options=["neutral", "mean"], default="neutral", optional=True,
                               tooltip="neutral: the concept prompts' encodings are moved all the way to the "
                                       "neutral prompts' average, which stays exactly in place (stronger). mean: "
                                       "plain LEACE, both moved to the average of all (least change). Both leave "
                                       "no linear signal. A prompt that leaves this input out gets mean."),
                io.Float.Input("shrinkage", default=0.01, min=0.0, max=10.0, step=0.001, optional=True,
                               tooltip="Regularises the fit: with few fitting prompts, plain LEACE (0) can move a "
                                       "prompt worded unlike them far off (its rows by many times their size); "
                                       "0.01 keeps the erasure exact on the fitting prompts and bounds that. "
                                       "A prompt that leaves this input out gets 0."),
                io.String.Input("concept_word", default="", optional=True,
                                tooltip="The word every concept prompt names (e.g. 'red'). Given (with per_position "
                                        "off): one eraser for prompts of any wording, fitted on each row's place "
                                        "after that word (the word and every later row, each its own label). "
                                        "Empty: every row of a concept prompt labelled alike."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="The erased conditioning.")],
        )

    @classmethod
    def execute(cls, conditioning, clip, concept_prompts, neutral_prompts, strength, per_position, centre="mean",
                shrinkage=0.0, concept_word=""):
        with_concept, without = lines(concept_prompts), lines(neutral_prompts)
        if not with_concept or not without:
            raise ValueError("give at least one prompt with the concept and one without it, one per line")

        t5 = "t5xxl" in clip.tokenize("")  # SD3 / Flux: the conditioning's rows include T5's

        def encode(prompts):
            """[B, L, D]: CLIP's first 77-token chunk; with T5, every row up to the shortest prompt's length (short
            prompts pad alike), so the eraser is fitted on the kinds of rows it is applied to."""
            with torch.no_grad():
                rows = [clip.encode_from_tokens(clip.tokenize(p)).float().cpu() for p in prompts]
            length = min(r.shape[1] for r in rows) if t5 else 77
            return torch.cat([r[:, :length] for r in rows])
        word = concept_word.strip()
        if word and t5:
            raise ValueError("concept_word fits by the rows after the word in CLIP's causal encoding; with T5 (SD3, "
                             "Flux) every row carries the word: leave concept_word empty")
        if word and per_position:
            raise ValueError("per_position and concept_word are two ways to fit: turn per_position off to fit by the "
                             "word (any wording), or leave concept_word empty")
        if word:
            starts = []
            for p in with_concept:
                try:
                    starts.append(concept_positions(clip, p, [word])[0])
                except TokenNotFoundError:
                    raise ValueError(f"concept_word '{word}' is not in the concept prompt \"{p}\": every concept "
                                     "prompt must name it (or leave concept_word empty)") from None
            if max(starts) >= 77:
                raise ValueError(f"'{word}' comes after the first 77 tokens of a concept prompt: shorten it")
            eraser = leace.fit_by_word(encode(with_concept), encode(without), starts, centre, shrinkage)
        else:
            eraser = leace.fit_on_conditioning(encode(with_concept), encode(without), per_position, centre,
                                               shrinkage)
        out = []
        for cond, extra in conditioning:
            erased = eraser(cond)
            out.append([torch.lerp(cond, erased, strength) if strength != 1.0 else erased, dict(extra)])
        log.info("LEACE eraser (%s, centred on the %s, shrinkage %g) of rank %d fitted on %d + %d prompts",
                 f"by offset from '{word}'" if word else "per position" if per_position else "pooled", centre,
                 shrinkage, eraser.rank, len(with_concept), len(without))
        return io.NodeOutput(out)
