"""The ComfyUI backend of the erase family. Duck-typed, never imports comfy: the nodes hand in ComfyUI's own
functions (the LoRA loader, calc_cond_batch) where one is needed.

- closed-form edit: the K/V weights are read from the model; the edit goes back as LoRA weight patches through
  ComfyUI's own loader (``apply_global``, what LoraLoader does with the saved file), on a clone;
- steering: a ``sampler_post_cfg_function`` (a list ComfyUI chains, so other CFG patches keep working) that runs
  one more prediction for the concept prompt;
- sliders: the residual gate installed for each model call by an APPLY_MODEL wrapper, off before the start step;
  a K/V residual set (ESD-x) is added by forward hooks on the cross-attention K/V projections for that call.
"""
from __future__ import annotations

import functools

import torch

from ..erase import KV_SUFFIXES, cross_attention_projections
from ..hooks.gate import LowRankGate
from ..hooks.plan import BatchPlan
from ..layouts import find_sites
from ..residuals import ResidualSet, init_residuals
from ..steering import preserve_gate, prompt_gate, sld_gamma, sld_momentum, steer_denoised
from .comfy import APPLY_MODEL, SiteCache, prompt_token_ids
from .comfy_compose import init_kv_residuals, kv_residuals

SLIDER_WRAPPER_KEY = "comfyui-concepts-slider"


def word_encoder(clip):
    """``encode(text) -> ([L, D] conditioning rows, number of word tokens)`` with the CLIP as CLIPTextEncode runs
    it (SDXL: both encoders, concatenated). Only the first 77-token chunk is used (a word list fits in it)."""
    end = prompt_token_ids(clip, "")[1]

    def encode(text):
        ids = prompt_token_ids(clip, text)
        with torch.no_grad():
            cond = clip.encode_from_tokens(clip.tokenize(text))
        return cond[0, :77].float().cpu(), ids.index(end) - 1
    return encode


def dit_word_encoder(clip):
    """``encode(text) -> ([L, D] conditioning rows, [1, D'] pooled vector or None)`` as CLIPTextEncode runs the
    text encoders of a DiT (SD3: CLIP then T5 rows; Flux: T5 rows, CLIP-L pooled). Short texts pad to one length
    (SD3 77 + 77, Flux 256), so the rows of two words line up position by position."""
    def encode(text):
        with torch.no_grad():
            cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
        return cond[0].float().cpu(), None if pooled is None else pooled.reshape(1, -1).float().cpu()
    return encode


def kv_weights(model_patcher) -> list[tuple[str, torch.Tensor]]:
    """(ldm name, weight) of every cross-attention K/V projection of the model (read only)."""
    sites = find_sites(model_patcher.model.diffusion_model)
    return [(name, layer.weight) for name, layer in cross_attention_projections(sites)]


def steering_post_cfg(concept_cond, scale: float, cfg_mode: str, threshold: float, sigma_range, calc_cond_batch,
                      encode_model_conds, neutral_cond=None, momentum: tuple[float, float] = (0.0, 0.0),
                      preserve_conds=(), margin: float = 0.0, prompt_summaries=None):
    """A ``sampler_post_cfg_function`` steering the guided result away from ``concept_cond`` (converted ComfyUI
    conditioning) between ``sigma_range`` = (start sigma, end sigma); outside it, and at scale 0, the result is
    passed through untouched. ``neutral_cond``: the direction is concept - neutral instead of concept - uncond.
    ``momentum`` = (s_m, beta), sld only: SLD's momentum, accumulated on every model call from the first (before
    the start too, as SLD's warm-up) and reset when a call's sigma is above the previous one (a new run).
    ``preserve_conds``: steer a sample at a step only while its prediction is closer in direction to the concept's
    than to each of these prompts' (``core.steering.preserve_gate``); one more prediction each per step.
    ``prompt_summaries`` = (concept summary, preserved summaries [n, D], margin): steer only if a row of the sampled
    prompt's conditioning is nearer the concept's (``core.steering.prompt_gate``); otherwise the result is passed
    through untouched, with no extra prediction."""
    start, end = sigma_range
    momentum_scale, beta = momentum
    with_momentum = cfg_mode == "sld" and momentum_scale != 0.0
    state: dict = {"sigma": float("inf"), "velocity": None}

    def asked(conds):
        """``asks_for_concept``, decided once per conditioning (the same tensors at every step of a run)."""
        rows = [c.get("cross_attn") for c in conds or () if isinstance(c, dict)]
        seen, answer = state.get("asked", ((), None))
        if answer is None or len(seen) != len(rows) or any(a is not b for a, b in zip(seen, rows, strict=True)):
            answer = asks_for_concept(conds, *prompt_summaries)
            state["asked"] = (rows, answer)
        return answer

    def post_cfg(args):
        denoised = args["denoised"]
        sigma = args["sigma"]
        uncond = args["uncond_denoised"]
        if scale == 0.0 or uncond is None:
            return denoised
        s = float(sigma.max())
        active = end <= s <= start
        if with_momentum:
            if s > state["sigma"] or (state["velocity"] is not None and state["velocity"].shape != denoised.shape):
                state["velocity"] = None  # a new sampling run
            state["sigma"] = s
            if s < end:
                return denoised
        elif not active:
            return denoised
        if prompt_summaries is not None and not asked(args.get("cond")):
            return denoised
        x, model = args["input"], args["model"]
        conds = [encode_model_conds(model.extra_conds, c, x, x.device, "negative")
                 for c in (concept_cond, neutral_cond, *preserve_conds) if c is not None]
        concept_denoised, *rest = calc_cond_batch(model, conds, x, sigma, args["model_options"])
        neutral_denoised = rest.pop(0) if neutral_cond is not None else None
        if not with_momentum:
            return steer_denoised(denoised, x, sigma, args["cond_denoised"], uncond, concept_denoised, scale,
                                  args["cond_scale"], cfg_mode, threshold, neutral_denoised, rest, margin)
        sx = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

        def eps(d):
            return (x - d) / sx
        gamma = sld_gamma(eps(args["cond_denoised"]), eps(uncond if neutral_denoised is None else neutral_denoised),
                          eps(concept_denoised), scale, threshold)
        if rest:
            gamma = gamma * preserve_gate(eps(args["cond_denoised"]), eps(concept_denoised), [eps(d) for d in rest],
                                          margin)
        guided, state["velocity"] = sld_momentum(gamma, state["velocity"], momentum_scale, beta)
        if not active:  # the warm-up: momentum builds up, nothing is applied yet
            return denoised
        return denoised + sx * args["cond_scale"] * guided
    return post_cfg


def asks_for_concept(conds, concept, preserve, margin: float, chunk: int = 77) -> bool:
    """``core.steering.prompt_gate`` over the sampled (converted) positive conditioning: True if any of its entries
    has a token row nearer the concept's summary; the start token of each ``chunk``-row chunk is left out. With no
    text conditioning to read, True: the steering is then applied rather than silently dropped."""
    seen = False
    for c in conds or ():
        rows = c.get("cross_attn") if isinstance(c, dict) else None
        if rows is None:
            continue
        seen = True
        keep = [i for i in range(rows.shape[1]) if i % chunk != 0]
        if bool(prompt_gate(rows[:, keep], concept, preserve, margin).any()):
            return True
    return not seen


def add_steering(model_patcher, post_cfg, active: bool = True):
    """A clone with the steering appended to the post-CFG chain; while ``active`` (scale not 0), CFG 1 (Flux's
    usual setting) still computes the unconditional half the steering needs. Inactive, sampling stays as it was,
    bit for bit (at CFG 1 computing that half changes the result by rounding)."""
    m = model_patcher.clone()
    m.set_model_sampler_post_cfg_function(post_cfg, disable_cfg1_optimization=active)
    return m


def slider_wrapper(rs: ResidualSet, strength: float, start_sigma: float):
    """An APPLY_MODEL wrapper (one signature on every family) adding ``strength`` * the residual for model calls at
    sigma <= ``start_sigma`` (the sliders paper's delayed start) and the base model before."""
    placed: dict = {}
    constants: dict = {}
    kv = is_kv_set(rs)
    sites_of = SiteCache()

    def on_device(device):
        if device not in placed:
            layers = {k: type(v)(v.down.to(device), v.up.to(device), v.alpha, v.conv) for k, v in rs.layers.items()}
            placed[device] = ResidualSet(layers, rs.metadata)
        return placed[device]

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        active = True
        if start_sigma != float("inf") and "sigmas" in transformer_options:
            active = float(transformer_options["sigmas"].max()) <= start_sigma
        if not active or strength == 0.0:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        sites = sites_of(executor.class_obj)[1]
        if kv:
            patch = kv_residuals(dict(cross_attention_projections(sites)), on_device(x.device), strength)
        else:
            patch = LowRankGate(sites, on_device(x.device), strength, cache=constants)
            patch.plan = BatchPlan(active=True)
        with patch:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    return wrapper


GUIDED_LAYERS = ("proj_out", "cross_attention_kv")


def guided_residuals(sites, layers: str, rank: int, seed: int = 0, device="cpu", metadata: dict | None = None):
    """(residual set, patch, ``switch(on)``) for training a slider / ESD on ``sites`` (ComfyUI's or diffusers'):
    ``proj_out`` (each transformer's output, applied by ``LowRankGate``) or ``cross_attention_kv`` (every attn2
    K/V projection, ESD-x, applied by ``kv_residuals``). Both start at zero; the patch is entered by the caller."""
    if layers == "cross_attention_kv":
        modules = dict(cross_attention_projections(sites))
        shapes = [(name, m.weight.shape[1], m.weight.shape[0]) for name, m in modules.items()]
        rs = init_kv_residuals(shapes, rank, seed=seed, device=device, metadata=metadata)
        hooks = kv_residuals(modules, rs)
        return rs, hooks, functools.partial(_set_plan, hooks)
    if layers == "proj_out":
        rs = init_residuals([s for s, _ in sites], fixed_rank=rank, seed=seed, init_scale=0.0, device=device,
                            metadata=metadata)
        gate = LowRankGate(sites, rs)
        return rs, gate, functools.partial(_set_plan, gate)
    raise ValueError(f"unknown layers {layers!r}; use one of {GUIDED_LAYERS}")


def _set_plan(gate: LowRankGate, on: bool) -> None:
    gate.plan = BatchPlan(active=on)


def is_kv_set(rs: ResidualSet) -> bool:
    """Whether ``rs`` holds cross-attention K/V residuals (ESD-x, Custom Diffusion) rather than proj_out ones."""
    return bool(rs.layers) and all(path.endswith(KV_SUFFIXES) for path in rs.layers)


def apply_slider(model_patcher, wrapper):
    m = model_patcher.clone()
    m.add_wrapper_with_key(APPLY_MODEL, SLIDER_WRAPPER_KEY, wrapper)
    return m


def guided_predict(guider, model_options, switch, sigma_table: torch.Tensor, input_divisor: torch.Tensor,
                   calc_cond_batch):
    """``predict(x_t, t, prompt, residual)`` for core.sliders.train_guided inside a ComfyUI guider whose conds are
    the slider's prompts; ``switch(on)`` turns the trained residual on or off; ``x_t / input_divisor[t]`` is the
    model's input at ``sigma_table[t]`` (``nodes._support.training_schedule``: the UNets' and rectified flow's
    scalings alike); returns ComfyUI's denoised x0 (prediction kind ``x0``)."""

    def predict(x_t, t, prompt, residual):
        switch(residual)
        (x0,) = calc_cond_batch(guider.inner_model, [guider.conds[prompt]], x_t / input_divisor[t].view(-1, 1, 1, 1),
                                sigma_table[t], model_options)
        return x0
    return predict
