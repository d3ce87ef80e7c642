"""One low-rank gate: add ``strength * gate * Delta W x`` to a layer's output, for every technique and family.

The gate is all ones (the global residual; training; erasure residuals), a concept's attention mask (LAG, Ham
et al. 2024, Sec. 3.3: that same block's text->image maps of the concept's tokens, summed, binarised at the
median, in the same pass) or a fixed spatial mask (a user region; Cut-Mix training). Attention masks come from a
tap (``core.hooks.tap``) and follow a ``BatchPlan``: rows of the concept's prompt compute their own mask, the
others borrow it (CFG), rows without one get the base model.

Cost: LAG runs at every gated block of every step, so its work is counted in tensor operations (at 512 px a
UNet step on a GPU is bound by how many small operations launch): two strided views for q and k, one fused
attention against a one-column token indicator, one reduction over heads (its column broadcasts over the layer's
channels), median and compare, the delta (one matmul, two for wide layers) and one ``addcmul``: eight per block,
one more for SD1's conv layout (a reshape) and for Flux's [text | image] rows (a pad)
(``bench/bench_learn_localize.py --count-ops``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..attention import token_indicator, token_mass_column
from ..masks import binarize
from ..residuals import LowRank, ResidualSet, residual_forward
from .plan import BatchPlan
from .tap import AttentionEvent, Tap, UNetTap

FULL_DELTA_LIMIT = 1 << 24  # a layer with at most this many weights applies Delta W as one matrix (one operation)


class LocalizationError(RuntimeError):
    """LAG could not compute a mask where it needed one."""


@dataclass
class GateState:
    """Per-call state of an attention gate: each site's summed maps and where its image tokens sit."""

    maps: dict[int, torch.Tensor] = field(default_factory=dict)
    image: dict[int, tuple[int, int] | None] = field(default_factory=dict)


def target_layer(site, module: nn.Module) -> nn.Module:
    """The layer a site's residual attaches to (``proj_out`` of a UNet transformer, a DiT block's projection)."""
    return module.get_submodule(getattr(site, "module_layer", "") or site.layer)


class LowRankGate:
    """Hooks that apply ``residuals`` to ``sites`` (``[(site, module)]``, as ``core.families.find_sites`` gives).

    ``localized`` selects LAG's attention gate (maps from ``tap``, whose events number ``sites`` as given here; a
    UNet's own ``attn2`` when no tap is given),
    ``mask`` a fixed [H, W] gate in [0, 1], neither the global residual. ``modules`` ({path: layer}) lets the
    residual target any layer by path (global or mask gates: LoRAs, K/V residuals). Set ``plan`` before each
    model call (attention gates need its rows; ``active=False`` turns the residual off for the call).

    On a DiT a mask gate needs ``grid``, the call's image-token grid (rows, columns), and ``kinds``, what each
    layer's output rows are (``core.families.row_kind``): image rows take the mask, [text | image] rows take it on
    their image rows and ``text_rows`` (0: the base model; 1: the full delta) on their text rows, text and vector
    layers have no positions and add their delta ungated (leave them out of ``residuals`` to keep them off).
    """

    def __init__(self, sites: list, residuals: ResidualSet, strength: float = 1.0,
                 block_strengths: dict[str, float] | None = None, localized: bool = False, rule: str = "median",
                 mask_fn=None, cache: dict | None = None, tap: Tap | None = None, mask: torch.Tensor | None = None,
                 modules: dict[str, nn.Module] | None = None, grid: tuple[int, int] | None = None,
                 kinds: dict[str, str] | None = None, text_rows: float = 0.0):
        if localized and mask is not None:
            raise ValueError("a gate is either localized (attention) or masked, not both")
        sites = list(sites)
        self.sites = [(s, m) for s, m in sites if s.target in residuals.layers]
        # a tap's events number the sites it was given (the same ``sites`` as here); only the gated ones are kept
        kept = [j for j, (s, _) in enumerate(sites) if s.target in residuals.layers]
        self.residuals = residuals
        self.strength = strength
        self.block_strengths = block_strengths or {}
        self.localized = localized
        self.rule = rule
        self.mask_fn = mask_fn  # maps [R, N] -> gate [R, N]; overrides ``rule`` (tests, custom rules)
        self.mask = mask
        self.grid = grid
        self.kinds = kinds or {}
        self.text_rows = text_rows
        self.plan = BatchPlan()
        # constants made on first use, shareable across calls: Delta W per layer/dtype/device and token indicators
        self.cache = cache if cache is not None else {}
        self._last: dict[str, tuple[torch.Tensor, BatchPlan]] = {}  # masks of the last call, for ``last_masks``
        self.state = GateState()
        self._targets = self._resolve(modules)
        if mask is not None and grid is None and any(self._kind(path) == "joint" for path in self._targets):
            raise ValueError("a fixed mask cannot gate a layer whose rows are [text | image] tokens (Flux's single "
                             "blocks): its text rows have no place in the mask; leave those layers out")
        self._own_tap = None
        self.tap = tap
        self._site_index = {j: i for i, j in enumerate(kept)}
        if localized and tap is None:
            self.tap = self._own_tap = UNetTap(self.sites)
            self._site_index = {i: i for i in range(len(self.sites))}
        self._handles: list = []

    def _kind(self, path: str) -> str:
        """What the output rows of the layer at ``path`` are (image tokens unless ``kinds`` or its site says)."""
        if path in self.kinds:
            return self.kinds[path]
        site = self._targets[path][1]
        return getattr(site, "tokens", "image") if site is not None else "image"

    def _resolve(self, modules):
        site_of = {s.target: (i, s, m) for i, (s, m) in enumerate(self.sites)}
        targets = {}
        for path in self.residuals.layers:
            if path in site_of:
                i, site, module = site_of[path]
                targets[path] = (i, site, target_layer(site, module))
            elif modules is not None:
                if path not in modules:
                    missing = [p for p in self.residuals.layers if p not in modules and p not in site_of]
                    raise ValueError(f"no layer named {path} in this model ({len(missing)} missing)")
                if self.localized:
                    raise ValueError(f"'{path}' is not a transformer site; an attention gate needs one")
                targets[path] = (None, None, modules[path])
        return targets

    @property
    def last_masks(self) -> dict[str, torch.Tensor]:
        """The gates of the last call per site path, [batch, N] in 0..1 (made on request: sampling keeps only the
        concept rows' masks)."""
        out = {}
        for path, (mask, plan) in self._last.items():
            m = mask.float().flatten(1)
            if plan.broadcast():
                m = m.expand(plan.batch, -1)
            elif not plan.identity():
                m = torch.cat([m, m.new_zeros(1, m.shape[1])])
                m = m[[len(plan.rows) if b < 0 else b for b in plan.borrow]]
            out[path] = m
        return out

    # -------------------------------------------------------------- lifecycle
    def install(self) -> LowRankGate:
        if self._handles:
            return self
        if self.localized:
            self.tap.listen(self._on_attention, self._wanted)
            if self._own_tap is not None:
                self._own_tap.install()
        for path, (index, site, layer) in self._targets.items():
            self._handles.append(layer.register_forward_hook(self._out_hook(path, index, site)))
        return self

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.localized:
            self.tap.unlisten(self._on_attention)
            if self._own_tap is not None:
                self._own_tap.remove()
        self.state = GateState()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    # -------------------------------------------------------------- maps
    def _wanted(self) -> bool:
        return self.plan.gated

    def _on_attention(self, ev: AttentionEvent) -> None:
        site = self._site_index.get(ev.site)
        if site is None:  # a block without a residual: no map needed
            return
        plan = self.plan
        if plan.consecutive:
            span = (plan.rows[0], len(plan.rows))
            qh, kh = ev.queries(span), ev.keys(span)
        else:
            idx = torch.tensor(plan.rows, device=ev.q.device)
            qh, kh = ev.queries().index_select(0, idx), ev.keys().index_select(0, idx)
        rows, heads, length, dim = qh.shape[0], qh.shape[1], kh.shape[2], kh.shape[3]
        key = ("indicator", plan.tokens, rows, heads, length, dim, kh.dtype, kh.device)
        ind = self.cache.get(key)
        if ind is None:
            idx = torch.tensor(plan.tokens, dtype=torch.long, device=kh.device)
            ind = self.cache[key] = token_indicator(idx, heads, length, 1, kh).expand(rows, -1, -1, -1)
        maps = token_mass_column(qh, kh, ind)  # [R, N, 1]
        prev = self.state.maps.get(site)
        self.state.maps[site] = maps if prev is None else prev + maps  # UNet depth > 1 (SDXL): sum the blocks
        self.state.image[site] = ev.image

    def _attention_mask(self, index: int, site) -> torch.Tensor:
        """[R, N, 1] mask of the concept rows at a site: bool (median/mean rule) or float (soft rule,
        ``mask_fn``)."""
        maps = self.state.maps.pop(index, None)
        if maps is None:
            raise LocalizationError(
                f"no attention map reached block {site.path}: another node replaced this block's attention "
                "without calling the attention function; apply the localized residual after that node")
        if self.mask_fn is not None:
            return self.mask_fn(maps).to(torch.float32)
        if self.rule == "median":
            return maps > maps.median(dim=1, keepdim=True).values
        return binarize(maps, self.rule)

    def _rows(self, mask: torch.Tensor, batch: int) -> torch.Tensor:
        """The mask's rows arranged as the batch: itself when it broadcasts, else one gather (borrowing)."""
        plan = self.plan
        if plan.broadcast() or plan.identity():
            return mask
        if -1 in plan.borrow:
            mask = torch.cat([mask, mask.new_zeros(1, *mask.shape[1:])])
        order = tuple(len(plan.rows) if b < 0 else b for b in plan.borrow)
        return mask.index_select(0, torch.tensor(order, device=mask.device))

    def _fixed_mask(self, output: torch.Tensor, kind: str) -> torch.Tensor:
        """The user mask at this output's positions, shaped to multiply it (made once per layout)."""
        key = ("mask", kind, self.grid, self.text_rows, output.ndim, tuple(output.shape[1:]), output.device,
               output.dtype)
        g = self.cache.get(key)
        if g is None:
            if self.grid is None or output.ndim == 4:
                g = spatial_gate(self.mask, output)
            else:
                g = token_gate(self.mask, self.grid, output.shape[1], kind, self.text_rows)
                g = g.to(output.device, output.dtype)
            self.cache[key] = g
        return g

    # -------------------------------------------------------------- the residual
    def _delta(self, path: str, layer: LowRank, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and layer.up.requires_grad:
            return residual_forward(layer, x)  # training: keep the low-rank factors in the graph
        key = (path, x.dtype, x.device)
        if layer.up.shape[0] * layer.down.shape[1] > FULL_DELTA_LIMIT:  # a wide layer: two thin matmuls beat one
            factors = self.cache.get(key)
            if factors is None:
                factors = self.cache[key] = (layer.down.to(x.device, x.dtype),
                                             (layer.up * layer.scale).to(x.device, x.dtype))
            return F.linear(F.linear(x, factors[0]), factors[1])
        w = self.cache.get(key)
        if w is None:
            w = layer.delta().to(device=x.device, dtype=x.dtype)
            w = self.cache[key] = w[:, :, None, None].contiguous() if layer.conv else w
        return F.conv2d(x, w) if layer.conv else F.linear(x, w)

    def _out_hook(self, path: str, index: int | None, site):
        layer = self.residuals.layers[path]
        weight = self.strength * self.block_strengths.get(path, 1.0)
        joint = site is not None and getattr(site, "tokens", "image") == "joint"

        def hook(module, inputs, output):
            plan = self.plan
            if not plan.active or weight == 0.0:
                self.state.maps.pop(index, None)
                return None
            x = inputs[0]
            if self.mask is not None:
                kind = self._kind(path)
                if kind in ("text", "vector"):  # no image positions: the delta applies everywhere
                    return output + weight * self._delta(path, layer, x)
                return torch.addcmul(output, self._fixed_mask(output, kind), self._delta(path, layer, x),
                                     value=weight)
            if not self.localized:
                return output + weight * self._delta(path, layer, x)
            if not plan.gated:
                return None  # no concept prompt in this call: the base model
            mask = self._attention_mask(index, site)
            self._last[site.path] = (mask, plan)
            if output.ndim == 4:  # [B, C, H, W] (a 1x1 conv proj_out)
                mask = self._rows(mask.view(mask.shape[0], 1, *output.shape[2:]), output.shape[0])
                return torch.addcmul(output, mask, self._delta(path, layer, x), value=weight)
            mask = self._rows(mask, output.shape[0])
            image = self.state.image.get(index)
            if joint and image is not None and (image[0] != 0 or image[1] != output.shape[1]):
                # [txt | img] rows (Flux single blocks): text rows get a zero gate, i.e. keep the base model
                start, count = image
                mask = F.pad(mask, (0, 0, start, output.shape[1] - start - count))
            return torch.addcmul(output, mask, self._delta(path, layer, x), value=weight)
        return hook


def spatial_gate(mask: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """``mask`` [H, W] at a layer output's positions (area-averaged, values stay in [0, 1]), shaped to multiply
    it: [1, 1, h, w] for conv maps, [1, N, 1] for tokens (the mask's aspect ratio gives the token grid)."""
    if output.ndim == 4:
        hw = tuple(output.shape[-2:])
    else:
        n, (mh, mw) = output.shape[1], mask.shape
        h = max(1, round((n * mh / mw) ** 0.5))
        hw = (h, n // h)
        if hw[0] * hw[1] != n:
            raise ValueError(f"cannot place {n} positions on a {mh}x{mw} mask's grid")
    g = resize_mask(mask, hw).to(output.device, output.dtype)
    return g.view(1, 1, *hw) if output.ndim == 4 else g.view(1, -1, 1)


def token_gate(mask: torch.Tensor, grid: tuple[int, int], rows: int, kind: str, text_rows: float = 0.0
               ) -> torch.Tensor:
    """``mask`` [H, W] as a [1, rows, 1] gate for a DiT layer's output rows: its image tokens on ``grid`` (rows,
    columns), and for [text | image] rows ``text_rows`` on the text rows before them."""
    image = grid[0] * grid[1]
    g = resize_mask(mask, grid).view(1, image, 1)
    if kind == "joint" and rows > image:
        return F.pad(g, (0, 0, rows - image, 0), value=text_rows)
    if rows != image:
        raise ValueError(f"a layer with {rows} output rows cannot take a mask over {grid[0]}x{grid[1]} image "
                         "tokens; is it an image-stream layer of this model?")
    return g


def resize_mask(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A mask [H, W] at a layer's resolution, flattened: [h*w] (area-averaged, so values stay in [0, 1])."""
    m = mask.float()[None, None]
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m, size=hw, mode="area") if m.shape[-1] >= hw[1] else \
            F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
    return m.flatten()
