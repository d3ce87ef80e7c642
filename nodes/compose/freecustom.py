"""FreeCustom: training-free multi-concept composition by multi-reference self-attention (Ding et al. 2024). The
node returns a clone; no weight is written in place."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io

from ...core import residuals as R
from ...core.patching.comfy import model_sites
from ...core.patching.comfy_compose import (
    References,
    apply_freecustom,
    block_keys,
    decoder_finest_levels,
    freecustom_patches,
)
from .._support import CATEGORY, comma_list, encode_rows, log, sigma_range

COMPOSE = f"{CATEGORY}/compose"


def _resize(t: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """[N, H, W] or [N, H, W, C] resized bilinearly to ``hw``."""
    if t.dim() == 3:
        return F.interpolate(t[:, None].float(), size=hw, mode="bilinear", align_corners=False)[:, 0]
    return F.interpolate(t.permute(0, 3, 1, 2).float(), size=hw, mode="bilinear",
                         align_corners=False).permute(0, 2, 3, 1)


def _per_reference(text: str, count: int, what: str) -> list[str]:
    lines = [line.strip() for line in text.splitlines()] if text.strip() else [""]
    lines = [line for line in lines if line] or [""]
    if len(lines) == 1:
        return lines * count
    if len(lines) != count:
        raise ValueError(f"{len(lines)} {what} for {count} references: give one per reference (one per line) or "
                         "one for all")
    return lines


def _chosen_blocks(sites, blocks: str):
    """The sites named by ``blocks`` ('auto': the decoder's two finest levels, FreeCustom's layers on SD1.x). A
    model without transformers in the named parts (a decoder without any) falls back to every block, with a log
    line; a name that is no block at all is an error."""
    if blocks.strip().lower() in ("auto", ""):
        chosen = decoder_finest_levels(sites)
        if chosen:
            return chosen
        log.warning("FreeCustom: this model's decoder has no transformer block; MRSA acts on every block")
        return list(sites)
    try:
        return R.select_sites(sites, blocks)
    except ValueError:
        if not set(comma_list(blocks)) <= {"input", "middle", "output"}:
            raise
        log.warning("FreeCustom: this model has no transformer block in '%s'; MRSA acts on every block", blocks)
        return list(sites)


class FreeCustom(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsFreeCustom",
            display_name="FreeCustom (multi-reference attention)",
            category=COMPOSE,
            description="Training-free multi-concept composition (FreeCustom, Ding et al. 2024): each step the "
                        "reference images are noised to the step's noise level and run through the model, and the "
                        "generated image's self-attention also attends to their keys/values inside each "
                        "reference's mask, with weighted masks (MRSA). One reference image and mask per concept. "
                        "Acts on the prompt's rows; the negative prompt keeps plain self-attention.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with. It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder for the references' prompts."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the reference images."),
                io.Image.Input("references", tooltip="One image per concept, as a batch (or one image shared by all "
                                                     "masks, e.g. two objects in one photo)."),
                io.Mask.Input("masks", tooltip="One mask per concept, marking the concept in its reference. A mask "
                                               "of another size than its image is resized (logged)."),
                io.String.Input("reference_prompts", multiline=True, default="a photo of an object",
                                tooltip="What each reference shows, one line per reference (or one line for "
                                        "all); the references are denoised with these prompts."),
                io.Float.Input("weight", default=3.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Weighted-mask strength: mode 'add' multiplies each masked reference key's "
                                       "attention by e^(weight x mask) (official code); 0 turns MRSA off."),
                io.String.Input("weights", default="", optional=True,
                                tooltip="Optional per-reference weights, comma-separated (e.g. '3, 2'); empty: "
                                        "'weight' for every reference."),
                io.Combo.Input("mode", options=["add", "log"], default="add",
                               tooltip="add: logit bias weight x mask (FreeCustom's code); log: bias "
                                       "log(weight x mask), so weight 1 is neutral and scales linearly."),
                io.String.Input("blocks", default="auto",
                                tooltip="Where MRSA acts: 'auto' (the decoder's two finest levels: "
                                        "output_blocks.6-11 on SD1.x, FreeCustom's layers), 'output', 'input, "
                                        "middle, output', or ldm paths such as 'output_blocks.9'."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress at which MRSA starts."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Sampling progress after which the model runs unchanged."),
                io.Int.Input("resolution", default=512, min=0, max=4096, step=8,
                             tooltip="References and masks are resized to this square size before encoding "
                                     "(0: keep their size). Match it to the generated image's size."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the noise the references are noised with (fresh at every step, as "
                                     "FreeCustom does): same seed, same result."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with MRSA (a clone).")],
        )

    @classmethod
    def execute(cls, model, clip, vae, references, masks, reference_prompts, weight, mode, blocks, start_percent,
                end_percent, resolution, seed, weights=""):
        if masks.dim() == 2:
            masks = masks[None]
        n_ref = masks.shape[0]
        if references.shape[0] not in (1, n_ref):
            raise ValueError(f"{references.shape[0]} reference images for {n_ref} masks: give one image per mask, "
                             "or one image shared by all masks")
        images = references[..., :3].cpu().float()
        if images.shape[0] == 1 and n_ref > 1:
            images = images.expand(n_ref, -1, -1, -1)
        if tuple(masks.shape[1:]) != tuple(images.shape[1:3]):
            log.warning("FreeCustom: the masks are %s but the references %s (height, width): masks resized",
                        tuple(masks.shape[1:]), tuple(images.shape[1:3]))
            masks = _resize(masks.cpu(), tuple(images.shape[1:3]))
        masks = masks.cpu().float().clamp(0, 1)
        if resolution > 0 and tuple(images.shape[1:3]) != (resolution, resolution):
            images = _resize(images, (resolution, resolution)).clamp(0, 1)
            masks = _resize(masks, (resolution, resolution)).clamp(0, 1)
        ws = [float(w) for w in comma_list(weights or "")] or [weight] * n_ref
        if len(ws) != n_ref:
            raise ValueError(f"{len(ws)} weights for {n_ref} references: give one per reference or leave "
                             "'weights' empty")
        if any(w < 0 for w in ws):
            raise ValueError("reference weights must be >= 0")
        for i in range(n_ref):
            if not (masks[i] > 0).any():
                log.warning("FreeCustom: mask %d is empty; reference %d is left out", i + 1, i + 1)
        prompts = _per_reference(reference_prompts, n_ref, "reference prompts")
        sites = model_sites(model)
        chosen = _chosen_blocks([s for s, _ in sites], blocks)
        keys = set(block_keys([s.path for s in chosen]))
        latent_format = model.get_model_object("latent_format")
        with torch.no_grad():
            lat = torch.cat([vae.encode(images[i:i + 1]) for i in range(n_ref)]).float().cpu()
            lat = latent_format.process_in(lat)
            context = torch.stack([encode_rows(clip, p)[:77] for p in prompts])
        refs = References(lat, context, masks, ws, keys, mode, sigma_range(model, start_percent, end_percent), seed)
        if not refs.active:
            log.info("FreeCustom: every reference has weight 0 or an empty mask: the model is unchanged")
        patches = freecustom_patches(refs, model.get_model_object("model_sampling"))
        return io.NodeOutput(apply_freecustom(model, patches, "comfyui-concepts-freecustom"))
