"""Erase: closed-form cross-attention edit (UCE + RealEra), LEACE on conditioning, steering during sampling,
concept sliders and ESD-style fine-tuning. Every node returns a clone; no weight is written in place."""
from __future__ import annotations

import functools

import comfy.lora
import comfy.model_management
import comfy.sampler_helpers
import comfy.samplers
import comfy.utils
import torch
from comfy_api.v0_0_2 import io, ui

from ..core import erase as E
from ..core import leace, training
from ..core import residuals as R
from ..core import sliders as S
from ..core.patching.comfy import apply_global, concept_positions, model_family, model_sites
from ..core.patching.comfy_erase import (
    GUIDED_LAYERS,
    add_steering,
    apply_slider,
    guided_predict,
    guided_residuals,
    is_kv_set,
    kv_weights,
    slider_wrapper,
    steering_post_cfg,
    word_encoder,
)
from ..core.plots import line_plot
from ..core.steering import MODES, word_summary
from ..core.tokens import TokenNotFoundError
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
    training_patcher,
)
from .compose_extra import check_kv_concept

ERASE = f"{CATEGORY}/erase"


def effective_kv_weights(model):
    """(name, weight) of the K/V projections as this model computes them: the checkpoint's own weight (ComfyUI's
    backup, not whatever another clone left in the module) plus this model's own patches (e.g. a LoRA before)."""
    patches = model.get_key_patches("diffusion_model.")
    out = []
    for name, _ in kv_weights(model):
        key = f"diffusion_model.{name}.weight"
        (weight, convert), *rest = patches[key]
        w = convert(weight.detach().float().cpu().clone())
        if rest:
            w = comfy.lora.calculate_weight(rest, w, key)
        out.append((name, w))
    return out


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))


class EraseConceptClosedForm(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsEraseClosedForm",
            display_name="Erase Concept (closed form)",
            category=ERASE,
            description="Edits every cross-attention key/value projection in closed form so the erased words (and "
                        "random neighbours of their embeddings, as in RealEra) give the anchor's keys and values, "
                        "while the preserved words keep theirs (UCE, Gandikota et al. 2024). Seconds, no training. "
                        "Applied as weight patches; optionally saved as a file LoraLoader reads.",
            inputs=[
                io.Model.Input("model", tooltip="The model to edit (SD1.x or SDXL). It is not changed."),
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
                                     "and the end token (gentler; see the README's toy-world table)."),
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
        path = lora_path(save_name) if save_name.strip() else None
        if path:
            check_free(path, overwrite)  # before any work
        encode = functools.cache(word_encoder(clip))  # each word is encoded once
        rows = E.build_rows(encode, words, anchor.strip(), kept, tail_rows)
        weights = effective_kv_weights(model)
        if rows.erase.shape[1] != weights[0][1].shape[1]:
            raise ValueError(f"the text encoder gives {rows.erase.shape[1]}-wide embeddings but the model's "
                             f"cross-attention reads {weights[0][1].shape[1]}: connect the CLIP of the same "
                             "checkpoint")
        operator = E.closed_form_operator(rows, lam, preserve_weight, neighbours, radius, seed)
        layers, truncation = E.lowrank_edit(weights, operator, rank)
        residual, change = E.edit_quality(weights, lambda name: layers[name].delta(), rows)
        counts = {w: encode(w)[1] for w in words}
        pieces = ", ".join(f"'{w}' ({n} token{'s' if n != 1 else ''})" for w, n in counts.items())
        report = (f"erased {pieces} -> '{anchor.strip()}'; {len(layers)} K/V layers at rank "
                  f"{next(iter(layers.values())).rank} (truncation error {truncation:.1e}); erased rows keep "
                  f"{residual:.1%} of their gap to the anchor, preserved rows change {change:.1%}")
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


class EraseFromConditioning(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsEraseLeace",
            display_name="Erase From Conditioning (LEACE)",
            category=ERASE,
            description="Fits a LEACE eraser (Belrose et al. 2023) on the text encodings of prompts with and "
                        "without a concept and applies it to a conditioning: afterwards no linear function of a "
                        "token's embedding tells whether the concept was in the prompt. No model change.",
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The conditioning to clean (e.g. the positive prompt)."),
                io.Clip.Input("clip", tooltip="The text encoder that made the conditioning."),
                io.String.Input("concept_prompts", multiline=True,
                                default="a red car\na red dress\na red apple\na red house\na red bird\na red cup",
                                tooltip="Prompts containing the concept, one per line (4 or more, varied)."),
                io.String.Input("neutral_prompts", multiline=True,
                                default="a blue car\na green dress\na yellow apple\na white house\na black bird"
                                        "\na grey cup",
                                tooltip="Matching prompts without it, one per line."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1: full LEACE erasure; 0: the conditioning unchanged; between: a blend."),
                io.Boolean.Input("per_position", default=False,
                                 tooltip="Off: one eraser for every token row, for prompts of any wording. On: one "
                                         "eraser per token position, much stronger when the prompt follows the "
                                         "fitting prompts' template (same words at the same places)."),
                io.Combo.Input("centre", options=["neutral", "mean"], default="neutral", optional=True,
                               tooltip="neutral: the concept prompts' encodings are moved all the way to the "
                                       "neutral prompts' average, which stays exactly in place (stronger). mean: "
                                       "plain LEACE, both moved to the average of all (least change). Both leave "
                                       "no linear signal. Prompts saved before this input existed use mean."),
                io.Float.Input("shrinkage", default=0.01, min=0.0, max=10.0, step=0.001, optional=True,
                               tooltip="Regularises the fit: with few fitting prompts, plain LEACE (0) can move a "
                                       "prompt worded unlike them far off (its rows by many times their size); "
                                       "0.01 keeps the erasure exact on the fitting prompts and bounds that. "
                                       "Prompts saved before this input existed use 0."),
                io.String.Input("concept_word", default="", optional=True,
                                tooltip="The word every concept prompt names (e.g. 'red'). Given (with per_position "
                                        "off): one eraser for prompts of any wording, fitted on each row's place "
                                        "after that word (the word and every later row, each its own label). "
                                        "Empty: as before, every row of a concept prompt labelled alike."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="The erased conditioning.")],
        )

    @classmethod
    def execute(cls, conditioning, clip, concept_prompts, neutral_prompts, strength, per_position, centre="mean",
                shrinkage=0.0, concept_word=""):
        with_concept, without = _lines(concept_prompts), _lines(neutral_prompts)
        if not with_concept or not without:
            raise ValueError("give at least one prompt with the concept and one without it, one per line")

        def encode(prompts):
            with torch.no_grad():
                return torch.cat([clip.encode_from_tokens(clip.tokenize(p))[:, :77].float().cpu() for p in prompts])
        word = concept_word.strip()
        if word and per_position:
            raise ValueError("per_position and concept_word are two ways to fit: turn per_position off to fit by the "
                             "word (any wording), or leave concept_word empty")
        if word:
            starts = []
            for p in with_concept:
                try:
                    starts.append(concept_positions(clip, p, [word])[0])
                except TokenNotFoundError:
                    raise ValueError(f"concept_word '{word}' is not in the concept prompt \"{p}\": every concept "
                                     "prompt must name it (or leave concept_word empty)") from None
            if max(starts) >= 77:
                raise ValueError(f"'{word}' comes after the first 77 tokens of a concept prompt: shorten it")
            eraser = leace.fit_by_word(encode(with_concept), encode(without), starts, centre, shrinkage)
        else:
            eraser = leace.fit_on_conditioning(encode(with_concept), encode(without), per_position, centre,
                                               shrinkage)
        out = []
        for cond, extra in conditioning:
            erased = eraser(cond)
            out.append([torch.lerp(cond, erased, strength) if strength != 1.0 else erased, dict(extra)])
        log.info("LEACE eraser (%s, centred on the %s, shrinkage %g) of rank %d fitted on %d + %d prompts",
                 f"by offset from '{word}'" if word else "per position" if per_position else "pooled", centre,
                 shrinkage, eraser.rank, len(with_concept), len(without))
        return io.NodeOutput(out)


class SteerAwayFromConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsSteerAway",
            display_name="Steer Away From Concept",
            category=ERASE,
            description="Training-free: each step also predicts the concept prompt and pushes the guided result "
                        "away from it (negative guidance, or Safe Latent Diffusion's elementwise version). A "
                        "post-CFG patch: other CFG patches keep working. Costs one more prediction per step.",
            inputs=[
                io.Model.Input("model", tooltip="The model to sample with. It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder; the concept below is encoded with it."),
                io.String.Input("concept", default="red", tooltip="The concept to steer away from."),
                io.Float.Input("scale", default=3.0, min=0.0, max=10000.0, step=0.1,
                               tooltip="Steering strength; 0 gives the unpatched model exactly. negative: like a "
                                       "CFG scale (1-7); sld: SLD's guidance scale s_S (weak 20, medium 1000, "
                                       "strong 2000, max 5000)."),
                io.Combo.Input("mode", options=list(MODES), default="negative",
                               tooltip="negative: subtract scale x (concept - unconditional); sld: Safe Latent "
                                       "Diffusion, only where the prompt leans towards the concept, bounded."),
                io.Float.Input("threshold", default=0.01, min=-1.0, max=1.0, step=0.001,
                               tooltip="sld only: where prompt - concept is below this, steering acts "
                                       "(SLD weak 0, medium 0.01, strong 0.025, max 1)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Steer from this point of the schedule (SLD's warm-up, in steps of 50: "
                                       "weak 15, medium 10, strong 7, max 0; about 0.3 / 0.2 / 0.15 / 0)."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Stop steering after this point of the schedule."),
                io.String.Input("neutral", default="", optional=True,
                                tooltip="The concept prompt without the concept (e.g. 'a car' for the concept 'a red "
                                        "car'): steering then pushes away from what the concept adds to it only, "
                                        "not from the rest (one more prediction per step). Or a prompt to steer "
                                        "towards instead (e.g. 'a blue car': a push that does not fade where "
                                        "the concept is already drawn; pair it with preserve). Empty: from the "
                                        "unconditional prediction, as in the papers."),
                io.Float.Input("momentum", default=0.0, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="sld only: SLD's momentum scale s_m (weak 0, medium 0.3, strong and max "
                                       "0.5). It builds up from the first step, the warm-up included (one more "
                                       "prediction per step there). 0: no momentum, as before."),
                io.Float.Input("momentum_beta", default=0.0, min=0.0, max=0.99, step=0.01, optional=True,
                               tooltip="sld only: SLD's momentum beta, how long the momentum remembers (weak 0, "
                                       "medium 0.4, strong and max 0.7)."),
                io.String.Input("preserve", default="", multiline=True, optional=True,
                                tooltip="Prompts to keep, one per line (e.g. 'a blue car', 'a green car'): prompts "
                                        "that ask for them are left alone. With preserve_by prediction an image is "
                                        "steered at a step only while the model's prediction for it is nearer in "
                                        "direction to the concept's than to each of these (whole image, from their "
                                        "mean; one more prediction per line and step); with preserve_by prompt, "
                                        "see there. Empty: always steer, as before."),
                io.Float.Input("preserve_margin", default=0.0, min=-1.0, max=1.0, step=0.01, optional=True,
                               tooltip="With preserve: steer only where the prediction is nearer the concept than "
                                       "every kept prompt by more than this (a cosine difference); higher keeps "
                                       "more, lower steers more."),
                io.Combo.Input("preserve_by", options=["prediction", "prompt"], default="prediction", optional=True,
                               tooltip="How preserve decides. prediction: at every step, from the model's "
                                       "predictions (one more per line and step). prompt: once, from the text: "
                                       "the image is steered only if a word of its prompt is nearer the concept "
                                       "than each kept prompt by prompt_margin (catches synonyms the text encoder "
                                       "places near the concept; a prompt far from it in text space passes; no "
                                       "extra prediction when it does not steer)."),
                io.Float.Input("prompt_margin", default=0.25, min=-2.0, max=2.0, step=0.01, optional=True,
                               tooltip="preserve_by prompt: how much nearer the concept (a cosine difference) a "
                                       "word of the prompt must be. Near 0, prompts that only share words with "
                                       "the concept prompt tip over."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the steering patch (a clone).")],
        )

    @classmethod
    def execute(cls, model, clip, concept, scale, mode, threshold, start_percent, end_percent, neutral="",
                momentum=0.0, momentum_beta=0.0, preserve="", preserve_margin=0.0, preserve_by="prediction",
                prompt_margin=0.25):
        if not concept.strip():
            raise ValueError("give the concept to steer away from")
        kept = _lines(preserve)
        if concept.strip() in kept:
            raise ValueError(f"'{concept.strip()}' is both the concept and a preserved prompt: a prompt cannot be "
                             "steered away from and kept; remove it from preserve")
        if neutral.strip() and neutral.strip() == concept.strip():
            raise ValueError(f"the neutral prompt is the concept itself ('{concept}'): give the concept prompt "
                             "without the concept (e.g. 'a car' for 'a red car'), or leave neutral empty")
        if momentum and mode != "sld":
            log.warning("Steer Away From Concept: momentum is SLD's; mode %s ignores it", mode)
        if preserve_by not in ("prediction", "prompt"):
            raise ValueError(f"preserve_by is 'prediction' or 'prompt', not {preserve_by!r}")
        if preserve_by == "prompt" and not kept:
            raise ValueError("preserve_by 'prompt' tells the concept from the preserved prompts: give at least one "
                             "line in preserve, or set preserve_by to 'prediction'")
        sigma_range = _sigma_range(model, start_percent, end_percent)

        def encode(text):
            return comfy.sampler_helpers.convert_cond(clip.encode_from_tokens_scheduled(clip.tokenize(text)))
        summaries = None
        if preserve_by == "prompt":
            words = word_encoder(clip)
            found = [word_summary(*words(text)) for text in (concept.strip(), *kept)]
            summaries = (found[0], torch.stack(found[1:]), prompt_margin)
        post_cfg = steering_post_cfg(encode(concept), scale, mode, threshold, sigma_range,
                                     comfy.samplers.calc_cond_batch, comfy.samplers.encode_model_conds,
                                     encode(neutral) if neutral.strip() else None, (momentum, momentum_beta),
                                     [encode(text) for text in kept] if summaries is None else [],
                                     preserve_margin, summaries)
        return io.NodeOutput(add_steering(model, post_cfg))


class _GuidedTrainer(comfy.samplers.Sampler):
    """Runs core.sliders.train_guided inside ComfyUI's guider (conditioning, wrappers and latent format are
    ComfyUI's own)."""

    def __init__(self, switch, params, eta, config, progress, denoise_steps=0, sets=(S.PROMPTS,), preserve=()):
        self.switch, self.params, self.eta, self.config, self.progress = switch, params, eta, config, progress
        self.denoise_steps, self.sets, self.preserve = denoise_steps, sets, preserve
        self.losses = []

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        table = model_wrap.inner_model.model_sampling.sigmas.float().to(noise.device)
        alphas_cumprod = 1.0 / (1.0 + table ** 2)
        predict = guided_predict(model_wrap, extra_args["model_options"], self.switch, table, alphas_cumprod,
                                 comfy.samplers.calc_cond_batch)
        self.losses = S.train_guided(self.params, predict, tuple(noise.shape[1:]), alphas_cumprod, self.eta, "x0",
                                     self.config, self.progress, noise.device, self.denoise_steps, self.sets,
                                     self.preserve)
        return latent_image


def _train_guided_residuals(model, clip, sets, eta, steps, learning_rate, batch_size, rank, resolution, seed,
                            technique, save_name, overwrite, denoise_steps=0, preserve=(), layers="proj_out"):
    """``sets``: (neutral, plus, minus) prompt triples (text), one drawn per step; ``preserve``: prompts kept;
    ``layers``: ``GUIDED_LAYERS`` (each transformer's proj_out, or every cross-attention K/V projection: ESD-x)."""
    path = lora_path(save_name) if save_name.strip() else None
    if path:
        check_free(path, overwrite)
    config = training.TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, seed=seed)
    family = model_family(model)
    meta = S.slider_metadata(family, sets, eta, config, technique, preserve)
    meta.update(resolution=str(resolution), denoise_steps=str(denoise_steps), layers=layers)
    progress = step_progress(steps)

    key = {text: f"prompt_{i}" for i, text in enumerate(S.sets_prompts(sets, preserve))}  # guider cond names
    keyed_sets = [tuple(key[t] for t in triple) for triple in sets]
    keyed_preserve = [key[t] for t in preserve]
    with torch.no_grad():
        conds = {k: clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text, k in key.items()}
    channels = model.get_model_object("latent_format").latent_channels
    with torch.inference_mode(False), torch.enable_grad():
        mp, device = training_patcher(model)
        sites = model_sites(mp)
        rs, patch, switch = guided_residuals(sites, layers, rank, seed, device, meta)
        latent = torch.zeros(batch_size, channels, resolution // 8, resolution // 8)
        guider = NamedCondGuider(mp)
        guider.set_prompts(conds)
        with patch:
            trainer = _GuidedTrainer(switch, rs.parameters(), eta, config, progress, denoise_steps, keyed_sets,
                                     keyed_preserve)
            guider.sample(latent, latent, trainer, torch.zeros(2), seed=seed)
    rs = rs.detached()
    for layer in rs.layers.values():
        layer.down, layer.up = layer.down.cpu(), layer.up.cpu()
    if path:
        save_residuals(rs, save_name, overwrite)
    log.info("trained %s %s: loss %.5f -> %.5f", family, technique, trainer.losses[0], trainer.losses[-1])
    curve = line_plot(trainer.losses)
    return rs, curve


def _training_inputs(default_steps=300, default_lr=2e-4, default_eta=1.0):
    return [
        io.Float.Input("eta", default=default_eta, min=-100.0, max=100.0, step=0.1,
                       tooltip="Guidance strength of the training target (the papers' eta)."),
        io.Int.Input("steps", default=default_steps, min=1, max=10000, tooltip="Optimisation steps."),
        io.Float.Input("learning_rate", default=default_lr, min=1e-6, max=1.0, step=1e-5,
                       tooltip="AdamW learning rate."),
        io.Int.Input("batch_size", default=1, min=1, max=16, tooltip="Noisy samples per step."),
        io.Int.Input("rank", default=4, min=1, max=256,
                     tooltip="Rank of each transformer block's proj_out residual (sliders paper: 4)."),
        io.Int.Input("resolution", default=512, min=64, max=2048, step=8,
                     tooltip="Square training resolution in pixels (no images are needed)."),
        io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFF, control_after_generate=False,
                     tooltip="Seeds noise and timesteps: same seed, same result."),
        io.String.Input("save_name", default="",
                        tooltip="File under models/loras (no extension); LoraLoader reads it too. Empty: do not "
                                "save."),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name."),
        io.Int.Input("denoise_steps", default=0, min=0, max=200, optional=True,
                     tooltip="0: each step trains at the model's one-step guess from pure noise, re-noised (fast). "
                             "n > 0: at a point of the model's own n-step DDIM path for the training prompt, as "
                             "the ESD paper does (about n / 2 more model calls per step)."),
    ]


class TrainConceptSlider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsTrainSlider",
            display_name="Train Concept Slider",
            category=ERASE,
            description="Trains a low-rank slider (Concept Sliders, Gandikota et al.) from a prompt pair that "
                        "differs in one word: with the slider, the neutral prompt follows neutral + eta x "
                        "(positive - negative). No images. Apply with a signed strength.",
            inputs=[
                io.Model.Input("model", tooltip="The base model (SD1.x or SDXL). It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder for the three prompts."),
                io.String.Input("positive", default="a photo of a red car", multiline=True,
                                tooltip="The attribute turned up (strength > 0). Several pairs: one prompt per line "
                                        "(the same attribute in other sentences), one pair drawn per step."),
                io.String.Input("negative", default="a photo of a blue car", multiline=True,
                                tooltip="The attribute turned down; each line must differ from the positive line of "
                                        "the same number in one word."),
                io.String.Input("neutral", default="",
                                tooltip="The prompt the slider is trained on. Empty: the words each pair shares."),
                *_training_inputs(),
            ],
            outputs=[
                Residuals.Output(display_name="slider", tooltip="The slider as a residual set."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, positive, negative, neutral, eta, steps, learning_rate, batch_size, rank,
                resolution, seed, save_name, overwrite, denoise_steps=0):
        sets = S.slider_sets(_lines(positive), _lines(negative), [neutral] if neutral.strip() else [])
        rs, curve = _train_guided_residuals(model, clip, sets, eta, steps, learning_rate, batch_size, rank,
                                            resolution, seed, "concept_slider", save_name, overwrite,
                                            denoise_steps)
        return io.NodeOutput(rs, curve, ui=ui.PreviewImage(curve, cls=cls))


class TrainEsdEraser(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsTrainEsd",
            display_name="Erase Concept (ESD fine-tune)",
            category=ERASE,
            description="Trains low-rank residuals so the model's prediction for the concept follows the "
                        "negatively guided target eps(c) - eta (eps(c) - eps(anchor)) (ESD, Gandikota et al. 2023; "
                        "anchor: the empty prompt unless given). Apply with Apply Residuals or Apply Slider "
                        "(strength 1).",
            inputs=[
                io.Model.Input("model", tooltip="The model to erase from. It is not changed."),
                io.Clip.Input("clip", tooltip="The text encoder for the concept prompt."),
                io.String.Input("concept", default="a photo of a red car", multiline=True,
                                tooltip="The concept to erase: a word, a phrase, or several prompts that hold it, "
                                        "one per line (one drawn per step: the erasure then carries to other "
                                        "sentences better than from one prompt)."),
                *_training_inputs(default_steps=300, default_lr=2e-4, default_eta=1.0),
                io.String.Input("preserve", default="", multiline=True, optional=True,
                                tooltip="Prompts to keep as they are, one per line (e.g. the same sentences with "
                                        "another colour). When given, every other step trains the residual to "
                                        "leave one of them unchanged. Empty: plain ESD."),
                io.String.Input("anchor", default="", multiline=True, optional=True,
                                tooltip="What the concept prompts should turn into: one prompt for all, or one per "
                                        "concept line (e.g. 'a photo of a car' for 'a photo of a red car': only "
                                        "the concept goes, the rest of the prompt stays). Empty: the empty prompt, "
                                        "as in the ESD paper."),
                io.Combo.Input("layers", options=list(GUIDED_LAYERS), default="proj_out", optional=True,
                               tooltip="proj_out: a residual on each transformer block's output (the pack's "
                                       "residual layout). cross_attention_kv: on every cross-attention key and "
                                       "value projection (ESD-x, the paper's choice for erasing a concept named in "
                                       "prompts while leaving other prompts alone; the better eraser on our toy "
                                       "benchmark)."),
            ],
            outputs=[
                Residuals.Output(display_name="residuals", tooltip="The erasing residual set."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept, eta, steps, learning_rate, batch_size, rank, resolution, seed,
                save_name, overwrite, denoise_steps=0, preserve="", anchor="", layers="proj_out"):
        sets = S.esd_sets(_lines(concept), _lines(anchor))
        kept = [p for p in _lines(preserve) if p not in {t[0] for t in sets}]
        if len(kept) < len(_lines(preserve)):
            log.warning("Erase Concept (ESD): preserve lines that are also concept lines were left out")
        rs, curve = _train_guided_residuals(model, clip, sets, eta, steps, learning_rate, batch_size, rank,
                                            resolution, seed, "esd", save_name, overwrite, denoise_steps, kept,
                                            layers)
        return io.NodeOutput(rs, curve, ui=ui.PreviewImage(curve, cls=cls))


class ApplySlider(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ConceptsApplySlider",
            display_name="Apply Slider",
            category=ERASE,
            description="Applies a slider (or ESD residuals) with a signed strength from a chosen point of the "
                        "schedule on; before it the base model runs, which keeps the composition (the sliders "
                        "paper's delayed start).",
            inputs=[
                io.Model.Input("model", tooltip="The base model the slider was trained on."),
                Residuals.Input("slider", tooltip="From Train Concept Slider, Erase Concept (ESD) or Load "
                                                  "Residuals."),
                io.Float.Input("strength", default=1.0, min=-20.0, max=20.0, step=0.05,
                               tooltip="Signed: > 0 towards the positive prompt, < 0 towards the negative; 0 "
                                       "gives the base model exactly."),
                io.Float.Input("start_percent", default=0.2, min=0.0, max=1.0, step=0.01,
                               tooltip="Apply from this point of the schedule on (0: from the first step)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the slider (a clone).")],
        )

    @classmethod
    def execute(cls, model, slider, strength, start_percent):
        if is_kv_set(slider):
            check_kv_concept(slider, model, "the slider")
        else:
            checked_sites(model, slider)
        start_sigma = _sigma_range(model, start_percent, 1.0)[0] if start_percent > 0 else float("inf")
        return io.NodeOutput(apply_slider(model, slider_wrapper(slider, strength, start_sigma)))
