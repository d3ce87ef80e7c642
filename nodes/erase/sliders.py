"""Concept sliders and ESD erasure: low-rank residuals trained from prompts alone, inside ComfyUI's guider, and
applied from a chosen step on. Every node returns a clone; no weight is written in place."""
from __future__ import annotations

import comfy.samplers
import torch
from comfy_api.v0_0_2 import io, ui

from ...core import sliders as S
from ...core import training
from ...core.patching.comfy import is_dit, model_family, model_sites
from ...core.patching.comfy_erase import (
    GUIDED_LAYERS,
    apply_slider,
    guided_predict,
    guided_residuals,
    is_kv_set,
    slider_wrapper,
)
from ...core.plots import line_plot
from .._support import (
    CATEGORY,
    Residuals,
    check_kv_concept,
    checked_sites,
    lines,
    log,
    residuals_to_cpu,
    run_in_guider,
    save_path,
    save_residuals,
    sigma_range,
    step_progress,
    training_inputs,
    training_patcher,
)

ERASE = f"{CATEGORY}/erase"


def _train_guided_residuals(model, clip, sets, eta, steps, learning_rate, batch_size, rank, resolution, seed,
                            technique, save_name, overwrite, denoise_steps=0, preserve=(), layers="proj_out"):
    """``sets``: (neutral, plus, minus) prompt triples (text), one drawn per step; ``preserve``: prompts kept;
    ``layers``: ``GUIDED_LAYERS`` (each transformer's proj_out, or every cross-attention K/V projection: ESD-x)."""
    if layers == "cross_attention_kv" and is_dit(model):
        raise ValueError("layers 'cross_attention_kv' (ESD-x) trains the cross-attention key/value projections, which "
                         "SD3 and Flux do not have: choose 'proj_out' (each block's residual site on these models)")
    path = save_path(save_name, overwrite)
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

        def train(guided):
            predict = guided_predict(guided.model_wrap, guided.model_options, switch, guided.sigmas,
                                     guided.input_divisor, comfy.samplers.calc_cond_batch)
            return S.train_guided(rs.parameters(), predict, tuple(guided.latent.shape[1:]), guided.alphas_cumprod,
                                  eta, "x0", config, progress, guided.latent.device, denoise_steps, keyed_sets,
                                  keyed_preserve)

        with patch:
            losses = run_in_guider(mp, conds, latent, train, seed)
    rs = residuals_to_cpu(rs)
    if path:
        save_residuals(rs, save_name, overwrite)
    log.info("trained %s %s: loss %.5f -> %.5f", family, technique, losses[0], losses[-1])
    curve = line_plot(losses)
    return rs, curve


def _guided_training_inputs() -> list:
    """The training inputs of the prompt-only trainers (Train Concept Slider, Erase Concept (ESD))."""
    return [
        io.Float.Input("eta", default=1.0, min=-100.0, max=100.0, step=0.1,
                       tooltip="Guidance strength of the training target (the papers' eta)."),
        *training_inputs(
            steps=dict(default=300),
            learning_rate=dict(default=2e-4, step=1e-5),
            batch_size=dict(default=1, max=16, tooltip="Noisy samples per step."),
        ),
        io.Int.Input("rank", default=4, min=1, max=256,
                     tooltip="Rank of each transformer block's proj_out residual (sliders paper: 4)."),
        *training_inputs(
            resolution=dict(default=512, tooltip="Square training resolution in pixels (no images are needed)."),
            seed=dict(default=0, tooltip="Seeds noise and timesteps: same seed, same result."),
            save_name=dict(default="", tooltip="File under models/loras (no extension); LoraLoader reads it too. "
                                               "Empty: do not save."),
            overwrite=dict(default=False),
        ),
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
                *_guided_training_inputs(),
            ],
            outputs=[
                Residuals.Output(display_name="slider", tooltip="The slider as a residual set."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, positive, negative, neutral, eta, steps, learning_rate, batch_size, rank,
                resolution, seed, save_name, overwrite, denoise_steps=0):
        sets = S.slider_sets(lines(positive), lines(negative), [neutral] if neutral.strip() else [])
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
                *_guided_training_inputs(),
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
                                       "prompts while leaving other prompts alone; compared in docs/erase.md)."),
            ],
            outputs=[
                Residuals.Output(display_name="residuals", tooltip="The erasing residual set."),
                io.Image.Output(display_name="loss_curve", tooltip="Training loss per step."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, concept, eta, steps, learning_rate, batch_size, rank, resolution, seed,
                save_name, overwrite, denoise_steps=0, preserve="", anchor="", layers="proj_out"):
        sets = S.esd_sets(lines(concept), lines(anchor))
        kept = [p for p in lines(preserve) if p not in {t[0] for t in sets}]
        if len(kept) < len(lines(preserve)):
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
        start_sigma = sigma_range(model, start_percent, 1.0)[0] if start_percent > 0 else float("inf")
        return io.NodeOutput(apply_slider(model, slider_wrapper(slider, strength, start_sigma)))
