"""Erase in closed form: every cross-attention key/value projection edited so erased words give the anchor's keys
and values while preserved words keep theirs (UCE with RealEra's neighbours). Returns a clone."""
from __future__ import annotations

import functools

import comfy.lora
from comfy_api.v0_0_2 import io, ui

from ...core import erase as E
from ...core import residuals as R
from ...core.patching.comfy import apply_global, model_family
from ...core.patching.comfy_erase import kv_weights, word_encoder
from .._support import CATEGORY, log, save_path, save_residuals

ERASE = f"{CATEGORY}/erase"


def effective_kv_weights(model):
    """(name, weight) of the K/V projections as this model computes them: the checkpoint's own weight (ComfyUI's
    backup, not whatever another clone left in the module) plus this model's own patches (e.g. a LoRA before)."""
    patches = model.get_key_patches("diffusion_model.")
    out = []
    for name, _ in kv_weights(model):
        key = f"diffusion_model.{name}.weight"
        (weight, convert), *rest = patches[key]
        w = convert(weight.detach().float().cpu().clone())
        if rest:
            w = comfy.lora.calculate_weight(rest, w, key)
        out.append((name, w))
    return out


class EraseConceptClosedForm(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsEraseClosedForm",
            display_name="Erase Concept (closed form)",
            category=ERASE,
            description="Edits every cross-attention key/value projection in closed form so the erased words (and "
                        "random neighbours of their embeddings, as in RealEra) give the anchor's keys and values, "
                        "while the preserved words keep theirs (UCE, Gandikota et al. 2024). Seconds, no training. "
                        "Applied as weight patches; optionally saved as a file LoraLoader reads.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit (SD1.x or SDXL). It is not changed."),
                io.Clip.Input("clip", tooltip="The model's text encoder: the words are encoded with it."),
                io.String.Input("erase", default="red",
                                tooltip="Words or short phrases to erase, comma-separated (e.g. 'Van Gogh, "
                                        "starry night')."),
                io.String.Input("anchor", default="",
                                tooltip="What the erased words should mean instead: empty (the empty prompt) or a "
                                        "word such as 'painting'."),
                io.String.Input("preserve", default="blue, green, dog, cat",
                                tooltip="Comma-separated words whose meaning must not change. Empty: only the "
                                        "ridge term protects other words (a warning is logged)."),
                io.Int.Input("neighbours", default=8, min=0, max=256,
                             tooltip="RealEra neighbour mining: random embeddings per erased row, near it and "
                                     "mapped to the same anchor, so synonyms are erased too. 0: plain UCE."),
                io.Float.Input("radius", default=0.05, min=0.0, max=1.0, step=0.005,
                               tooltip="Neighbour distance, as a fraction of each embedding's length."),
                io.Int.Input("tail_rows", default=-1, min=-1, max=512,
                             tooltip="Rows after each erased word that are edited too: -1 every row to the end "
                                     "(UCE; erases hardest, can harm other words), 0 the word only, 1 the word "
                                     "and the end token (gentler; compared in docs/erase.md)."),
                io.Float.Input("lam", default=0.1, min=0.0, max=1000.0, step=0.01,
                               tooltip="Ridge weight keeping the edit small where no word constrains it (UCE: "
                                       "0.1)."),
                io.Float.Input("preserve_weight", default=1.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="How much keeping the preserved words counts against erasing."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on the edit; 0 gives the base model."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the neighbour mining."),
                io.Int.Input("rank", default=0, min=0, max=4096,
                             tooltip="Rank of the saved LoRA factors. 0: the edit's exact numerical rank (at most "
                                     "the number of erased rows, neighbours included); lower: smaller file, "
                                     "truncation error reported."),
                io.String.Input("save_name", default="",
                                tooltip="File under models/loras (no extension) to save the edit to, loadable "
                                        "with LoraLoaderModelOnly. Empty: do not save."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The edited model (a clone).")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, erase, anchor, preserve, neighbours, radius, tail_rows, lam, preserve_weight,
                strength, seed, rank, save_name, overwrite):
        words, kept = E.split_words(erase), E.split_words(preserve)
        path = save_path(save_name, overwrite)
        encode = functools.cache(word_encoder(clip))  # each word is encoded once
        rows = E.build_rows(encode, words, anchor.strip(), kept, tail_rows)
        weights = effective_kv_weights(model)
        if rows.erase.shape[1] != weights[0][1].shape[1]:
            raise ValueError(f"the text encoder gives {rows.erase.shape[1]}-wide embeddings but the model's "
                             f"cross-attention reads {weights[0][1].shape[1]}: connect the CLIP of the same "
                             "checkpoint")
        operator = E.closed_form_operator(rows, lam, preserve_weight, neighbours, radius, seed)
        layers, truncation = E.lowrank_edit(weights, operator, rank)
        residual, change = E.edit_quality(weights, lambda name: layers[name].delta(), rows)
        counts = {w: encode(w)[1] for w in words}
        pieces = ", ".join(f"'{w}' ({n} token{'s' if n != 1 else ''})" for w, n in counts.items())
        report = (f"erased {pieces} -> '{anchor.strip()}'; {len(layers)} K/V layers at rank "
                  f"{next(iter(layers.values())).rank} (truncation error {truncation:.1e}); erased rows keep "
                  f"{residual:.1%} of their gap to the anchor, preserved rows change {change:.1%}")
        meta = {"technique": "uce_realera", "base_family": model_family(model), "erase": ", ".join(words),
                "anchor": anchor.strip(), "preserve": ", ".join(kept), "neighbours": neighbours, "radius": radius,
                "tail_rows": tail_rows, "lam": lam, "preserve_weight": preserve_weight, "seed": seed}
        edit = R.ResidualSet(layers, {k: str(v) for k, v in meta.items()})
        if path:
            report += f"; saved {save_residuals(edit, save_name, overwrite)}"
        log.info(report)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        m = apply_global(model, edit, strength, {}, comfy.lora.load_lora, key_map)
        return io.NodeOutput(m, ui=ui.PreviewText(report))
