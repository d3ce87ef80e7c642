"""The ComfyUI backend of Custom Diffusion, FreeCustom and Multi-Concept T2I-Zero.

Duck-typed, never imports comfy: the nodes hand in ComfyUI's own pieces (the attention function, the model's
``model_sampling``) where one is needed.

- Custom Diffusion: K/V residuals are forward hooks on ``attn2.to_k``/``attn2.to_v`` while training
  (``kv_residuals``: the pack's one low-rank gate); the closed-form merge is a low-rank factorisation of the
  merged ΔW (``merge_lowrank``), applied as ordinary LoRA weight patches on a clone;
- FreeCustom: a DIFFUSION_MODEL wrapper runs the references through the UNet at the call's sigma first (a
  separate pass, marked unconditional), keeping their self-attention keys/values, then runs the real batch with
  an ``optimized_attention_override`` that concatenates them into each chosen self-attention of the conditional
  rows (``mrsa_attention``); ``attn1_patch``/``attn1_output_patch`` mark which attention calls are
  self-attention; an OUTER_SAMPLE wrapper drops the features at the start and end of each run;
- T2I-Zero Cross-Token NMS: an attn2 replace patch on every transformer block (chaining to a replace patch that
  was there before), with the rows of the prompt found per call by a DIFFUSION_MODEL wrapper.

Per-call state travels in a shallow copy of ``transformer_options``; nothing is global and nothing outlives the
call (FreeCustom's step features outlive it until the run ends, for the other CFG half of the same step).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..compose import merge_projector, mrsa_attention, nms_attention
from ..hooks.gate import LowRankGate
from ..hooks.plan import PromptMatcher, conditional_rows, plan_batch
from ..residuals import LowRank, ResidualSet
from .comfy import DIFFUSION_MODEL, OUTER_SAMPLE, in_sigma_range

MRSA_KEY = "concepts_mrsa"
NMS_KEY = "concepts_nms"
OVERRIDE = "optimized_attention_override"


# ------------------------------------------------------------------------------------------ Custom Diffusion
def kv_residuals(modules: dict[str, torch.nn.Module], rs: ResidualSet, strength: float = 1.0) -> LowRankGate:
    """The gate adding ``strength * ΔW x`` (``rs.layers[name]``, low-rank, differentiable while training) to each
    named linear layer (``{name: module}``, e.g. every ``attn2.to_k``/``to_v``) while its ``with`` block lasts."""
    return LowRankGate([], rs, strength, modules=modules)


def init_kv_residuals(layers: Sequence[tuple[str, int, int]], rank: int, seed: int = 0, device="cpu",
                      metadata: dict | None = None) -> ResidualSet:
    """Rank-``rank`` residuals for linear layers ``(name, in, out)``: down ~ N(0, 1/in), up = 0, alpha = rank, so
    training starts at the base model exactly (LoRA's initialisation; Custom Diffusion starts from W0 too)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = {}
    for name, width_in, width_out in layers:
        r = max(1, min(rank, width_in, width_out))
        down = torch.randn(r, width_in, generator=gen) / math.sqrt(width_in)
        out[name] = LowRank(down.to(device), torch.zeros(width_out, r, device=device), float(r), conv=False)
    return ResidualSet(out, {k: str(v) for k, v in (metadata or {}).items()})


@dataclass
class MergeResult:
    layers: dict[str, LowRank]  # the merged ΔW of each layer as an exact rank-s factorisation
    constraint_error: float  # max over layers of ||W C^T - V|| / ||V - W0 C^T|| (relative; 0 = exact)


def merge_lowrank(base: dict[str, torch.Tensor], concepts: Sequence[dict[str, torch.Tensor]],
                  feats: Sequence[torch.Tensor], c_reg: torch.Tensor, ridge: float = 1e-6) -> MergeResult:
    """Custom Diffusion's closed-form merge (``core.compose.custom_diffusion_merge``) in factorised form.

    ``base`` {layer: W0 [out, in]}; ``concepts[i]`` {layer: ΔW_i} (a concept without a layer leaves it at W0);
    ``feats[i]`` C_i [n_i, in]. With V - W0 C^T = [ΔW_1 C_1^T, ..., ΔW_K C_K^T] the merge is
    W = W0 + U D, U = (V - W0 C^T)(C A^-1 C^T)^-1 [out, s], D = C A^-1 [s, in], s = sum n_i: a rank-s ΔW stored
    as a LoRA (``up`` = U, ``down`` = D, alpha = s), exact, small, and applied by ComfyUI's own loader.
    Computed in float64; factors returned in float32.
    """
    if len(concepts) != len(feats):
        raise ValueError(f"{len(concepts)} concepts but {len(feats)} feature sets: give one per concept")
    c_all = torch.cat([f.double() for f in feats], dim=0)
    proj = merge_projector(c_all, c_reg, ridge)
    layers, worst = {}, 0.0
    for name, w0 in base.items():
        if w0.shape[1] != c_all.shape[1]:
            raise ValueError(f"'{name}' takes {w0.shape[1]}-wide inputs but the text features are "
                             f"{c_all.shape[1]} wide: use the text encoder of the same checkpoint")
        cols = []
        for delta, c in zip(concepts, feats, strict=True):
            d = delta.get(name)
            cols.append(torch.zeros(w0.shape[0], c.shape[0], dtype=torch.float64) if d is None
                        else d.double() @ c.double().T)
        target = torch.cat(cols, dim=1)  # V - W0 C^T
        up = target @ proj.g_inv
        dw_c = up @ (proj.d @ proj.c.T)  # (W - W0) C^T, to check the constraints
        err = float((dw_c - target).norm() / target.norm().clamp_min(1e-30)) if target.abs().max() > 0 else 0.0
        worst = max(worst, err)
        s = up.shape[1]
        layers[name] = LowRank(proj.d.float().clone(), up.float(), float(s), conv=False)
    return MergeResult(layers, worst)


# ------------------------------------------------------------------------------------------ FreeCustom
@dataclass
class References:
    """What the FreeCustom wrapper needs, made once by the node: latents already in the model's latent space
    (``process_in``), the references' text contexts, masks at pixel size, weights and the noise seed."""

    latents: torch.Tensor  # [R, C, h, w]
    context: torch.Tensor  # [R, L, D]
    masks: torch.Tensor  # [R, H, W] in [0, 1]
    weights: list[float]
    blocks: set  # (block name, block number) keys whose self-attention gets MRSA
    mode: str = "add"
    sigma_range: tuple[float, float] = (float("inf"), 0.0)
    seed: int = 0

    @property
    def active(self) -> bool:
        return any(w != 0 and bool((m > 0).any()) for w, m in zip(self.weights, self.masks, strict=True))

    def noise(self, step: int) -> torch.Tensor:
        """The references' noise at the run's ``step``-th reference pass: fresh each step, as FreeCustom's code
        draws it, and reproducible from the seed."""
        gen = torch.Generator().manual_seed(self.seed * 100003 + step)
        return torch.randn(self.latents.shape, generator=gen)


@dataclass
class _MRSAState:
    capture: bool
    feats: dict = field(default_factory=dict)  # (block, number, index) -> (k [R, N, C], v, (h, w))
    rows: tuple = ()  # batch rows that get MRSA (the conditional ones); the others run plain self-attention
    in_self: bool = False
    masks: dict = field(default_factory=dict)  # ((h, w), device) -> [R, h*w]


def mask_at(masks: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Pixel masks [R, H, W] -> [R, h*w] at an attention grid, nearest neighbour (as FreeCustom's code)."""
    return F.interpolate(masks[:, None].float(), size=hw, mode="nearest").flatten(1)


def _layer_key(opts: dict):
    block = opts.get("block")
    if block is None:
        return None
    return (block[0], int(block[1]), int(opts.get("block_index", 0)))


def freecustom_patches(refs: References, model_sampling):
    """(OUTER_SAMPLE wrapper, DIFFUSION_MODEL wrapper, attention override factory, attn1_patch,
    attn1_output_patch) for FreeCustom's MRSA.

    The wrapper runs the references (noised to the call's sigma, their own prompts, no ControlNet, the first row's
    ``y``) through the UNet first, capturing their self-attention keys/values in the chosen blocks, then the real
    batch, whose conditional rows' self-attention there is extended by the references' masked keys/values; the
    unconditional rows keep plain self-attention (FreeCustom's code with its default style_fidelity = 1). The cond
    and uncond calls of one step share one reference pass; the outer wrapper drops the features at the start and
    end of each sampling run. Inactive (weights 0, empty masks, outside the step range, no conditional row): the
    call runs unchanged.
    """
    cache: dict = {}  # the current step's captured features
    steps = [0]  # reference passes so far in this run (picks the step's noise)

    def outer(executor, *args, **kwargs):
        cache.clear()  # features belong to one sampling run (the model or y may differ in the next one)
        steps[0] = 0
        try:
            return executor(*args, **kwargs)
        finally:
            cache.clear()  # do not keep GPU tensors alive between runs

    def run_references(executor, x, timesteps, y, transformer_options, kwargs, sigma):
        key = (round(float(sigma), 8), str(x.device), x.dtype)
        if key in cache:
            return cache[key]
        cache.clear()
        n_ref = refs.latents.shape[0]
        sig = sigma.reshape(1).to(x.device, torch.float32).expand(n_ref)
        lat = refs.latents.to(x.device, torch.float32)
        noise = refs.noise(steps[0]).to(x.device)
        steps[0] += 1
        x_ref = model_sampling.calculate_input(sig, model_sampling.noise_scaling(sig, noise, lat)).to(x.dtype)
        t_ref = timesteps[:1].expand(n_ref)
        ctx = refs.context.to(x.device, x.dtype)
        y_ref = y[:1].expand(n_ref, *y.shape[1:]) if y is not None else None
        state = _MRSAState(capture=True)
        opts = transformer_options.copy()
        opts.update({MRSA_KEY: state, "cond_or_uncond": [1], "uuids": [None], "sigmas": sig})
        with torch.no_grad():
            executor(x_ref, t_ref, ctx, y_ref, None, opts, **kwargs)
        cache[key] = state.feats
        return state.feats

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        sigmas = transformer_options.get("sigmas")
        rows = conditional_rows(x.shape[0], list(transformer_options.get("cond_or_uncond") or [0]))
        if not refs.active or sigmas is None or not rows:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        sigma = sigmas.max()
        start, end = refs.sigma_range
        if not (start == float("inf") and end <= 0.0) and not end <= float(sigma) <= start:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        feats = run_references(executor, x, timesteps, y, transformer_options, kwargs, sigma)
        opts = transformer_options.copy()
        opts[MRSA_KEY] = _MRSAState(capture=False, feats=feats, rows=rows)
        return executor(x, timesteps, context, y, control, opts, **kwargs)

    def attn1_patch(n, context, value, extra_options):
        state = extra_options.get(MRSA_KEY)
        if state is not None:
            state.in_self = True
        return n, context, value

    def attn1_output_patch(n, extra_options):
        state = extra_options.get(MRSA_KEY)
        if state is not None:
            state.in_self = False
        return n

    def override_for(previous):
        def backend(func, q, k, v, heads, args, kwargs):
            if previous is not None:
                return previous(func, q, k, v, heads, *args, **kwargs)
            return func(q, k, v, heads, *args, **kwargs)

        def call(func, q, k, v, heads, *args, **kwargs):
            opts = kwargs.get("transformer_options") or {}
            state = opts.get(MRSA_KEY)
            plain = kwargs.get("mask") is None and not kwargs.get("skip_reshape") and not args
            layer = _layer_key(opts) if state is not None and state.in_self and plain else None
            if layer is not None and layer[:2] in refs.blocks:
                hw = tuple(opts["activations_shape"][-2:]) if "activations_shape" in opts else None
                if state.capture and hw is not None and hw[0] * hw[1] == k.shape[1]:
                    state.feats[layer] = (k.detach(), v.detach(), hw)
                elif not state.capture and layer in state.feats and state.rows:
                    rows = state.rows
                    if len(rows) == q.shape[0]:
                        out = _mrsa(q, k, v, heads, state, layer)
                    else:
                        out = backend(func, q, k, v, heads, args, dict(kwargs, skip_output_reshape=False)).clone()
                        idx = torch.tensor(rows, device=q.device)
                        out[idx] = _mrsa(q[idx], k[idx], v[idx], heads, state, layer).to(out.dtype)
                    if kwargs.get("skip_output_reshape"):
                        out = out.reshape(out.shape[0], out.shape[1], heads, -1).transpose(1, 2)
                    return out
            return backend(func, q, k, v, heads, args, kwargs)
        return call

    def _mrsa(q, k, v, heads, state, layer):
        k_r, v_r, hw = state.feats[layer]
        mkey = (hw, q.device)
        masks = state.masks.get(mkey)
        if masks is None:
            masks = state.masks[mkey] = mask_at(refs.masks, hw).to(q.device)
        ref_list = [(k_r[i], v_r[i], masks[i], w) for i, w in enumerate(refs.weights)]
        return mrsa_attention(q, k, v, ref_list, heads, refs.mode)

    return outer, wrapper, override_for, attn1_patch, attn1_output_patch


def apply_freecustom(model_patcher, patches, wrapper_key: str):
    """A clone carrying FreeCustom's wrappers, override (chained to an override set before) and flag patches."""
    outer, wrapper, override_for, attn1_patch, attn1_output_patch = patches
    m = model_patcher.clone()
    topts = m.model_options.setdefault("transformer_options", {})
    topts[OVERRIDE] = override_for(topts.get(OVERRIDE))
    m.set_model_attn1_patch(attn1_patch)
    m.set_model_attn1_output_patch(attn1_output_patch)
    m.add_wrapper_with_key(OUTER_SAMPLE, wrapper_key, outer)
    m.add_wrapper_with_key(DIFFUSION_MODEL, wrapper_key, wrapper)
    return m


def decoder_finest_levels(sites, levels: int = 2) -> list:
    """The decoder's (output_blocks) transformer sites at its ``levels`` finest resolutions (narrowest widths):
    on SD1.x output_blocks.6-11, FreeCustom's layers 10-15; on SDXL every decoder transformer."""
    out = [s for s in sites if s.path.startswith("output_blocks.")]
    widths = sorted({s.width for s in out})[:levels]
    return [s for s in out if s.width in widths]


# ------------------------------------------------------------------------------------------ T2I-Zero NMS
def block_keys(site_paths: Sequence[str]) -> list[tuple[str, int]]:
    """ComfyUI patch keys ("input", 1), ("middle", 0), ("output", 3) of ldm transformer paths
    (``input_blocks.1.1``, ``middle_block.1``, ``output_blocks.3.1``)."""
    keys = []
    for path in site_paths:
        head, num = path.split(".")[:2]
        if head == "middle_block":
            key = ("middle", 0)
        else:
            key = (head.replace("_blocks", ""), int(num))
        if key not in keys:
            keys.append(key)
    return keys


def nms_patches(concepts: list[list[int]], reference_cond: torch.Tensor, attention, sigma_range,
                smoothing: float = 0.5, error_hint: str = ""):
    """(DIFFUSION_MODEL wrapper, attn2 replace factory) applying Cross-Token NMS (``nms_attention``) to the
    conditional rows whose context is ``reference_cond`` [L, D]; ``attention`` is ComfyUI's
    ``optimized_attention`` (what an unpatched cross-attention calls)."""
    matcher = PromptMatcher(reference_cond)

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        if not in_sigma_range(transformer_options, sigma_range):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        rows = plan_batch(x.shape[0], cond_or_uncond,
                          matcher.matches(context, cond_or_uncond, transformer_options.get("uuids"))).rows
        if 0 in cond_or_uncond and not rows:
            raise ValueError("Cross-Token NMS: the sampler's positive conditioning is not the one connected to "
                             "this node, so the concepts' tokens cannot be found. " + error_hint)
        opts = transformer_options.copy()
        opts[NMS_KEY] = rows
        return executor(x, timesteps, context, y, control, opts, **kwargs)

    def replace_for(previous):
        def default(q, k, v, extra):
            if previous is not None:
                return previous(q, k, v, extra)
            return attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                             transformer_options=extra)

        def attn2(q, k, v, extra_options):
            rows = extra_options.get(NMS_KEY)
            if not rows:
                return default(q, k, v, extra_options)
            hw = tuple(extra_options["activations_shape"][-2:])
            heads = extra_options["n_heads"]
            if len(rows) == q.shape[0]:
                return nms_attention(q, k, v, heads, concepts, hw, sigma=smoothing)
            out = default(q, k, v, extra_options).clone()
            idx = torch.tensor(rows, device=q.device)
            out[idx] = nms_attention(q[idx], k[idx], v[idx], heads, concepts, hw, sigma=smoothing).to(out.dtype)
            return out
        return attn2

    return wrapper, replace_for


def apply_nms(model_patcher, patches, site_paths: Sequence[str], wrapper_key: str):
    """A clone with the NMS attn2 replace on every transformer block (an attn2 replace set before, per block or
    per transformer index, is wrapped: it still computes the rows NMS leaves alone) and the row-finding wrapper."""
    wrapper, replace_for = patches
    m = model_patcher.clone()
    existing = dict(m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {}))
    for key in block_keys(site_paths):
        for old_key, old in existing.items():
            if tuple(old_key[:2]) == key and len(old_key) == 3:
                m.set_model_attn2_replace(replace_for(old), key[0], key[1], old_key[2])
        m.set_model_attn2_replace(replace_for(existing.get(key)), key[0], key[1])
    m.add_wrapper_with_key(DIFFUSION_MODEL, wrapper_key, wrapper)
    return m


def word_pool(ids: list[int], start: int, end: int) -> list[int]:
    """Positions of a tokenised prompt that hold word tokens (not start, end or padding), every chunk."""
    return [i for i, t in enumerate(ids) if t not in (start, end, -1)]
