"""The ComfyUI backend: the only core code that calls ModelPatcher methods. Duck-typed, never imports comfy.

Global residuals become ordinary LoRA weight patches (the node hands in ComfyUI's own loader, so the result is
what the stock LoraLoader gives). LAG installs the core's hooks for the length of one UNet call through a
DIFFUSION_MODEL wrapper, so nothing outlives the call and the per-call state lives on the stack.
"""
from __future__ import annotations

import logging

import torch

from ..layouts import find_sites
from ..localize import ResidualGate, cfg_plan
from ..residuals import ResidualSet, to_state_dict
from ..tokens import same_prompt, word_positions

log = logging.getLogger(__name__)

DIFFUSION_MODEL = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
WRAPPER_KEY = "comfyui-concepts"

_FAMILIES = {"SD15": "SD1", "SD20": "SD2", "SDXL": "SDXL", "SDXLRefiner": "SDXLRefiner"}


class ConditioningMismatchError(RuntimeError):
    """The sampler's positive prompt is not the one whose token positions LAG knows."""


def model_family(model_patcher) -> str:
    """SD1 / SD2 / SDXL from the model's ComfyUI config class (subclasses such as SSD1B count as their base)."""
    for cls in type(model_patcher.model.model_config).__mro__:
        if cls.__name__ in _FAMILIES:
            return _FAMILIES[cls.__name__]
    return type(model_patcher.model.model_config).__name__


def model_sites(model_patcher):
    return find_sites(model_patcher.model.diffusion_model)


def lora_state_dict(rs: ResidualSet, block_strengths: dict[str, float] | None = None):
    """Group the residual's LoRA tensors by strength multiplier: {multiplier: state dict}."""
    groups: dict[float, dict] = {}
    sd = to_state_dict(rs)
    for path in rs.layers:
        mult = (block_strengths or {}).get(path, 1.0)
        part = groups.setdefault(mult, {})
        for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha"):
            key = f"diffusion_model.{path}{suffix}"
            part[key] = sd[key]
    return groups


def apply_global(model_patcher, rs: ResidualSet, strength: float, block_strengths, load_lora, key_map):
    """A clone with the residuals as weight patches; ``load_lora``/``key_map`` are ComfyUI's own loader pieces."""
    m = model_patcher.clone()
    for mult, sd in lora_state_dict(rs, block_strengths).items():
        patches = load_lora(sd, key_map)
        if len(patches) != len({k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}):
            raise RuntimeError("some residual layers did not map onto this model's weights")
        m.add_patches(patches, strength * mult)
    return m


def _fresh_weight(weight):
    return weight  # ComfyUI copies a weight that has a weight function: the copy is a normal autograd tensor


def trainable_clone(model_patcher):
    """A clone whose UNet weights reach each forward as fresh copies.

    Checkpoints load under ``torch.inference_mode``; their weights cannot be saved for backward, which training
    the residuals needs (gradients flow through every layer after the first proj_out). A weight function makes
    ComfyUI's cast copy the weight inside the forward, where autograd accepts it; the loaded model is untouched.
    """
    m = model_patcher.clone()
    for name, module in m.model.diffusion_model.named_modules():
        if not hasattr(module, "weight_function"):
            continue
        for kind in ("weight", "bias"):
            if getattr(module, kind, None) is not None:
                m.add_weight_wrapper(f"diffusion_model.{name}.{kind}", _fresh_weight)
    m.model.requires_grad_(False)
    return m


def prompt_token_ids(clip, text: str) -> list[int]:
    """Token ids of ``text`` as ComfyUI lays them out in the conditioning (all 77-token chunks, flattened)."""
    tokens = clip.tokenize(text)
    key = "l" if "l" in tokens else next(iter(tokens))
    return [t[0] if isinstance(t[0], int) else -1 for chunk in tokens[key] for t in chunk]


def word_token_ids(clip, word: str) -> list[int]:
    """The ids of ``word`` without start/end/padding tokens."""
    empty = prompt_token_ids(clip, "")
    end = empty[1]
    ids = prompt_token_ids(clip, word)[1:]
    return ids[:ids.index(end)] if end in ids else ids


def concept_positions(clip, text: str, words: list[str]) -> list[int]:
    return word_positions(prompt_token_ids(clip, text), {w: word_token_ids(clip, w) for w in words if w}, text)


def lag_wrapper(rs: ResidualSet, token_idx: list[int], reference_cond: torch.Tensor, strength: float = 1.0,
                block_strengths: dict[str, float] | None = None, rule: str = "median",
                sigma_range: tuple[float, float] = (float("inf"), 0.0)):
    """A DIFFUSION_MODEL wrapper applying ``rs`` with LAG for each UNet call.

    Conditional chunks whose context starts with ``reference_cond`` [L, D] (the prompt the token positions
    belong to) compute masks; unconditional chunks borrow them (see core.localize). Outside ``sigma_range``
    (start sigma, end sigma) the call runs the base model.
    """
    placed: dict = {}
    constants: dict = {}  # Delta W and token indicators per device, made on first use (see ResidualGate)
    sites_cache: dict = {}
    matched: dict = {}  # cond uuid -> whether its context is the reference prompt (checked once per run)
    full_range = sigma_range[0] == float("inf") and sigma_range[1] <= 0.0

    def on_device(device):
        if device not in placed:
            layers = {k: type(v)(v.down.to(device), v.up.to(device), v.alpha, v.conv) for k, v in rs.layers.items()}
            placed[device] = ResidualSet(layers, rs.metadata)
        return placed[device]

    def is_reference(context, row, uuid):
        if uuid is None:
            return same_prompt(context[row], reference_cond)
        if uuid not in matched:
            if len(matched) > 4096:  # a long-lived server: forget old runs
                matched.clear()
            matched[uuid] = same_prompt(context[row], reference_cond)
        return matched[uuid]

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        unet = executor.class_obj
        sites = sites_cache.get(id(unet))
        if sites is None:
            sites = sites_cache[id(unet)] = find_sites(unet)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        uuids = list(transformer_options.get("uuids") or [None] * len(cond_or_uncond))
        active = True
        if not full_range and "sigmas" in transformer_options:  # reading sigma waits for the GPU: only if needed
            sigma = float(transformer_options["sigmas"].max())
            active = sigma_range[1] <= sigma <= sigma_range[0]
        size = x.shape[0] // len(cond_or_uncond)
        per_chunk = [token_idx if kind == 0 and is_reference(context, c * size, uuids[c]) else None
                     for c, kind in enumerate(cond_or_uncond)]
        if active and 0 in cond_or_uncond and not any(per_chunk):
            raise ConditioningMismatchError(
                "Apply Residuals Localized: the sampler's positive conditioning is not the prompt this node "
                "encoded, so the concept's tokens cannot be found. Connect the node's 'positive' output to the "
                "sampler's positive input (and edit the prompt in the node).")
        gate = ResidualGate(sites, on_device(x.device), strength, block_strengths, localized=True, rule=rule,
                            cache=constants)
        gate.plan = cfg_plan(x.shape[0], cond_or_uncond, per_chunk, active)
        with gate:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    return wrapper


def apply_localized(model_patcher, wrapper):
    """A clone carrying the LAG wrapper; wrappers of other nodes (and earlier LAG nodes) stay in place."""
    m = model_patcher.clone()
    m.add_wrapper_with_key(DIFFUSION_MODEL, WRAPPER_KEY, wrapper)
    return m


OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE


def record_wrappers(record):
    """(OUTER_SAMPLE wrapper, DIFFUSION_MODEL wrapper) that record every sampling run's cross-attention.

    The outer wrapper starts a fresh record per sampling run; the model wrapper records the conditional chunks of
    each UNet call into the step bin of the call's sigma.
    """
    from ..heatmaps import AttentionRecorder, step_bin, step_fraction

    sites_cache: dict = {}
    sources: dict = {}  # cond uuid -> source index, per run

    def outer(executor, *args, **kwargs):
        record.reset()
        sources.clear()
        return executor(*args, **kwargs)

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        unet = executor.class_obj
        sites = sites_cache.get(id(unet))
        if sites is None:
            sites = sites_cache[id(unet)] = find_sites(unet)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        uuids = list(transformer_options.get("uuids") or [None] * len(cond_or_uncond))
        size = x.shape[0] // len(cond_or_uncond)
        record.latent_hw = tuple(x.shape[-2:])
        rows = {}
        for c, kind in enumerate(cond_or_uncond):
            if kind != 0:
                continue
            key = uuids[c]
            src = sources.get(key) if key is not None else None
            if src is None:
                src = record.source_of(context[c * size])
                if key is not None:
                    sources[key] = src
            if src is not None:
                rows[src] = rows.get(src, ()) + tuple(range(c * size, (c + 1) * size))
        recorder = AttentionRecorder(sites, record)
        recorder.rows = rows
        if "sigmas" in transformer_options and "sample_sigmas" in transformer_options:
            frac = step_fraction(float(transformer_options["sigmas"].max()), transformer_options["sample_sigmas"])
            recorder.bin = step_bin(frac, record.bins)
        with recorder:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)

    return outer, wrapper


def apply_recording(model_patcher, record):
    """A clone that records cross-attention into ``record`` during any sampler run."""
    outer, wrapper = record_wrappers(record)
    m = model_patcher.clone()
    m.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY + "-record", outer)
    m.add_wrapper_with_key(DIFFUSION_MODEL, WRAPPER_KEY + "-record", wrapper)
    return m


def model_modules(model_patcher) -> dict:
    """{ldm module path: module} for every layer with a weight in the model's UNet (ComfyUI names are ldm paths)."""
    unet = model_patcher.model.diffusion_model
    return {name: m for name, m in unet.named_modules() if getattr(m, "weight", None) is not None}


def regions_wrappers(regions, reference_cond: torch.Tensor | None, rule: str = "argmax", mask_rule: str = "median"):
    """(OUTER_SAMPLE, DIFFUSION_MODEL) wrappers applying ``regions`` (core.regions) in every UNet call of a run.

    One RegionGate per sampling run (it carries the last call's masks to the next call); conditional chunks
    whose context starts with ``reference_cond`` compute attention masks, the others borrow them.
    """
    from ..regions import Region, RegionGate, plan_rows

    state: dict = {}
    matched: dict = {}
    needs_prompt = any(r.tokens for r in regions)

    def outer(executor, *args, **kwargs):
        state.clear()
        matched.clear()
        return executor(*args, **kwargs)

    def gate_for(unet, device):
        key = (id(unet), str(device))
        if key not in state:
            placed = [Region({p: _to_device(layer, device) for p, layer in r.layers.items()}, r.strength, r.tokens,
                             None if r.mask is None else r.mask.to(device), r.name) for r in regions]
            modules = {n: m for n, m in unet.named_modules() if getattr(m, "weight", None) is not None}
            state[key] = RegionGate(modules, find_sites(unet), placed, rule, mask_rule)
        return state[key]

    def note_aspect(hw):
        for r in regions:
            if r.mask is not None and ("aspect", r.name) not in state:
                state[("aspect", r.name)] = True
                mh, mw = r.mask.shape[-2:]
                if abs(mh / mw - hw[0] / hw[1]) > 0.02:
                    log.warning("region '%s': its %dx%d mask is stretched to the %dx%d latent (another aspect "
                                "ratio); draw the mask on an image of the output's size", r.name, mw, mh, hw[1], hw[0])

    def wrapper(executor, x, timesteps, context, y, control, transformer_options, **kwargs):
        gate = gate_for(executor.class_obj, x.device)
        gate.set_latent_hw(tuple(x.shape[-2:]))
        note_aspect(tuple(x.shape[-2:]))
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        rows, borrow = (), ()
        if needs_prompt:
            uuids = list(transformer_options.get("uuids") or [None] * len(cond_or_uncond))
            size = x.shape[0] // len(cond_or_uncond)
            chunks = []
            for c, kind in enumerate(cond_or_uncond):
                key = uuids[c]
                if kind != 0:
                    chunks.append(False)
                elif key is not None and key in matched:
                    chunks.append(matched[key])
                else:
                    hit = same_prompt(context[c * size], reference_cond)
                    if key is not None:
                        matched[key] = hit
                    chunks.append(hit)
            if 0 in cond_or_uncond and not any(chunks):
                raise ConditioningMismatchError(
                    "Apply Regions: the sampler's positive conditioning is not the prompt this node encoded, so the "
                    "regions' words cannot be found. Connect the node's 'positive' output to the sampler.")
            rows, borrow = plan_rows(x.shape[0], cond_or_uncond, chunks)
        gate.begin_call(rows, borrow)
        with gate:
            out = executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        gate.check_text_side()
        return out

    return outer, wrapper


def _to_device(layer, device):
    import copy

    placed = copy.copy(layer)
    placed.down, placed.up = layer.down.to(device), layer.up.to(device)
    return placed


def apply_regions(model_patcher, regions, reference_cond, rule="argmax", mask_rule="median"):
    """A clone applying ``regions`` in one pass per step; other wrappers stay in place."""
    outer, wrapper = regions_wrappers(regions, reference_cond, rule, mask_rule)
    m = model_patcher.clone()
    m.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY + "-regions", outer)
    m.add_wrapper_with_key(DIFFUSION_MODEL, WRAPPER_KEY + "-regions", wrapper)
    return m
