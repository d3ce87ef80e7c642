"""Learn: train, save, load and apply personalized residuals (Ham et al., CVPR 2024)."""
from __future__ import annotations

import comfy.lora
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui

from ..core import residuals as R
from ..core import training
from ..core.hooks.gate import LowRankGate
from ..core.patching.comfy import apply_global, concept_positions, model_family, model_sites
from ..core.plots import line_plot
from ._support import (
    CATEGORY,
    Residuals,
    checked_sites,
    encode_views,
    log,
    residuals_to_cpu,
    save_path,
    save_residuals,
    step_progress,
    strengths_for,
    train_on_latents,
    training_inputs,
    training_patcher,
)


class TrainPersonalizedResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsTrainResiduals",
            display_name="Train Personalized Residuals",
            category=f"{CATEGORY}/learn",
            description="Learns a concept from a few images as low-rank residuals on every transformer block's "
                        "output projection, with the base model frozen (Ham et al., CVPR 2024). Saves a LoRA "
                        "file that the stock LoraLoader can also read.",
            inputs=[
                io.Model.Input("model", tooltip="The base model to personalise (SD1.x or SDXL). It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder that encodes 'a photo of a <token> <class word>'."),
                *training_inputs(
                    vae={},
                    images={},
                    class_word=dict(tooltip="The concept's broad class ('dog', 'mug', 'person'): the prompt is "
                                            "'a photo of a <token> <class word>'."),
                    token={},
                    steps=dict(default=150, tooltip="Optimisation steps; the paper uses 150."),
                    learning_rate=dict(default=1e-3, tooltip="AdamW learning rate; the paper uses 1e-3."),
                    batch_size=dict(default=4, tooltip="Images per step; the paper uses 4."),
                ),
                io.Float.Input("rank_ratio", default=0.05, min=0.001, max=1.0, step=0.005,
                               tooltip="Residual rank as a fraction of each layer's width (0.05 gives 16/32/64 "
                                       "on SD1.x's 320/640/1280 channels)."),
                *training_inputs(
                    seed=dict(default=0, tooltip="Seeds the initial residuals, the crops, noise and timesteps: "
                                                 "same seed, same result."),
                    resolution=dict(default=512),
                    views=dict(default=4),
                    save_name=dict(default="concepts/sks_dog"),
                    overwrite=dict(default=False, tooltip="Replace an existing file of the same name. Off: an "
                                                          "existing file stops the run before training."),
                    masks={},
                ),
                io.String.Input("target_blocks", default="", optional=True,
                                tooltip="Optional: train residuals only in these blocks, e.g. 'input, middle' or "
                                        "'output_blocks.9'. Empty: every transformer block (the paper)."),
                io.String.Input("captions", default="", multiline=True, optional=True,
                                tooltip="Optional: one caption per image, one per line in the batch's order (or "
                                        "one line for all), each with the token and the class word, e.g. 'a sks "
                                        "dog on a beach'. Name what else the picture shows so those words keep "
                                        "working with the concept. Empty: 'a photo of a <token> <class word>' "
                                        "(the paper)."),
                io.Boolean.Input("flip", default=True, optional=True,
                                 tooltip="Mirror some views at random (more variety from few images). Turn it off "
                                         "where left and right matter, e.g. captions that say 'on the left'."),
            ],
            outputs=[
                Residuals.Output(display_name="residuals", tooltip="The learned residual set."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, images, class_word, token, steps, learning_rate, batch_size, rank_ratio,
                seed, resolution, views, save_name, overwrite, masks=None, target_blocks="", captions="",
                flip=True):
        class_word, token = class_word.strip(), token.strip()
        if not class_word or not token:
            raise ValueError("give both a class word (e.g. 'dog') and a token (e.g. 'sks')")
        masks = training.check_images(images, masks)
        path = save_path(save_name, overwrite)
        prompts = training.image_prompts(token, class_word, (captions or "").splitlines(), images.shape[0])
        unique = list(dict.fromkeys(prompts))
        for prompt in unique:
            concept_positions(clip, prompt, [token, class_word])
        config = training.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
        family = model_family(model)
        meta = training.residual_metadata(family, class_word, token, config, resolution, prompts)
        progress = step_progress(steps)

        view_images, view_masks = training.make_views(images[..., :3].cpu(), None if masks is None else masks.cpu(),
                                                      resolution, views, seed, flip)
        with torch.no_grad():
            latents = encode_views(vae, view_images)
            conds = [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in unique]
        caption_of_view = None
        if len(unique) > 1:  # make_views keeps each image's views together
            caption_of_view = torch.tensor([unique.index(p) for p in prompts]).repeat_interleave(views)
        with torch.inference_mode(False), torch.enable_grad():
            latents = latents.detach().clone()  # tensors made under inference mode cannot enter autograd
            lat_masks = training.latent_masks(None if view_masks is None else view_masks.clone(),
                                              latents.shape[-2:])
            mp, device = training_patcher(model)
            sites = model_sites(mp)
            targets = R.select_sites([s for s, _ in sites], target_blocks or "")
            rs = R.init_residuals(targets, rank_ratio, seed=seed, device=device, metadata=meta)
            with LowRankGate(sites, rs):
                losses = train_on_latents(mp, conds[0] if caption_of_view is None else conds, latents,
                                          rs.parameters(), config, progress, lat_masks, caption_of_view, seed=seed)
        rs = residuals_to_cpu(rs)
        if path:
            save_residuals(rs, save_name, overwrite)
        log.info("trained %s residuals: loss %.4f -> %.4f", family, losses[0], losses[-1])
        curve = line_plot(losses)
        return io.NodeOutput(rs, curve, ui=ui.PreviewImage(curve, cls=cls))


class LoadResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsLoadResiduals",
            display_name="Load Residuals",
            category=f"{CATEGORY}/learn",
            description="Loads a residual file from models/loras.",
            inputs=[io.Combo.Input("residual_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A residual file trained by this pack (or any generic-key LoRA).")],
            outputs=[Residuals.Output(display_name="residuals")],
        )

    @classmethod
    def execute(cls, residual_name):
        return io.NodeOutput(R.load(folder_paths.get_full_path_or_raise("loras", residual_name)))


class SaveResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsSaveResiduals",
            display_name="Save Residuals",
            category=f"{CATEGORY}/learn",
            description="Saves residuals into models/loras, where LoraLoader and Load Residuals find them.",
            is_output_node=True,
            inputs=[
                Residuals.Input("residuals", tooltip="The residuals to save."),
                io.String.Input("save_name", default="concepts/my_concept",
                                tooltip="File name under models/loras (no extension)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name; off: stop with an error."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, residuals, save_name, overwrite):
        path = save_residuals(residuals, save_name, overwrite)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path}"))


class ApplyResiduals(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsApplyResiduals",
            display_name="Apply Residuals",
            category=f"{CATEGORY}/learn",
            description="Applies residuals everywhere in the image, as weight patches (the same result as the "
                        "stock LoraLoader at equal strength). The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the residuals were trained on."),
                Residuals.Input("residuals", tooltip="Residuals from Train or Load Residuals."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on every residual; 0 gives the base model."),
                io.String.Input("block_strengths", default="", optional=True,
                                tooltip="Optional per-block multipliers, e.g. 'input=1, middle=0.5, "
                                        "output_blocks.11=0' (longest matching name wins)."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, residuals, strength, block_strengths=""):
        checked_sites(model, residuals)
        key_map = comfy.lora.model_lora_keys_unet(model.model, {})
        m = apply_global(model, residuals, strength, strengths_for(block_strengths, residuals),
                         comfy.lora.load_lora, key_map)
        return io.NodeOutput(m)
