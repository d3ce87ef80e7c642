"""The ComfyUI backend: the only core code that calls ModelPatcher methods. Duck-typed, never imports comfy.

Global residuals become ordinary LoRA weight patches (the node hands in ComfyUI's own loader, so the result is
what the stock LoraLoader gives). LAG installs the core's hooks for the length of one UNet call through a
DIFFUSION_MODEL wrapper, so nothing outlives the call and the per-call state lives on the stack.
"""
from __future__ import annotations

import contextlib
import logging

import torch

from ..families import FAMILIES, Family, comfy_family_key, find_sites
from ..hooks.gate import LowRankGate
from ..hooks.plan import PromptMatcher, plan_batch, source_rows
from ..hooks.tap import AttentionEvent, Tap, UNetTap
from ..residuals import ResidualSet, to_state_dict
from ..tokens import word_positions

log = logging.getLogger(__name__)

DIFFUSION_MODEL = "diffusion_model"  # comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL
APPLY_MODEL = "apply_model"  # comfy.patcher_extension.WrappersMP.APPLY_MODEL: one signature for every family
OUTER_SAMPLE = "outer_sample"  # comfy.patcher_extension.WrappersMP.OUTER_SAMPLE
WRAPPER_KEY = "comfyui-concepts"
OVERRIDE = "optimized_attention_override"
TAPS = "concepts_taps"  # this call's override taps, in a copy of transformer_options


class ConditioningMismatchError(RuntimeError):
    """The sampler's positive prompt is not the one whose token positions LAG knows."""


def model_family(model_patcher) -> str:
    """The family key (SD1, SDXL, SD3, Flux, ...) of the model's ComfyUI config class (subclasses such as SSD1B
    or FluxSchnell count as their base); the class name for a family the pack does not know."""
    return comfy_family_key(type(model_patcher.model.model_config))


def base_model_family(base_model) -> Family | None:
    """The ``Family`` of a ComfyUI ``BaseModel`` (what an APPLY_MODEL wrapper's executor holds), or None."""
    return FAMILIES.get(comfy_family_key(type(base_model.model_config)))


def is_dit(model_patcher) -> bool:
    """Whether the model is a diffusion transformer family the pack knows (SD3, Flux, Chroma)."""
    fam = FAMILIES.get(model_family(model_patcher))
    return fam is not None and fam.architecture == "dit"


def model_sites(model_patcher):
    """The residual sites of the model's diffusion model, as its family defines them."""
    return find_sites(model_patcher.model.diffusion_model, FAMILIES.get(model_family(model_patcher)))


class OverrideTap(Tap):
    """A DiT's joint attention, seen through ComfyUI's ``optimized_attention_override``.

    ComfyUI 0.3.64 passes no block index to the override on DiTs, so sites are counted: within one model call the
    joint calls (q over at least text + image tokens) come in block order (SD3: joint blocks; Flux: double, then
    single blocks), one per site; MMDiT-X's image-only self-attention calls are shorter and skipped. Make one tap
    per model call.
    """

    def __init__(self, text_tokens: int, image_tokens: int):
        super().__init__()
        self.text, self.image = text_tokens, image_tokens
        self.count = 0

    def observe(self, args: tuple, kwargs: dict) -> None:
        q, k = args[0], args[1]
        head_major = bool(kwargs.get("skip_reshape"))
        length = q.shape[2] if head_major else q.shape[1]
        if length < self.text + self.image:
            return
        site = self.count
        self.count += 1
        if self.wanted():
            heads = args[3] if len(args) > 3 else kwargs["heads"]
            self.emit(AttentionEvent(site, q, k, int(heads), head_major, (self.text, self.image), (0, self.text)))


def _tap_override(previous):
    """The override that shows each attention call to this call's taps, runs the override set before it (another
    node's or pack's) or the attention function itself, then shows the result to taps that read it
    (``observe_output``: ConceptAttention reads the image tokens' attention output)."""
    def override(func, *args, **kwargs):
        taps = (kwargs.get("transformer_options") or {}).get(TAPS, ())
        for tap in taps:
            tap.observe(args, kwargs)
        out = previous(func, *args, **kwargs) if previous is not None else func(*args, **kwargs)
        for tap in taps:
            after = getattr(tap, "observe_output", None)
            if after is not None:
                after(args, kwargs, out)
        return out
    override.concepts_tap = True
    return override


def with_override_tap(transformer_options: dict, tap) -> dict:
    """A copy of a call's ``transformer_options`` in which ``tap`` (``observe(args, kwargs)``, optionally
    ``observe_output(args, kwargs, out)``) sees every attention call, through the one chained override."""
    opts = transformer_options.copy()
    opts[TAPS] = tuple(opts.get(TAPS, ())) + (tap,)
    if not getattr(opts.get(OVERRIDE), "concepts_tap", False):
        opts[OVERRIDE] = _tap_override(opts.get(OVERRIDE))
    return opts


def call_tap(fam: Family | None, sites, x: torch.Tensor, context: torch.Tensor, transformer_options: dict):
    """(tap, transformer_options for the call) for one model call: a UNet's own ``attn2`` hooks, or for a DiT an
    ``OverrideTap`` added to a copy of the options (the override chained to whatever override was set)."""
    if fam is None or fam.architecture == "unet":
        return UNetTap(sites), transformer_options
    tap = OverrideTap(int(context.shape[1]), fam.image_tokens(tuple(x.shape[-2:])))
    return tap, with_override_tap(transformer_options, tap)


def attached(tap: Tap):
    """The tap's hooks for a ``with`` block (an override tap needs none)."""
    return tap if isinstance(tap, UNetTap) else contextlib.nullcontext(tap)


class SiteCache:
    """Sites per diffusion model, found once."""

    def __init__(self):
        self._cache: dict = {}

    def __call__(self, base_model):
        dm = base_model.diffusion_model
        key = id(dm)
        if key not in self._cache:
            fam = base_model_family(base_model)
            self._cache[key] = (fam, find_sites(dm, fam))
        return self._cache[key]


def in_sigma_range(transformer_options: dict, sigma_range: tuple[float, float]) -> bool:
    """Whether the call's sigma lies in (start, end); the full range is decided without reading the sigma (that
    waits for the GPU)."""
    if sigma_range[0] == float("inf") and sigma_range[1] <= 0.0:
        return True
    if "sigmas" not in transformer_options:
        return True
    sigma = float(transformer_options["sigmas"].max())
    return sigma_range[1] <= sigma <= sigma_range[0]


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


CLONE_LIMIT = 1 << 24  # parameters larger than this are not copied for training (SD3's position table: added only)


def trainable_clone(model_patcher):
    """A clone whose weights reach each forward as normal tensors, so that autograd can save them.

    Checkpoints load under ``torch.inference_mode``; their weights cannot be saved for backward, which training
    the residuals needs (gradients flow through every layer after the first site). A weight function makes
    ComfyUI's cast copy a cast layer's weight inside the forward, where autograd accepts it; the other parameters
    (the norms' scales of SD3 and Flux: they are saved for backward too) are swapped for copies by object patches
    that live as long as the clone's patches. The loaded model is untouched.
    """
    m = model_patcher.clone()
    for name, module in m.model.diffusion_model.named_modules():
        cast = hasattr(module, "weight_function")
        for kind, p in module.named_parameters(recurse=False):
            if cast and kind in ("weight", "bias"):
                m.add_weight_wrapper(f"diffusion_model.{name}.{kind}", _fresh_weight)
            elif p.is_inference() and p.numel() <= CLONE_LIMIT:
                path = f"diffusion_model.{name}.{kind}" if name else f"diffusion_model.{kind}"
                m.add_object_patch(path, torch.nn.Parameter(p.detach().clone(), requires_grad=False))
    fam = FAMILIES.get(model_family(m))
    existing = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
    for kind, blocks in fam.inplace_blocks if fam else ():
        for i in range(len(getattr(m.model.diffusion_model, blocks, ()))):
            m.set_model_patch_replace(_trainable_block(existing.get((kind, i))), "dit", kind, i)
    m.model.requires_grad_(False)
    return m


def _trainable_block(previous):
    """A block patch under which tensors saved for backward that share storage with the block's inputs are saved
    as copies: Flux's blocks add into their inputs in place (``x += ...``), which would change what autograd saved.
    Chains to the patch set before for the same block."""
    def patch(args, extra):
        inputs = {t.untyped_storage().data_ptr() for t in args.values() if isinstance(t, torch.Tensor)}

        def pack(t):
            return t.clone() if t.untyped_storage().data_ptr() in inputs else t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if previous is not None:
                return previous(args, extra)
            return extra["original_block"](args)
    return patch


def _flat(chunks) -> list[int]:
    return [t[0] if isinstance(t[0], int) else -1 for chunk in chunks for t in chunk]


def sequence_keys(tokens: dict) -> list[str]:
    """The tokenizers whose tokens run along the conditioning's sequence, in order: CLIP's (``l`` carries the
    positions of SDXL's and SD3's ``g`` too) then T5's (SD3 appends it; Flux and Chroma have only T5)."""
    clip_key = "l" if "l" in tokens else next((k for k in tokens if k != "t5xxl"), None)
    keys = [clip_key] if clip_key is not None else []
    if "t5xxl" in tokens and ("l" not in tokens or "g" in tokens):  # Flux's CLIP-L only gives the pooled vector
        keys.append("t5xxl")
    return keys


def prompt_token_ids(clip, text: str) -> list[int]:
    """Token ids of ``text`` as ComfyUI lays them out in the conditioning's sequence (every 77-token CLIP chunk,
    then T5's tokens where the family appends them)."""
    tokens = clip.tokenize(text)
    return [i for key in sequence_keys(tokens) for i in _flat(tokens[key])]


def _word_ids(clip, word: str, key: str) -> list[int]:
    """The ids of ``word`` in one tokenizer, without start, end or padding tokens."""
    empty, ids = _flat(clip.tokenize("")[key]), _flat(clip.tokenize(word)[key])
    start = 1 if empty and ids and empty[0] == ids[0] and len(empty) > 1 and empty[1] != ids[1] else 0
    end = empty[start] if start < len(empty) else None
    ids = ids[start:]
    return ids[:ids.index(end)] if end in ids else ids


def word_token_ids(clip, word: str) -> list[int]:
    """The ids of ``word`` in the conditioning's first tokenizer (CLIP, or T5 where there is no CLIP sequence)."""
    return _word_ids(clip, word, sequence_keys(clip.tokenize(word))[0])


def concept_positions(clip, text: str, words: list[str], context_length: int | None = None) -> list[int]:
    """Sequence positions of every sub-token of ``words`` in the encoded ``text``: in each tokenizer's part of the
    sequence (SD3: CLIP's and T5's, both summed). ``context_length`` (the encoded prompt's length) leaves out a
    part the text encoder did not produce (SD3 loaded without T5)."""
    tokens = clip.tokenize(text)
    positions, offset = [], 0
    for key in sequence_keys(tokens):
        ids = _flat(tokens[key])
        if context_length is not None and offset >= context_length:
            break
        words_ids = {w: _word_ids(clip, w, key) for w in words if w}
        positions += [offset + p for p in word_positions(ids, words_ids, text, key)]
        offset += len(ids)
    return positions


def lag_wrapper(rs: ResidualSet, token_idx: list[int], reference_cond: torch.Tensor, strength: float = 1.0,
                block_strengths: dict[str, float] | None = None, rule: str = "median",
                sigma_range: tuple[float, float] = (float("inf"), 0.0)):
    """An APPLY_MODEL wrapper applying ``rs`` with LAG in each model call, on any family.

    Conditional chunks whose context starts with ``reference_cond`` [L, D] (the prompt the token positions
    belong to) compute masks; unconditional chunks borrow them (``core.hooks.plan``). Outside ``sigma_range``
    (start sigma, end sigma) the call runs the base model.
    """
    placed: dict = {}
    constants: dict = {}  # Delta W and token indicators per device, made on first use (see LowRankGate)
    sites_of = SiteCache()
    matcher = PromptMatcher(reference_cond)

    def on_device(device):
        if device not in placed:
            layers = {k: type(v)(v.down.to(device), v.up.to(device), v.alpha, v.conv) for k, v in rs.layers.items()}
            placed[device] = ResidualSet(layers, rs.metadata)
        return placed[device]

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        fam, sites = sites_of(executor.class_obj)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        active = in_sigma_range(transformer_options, sigma_range)
        matches = matcher.matches(c_crossattn, cond_or_uncond, transformer_options.get("uuids"))
        if active and 0 in cond_or_uncond and not any(matches):
            raise ConditioningMismatchError(
                "Apply Residuals Localized: the sampler's positive conditioning is not the prompt this node "
                "encoded, so the concept's tokens cannot be found. Connect the node's 'positive' output to the "
                "sampler's positive input (and edit the prompt in the node).")
        tap, opts = call_tap(fam, sites, x, c_crossattn, transformer_options)
        gate = LowRankGate(sites, on_device(x.device), strength, block_strengths, localized=True, rule=rule,
                           cache=constants, tap=tap)
        gate.plan = plan_batch(x.shape[0], cond_or_uncond, matches, token_idx, active)
        with attached(tap), gate:
            return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)

    return wrapper


def apply_localized(model_patcher, wrapper):
    """A clone carrying the LAG wrapper; wrappers of other nodes (and earlier LAG nodes) stay in place."""
    m = model_patcher.clone()
    m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY, wrapper)
    return m


def record_wrappers(record):
    """(OUTER_SAMPLE wrapper, APPLY_MODEL wrapper) that record every sampling run's text->image attention.

    The outer wrapper starts a fresh record per sampling run; the model wrapper records the conditional chunks of
    each model call into the step bin of the call's sigma.
    """
    from ..heatmaps import AttentionRecorder, step_bin, step_fraction

    sites_of = SiteCache()
    sources: dict = {}  # cond uuid -> source index, per run

    def outer(executor, *args, **kwargs):
        record.reset()
        sources.clear()
        return executor(*args, **kwargs)

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        fam, sites = sites_of(executor.class_obj)
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        record.latent_hw = tuple(x.shape[-2:])
        rows = source_rows(record.source_of, sources, c_crossattn, cond_or_uncond, transformer_options.get("uuids"))
        tap, opts = call_tap(fam, sites, x, c_crossattn, transformer_options)
        recorder = AttentionRecorder(tap, record)
        recorder.rows = rows
        if "sigmas" in transformer_options and "sample_sigmas" in transformer_options:
            frac = step_fraction(float(transformer_options["sigmas"].max()), transformer_options["sample_sigmas"])
            recorder.bin = step_bin(frac, record.bins)
        with attached(tap), recorder:
            return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)

    return outer, wrapper


def apply_recording(model_patcher, record):
    """A clone that records text->image attention into ``record`` during any sampler run."""
    outer, wrapper = record_wrappers(record)
    m = model_patcher.clone()
    m.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY + "-record", outer)
    m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY + "-record", wrapper)
    return m


def model_modules(model_patcher) -> dict:
    """{ldm module path: module} for every layer with a weight in the model's UNet (ComfyUI names are ldm paths)."""
    unet = model_patcher.model.diffusion_model
    return {name: m for name, m in unet.named_modules() if getattr(m, "weight", None) is not None}


def regions_wrappers(regions, reference_cond: torch.Tensor | None, rule: str = "argmax", mask_rule: str = "median"):
    """(OUTER_SAMPLE, APPLY_MODEL) wrappers applying ``regions`` (core.regions) in every UNet call of a run.

    One RegionGate per sampling run (it carries the last call's masks to the next call); conditional chunks
    whose context starts with ``reference_cond`` compute attention masks, the others borrow them.
    """
    from ..regions import Region, RegionGate

    state: dict = {}
    matcher = PromptMatcher(reference_cond)
    needs_prompt = any(r.tokens for r in regions)

    def outer(executor, *args, **kwargs):
        state.clear()
        matcher.reset()
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

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        gate = gate_for(executor.class_obj.diffusion_model, x.device)
        gate.set_latent_hw(tuple(x.shape[-2:]))
        note_aspect(tuple(x.shape[-2:]))
        cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
        rows, borrow = (), ()
        if needs_prompt:
            matches = matcher.matches(c_crossattn, cond_or_uncond, transformer_options.get("uuids"))
            if 0 in cond_or_uncond and not any(matches):
                raise ConditioningMismatchError(
                    "Apply Regions: the sampler's positive conditioning is not the prompt this node encoded, so the "
                    "regions' words cannot be found. Connect the node's 'positive' output to the sampler.")
            plan = plan_batch(x.shape[0], cond_or_uncond, matches)
            rows, borrow = plan.rows, plan.borrow
        gate.begin_call(rows, borrow)
        with gate:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        gate.check_text_side()
        return out

    return outer, wrapper


def _to_device(layer, device):
    import copy

    placed = copy.copy(layer)
    placed.down, placed.up = layer.down.to(device), layer.up.to(device)
    return placed


def dit_regions_wrappers(regions, reference_cond: torch.Tensor | None, rule: str = "argmax",
                         mask_rule: str = "median", text_layers: str = "skip"):
    """(OUTER_SAMPLE, APPLY_MODEL) wrappers applying ``regions`` on a DiT (SD3, Flux): one gate per region per
    model call (``core.regions.dit_region_gates``), word regions reading the call's attention through the tap."""
    from ..regions import dit_region_gates

    matcher = PromptMatcher(reference_cond)
    words = [i for i, r in enumerate(regions) if r.tokens]
    sites_of = SiteCache()
    modules_of: dict = {}
    cache: dict = {}  # per region: Delta W and masks per layout, kept for the model's life

    def outer(executor, *args, **kwargs):
        matcher.reset()
        return executor(*args, **kwargs)

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        fam, sites = sites_of(executor.class_obj)
        dm = executor.class_obj.diffusion_model
        if id(dm) not in modules_of:
            modules_of.clear()
            modules_of[id(dm)] = {n: m for n, m in dm.named_modules() if getattr(m, "weight", None) is not None}
        grid = tuple(-(-int(s) // fam.patch) for s in x.shape[-2:])
        tap, opts, plans = None, transformer_options, {}
        if words:
            cond_or_uncond = list(transformer_options.get("cond_or_uncond") or [0])
            matches = matcher.matches(c_crossattn, cond_or_uncond, transformer_options.get("uuids"))
            if 0 in cond_or_uncond and not any(matches):
                raise ConditioningMismatchError(
                    "Apply Regions: the sampler's positive conditioning is not the prompt this node encoded, so the "
                    "regions' words cannot be found. Connect the node's 'positive' output to the sampler.")
            tap, opts = call_tap(fam, sites, x, c_crossattn, transformer_options)
            plans = {i: plan_batch(x.shape[0], cond_or_uncond, matches, regions[i].tokens) for i in words}
        gates = dit_region_gates(sites, modules_of[id(dm)], regions, fam, grid, text_layers, rule, cache, tap,
                                 mask_rule=mask_rule)
        for i, plan in plans.items():
            gates[i].plan = plan
        with contextlib.ExitStack() as stack:
            for gate in gates:
                stack.enter_context(gate)
            return executor(x, t, c_concat, c_crossattn, control, opts, **kwargs)

    return outer, wrapper


def apply_regions(model_patcher, regions, reference_cond, rule="argmax", mask_rule="median", text_layers="skip"):
    """A clone applying ``regions`` in one pass per step; other wrappers stay in place. On DiTs ``text_layers``
    says what the regions' text-stream and modulation layers do (``core.regions``); regions that cannot be
    applied are refused here (``RegionError``), before sampling."""
    if is_dit(model_patcher):
        from ..regions import dit_region_gates

        fam = FAMILIES[model_family(model_patcher)]
        dm = model_patcher.model.diffusion_model
        modules = {n: m for n, m in dm.named_modules() if getattr(m, "weight", None) is not None}
        dit_region_gates(find_sites(dm, fam), modules, regions, fam, (1, 1), text_layers, "sum", tap=Tap())
        outer, wrapper = dit_regions_wrappers(regions, reference_cond, rule, mask_rule, text_layers)
    else:
        outer, wrapper = regions_wrappers(regions, reference_cond, rule, mask_rule)
    m = model_patcher.clone()
    m.add_wrapper_with_key(OUTER_SAMPLE, WRAPPER_KEY + "-regions", outer)
    m.add_wrapper_with_key(APPLY_MODEL, WRAPPER_KEY + "-regions", wrapper)
    return m
