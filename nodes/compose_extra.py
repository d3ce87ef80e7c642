"""Compose (issue 5, items 3-5): Custom Diffusion K/V training and closed-form merge, FreeCustom multi-reference
self-attention, Multi-Concept T2I-Zero (Correction by Similarities, Cross-Token NMS). Every node returns a clone
or a new conditioning; no weight is written in place."""
from __future__ import annotations

import comfy.ldm.modules.attention as comfy_attention
import comfy.lora
import comfy.model_management
import comfy.utils
import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..core import compose as C
from ..core import residuals as R
from ..core import training
from ..core.erase import KV_SUFFIXES, cross_attention_projections
from ..core.layouts import family_label
from ..core.patching.comfy import (
    apply_global,
    concept_positions,
    model_family,
    model_sites,
    prompt_token_ids,
    same_prompt,
)
from ..core.patching.comfy_compose import (
    KVResidualHooks,
    References,
    apply_freecustom,
    apply_nms,
    block_keys,
    decoder_finest_levels,
    freecustom_patches,
    init_kv_residuals,
    merge_lowrank,
    nms_patches,
    word_pool,
)
from ..core.plots import line_plot
from ..core.tokens import DEFAULT_TOKEN
from ._common import CATEGORY, Residuals, check_free, log, lora_path, save_residuals, step_progress, training_patcher
from .learn import _ResidualTrainer

COMPOSE = f"{CATEGORY}/compose"

# Custom Diffusion's merge keeps the merged K/V close to the base on these generic captions (the paper: ~1000
# LAION captions; we ship a small fixed list covering common subjects, styles and scenes; editable in the node).
DEFAULT_CAPTIONS = "\n".join([
    "a photo of a dog", "a photo of a cat", "a photo of a person", "a portrait of a woman", "a portrait of a man",
    "a photo of a car on the street", "a house in the countryside", "a city skyline at night",
    "a bowl of fruit on a table", "a cup of coffee", "a landscape with mountains and a lake",
    "a painting of flowers", "an oil painting of a ship at sea", "a watercolor of a forest",
    "a close-up photo of a bird", "a toy on a shelf", "a plate of food", "a child playing in the park",
    "a red chair in a room", "a beach at sunset", "a bicycle leaning on a wall", "a teddy bear",
    "a backpack", "a pair of shoes",
])
CONSTRAIN = ("token and class word", "token", "prompt")


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.replace(";", ",").replace("\n", ",").split(",") if w.strip()]


def _sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
    if start_percent <= 0.0 and end_percent >= 1.0:
        return float("inf"), 0.0
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))


def _encode(clip, text: str) -> torch.Tensor:
    """[L, D] conditioning rows of ``text`` as CLIPTextEncode makes them (SDXL: both encoders, concatenated)."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text))[0].float().cpu()


# ------------------------------------------------------------------------------------------ Custom Diffusion
def _kv_modules(model) -> dict:
    return dict(cross_attention_projections(model_sites(model)))


def check_kv_concept(rs: R.ResidualSet, model, label: str) -> dict:
    """The model's K/V modules after checking that ``rs`` is a Custom Diffusion K/V set for this model."""
    family = model_family(model)
    file_family = rs.metadata.get("base_family")
    if file_family and file_family != family:
        raise R.ResidualFileError(
            f"{label} was trained for {family_label(file_family)} ({file_family}) but the model is "
            f"{family_label(family)} ({family}); use concepts trained on this checkpoint's family")
    modules = _kv_modules(model)
    for path, layer in rs.layers.items():
        if not path.endswith(KV_SUFFIXES):
            raise R.ResidualFileError(
                f"{label}: '{path}' is not a cross-attention key/value projection; the merge takes Custom "
                "Diffusion K/V concepts (Train Custom Diffusion), not personalized residuals or other LoRAs")
        if path not in modules:
            raise R.ResidualFileError(f"{label} targets '{path}', which this {family_label(family)} model does "
                                      "not have: it was trained on a model with another block layout")
        w = modules[path].weight
        if tuple(layer.delta().shape) != tuple(w.shape):
            raise R.ResidualFileError(f"{label}: '{path}' is {tuple(w.shape)} in this model but "
                                      f"{tuple(layer.delta().shape)} in the concept: another model layout")
    return modules


class TrainCustomDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsTrainCustomDiffusion",
            display_name="Train Custom Diffusion (K/V)",
            category=COMPOSE,
            description="Learns a concept as updates of every cross-attention key and value projection (attn2.to_k "
                        "and to_v), the only weights Custom Diffusion fine-tunes (Kumari et al. 2023), here as "
                        "rank-r residuals trained on 'a photo of a <token> <class word>'. Concepts trained this way "
                        "merge into one model with Merge Custom Diffusion Concepts; the file also loads in "
                        "LoraLoader.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.x or SDXL). It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder that encodes 'a photo of a <token> <class word>'."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the images into latents."),
                io.Image.Input("images", tooltip="3-8 photos of the concept, as one batch."),
                io.String.Input("class_word", default="dog",
                                tooltip="The concept's broad class ('dog', 'mug'): the prompt is 'a photo of a "
                                        "<token> <class word>'."),
                io.String.Input("token", default=DEFAULT_TOKEN,
                                tooltip="A rare word standing for this concept (V*). Concepts to be merged need "
                                        "different tokens."),
                io.Int.Input("rank", default=16, min=1, max=1024,
                             tooltip="Rank of each K/V update (the paper updates the full matrices; 16 keeps "
                                     "files small; the merge is exact at any rank)."),
                io.Int.Input("steps", default=250, min=1, max=10000,
                             tooltip="Optimisation steps (the paper: 250 for one concept)."),
                io.Float.Input("learning_rate", default=5e-4, min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the low-rank factors."),
                io.Int.Input("batch_size", default=2, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the initial factors, crops, noise and timesteps: same seed, same "
                                     "result."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Square training resolution in pixels (images are cropped and resized)."),
                io.Int.Input("views", default=4, min=1, max=32,
                             tooltip="Augmented views per image (random crops and flips), encoded once."),
                io.String.Input("save_name", default="concepts/cd_sks_dog",
                                tooltip="File name under models/loras (no extension). Empty: do not save."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name. Off: an existing file "
                                         "stops the run before training."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional: one mask per image; the loss only counts pixels inside it."),
            ],
            outputs=[
                Residuals.Output(display_name="concept", tooltip="The learned K/V updates (a residual set)."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, class_word, token, rank, steps, learning_rate, batch_size, seed,
                resolution, views, save_name, overwrite, masks=None):
        class_word, token = class_word.strip(), token.strip()
        if not class_word or not token:
            raise ValueError("give both a class word (e.g. 'dog') and a token (e.g. 'sks')")
        masks = training.check_images(images, masks)
        path = lora_path(save_name) if save_name.strip() else None
        if path:
            check_free(path, overwrite)
        prompt = training.training_prompt(token, class_word)
        concept_positions(clip, prompt, [token, class_word])
        config = training.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
        family = model_family(model)
        meta = training.residual_metadata(family, class_word, token, config, resolution)
        meta.update(technique="custom_diffusion", rank=str(rank), targets="attn2.to_k, attn2.to_v")
        progress = step_progress(steps)

        view_images, view_masks = training.make_views(images[..., :3].cpu(), None if masks is None else masks.cpu(),
                                                      resolution, views, seed)
        with torch.no_grad():
            latents = torch.cat([vae.encode(view_images[i:i + 4]) for i in range(0, len(view_images), 4)])
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        with torch.inference_mode(False), torch.enable_grad():
            latents = latents.detach().clone()
            lat_masks = training.latent_masks(None if view_masks is None else view_masks.clone(),
                                              latents.shape[-2:])
            mp, device = training_patcher(model)
            modules = _kv_modules(mp)
            shapes = [(name, m.weight.shape[1], m.weight.shape[0]) for name, m in modules.items()]
            rs = init_kv_residuals(shapes, rank, seed=seed, device=device, metadata=meta)
            trainer = _ResidualTrainer(rs.parameters(), config, progress, lat_masks)
            guider = Guider_Basic(mp)
            guider.set_conds(cond)
            with KVResidualHooks(modules, rs):
                guider.sample(torch.zeros_like(latents), latents, trainer, torch.zeros(len(latents)), seed=seed)
        rs = rs.detached()
        for layer in rs.layers.values():
            layer.down, layer.up = layer.down.cpu(), layer.up.cpu()
        if path:
            save_residuals(rs, save_name, overwrite)
        log.info("trained Custom Diffusion K/V (%s, %d layers, rank %d): loss %.4f -> %.4f", family, len(rs.layers),
                 rank, trainer.losses[0], trainer.losses[-1])
        curve = line_plot(trainer.losses)
        return io.NodeOutput(rs, curve, ui=ui.PreviewImage(curve, cls=cls))


def concept_features(clip, rs: R.ResidualSet, constrain: str, label: str) -> tuple[torch.Tensor, str]:
    """C_i: the rows of the concept's training prompt that the merge must keep (``constrain``), and its token."""
    token, class_word = rs.metadata.get("token", "").strip(), rs.metadata.get("class_word", "").strip()
    if not token:
        raise R.ResidualFileError(f"{label} has no 'token' in its metadata: train it with Train Custom Diffusion "
                                  "(the merge needs the concept's prompt)")
    prompt = rs.metadata.get("prompt") or training.training_prompt(token, class_word)
    rows = _encode(clip, prompt)
    if constrain == "prompt":
        ids = prompt_token_ids(clip, prompt)
        end = prompt_token_ids(clip, "")[1]
        positions = list(range(1, ids.index(end) + 1))  # every word token and the end token
    else:
        words = [token] + ([class_word] if constrain == "token and class word" and class_word else [])
        positions = concept_positions(clip, prompt, words)
    return rows[positions], token


class MergeCustomDiffusion(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsMergeCustomDiffusion",
            display_name="Merge Custom Diffusion Concepts",
            category=COMPOSE,
            description="Merges 2-4 Custom Diffusion K/V concepts into one model in closed form (Kumari et al. "
                        "2023, Sec. 3.2): each K/V weight becomes the one closest to the base on generic captions "
                        "while giving exactly each concept's fine-tuned keys/values on its own token features. "
                        "Applied as weight patches (nothing extra at sampling time); optionally saved as a LoRA.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The base model the concepts were trained on. It is not changed."),
                io.Clip.Input("clip", tooltip="The model's text encoder: it encodes the concepts' prompts and the "
                                              "regularisation captions."),
                Residuals.Input("concept_1", tooltip="A concept from Train Custom Diffusion or Load Residuals."),
                Residuals.Input("concept_2", optional=True, tooltip="A second concept (needs its own token)."),
                Residuals.Input("concept_3", optional=True, tooltip="Optional third concept."),
                Residuals.Input("concept_4", optional=True, tooltip="Optional fourth concept."),
                io.Combo.Input("constrain", options=list(CONSTRAIN), default=CONSTRAIN[0],
                               tooltip="Which text features of each concept's prompt must keep the concept's own "
                                       "keys/values: its token and class word (default), the token only, or "
                                       "every word of its prompt."),
                io.String.Input("regularization_captions", multiline=True, default=DEFAULT_CAPTIONS,
                                tooltip="Generic captions, one per line: on their text features the merged "
                                        "weights stay as close as possible to the base model."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on the merged update; 0 gives the base model."),
                io.String.Input("save_name", default="", optional=True,
                                tooltip="Optional: save the merged update under models/loras (no extension); "
                                        "LoraLoader reads it. Empty: do not save."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing file of the same name."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the merged concepts (a clone).")],
        )

    @classmethod
    def execute(cls, model, clip, concept_1, constrain, regularization_captions, strength, concept_2=None,
                concept_3=None, concept_4=None, save_name="", overwrite=False):
        concepts = [c for c in (concept_1, concept_2, concept_3, concept_4) if c is not None]
        labels = [f"concept {i + 1}" for i in range(len(concepts))]
        for rs, label in zip(concepts, labels, strict=True):
            check_kv_concept(rs, model, label)
        path = lora_path(save_name) if (save_name or "").strip() else None
        if path:
            check_free(path, overwrite)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        if len(concepts) == 1:
            # nothing to merge: the fine-tuned weights are the answer (the closed form with one concept would keep
            # only their action on the concept's own features)
            report = "one concept: nothing to merge; its K/V updates are applied as trained"
            if path:
                report += f"; saved {save_residuals(concept_1, save_name, overwrite)}"
            log.info(report)
            m = apply_global(model, concept_1, strength, {}, comfy.lora.load_lora, key_map)
            return io.NodeOutput(m, ui=ui.PreviewText(report))
        feats, tokens = [], []
        for rs, label in zip(concepts, labels, strict=True):
            f, tok = concept_features(clip, rs, constrain, label)
            if tok in tokens:
                raise ValueError(f"{labels[tokens.index(tok)]} and {label} both use the token '{tok}': their "
                                 "constraints contradict each other; train each concept with its own token")
            feats.append(f)
            tokens.append(tok)
        captions = [c.strip() for c in regularization_captions.splitlines() if c.strip()]
        if not captions:
            raise ValueError("give at least one regularisation caption (one per line)")
        c_reg = torch.cat([_encode(clip, c)[:77] for c in captions])
        names = sorted({name for rs in concepts for name in rs.layers})
        # W0: the checkpoint's own weights (ComfyUI's backup when another clone has patched the module in place)
        kp = model.get_key_patches("diffusion_model.")
        base = {name: kp[f"diffusion_model.{name}.weight"][0][0].detach().float().cpu() for name in names}
        deltas = [{k: v.delta().double() for k, v in rs.layers.items()} for rs in concepts]
        result = merge_lowrank(base, deltas, feats, c_reg)
        meta = {"technique": "custom_diffusion_merge", "base_family": model_family(model),
                "tokens": ", ".join(tokens), "class_words": ", ".join(rs.metadata.get("class_word", "")
                                                                     for rs in concepts),
                "constrain": constrain, "captions": str(len(captions))}
        merged = R.ResidualSet(result.layers, meta)
        rank = sum(f.shape[0] for f in feats)
        report = (f"merged {len(concepts)} concepts ({', '.join(tokens)}) into {len(result.layers)} K/V layers: "
                  f"rank {rank} update, constraints hold to {result.constraint_error:.1e} (relative), "
                  f"{len(captions)} regularisation captions")
        if path:
            report += f"; saved {save_residuals(merged, save_name, overwrite)}"
        log.info(report)
        m = apply_global(model, merged, strength, {}, comfy.lora.load_lora, key_map)
        return io.NodeOutput(m, ui=ui.PreviewText(report))


# ------------------------------------------------------------------------------------------ FreeCustom
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
        if not set(_words(blocks)) <= {"input", "middle", "output"}:
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
        ws = [float(w) for w in _words(weights or "")] or [weight] * n_ref
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
            context = torch.stack([_encode(clip, p)[:77] for p in prompts])
        refs = References(lat, context, masks, ws, keys, mode, _sigma_range(model, start_percent, end_percent), seed)
        if not refs.active:
            log.info("FreeCustom: every reference has weight 0 or an empty mask: the model is unchanged")
        patches = freecustom_patches(refs, model.get_model_object("model_sampling"))
        return io.NodeOutput(apply_freecustom(model, patches, "comfyui-concepts-freecustom"))


# ------------------------------------------------------------------------------------------ T2I-Zero
def _concept_positions(clip, text: str, concepts: str) -> list[list[int]]:
    groups = [c.split() for c in _words(concepts)]
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
        _check_conditioning(conditioning, _encode(clip, text), [], text)
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
        sigma_range = _sigma_range(model, start_percent, end_percent)
        encoded = _encode(clip, text)
        _check_conditioning(positive, encoded, [p for c in positions for p in c], text)
        if len(positions) < 2:
            log.info("Cross-Token NMS with one concept changes nothing: the model is returned unpatched")
            return io.NodeOutput(model.clone())
        reference = positive[0][0][0]
        patches = nms_patches(positions, reference, comfy_attention.optimized_attention, sigma_range, smoothing,
                              "Connect the same conditioning to this node's 'positive' and to the sampler.")
        paths = [s.path for s, _ in model_sites(model)]
        return io.NodeOutput(apply_nms(model, patches, paths, "comfyui-concepts-nms"))
