"""Learn: train, save, load and apply personalized residuals (Ham et al., CVPR 2024)."""
from __future__ import annotations

import comfy.lora
import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io, ui
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..core import residuals as R
from ..core import training
from ..core.localize import ResidualGate
from ..core.patching.comfy import apply_global, concept_positions, model_family, model_sites
from ..core.plots import line_plot
from ..core.tokens import DEFAULT_TOKEN
from ._common import (
    CATEGORY,
    NamedCondGuider,
    Residuals,
    check_free,
    checked_sites,
    log,
    lora_path,
    save_residuals,
    step_progress,
    strengths_for,
    training_patcher,
)


class _ResidualTrainer(comfy.samplers.Sampler):
    """Runs the core's training loop inside ComfyUI's guider, so conditioning, wrappers and latent scaling are
    ComfyUI's own (SD1.x and SDXL alike)."""

    def __init__(self, params, config, progress, masks, caption_of_view=None):
        self.params, self.config, self.progress, self.masks = params, config, progress, masks
        self.caption_of_view = caption_of_view  # [V] caption index of each view (NamedCondGuider keys caption_<i>)
        self.extra_loss = None  # added to every step's loss (training.train's extra_loss)
        self.losses = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        ms = model_wrap.inner_model.model_sampling
        table = ms.sigmas.float().to(latent_image.device)
        alphas_cumprod = 1.0 / (1.0 + table ** 2)

        def predict(x_t, t, ctx):
            sigma = table[t]
            a = alphas_cumprod[t].view(-1, 1, 1, 1)
            if self.caption_of_view is None:
                return model_wrap(x_t / a.sqrt(), sigma, **extra_args)  # ComfyUI returns the denoised x0
            keys = ctx[:, 0, 0].long()
            out = torch.empty_like(x_t)
            for k in keys.unique().tolist():  # one model call per caption in the batch
                rows = (keys == k).nonzero().flatten()
                (x0,) = comfy.samplers.calc_cond_batch(model_wrap.inner_model, [model_wrap.conds[f"caption_{k}"]],
                                                       x_t[rows] / a[rows].sqrt(), sigma[rows],
                                                       extra_args["model_options"])
                out[rows] = x0
            return out

        masks = self.masks.to(latent_image.device) if self.masks is not None else None
        if self.caption_of_view is None:
            context = torch.zeros(1, 1, 1, device=latent_image.device)  # conditioning comes from the guider
        else:  # each view's caption index travels as its "context"
            context = self.caption_of_view.to(latent_image.device, torch.float32).view(-1, 1, 1)
        self.losses = training.train(self.params, predict, latent_image.float(), context, alphas_cumprod, "x0",
                                     masks, self.config, self.progress, self.extra_loss)
        return latent_image


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
                io.Vae.Input("vae", tooltip="The VAE that encodes the images into latents."),
                io.Image.Input("images", tooltip="3-8 photos of the concept, as one batch."),
                io.String.Input("class_word", default="dog",
                                tooltip="The concept's broad class ('dog', 'mug', 'person'): the prompt is "
                                        "'a photo of a <token> <class word>'."),
                io.String.Input("token", default=DEFAULT_TOKEN,
                                tooltip="A rare word that will stand for this concept in prompts (V*)."),
                io.Int.Input("steps", default=150, min=1, max=10000,
                             tooltip="Optimisation steps; the paper uses 150."),
                io.Float.Input("learning_rate", default=1e-3, min=1e-6, max=1.0, step=1e-4,
                               tooltip="AdamW learning rate; the paper uses 1e-3."),
                io.Int.Input("batch_size", default=4, min=1, max=64, tooltip="Images per step; the paper uses 4."),
                io.Float.Input("rank_ratio", default=0.05, min=0.001, max=1.0, step=0.005,
                               tooltip="Residual rank as a fraction of each layer's width (0.05 gives 16/32/64 "
                                       "on SD1.x's 320/640/1280 channels)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the initial residuals, the crops, noise and timesteps: same seed, "
                                     "same result."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                             tooltip="Square training resolution in pixels (images are cropped and resized)."),
                io.Int.Input("views", default=4, min=1, max=32,
                             tooltip="Augmented views per image (random crops and flips), encoded once."),
                io.String.Input("save_name", default="concepts/sks_dog",
                                tooltip="File name under models/loras (no extension). Empty: do not save."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name. Off: an existing file "
                                         "stops the run before training."),
                io.Mask.Input("masks", optional=True,
                              tooltip="Optional: one mask per image; the loss only counts pixels inside it."),
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
        path = lora_path(save_name) if save_name.strip() else None
        if path:
            check_free(path, overwrite)  # fail before minutes of training, not after
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
            latents = torch.cat([vae.encode(view_images[i:i + 4]) for i in range(0, len(view_images), 4)])
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
            trainer = _ResidualTrainer(rs.parameters(), config, progress, lat_masks, caption_of_view)
            if caption_of_view is None:
                guider = Guider_Basic(mp)
                guider.set_conds(conds[0])
            else:
                guider = NamedCondGuider(mp)
                guider.set_prompts({f"caption_{i}": c for i, c in enumerate(conds)})
            with ResidualGate(sites, rs):
                guider.sample(torch.zeros_like(latents), latents, trainer, torch.zeros(len(latents)), seed=seed)
        rs = rs.detached()
        for layer in rs.layers.values():
            layer.down, layer.up = layer.down.cpu(), layer.up.cpu()
        if path:
            save_residuals(rs, save_name, overwrite)
        log.info("trained %s residuals: loss %.4f -> %.4f", family, trainer.losses[0], trainer.losses[-1])
        curve = line_plot(trainer.losses)
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
