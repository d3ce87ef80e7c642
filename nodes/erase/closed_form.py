"""Erase in closed form: every cross-attention key/value projection edited so erased words give the anchor's keys
and values while preserved words keep theirs (UCE with RealEra's neighbours). Returns a clone."""
from __future__ import annotations

import functools

import comfy.lora
from comfy_api.v0_0_2 import io, ui

from ...core import erase as E
from ...core import residuals as R
from ...core.families import FAMILIES
from ...core.patching.comfy import apply_global, is_dit, model_family
from ...core.patching.comfy_erase import dit_word_encoder, kv_weights, word_encoder
from .._support import CATEGORY, log, save_path, save_residuals

ERASE = f"{CATEGORY}/erase"


def effective_weights(model, names: list[str]):
    """(name, weight) of the named layers as this model computes them: the checkpoint's own weight (ComfyUI's
    backup, not whatever another clone left in the module) plus this model's own patches (e.g. a LoRA before)."""
    patches = model.get_key_patches("diffusion_model.")
    out = []
    for name in names:
        key = f"diffusion_model.{name}.weight"
        (weight, convert), *rest = patches[key]
        w = convert(weight.detach().float().cpu().clone())
        if rest:
            w = comfy.lora.calculate_weight(rest, w, key)
        out.append((name, w))
    return out


def checked_width(rows: E.EditRows, weights, what: str) -> None:
    if rows.erase.shape[1] != weights[0][1].shape[1]:
        raise ValueError(f"the text encoder gives {rows.erase.shape[1]}-wide embeddings but the model's {what} "
                         f"reads {weights[0][1].shape[1]}: connect the text encoder of the same model")


def kv_edit(model, clip, words, anchor, kept, neighbours, radius, tail_rows, lam, preserve_weight, seed, rank):
    """UNets: every cross-attention K/V projection, rows aligned as UCE does for CLIP. Returns (layers, report)."""
    encode = functools.cache(word_encoder(clip))  # each word is encoded once
    rows = E.build_rows(encode, words, anchor, kept, tail_rows)
    weights = effective_weights(model, [name for name, _ in kv_weights(model)])
    checked_width(rows, weights, "cross-attention")
    operator = E.closed_form_operator(rows, lam, preserve_weight, neighbours, radius, seed)
    layers, truncation = E.lowrank_edit(weights, operator, rank)
    residual, change = E.edit_quality(weights, lambda name: layers[name].delta(), rows)
    counts = {w: encode(w)[1] for w in words}
    pieces = ", ".join(f"'{w}' ({n} token{'s' if n != 1 else ''})" for w, n in counts.items())
    return layers, (f"erased {pieces} -> '{anchor}'; {len(layers)} K/V layers at rank "
                    f"{next(iter(layers.values())).rank} (truncation error {truncation:.1e}); erased rows keep "
                    f"{residual:.1%} of their gap to the anchor, preserved rows change {change:.1%}")


def dit_edit(model, clip, words, anchor, kept, neighbours, radius, lam, preserve_weight, seed, rank):
    """SD3 / Flux: the layers that read the text encoder's output (the token features' entry and the pooled
    vector's), rows aligned position by position. Returns (layers, report)."""
    fam = FAMILIES[model_family(model)]
    encode = functools.cache(dit_word_encoder(clip))
    parts = [(fam.text_entry[0], 0, "token entry")]
    if fam.pooled_entry[0] and encode(anchor)[1] is not None:
        parts.append((fam.pooled_entry[0], 1, "pooled entry"))
    layers, notes = {}, []
    for name, part, what in parts:
        rows = E.build_rows(lambda w, part=part: (encode(w)[part], 1), words, anchor, kept, align="positional")
        weights = effective_weights(model, [name])
        checked_width(rows, weights, what)
        operator = E.closed_form_operator(rows, lam, preserve_weight, neighbours, radius, seed)
        edit, truncation = E.lowrank_edit(weights, operator, rank)
        residual, change = E.edit_quality(weights, lambda n, edit=edit: edit[n].delta(), rows)
        layers.update(edit)
        notes.append(f"{what} {name} at rank {edit[name].rank} (truncation error {truncation:.1e}): erased rows "
                     f"keep {residual:.1%} of their gap to the anchor, preserved rows change {change:.1%}")
    quoted = ", ".join(f"'{w}'" for w in words)
    return layers, f"erased {quoted} -> '{anchor}' on {fam.label}; " + "; ".join(notes)


class EraseConceptClosedForm(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsEraseClosedForm",
            display_name="Erase Concept (closed form)",
            category=ERASE,
            description="Edits every cross-attention key/value projection in closed form so the erased words (and "
                        "random neighbours of their embeddings, as in RealEra) give the anchor's keys and values, "
                        "while the preserved words keep theirs (UCE, Gandikota et al. 2024). On SD3.5 and Flux: the "
                        "layers that read the text encoder's output. Seconds, no training. Applied as weight "
                        "patches; optionally saved as a file LoraLoader reads.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit (SD1.x, SDXL, SD3.5 or Flux). It is not changed."),
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
                                     "and the end token (gentler; compared in docs/erase.md). SD3.5 / Flux: "
                                     "ignored (every row of the word's encoding is edited)."),
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
        if is_dit(model):
            layers, report = dit_edit(model, clip, words, anchor.strip(), kept, neighbours, radius, lam,
                                      preserve_weight, seed, rank)
        else:
            layers, report = kv_edit(model, clip, words, anchor.strip(), kept, neighbours, radius, tail_rows, lam,
                                     preserve_weight, seed, rank)
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
