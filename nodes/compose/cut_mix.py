"""Cut-Mix: two learned residual sets fine-tuned together on images that show both concepts side by side."""
from __future__ import annotations

import contextlib

import torch
from comfy_api.v0_0_2 import io, ui

from ...core import training
from ...core.cut_mix import cut_mix, gated_residuals, spread_rows, trainable_copy, unmix_term
from ...core.patching import comfy as P
from ...core.plots import line_plot
from .._support import (
    CATEGORY,
    Residuals,
    checked_sites,
    encode_views,
    log,
    residuals_to_cpu,
    step_progress,
    train_on_latents,
    training_inputs,
    training_patcher,
)


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
                *training_inputs(
                    steps=dict(default=300, tooltip="Optimisation steps over the Cut-Mix images."),
                    learning_rate=dict(default=1e-3, tooltip="AdamW learning rate (the residual trainer's default)."),
                    batch_size=dict(default=4, tooltip="Cut-Mix images per step."),
                    seed=dict(default=0, tooltip="Seeds the crops, noise and timesteps: same seed, same result."),
                    resolution=dict(default=512, tooltip="Square training resolution in pixels; the half masks "
                                                         "come out this size."),
                    views=dict(default=2, tooltip="Random crops per Cut-Mix image (never mirrored: that would swap "
                                                  "the halves)."),
                ),
                io.Int.Input("max_pairs", default=16, min=1, max=256,
                             tooltip="At most this many (A photo, B photo) pairs, spread over all of them."),
                io.Float.Input("scale", default=1.0, min=0.25, max=1.0, step=0.05,
                               tooltip="Shrink each photo first (border pixels fill the frame), so the objects "
                                       "are the size they have when two share a picture. 1: no shrinking."),
                io.Float.Input("unmix_weight", default=0.0, min=0.0, max=100.0, step=0.1, optional=True,
                               tooltip="SVDiff's Unmix term: penalises each token's cross-attention in the other "
                                       "concept's half, at this weight (0: off). Needs both files' tokens. Whether "
                                       "it helps: docs/compose.md."),
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
            latents = encode_views(vae, view_images)
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
        with torch.inference_mode(False), torch.enable_grad():
            latents = latents.detach().clone()  # tensors made under inference mode cannot enter autograd
            mp, device = training_patcher(model)
            sets = [trainable_copy(rs, device) for rs in (residuals_a, residuals_b)]
            unmix = contextlib.nullcontext()
            if unmix_weight > 0:
                positions = [P.concept_positions(clip, caption, [token]) for token, _ in tokens]
                unmix = unmix_term(P.model_sites(mp), positions, [left, right], tuple(latents.shape[-2:]), unmix_weight)
            with gated_residuals(P.model_modules(mp), [(sets[0], left), (sets[1], right)]), unmix as extra:
                losses = train_on_latents(mp, cond, latents, [p for rs in sets for p in rs.parameters()], config,
                                          progress, extra_loss=extra, seed=seed)
        out = []
        for rs, (other, _) in zip(sets, reversed(tokens), strict=True):
            rs = residuals_to_cpu(rs)
            rs.metadata.update(cut_mix_with=other, cut_mix_caption=caption, cut_mix_steps=str(steps),
                               cut_mix_unmix=f"{unmix_weight:g}")
            out.append(rs)
        log.info("trained %s and %s together on %d Cut-Mix images: loss %.4f -> %.4f", tokens[0][0], tokens[1][0],
                 mixed.shape[0], losses[0], losses[-1])
        curve = line_plot(losses)
        return io.NodeOutput(out[0], out[1], left[None], right[None], mixed, curve,
                             ui=ui.PreviewImage(mixed[:8], cls=cls))
