"""Compose: several learned concepts or community LoRAs in one image, each in its own region, in one pass."""
from __future__ import annotations

import contextlib
import re

import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..core import lora_files as L
from ..core import training
from ..core.compose import OVERLAP_RULES
from ..core.cut_mix import cut_mix, gated_residuals, spread_rows, trainable_copy, unmix_term
from ..core.layouts import family_label
from ..core.masks import RULES
from ..core.patching import comfy as P
from ..core.plots import line_plot
from ..core.regions import Region
from ._common import CATEGORY, Residuals, checked_sites, log, step_progress, training_patcher
from .learn import _ResidualTrainer

Regions = io.Custom("CONCEPT_REGIONS")
NONE = "none"


def lora_region_layers(model, lora_name: str) -> dict:
    """The UNet layers of a LoRA file mapped onto this model, after family and shape checks."""
    family = P.model_family(model)
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    stated = file_family(path)
    if stated and stated != family:
        raise L.LoraFamilyError(f"'{lora_name}' was made for {family_label(stated)} but the model is "
                                f"{family_label(family)}: pick a LoRA for this model")
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    spec = L.spec_from_unet_config(model.model.model_config.unet_config, family)
    lf = L.read_lora(sd, family=family, spec=spec)
    shapes = {p: tuple(m.weight.shape) for p, m in P.model_modules(model).items()}
    L.check_shapes(lf.layers, shapes, family)
    if lf.skipped_text_encoder:
        log.info("%s: %d text-encoder keys left out (a region acts on the UNet only)", lora_name,
                 lf.skipped_text_encoder)
    return lf.layers


def file_family(path: str) -> str:
    """The model family a safetensors file states in its metadata (this pack's files do), or ''."""
    if not path.endswith(".safetensors"):
        return ""
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        return (f.metadata() or {}).get("base_family", "")


def split_words(text: str) -> list[str]:
    return [w for w in re.split(r"[,\s]+", text or "") if w]


class ConceptRegion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsRegion",
            display_name="Concept Region",
            category=f"{CATEGORY}/compose",
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
            category=f"{CATEGORY}/compose",
            description="Applies every region in the same UNet pass: each delta is added only inside its mask or "
                        "where its words attend (LAG), overlaps decided by the rule. Encodes the prompt too: connect "
                        "'positive' to the sampler (KSampler or SamplerCustomAdvanced).",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.x or SDXL); it is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder; the prompt below is encoded with it."),
                Regions.Input("regions", tooltip="From Concept Region."),
                io.String.Input("text", multiline=True, default="a photo of a sks dog and a cat",
                                tooltip="The positive prompt; it must contain every word-gated region's words."),
                io.Combo.Input("overlap", options=list(OVERLAP_RULES), default="argmax",
                               tooltip="Where regions overlap: argmax = the larger attention (or mask value) wins, "
                                       "sum = both apply, error = stop and say which regions overlap."),
                io.Combo.Input("mask_rule", options=list(RULES), default="median",
                               tooltip="How a word region's attention becomes a mask (median: LAG's rule)."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Conditioning.Output(display_name="positive", tooltip="Connect to the sampler's positive input."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, regions, text, overlap, mask_rule):
        if not regions:
            raise ValueError("no regions: connect Concept Region")
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
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
                tokens = P.concept_positions(clip, text, entry["words"])
            built.append(Region(layers, entry["strength"], tokens, entry["mask"], name))
        ref = positive[0][0][0] if any(r.tokens for r in built) else None
        return io.NodeOutput(P.apply_regions(model, built, ref, overlap, mask_rule), positive)


class TrainConceptsTogether(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsTrainTogether",
            display_name="Train Concepts Together (Cut-Mix)",
            category=f"{CATEGORY}/compose",
            description="Fine-tunes two learned residual sets together on Cut-Mix images (SVDiff): every pair of "
                        "their photos cut around the objects and put side by side, A left, B right, each residual "
                        "active only in its own half, as Apply Regions uses them with the two half masks it "
                        "outputs. Each residual learns its concept while the other acts beside it.",
            inputs=[
                io.Model.Input("model", tooltip="The base model both residual sets were trained on; not changed."),
                io.Clip.Input("clip", tooltip="The text encoder; the caption below is encoded with it."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the Cut-Mix images into latents."),
                Residuals.Input("residuals_a", tooltip="Concept A's residuals (Train or Load Residuals): left half."),
                io.Image.Input("images_a", tooltip="Concept A's photos (the ones it was trained on, or others)."),
                Residuals.Input("residuals_b", tooltip="Concept B's residuals: right half."),
                io.Image.Input("images_b", tooltip="Concept B's photos."),
                io.String.Input("caption", default="",
                                tooltip="The caption of every Cut-Mix image, naming both tokens and class words, A "
                                        "first, e.g. 'a photo of a sks dog and a zwx cat'. Empty: built from the "
                                        "two files' tokens and class words like that."),
                io.Int.Input("steps", default=300, min=1, max=10000,
                             tooltip="Optimisation steps over the Cut-Mix images."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate (the residual trainer's default)."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Cut-Mix images per step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the crops, noise and timesteps: same seed, same result."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Square training resolution in pixels; the half masks come out this size."),
                io.Int.Input("views", default=2, min=1, max=32,
                             tooltip="Random crops per Cut-Mix image (never mirrored: that would swap the halves)."),
                io.Int.Input("max_pairs", default=16, min=1, max=256,
                             tooltip="At most this many (A photo, B photo) pairs, spread over all of them."),
                io.Float.Input("scale", default=1.0, min=0.25, max=1.0, step=0.05,
                               tooltip="Shrink each photo first (border pixels fill the frame), so the objects "
                                       "are the size they have when two share a picture. 1: no shrinking."),
                io.Float.Input("unmix_weight", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="SVDiff's Unmix term: penalises each token's cross-attention in the other "
                                       "concept's half, at this weight (0: off). Needs both files' tokens. On the "
                                       "toy world 5 and 20 did not help (README, Cut-Mix)."),
                io.Mask.Input("masks_a", optional=True,
                              tooltip="Optional: one mask per A photo; the cut is centred on it (else the centre)."),
                io.Mask.Input("masks_b", optional=True, tooltip="Optional: one mask per B photo, as masks_a."),
            ],
            outputs=[
                Residuals.Output(display_name="residuals_a", tooltip="A's residuals after the joint training."),
                Residuals.Output(display_name="residuals_b", tooltip="B's residuals after the joint training."),
                io.Mask.Output(display_name="mask_a", tooltip="The left half: A's mask for Concept Region."),
                io.Mask.Output(display_name="mask_b", tooltip="The right half: B's mask for Concept Region."),
                io.Image.Output(display_name="cut_mix_images", tooltip="The images it trained on."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, residuals_a, images_a, residuals_b, images_b, caption, steps, learning_rate,
                batch_size, seed, resolution, views, max_pairs, scale, unmix_weight=0.0, masks_a=None, masks_b=None):
        tokens = []
        for rs in (residuals_a, residuals_b):
            checked_sites(model, rs)
            tokens.append((rs.metadata.get("token", ""), rs.metadata.get("class_word", "")))
        if tokens[0][0] and tokens[0][0] == tokens[1][0]:
            raise ValueError(f"both residual sets use the token '{tokens[0][0]}': retrain one with another token, "
                             "or the caption cannot tell them apart")
        if not caption.strip() and not all(w for pair in tokens for w in pair):
            raise ValueError("a residual set does not name its token and class word (not trained by this pack?): "
                             "write the caption yourself, naming both concepts, A first")
        caption = caption.strip() or f"a photo of a {tokens[0][0]} {tokens[0][1]} and a {tokens[1][0]} {tokens[1][1]}"
        for words in tokens:
            P.concept_positions(clip, caption, [w for w in words if w])  # clear error for a word the caption lacks
        if unmix_weight > 0 and not all(token for token, _ in tokens):
            raise ValueError("unmix_weight needs each residual set's token (the attention it confines to its half), "
                             "and a file here names none: set unmix_weight to 0, or retrain it with this pack")
        masks_a = training.check_images(images_a, masks_a)
        masks_b = training.check_images(images_b, masks_b)

        def square(images, masks):  # the centre crop at the training resolution (make_views' first view)
            return training.make_views(images[..., :3].cpu(), None if masks is None else masks.cpu(), resolution, 1,
                                       seed, False)
        mixed, left, right = cut_mix(*square(images_a, masks_a), *square(images_b, masks_b), scale)
        mixed = mixed[spread_rows(mixed.shape[0], max_pairs)]
        view_images, _ = training.make_views(mixed, None, resolution, views, seed, False)
        config = training.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
        progress = step_progress(steps)
        with torch.no_grad():
            latents = torch.cat([vae.encode(view_images[i:i + 4]) for i in range(0, len(view_images), 4)])
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
        with torch.inference_mode(False), torch.enable_grad():
            latents = latents.detach().clone()  # tensors made under inference mode cannot enter autograd
            mp, device = training_patcher(model)
            sets = [trainable_copy(rs, device) for rs in (residuals_a, residuals_b)]
            trainer = _ResidualTrainer([p for rs in sets for p in rs.parameters()], config, progress, None)
            guider = Guider_Basic(mp)
            guider.set_conds(cond)
            unmix = contextlib.nullcontext()
            if unmix_weight > 0:
                positions = [P.concept_positions(clip, caption, [token]) for token, _ in tokens]
                unmix = unmix_term(P.model_sites(mp), positions, [left, right], tuple(latents.shape[-2:]), unmix_weight)
            with gated_residuals(P.model_modules(mp), [(sets[0], left), (sets[1], right)]), unmix as extra:
                trainer.extra_loss = extra
                guider.sample(torch.zeros_like(latents), latents, trainer, torch.zeros(len(latents)), seed=seed)
        out = []
        for rs, (other, _) in zip(sets, reversed(tokens), strict=True):
            rs = rs.detached()
            for layer in rs.layers.values():
                layer.down, layer.up = layer.down.cpu(), layer.up.cpu()
            rs.metadata.update(cut_mix_with=other, cut_mix_caption=caption, cut_mix_steps=str(steps),
                               cut_mix_unmix=f"{unmix_weight:g}")
            out.append(rs)
        log.info("trained %s and %s together on %d Cut-Mix images: loss %.4f -> %.4f", tokens[0][0], tokens[1][0],
                 mixed.shape[0], trainer.losses[0], trainer.losses[-1])
        curve = line_plot(trainer.losses)
        return io.NodeOutput(out[0], out[1], left[None], right[None], mixed, curve,
                             ui=ui.PreviewImage(mixed[:8], cls=cls))
