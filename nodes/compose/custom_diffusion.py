"""Custom Diffusion: concepts learned as cross-attention key/value updates, and their closed-form merge into one
model (Kumari et al. 2023). Every node returns a clone; no weight is written in place."""
from __future__ import annotations

import comfy.lora
import torch
from comfy_api.v0_0_2 import io, ui

from ...core import residuals as R
from ...core import training
from ...core.patching.comfy import apply_global, concept_positions, model_family, prompt_token_ids
from ...core.patching.comfy_compose import init_kv_residuals, kv_residuals, merge_lowrank
from ...core.plots import line_plot
from .._support import (
    CATEGORY,
    Residuals,
    check_kv_concept,
    encode_rows,
    encode_views,
    kv_modules,
    log,
    residuals_to_cpu,
    save_path,
    save_residuals,
    step_progress,
    train_on_latents,
    training_inputs,
    training_patcher,
)

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
                *training_inputs(
                    vae={},
                    images={},
                    class_word={},
                    token=dict(tooltip="A rare word standing for this concept (V*). Concepts to be merged need "
                                       "different tokens."),
                ),
                io.Int.Input("rank", default=16, min=1, max=1024,
                             tooltip="Rank of each K/V update (the paper updates the full matrices; 16 keeps "
                                     "files small; the merge is exact at any rank)."),
                *training_inputs(
                    steps=dict(default=250, tooltip="Optimisation steps (the paper: 250 for one concept)."),
                    learning_rate=dict(default=5e-4, min=1e-7, step=1e-5,
                                       tooltip="AdamW learning rate of the low-rank factors."),
                    batch_size=dict(default=2),
                    seed=dict(default=0, tooltip="Seeds the initial factors, crops, noise and timesteps: same "
                                                 "seed, same result."),
                    resolution=dict(default=512),
                    views=dict(default=4),
                    save_name=dict(default="concepts/cd_sks_dog"),
                    overwrite=dict(default=False, tooltip="Replace an existing file of the same name. Off: an "
                                                          "existing file stops the run before training."),
                    masks={},
                ),
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
        path = save_path(save_name, overwrite)
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
            latents = encode_views(vae, view_images)
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
        with torch.inference_mode(False), torch.enable_grad():
            latents = latents.detach().clone()
            lat_masks = training.latent_masks(None if view_masks is None else view_masks.clone(),
                                              latents.shape[-2:])
            mp, device = training_patcher(model)
            modules = kv_modules(mp)
            shapes = [(name, m.weight.shape[1], m.weight.shape[0]) for name, m in modules.items()]
            rs = init_kv_residuals(shapes, rank, seed=seed, device=device, metadata=meta)
            with kv_residuals(modules, rs):
                losses = train_on_latents(mp, cond, latents, rs.parameters(), config, progress, lat_masks, seed=seed)
        rs = residuals_to_cpu(rs)
        if path:
            save_residuals(rs, save_name, overwrite)
        log.info("trained Custom Diffusion K/V (%s, %d layers, rank %d): loss %.4f -> %.4f", family, len(rs.layers),
                 rank, losses[0], losses[-1])
        curve = line_plot(losses)
        return io.NodeOutput(rs, curve, ui=ui.PreviewImage(curve, cls=cls))


def concept_features(clip, rs: R.ResidualSet, constrain: str, label: str) -> tuple[torch.Tensor, str]:
    """C_i: the rows of the concept's training prompt that the merge must keep (``constrain``), and its token."""
    token, class_word = rs.metadata.get("token", "").strip(), rs.metadata.get("class_word", "").strip()
    if not token:
        raise R.ResidualFileError(f"{label} has no 'token' in its metadata: train it with Train Custom Diffusion "
                                  "(the merge needs the concept's prompt)")
    prompt = rs.metadata.get("prompt") or training.training_prompt(token, class_word)
    rows = encode_rows(clip, prompt)
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
        path = save_path(save_name, overwrite)
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
        c_reg = torch.cat([encode_rows(clip, c)[:77] for c in captions])
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
