"""Extract: concepts from one image, masks from self-attention (ConceptExpress) or from the user (Break-A-Scene)."""
from __future__ import annotations

import os

import comfy.lora
import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.v0_0_2 import io, ui

from ..core import extract as X
from ..core import residuals as R
from ..core import training
from ..core.heatmaps import colorize
from ..core.hooks.gate import LowRankGate
from ..core.patching import comfy as P
from ..core.plots import line_plot
from ..core.tokens import find_subsequence
from ._support import (
    CATEGORY,
    check_free,
    checked_sites,
    encode_views,
    log,
    lora_path,
    residuals_to_cpu,
    run_in_guider,
    step_progress,
    training_inputs,
    training_patcher,
)

Concepts = io.Custom("CONCEPT_SET")


def one_image(image):
    if image.shape[0] != 1:
        raise ValueError(f"give one image (got a batch of {image.shape[0]}); pick one with ImageFromBatch")
    return image[..., :3].cpu()


def segmentation_preview(image, masks):
    """The image with each mask tinted in its own colour (concept 1 first on the blue-to-red ramp)."""
    k = masks.shape[0]
    colours = colorize(torch.linspace(0.25, 1.0, k)) if k > 1 else torch.tensor([[0.9, 0.0, 0.0]])
    out = image[0].clone()
    for i in range(k):
        m = masks[i][..., None]
        out = out * (1 - 0.5 * m) + 0.5 * m * colours[i]
    return out[None]


class ExtractMasks(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsExtractMasks",
            display_name="Extract Concept Masks (self-attention)",
            category=f"{CATEGORY}/extract",
            description="Finds the separate objects of one image without supervision (ConceptExpress): the image is "
                        "encoded, noised, run through the UNet (once per noise draw), and the finest layers' "
                        "self-attention is clustered; the cluster that holds most of the border is the background "
                        "and is dropped. Masks come left to right.",
            inputs=[
                io.Model.Input("model", tooltip="The model whose self-attention groups the pixels."),
                io.Clip.Input("clip", tooltip="The text encoder (encodes the prompt below for the UNet calls)."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the image."),
                io.Image.Input("image", tooltip="One image holding the concepts."),
                io.Int.Input("concepts", default=0, min=0, max=8,
                             tooltip="How many concepts to find; 0 picks the count automatically (best silhouette)."),
                io.Int.Input("max_concepts", default=4, min=1, max=8,
                             tooltip="The most concepts the automatic count may pick."),
                io.Float.Input("noise", default=0.3, min=0.0, max=1.0, step=0.05,
                               tooltip="How far along the noise schedule the image is noised before the UNet call "
                                       "(0 = clean, 1 = pure noise); ConceptExpress-style extraction works early."),
                io.String.Input("text", default="", tooltip="Prompt for the UNet call; empty is the usual choice."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                             tooltip="Seeds the noise and the clustering."),
                io.Int.Input("noise_draws", default=4, min=1, max=16, optional=True,
                             tooltip="UNet calls, each with its own noise (seeds seed, seed + 1, ...), whose "
                                     "self-attention is averaged: steadier masks for a few more calls."),
            ],
            outputs=[io.Mask.Output(display_name="masks", tooltip="One mask per concept, left to right.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, concepts, max_concepts, noise, text, seed, noise_draws=4):
        image = one_image(image)
        with torch.no_grad():
            latents = vae.encode(image)
            cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))

        def probe(guided):
            latent, table = guided.latent, guided.sigmas
            sites = P.model_sites(model)  # the same modules the guider runs (ComfyUI patches weights in place)
            sigma = table[min(len(table) - 1, max(0, round(noise * (len(table) - 1))))]
            latent_hw = tuple(latent.shape[-2:])

            def run_draw(draw):
                gen = torch.Generator().manual_seed(seed + draw)
                eps = torch.randn(latent.shape, generator=gen).to(latent)
                guided.predict_x0(latent + sigma * eps, sigma.view(1).expand(latent.shape[0]))

            with torch.no_grad():  # sums over the draws; layers the grid does not use are not recorded
                sums, counts = X.record_self_attention(sites, latent_hw, run_draw, noise_draws)
            return sums, counts, latent_hw

        sums, counts, latent_hw = run_in_guider(model, cond, latents, probe, seed)
        grid, hw = X.self_attention_grid(sums, counts, latent_hw)
        masks = X.resize_masks(X.cluster_concepts(grid[0], hw, concepts, max_concepts, seed), tuple(image.shape[1:3]))
        log.info("extracted %d concept masks", masks.shape[0])
        return io.NodeOutput(masks, ui=ui.PreviewImage(segmentation_preview(image, masks), cls=cls))


def candidate_row(clip, phrase: str, sentence: str = X.DEFAULT_SENTENCE) -> torch.Tensor:
    """[D]: the phrase's last word's row in ``candidate_prompt(phrase, sentence)`` (a handle search candidate)."""
    prompt, head = X.candidate_prompt(phrase, sentence)
    pos = P.concept_positions(clip, head, [phrase.split()[-1]])
    return clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0].float()[0, max(pos)]


def _context_override(state):
    """A DIFFUSION_MODEL wrapper feeding the training step's conditioning (with the handles) to the UNet."""
    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        ctx = state.get("context")
        if ctx is not None:
            context = ctx.to(context.device, context.dtype).expand(x.shape[0], -1, -1)
        return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
    return wrapper


class LearnConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsLearnConcepts",
            display_name="Learn Concepts from One Image",
            category=f"{CATEGORY}/extract",
            description="Learns one concept per mask from a single image (Break-A-Scene): phase 1 trains a handle "
                        "per concept (a learned vector for its word), phase 2 the handles and shared residuals; each "
                        "step uses a random subset of the concepts, the diffusion loss inside their masks and a loss "
                        "pulling each handle's cross-attention toward its mask. Sample with Apply Concepts.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.x or SDXL); it is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder."),
                io.Vae.Input("vae", tooltip="The VAE that encodes the image."),
                io.Image.Input("image", tooltip="One image holding the concepts."),
                io.Mask.Input("masks", tooltip="One mask per concept (from Extract Concept Masks, or drawn: batch "
                                               "mask images with ImageBatch + ImageToMask)."),
                io.String.Input("words", default="",
                                tooltip="Comma-separated words for the concepts, one per mask; empty: sks, ohwx, "
                                        "zwx, ..."),
                io.String.Input("class_words", default="",
                                tooltip="Optional comma-separated class words ('dog, mug'), one per mask: '<word> "
                                        "<class>' goes into the sentence."),
                io.Int.Input("handle_steps", default=100, min=0, max=5000,
                             tooltip="Phase 1: steps training the handles alone (Break-A-Scene: ~400)."),
                io.Int.Input("joint_steps", default=150, min=0, max=5000,
                             tooltip="Phase 2: steps training handles and residuals; 0 = handles only "
                                     "(ConceptExpress-style tokens)."),
                io.Float.Input("attention_weight", default=0.01, min=0.0, max=10.0, step=0.001,
                               tooltip="Weight of the loss pulling each handle's cross-attention toward its mask "
                                       "(Break-A-Scene: 0.01); 0 turns it off."),
                io.Boolean.Input("union_sampling", default=True,
                                 tooltip="Train on random subsets of the concepts so each also works alone."),
                *training_inputs(
                    batch_size=dict(default=2, max=16, tooltip="Views per step."),
                    resolution=dict(default=512, tooltip="Square training resolution in pixels."),
                    views=dict(default=4, tooltip="Random crops of the image, encoded once."),
                ),
                io.Boolean.Input("flip", default=True,
                                 tooltip="Also flip views horizontally (off when left and right matter)."),
                *training_inputs(seed=dict(default=0, tooltip="Seeds handles' training, crops, noise and subsets: "
                                                              "same seed, same result.")),
                io.String.Input("start_phrases", default="", optional=True,
                                tooltip="Optional comma-separated guesses of what the concepts are ('a red mug, "
                                        "a black dog, a striped sock'): each handle starts from the guess whose "
                                        "last word's encoding best explains its mask (lowest masked loss on fixed "
                                        "noise) instead of its own word's. Empty: no search. Each guess costs 8 "
                                        "model calls per concept."),
                io.String.Input("sentence", default=X.DEFAULT_SENTENCE, optional=True,
                                tooltip="The sentence the concepts are learned in; {} is where their words go "
                                        "('{} on a wooden table' gives 'sks and ohwx on a wooden table'). Words "
                                        "that describe the rest of the image help the model explain it; sample "
                                        "the concepts in the same sentence. Empty: 'a photo of {}' "
                                        "(Break-A-Scene's)."),
            ],
            outputs=[
                Concepts.Output(display_name="concepts", tooltip="The learned concepts; sample with Apply Concepts."),
                io.Mask.Output(display_name="masks", tooltip="The masks used, one per concept."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, masks, words, class_words, handle_steps, joint_steps,
                attention_weight, union_sampling, batch_size, resolution, views, flip, seed, start_phrases="",
                sentence=X.DEFAULT_SENTENCE):
        image = one_image(image)
        if masks.ndim == 2:
            masks = masks[None]
        if tuple(masks.shape[1:]) != tuple(image.shape[1:3]):
            log.warning("masks %s resized to the image %s", tuple(masks.shape[1:]), tuple(image.shape[1:3]))
            masks = F.interpolate(masks[:, None].float(), size=image.shape[1:3], mode="bilinear")[:, 0]
        masks = X.check_masks(masks.cpu(), tuple(image.shape[1:3]))
        sentence = X.check_sentence(sentence)
        tokens = X.concept_tokens(words, masks.shape[0])
        cws = [c.strip() for c in (class_words or "").split(",")] if (class_words or "").strip() else [""] * len(tokens)
        if len(cws) != len(tokens):
            raise ValueError(f"{len(cws)} class words for {len(tokens)} concepts: give one per mask or none")
        if handle_steps + joint_steps == 0:
            raise ValueError("set handle_steps or joint_steps above 0")
        config = X.ExtractConfig(handle_steps=handle_steps, joint_steps=joint_steps, batch_size=batch_size,
                                 attention_weight=attention_weight, union_sampling=union_sampling, seed=seed)
        phrases = [f"{t} {c}".strip() for t, c in zip(tokens, cws, strict=True)]
        contexts, positions = {}, {}
        with torch.no_grad():
            for sub in X.subsets(len(tokens)) if union_sampling else [tuple(range(len(tokens)))]:
                prompt = X.subset_prompt(phrases, sub, sentence)
                contexts[sub] = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0].float()
                positions[sub] = [P.concept_positions(clip, prompt, [tokens[i]]) for i in sub]
            handles, single_contexts, single_positions = [], [], []
            for i in range(len(tokens)):
                prompt = X.subset_prompt(phrases, (i,), sentence)
                ctx = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))[0][0].float()
                single_contexts.append(ctx)
                single_positions.append(P.concept_positions(clip, prompt, [tokens[i]]))
                handles.append(ctx[0, single_positions[-1]].clone())
            candidates = X.candidate_phrases(start_phrases)
            rows = torch.stack([candidate_row(clip, c, sentence) for c in candidates]) if candidates else None
            view_images, vmasks = X.view_masks(training.make_views, image, masks, resolution, views, seed, flip)
            latents = encode_views(vae, view_images)
            base_cond = clip.encode_from_tokens_scheduled(clip.tokenize(X.subset_prompt(phrases, (0,), sentence)))
        search_calls = len(candidates) * len(X.SEARCH_FRACTIONS) * X.SEARCH_DRAWS * len(tokens)
        total = config.handle_steps + config.joint_steps
        progress = step_progress(total + search_calls)

        family = P.model_family(model)
        with torch.inference_mode(False), torch.enable_grad():
            latents = latents.detach().clone()
            lat_masks = F.interpolate(vmasks.clone(), size=latents.shape[-2:], mode="bilinear", align_corners=False)
            contexts = {k: v.clone() for k, v in contexts.items()}
            handles = [h.clone() for h in handles]
            single_contexts = [c.clone() for c in single_contexts]
            rows = rows.clone() if rows is not None else None
            mp, device = training_patcher(model)
            state: dict = {}
            mp.add_wrapper_with_key(P.DIFFUSION_MODEL, P.WRAPPER_KEY + "-handles", _context_override(state))
            sites = P.model_sites(mp)
            rs = None
            if joint_steps > 0:
                meta = {"technique": "break-a-scene", "base_family": family, "token": ",".join(tokens),
                        "class_word": ",".join(cws)}
                rs = R.init_residuals([s for s, _ in sites], seed=seed, device=device, metadata=meta)
            handles = [h.to(device) for h in handles]
            chosen: list[str] = []

            def train(guided):
                latent, table, ac = guided.latent, guided.sigmas, guided.alphas_cumprod

                def predict(x_t, t, ctx):
                    state["context"] = ctx
                    a = ac[t].view(-1, 1, 1, 1)
                    return guided.predict_x0(x_t / a.sqrt(), table[t])

                masks_here = lat_masks.to(latent.device)
                if rows is not None:
                    scores = []
                    for i in range(len(tokens)):
                        def search_progress(step, n, loss, done=i * search_calls // len(tokens)):
                            progress(done + step, total + search_calls, loss)
                        scores.append(X.handle_search_losses(predict, latent.float(), masks_here[:, i:i + 1],
                                                             single_contexts[i], single_positions[i], rows, ac, "x0",
                                                             progress=search_progress))
                    chosen.extend(candidates[j] for j in X.start_handles(handles, rows, scores))
                    log.info("handles start from: %s",
                             ", ".join(f"{t} <- {c}" for t, c in zip(tokens, chosen, strict=True)))

                def train_progress(step, n, loss):
                    progress(search_calls + step, total + search_calls, loss)
                gate = LowRankGate(sites, rs) if rs is not None else None
                try:
                    if gate is not None:
                        gate.install()
                    with X.HandleAttention(sites) as att:
                        return X.train_concepts(predict, latent.float(), masks_here, contexts,
                                                positions, handles, rs.parameters() if rs is not None else [], ac,
                                                "x0", config, att, train_progress)
                finally:
                    if gate is not None:
                        gate.remove()

            losses = run_in_guider(mp, base_cond, latents, train, seed)
        if rs is not None:
            rs = residuals_to_cpu(rs)
        concepts = X.ConceptSet(tokens, [h.detach().cpu() for h in handles], masks, rs, cws, losses, family, chosen,
                                sentence)
        log.info("learned %d concepts: loss %.4f -> %.4f", len(tokens), losses[0], losses[-1])
        curve = line_plot(losses)
        return io.NodeOutput(concepts, masks, curve, ui=ui.PreviewImage(curve, cls=cls))


class ApplyConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsApplyConcepts",
            display_name="Apply Concepts",
            category=f"{CATEGORY}/extract",
            description="Samples learned concepts alone or together: encodes the prompt, writes each named "
                        "concept's handle over its word, and adds the shared residuals where cross-attention finds "
                        "the named concepts (LAG) or everywhere. Connect 'positive' to the sampler.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the concepts were learned on."),
                io.Clip.Input("clip", tooltip="The text encoder."),
                Concepts.Input("concepts", tooltip="From Learn Concepts from One Image."),
                io.String.Input("text", multiline=True, default="a photo of sks and ohwx",
                                tooltip="The positive prompt; name one or more of the concepts' words."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Multiplier on the residuals; 0 keeps only the handles."),
                io.Boolean.Input("localized", default=True,
                                 tooltip="On: residuals only where the named concepts' words attend (LAG); "
                                         "off: everywhere."),
            ],
            outputs=[
                io.Model.Output(display_name="model"),
                io.Conditioning.Output(display_name="positive", tooltip="Connect to the sampler's positive input."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concepts, text, strength, localized):
        family = P.model_family(model)
        if concepts.family and concepts.family != family:
            raise ValueError(f"these concepts were learned on a {concepts.family} model, not {family}")
        ids = P.prompt_token_ids(clip, text)
        present, pos = [], []
        for i, tok in enumerate(concepts.tokens):
            p = find_subsequence(ids, P.word_token_ids(clip, tok))
            if p:
                present.append(i)
                pos.append(p)
        if not present:
            raise ValueError(f"the prompt names none of the concepts; write one of: {', '.join(concepts.tokens)}")
        if concepts.sentence != X.DEFAULT_SENTENCE:  # the handles were learned in this sentence's context
            log.info("these concepts were learned in the sentence %r; prompts close to it work best",
                     concepts.sentence)
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        cond = X.insert_handles(positive[0][0].float(), pos, [concepts.handles[i] for i in present])
        positive = [[cond.to(positive[0][0].dtype), dict(positive[0][1])]] + positive[1:]
        m = model
        if concepts.residuals is not None and strength != 0.0:
            checked_sites(model, concepts.residuals)
            if localized:
                wrapper = P.lag_wrapper(concepts.residuals, sorted(x for p in pos for x in p), positive[0][0][0],
                                      strength)
                m = P.apply_localized(model, wrapper)
            else:
                key_map = comfy.lora.model_lora_keys_unet(model.model, {})
                m = P.apply_global(model, concepts.residuals, strength, {}, comfy.lora.load_lora, key_map)
        return io.NodeOutput(m, positive)


class SaveConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsSaveConcepts",
            display_name="Save Concepts",
            category=f"{CATEGORY}/extract",
            description="Saves learned concepts (handles + shared residuals) into models/loras as one file; Load "
                        "Concepts reads it back. The stock LoraLoader reads its residuals (and logs the handle keys as "
                        "not loaded).",
            is_output_node=True,
            inputs=[
                Concepts.Input("concepts", tooltip="From Learn Concepts from One Image."),
                io.String.Input("save_name", default="concepts/extracted",
                                tooltip="File name under models/loras (no extension)."),
                io.Boolean.Input("overwrite", default=False,
                                 tooltip="Replace an existing file of the same name; off: stop with an error."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, concepts, save_name, overwrite):
        path = lora_path(save_name)
        check_free(path, overwrite)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        X.save_concepts(concepts, path, overwrite)
        log.info("saved %d concepts to %s", len(concepts.tokens), path)
        return io.NodeOutput(ui=ui.PreviewText(f"saved {path}: {', '.join(concepts.tokens)}"))


class LoadConcepts(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsLoadConcepts",
            display_name="Load Concepts",
            category=f"{CATEGORY}/extract",
            description="Loads a concept set written by Save Concepts from models/loras.",
            inputs=[io.Combo.Input("concepts_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A file saved by Save Concepts.")],
            outputs=[Concepts.Output(display_name="concepts")],
        )

    @classmethod
    def execute(cls, concepts_name):
        return io.NodeOutput(X.load_concepts(folder_paths.get_full_path_or_raise("loras", concepts_name)))
