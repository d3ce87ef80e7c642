"""Regions: several learned concepts or community LoRAs in one image, each in its own region, in one pass."""
from __future__ import annotations

import re

import comfy.lora
import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ...core import lora_files as L
from ...core.compose import OVERLAP_RULES
from ...core.layouts import family_label
from ...core.masks import RULES
from ...core.patching import comfy as P
from ...core.regions import TEXT_LAYERS, Region
from .._support import CATEGORY, Residuals, checked_sites, log

Regions = io.Custom("CONCEPT_REGIONS")
NONE = "none"
COMPOSE = f"{CATEGORY}/compose"


def lora_region_layers(model, lora_name: str) -> dict:
    """The layers of a LoRA file mapped onto this model's diffusion model, after family and shape checks."""
    family = P.model_family(model)
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    if path.endswith(".safetensors"):
        sd, meta = L.load_lora_file(path)  # checked: readable, complete, finite, matching factor ranks
    else:  # .pt / .ckpt, read as ComfyUI reads them
        sd, meta = comfy.utils.load_torch_file(path, safe_load=True), {}
        L.check_lora_tensors(sd, path)
    stated = meta.get("base_family", "")
    if stated and stated != family:
        raise L.LoraFamilyError(f"'{lora_name}' was made for {family_label(stated)} but the model is "
                                f"{family_label(family)}: pick a LoRA for this model")
    if P.is_dit(model):  # every key format the stock loader reads for this model, through its own key map
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        widths = {p: int(m.weight.shape[0]) for p, m in P.model_modules(model).items()}
        try:
            return L.read_keyed_lora(sd, key_map, widths, family).layers
        except L.LoraFileError as e:
            raise L.LoraFileError(f"'{lora_name}': {e}") from e
    spec = L.spec_from_unet_config(model.model.model_config.unet_config, family)
    lf = L.read_lora(sd, family=family, spec=spec)
    shapes = {p: tuple(m.weight.shape) for p, m in P.model_modules(model).items()}
    L.check_shapes(lf.layers, shapes, family)
    if lf.skipped_text_encoder:
        log.info("%s: %d text-encoder keys left out (a region acts on the UNet only)", lora_name,
                 lf.skipped_text_encoder)
    return lf.layers


def split_words(text: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", text or "") if w]


class ConceptRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsRegion",
            display_name="Concept Region",
            category=COMPOSE,
            description="Adds one region to a list: learned residuals or a community LoRA file (kohya, generic, "
                        "LoCon), limited to a mask or to where its words attend. Chain several, then Apply Regions.",
            inputs=[
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on this region's delta; 0 turns it off."),
                io.String.Input("words", default="",
                                tooltip="Words of the prompt whose cross-attention gates the region (e.g. 'sks dog'). "
                                        "Empty: the residuals' token and class word; ignored when a mask is given."),
                Regions.Input("regions", optional=True, tooltip="Regions added so far (chain Concept Region nodes)."),
                Residuals.Input("residuals", optional=True, tooltip="Learned residuals (Train or Load Residuals)."),
                io.Combo.Input("lora_name", options=[NONE] + folder_paths.get_filename_list("loras"), default=NONE,
                               optional=True, tooltip="Or a LoRA file from models/loras, applied at sampling time, "
                                                      "not merged, only inside the region."),
                io.Mask.Input("mask", optional=True,
                              tooltip="A mask for the region (any size; resized to each layer, a note is logged "
                                      "when its aspect ratio differs from the image's)."),
            ],
            outputs=[Regions.Output(display_name="regions")],
        )

    @classmethod
    def execute(cls, strength, words, regions=None, residuals=None, lora_name=NONE, mask=None):
        if (residuals is None) == (lora_name in (None, "", NONE)):
            raise ValueError("give this region either residuals or a LoRA file (exactly one)")
        entry = dict(strength=strength, words=split_words(words), residuals=residuals,
                     lora_name=None if residuals is not None else lora_name, mask=None)
        if mask is not None:
            m = mask[0] if mask.ndim == 3 else mask
            if float(m.max()) <= 0:
                raise ValueError("the region's mask is empty: paint the region or leave the mask unconnected")
            entry["mask"] = m.float().cpu()
        if entry["mask"] is None and not entry["words"]:
            meta = residuals.metadata if residuals is not None else {}
            entry["words"] = [w for w in (meta.get("token", ""), meta.get("class_word", "")) if w]
            if not entry["words"]:
                raise ValueError("a LoRA region needs words of the prompt or a mask to say where it goes")
        return io.NodeOutput(list(regions or []) + [entry])


class ApplyRegions(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsApplyRegions",
            display_name="Apply Regions",
            category=COMPOSE,
            description="Applies every region in the same model pass: each delta is added only inside its mask or "
                        "where its words attend (LAG), overlaps decided by the rule. Encodes the prompt too: connect "
                        "'positive' to the sampler (KSampler or SamplerCustomAdvanced). SD1.x, SDXL, SD3.5, Flux.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.x, SDXL, SD3.5 or Flux); it is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder; the prompt below is encoded with it."),
                Regions.Input("regions", tooltip="From Concept Region."),
                io.String.Input("text", multiline=True, default="a photo of a sks dog and a cat",
                                tooltip="The positive prompt; it must contain every word-gated region's words."),
                io.Combo.Input("overlap", options=list(OVERLAP_RULES), default="argmax",
                               tooltip="Where regions overlap: argmax = the larger attention (or mask value) wins, "
                                       "sum = both apply, error = stop and say which regions overlap."),
                io.Combo.Input("mask_rule", options=list(RULES), default="median",
                               tooltip="How a word region's attention becomes a mask (median: LAG's rule)."),
                io.Combo.Input("text_layers", options=list(TEXT_LAYERS), default="skip", optional=True,
                               tooltip="SD3.5 / Flux only: a LoRA's text-stream and modulation layers have no place "
                                       "in the image. skip = leave them out (regions stay apart); everywhere = apply "
                                       "them to the whole image (one full-image region = the LoRA loaded normally, "
                                       "but several regions' text layers mix)."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Conditioning.Output(display_name="positive", tooltip="Connect to the sampler's positive input."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, regions, text, overlap, mask_rule, text_layers="skip"):
        if not regions:
            raise ValueError("no regions: connect Concept Region")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        context_length = positive[0][0].shape[1]
        built = []
        for i, entry in enumerate(regions):
            if entry["residuals"] is not None:
                checked_sites(model, entry["residuals"])
                layers = dict(entry["residuals"].layers)
                name = entry["residuals"].metadata.get("token", "") or f"region {i + 1}"
            else:
                layers = lora_region_layers(model, entry["lora_name"])
                name = entry["lora_name"]
            tokens = None
            if entry["mask"] is None:
                tokens = P.concept_positions(clip, text, entry["words"], context_length=context_length)
            built.append(Region(layers, entry["strength"], tokens, entry["mask"], name))
        ref = positive[0][0][0] if any(r.tokens for r in built) else None
        return io.NodeOutput(P.apply_regions(model, built, ref, overlap, mask_rule, text_layers), positive)
