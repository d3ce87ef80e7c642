"""Several low-rank residuals in one UNet pass, each limited to its own region.

A *region* is a set of low-rank layers (a learned residual set, a community LoRA) with a strength and a gate:
either a user mask, or the cross-attention of its words (LAG, Ham et al. 2024: summed maps of the words,
binarised per block). Every gated layer adds ``strength * gate * Delta W x`` to its output in the same pass; where
gates overlap, a rule decides (``core.compose.resolve_overlaps``: larger attention wins, both apply, or error).

When is which gate known? A transformer's attention maps exist once its ``attn2`` has run, so layers after it
(``attn2.to_out``, ``ff``, ``proj_out``) use this call's masks, exactly as LAG does. Layers that run before
(``proj_in``, ``attn1``, resnets, samplers) use the masks of the same resolution from the previous UNet call of the
run (attention layouts change slowly between steps); on the first call they get none (base model). User masks
apply everywhere from the first call.

Text-side layers (``attn2.to_k``/``to_v`` read the prompt, not the image) cannot be gated by position; for them
each region's attention is computed from the pass's own q, k, v with its K/V deltas (77 keys: cheap) and the
differences from the block's own result ``a`` (``to_out``'s input) are blended by the gates before ``to_out``:
``out = out_base + to_out_linear(sum_r g_r (a_r - a))``.

On diffusion transformers (SD3, Flux) a region is one ``core.hooks.gate.LowRankGate`` (``dit_region_gates``): a
mask gates every layer whose rows are image tokens (on Flux's single blocks the image rows of [text | image]; text
rows keep the base model); words gate a learned residual's block sites by that block's attention, as LAG does. A
LoRA's text-stream and vector layers (modulation, embedders) have no image positions, nor have the text rows of
Flux's single blocks: ``text_layers`` leaves them at the base model ("skip") or applies them in full
("everywhere": one region covering the image is then the LoRA applied globally).

Cost: regions that cover few positions (together at most half of a dense pass per region) run their low-rank
matmuls on their own positions only, so k disjoint regions cost about what one full-image region does.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import token_indicator, token_mass
from .compose import resolve_overlaps
from .families import Family, row_kind
from .hooks.gate import LowRankGate, resize_mask
from .hooks.tap import AttentionEvent, UNetTap, remove_hooks
from .layouts import TransformerSite
from .lora_files import ConvLowRank, lora_forward
from .masks import binarize
from .residuals import LowRank, ResidualSet

log = logging.getLogger(__name__)

TEXT_SIDE = ("attn2.to_k", "attn2.to_v")
TEXT_LAYERS = ("skip", "everywhere")  # DiTs: what a region does with layers that have no image positions


@dataclass
class Region:
    """One region: its layers {ldm module path: LowRank}, strength, and gate source (tokens or a mask)."""

    layers: dict[str, LowRank]
    strength: float = 1.0
    tokens: list[int] | None = None  # prompt positions of the words whose attention gates the region
    mask: torch.Tensor | None = None  # [H, W] in [0, 1]
    name: str = ""


class RegionGate:
    """Installs the hooks for ``regions`` on a UNet; keep one per sampling run (it remembers masks between calls).

    ``modules`` maps ldm paths to the UNet's modules; ``sites`` are its transformers (``core.layouts``).
    Before each call set ``rows`` (the batch rows whose prompt holds the regions' words) and ``borrow`` (per batch
    row, the index into ``rows`` whose masks it uses, or -1), e.g. from ``core.hooks.plan.plan_batch``.
    """

    def __init__(self, modules: dict[str, nn.Module], sites: list[tuple[TransformerSite, nn.Module]],
                 regions: list[Region], rule: str = "argmax", mask_rule: str = "median"):
        missing = sorted({p for r in regions for p in r.layers if p not in modules})
        if missing:
            raise KeyError(f"layers not in this model: {', '.join(missing[:4])}")
        self.modules, self.sites, self.regions = modules, sites, regions
        self.rule, self.mask_rule = rule, mask_rule
        self.rows: tuple[int, ...] = ()
        self.borrow: tuple[int, ...] = ()
        self.memory: dict[int, torch.Tensor] = {}  # positions -> resolved masks [K, len(rows), N] of the last call
        self._maps: dict[str, list[torch.Tensor | None]] = {}  # site path -> per region summed maps
        self._site_masks: dict[str, tuple[int, torch.Tensor]] = {}  # site -> (maps version, masks)
        self._version: dict[str, int] = {}
        self._fallback: dict[int, torch.Tensor] = {}  # positions -> masks from user masks alone
        # fused per-position gates, shared by every layer of one resolution: key -> (masks they came from, gates)
        self._gates: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._kv_blocks: dict[str, list[int]] = {}
        self._known_hw: list[tuple[int, int]] = []
        self._attn2_ran: set[str] = set()
        self._handles: list = []
        self._tap: UNetTap | None = None
        self._site_of = {}
        self._attn2 = {}
        for site, module in sites:
            self._site_of[site.path] = site
            for d, block in enumerate(module.transformer_blocks):
                self._attn2[f"{site.path}.transformer_blocks.{d}.attn2"] = block.attn2
        self.token_regions = [i for i, r in enumerate(regions) if r.tokens]

    # ---------------------------------------------------------------- lifecycle
    def install(self) -> RegionGate:
        if self._handles:
            return self
        if self.token_regions:
            self._tap = UNetTap(self.sites).listen(self._on_attention, self._wanted).install()
        by_module: dict[str, list[int]] = {}
        for i, r in enumerate(self.regions):
            for path in r.layers:
                by_module.setdefault(path, []).append(i)
        kv_blocks: dict[str, list[int]] = {}
        for path, idx in by_module.items():
            if path.endswith(TEXT_SIDE):
                attn = path.rsplit(".", 1)[0]
                kv_blocks[attn] = sorted(set(kv_blocks.get(attn, [])) | set(idx))
            else:
                self._handles.append(self.modules[path].register_forward_hook(self._out_hook(path, idx)))
        for attn_path, idx in kv_blocks.items():
            attn = self._attn2[attn_path]
            seen: dict = {}
            for name in ("to_q", "to_k", "to_v"):
                self._handles.append(getattr(attn, name).register_forward_hook(self._keep(seen, name)))
            self._handles.append(attn.to_out[0].register_forward_hook(self._keep(seen, "to_out")))
            self._handles.append(attn.register_forward_hook(self._attn2_hook(attn_path, idx, seen)))
        self._kv_blocks = kv_blocks
        return self

    def remove(self) -> None:
        remove_hooks(self._handles)
        if self._tap is not None:
            self._tap.remove()
            self._tap = None
        self._maps.clear()
        self._site_masks.clear()
        self._gates.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    def begin_call(self, rows: tuple[int, ...], borrow: tuple[int, ...]) -> None:
        """Set the batch plan of the next UNet call and forget the previous call's per-site state."""
        changed = rows != self.rows or borrow != self.borrow
        if changed:
            self.memory.clear()  # another batch layout: last call's masks do not fit
        if changed or self.token_regions:
            self._fallback.clear()  # with user masks only it never changes: kept across calls
        self.rows, self.borrow = rows, borrow
        self._maps.clear()
        self._site_masks.clear()
        self._version.clear()
        self._attn2_ran.clear()
        self._gates.clear()

    # ---------------------------------------------------------------- maps and masks
    def _wanted(self) -> bool:
        return bool(self.rows)

    def _on_attention(self, ev: AttentionEvent) -> None:
        path = self.sites[ev.site][0].path
        idx = torch.tensor(self.rows, device=ev.q.device)
        qh, kh = ev.queries().index_select(0, idx), ev.keys().index_select(0, idx)
        maps = self._maps.setdefault(path, [None] * len(self.regions))
        self._version[path] = self._version.get(path, 0) + 1
        for i in self.token_regions:
            tokens = torch.tensor(self.regions[i].tokens, device=qh.device)
            m = token_mass(qh, kh, token_indicator(tokens, qh.shape[1], kh.shape[2], kh.shape[3], kh))
            maps[i] = m if maps[i] is None else maps[i] + m

    def _resolve(self, maps: list[torch.Tensor | None], n: int, hw: tuple[int, int], device) -> torch.Tensor:
        """Masks [K, len(rows), n] of all regions at one resolution, overlaps resolved."""
        rows = max(1, len(self.rows))
        masks, scores = [], []
        for i, r in enumerate(self.regions):
            if r.mask is not None:
                m = resize_mask(r.mask.to(device), hw).expand(rows, n)
                masks.append(m)
                scores.append(m)
            elif maps[i] is not None:
                raw = maps[i].float()
                masks.append(binarize(raw, self.mask_rule, torch.float32))
                scores.append(raw / raw.amax(dim=1, keepdim=True).clamp_min(1e-12))
            else:
                masks.append(torch.zeros(rows, n, device=device))
                scores.append(masks[-1])
        return resolve_overlaps(torch.stack(masks), self.rule, torch.stack(scores),
                                [r.name or f"region {i + 1}" for i, r in enumerate(self.regions)])

    def _masks_for(self, path: str, hw: tuple[int, int], device) -> torch.Tensor:
        """Resolved masks [K, len(rows), N] for a layer of ``path`` whose output has spatial size ``hw``."""
        n = hw[0] * hw[1]
        site = self._enclosing_site(path)
        if site is not None and site in self._maps and n == self._maps[site][self.token_regions[0]].shape[-1]:
            version = self._version[site]  # deep transformers (SDXL): the maps of the blocks run so far
            cached = self._site_masks.get(site)
            if cached is None or cached[0] != version:
                cached = self._site_masks[site] = (version, self._resolve(self._maps[site], n, hw, device))
                self.memory[n] = cached[1]
            return cached[1]
        if n in self.memory:
            return self.memory[n]
        cached = self._fallback.get(n)
        if cached is None:  # user masks only (token regions off): the same for every layer of this size
            cached = self._fallback[n] = self._resolve([None] * len(self.regions), n, hw, device)
        return cached

    def _enclosing_site(self, path: str) -> str | None:
        if not self.token_regions:
            return None
        best = None
        for p in self._site_of:
            if path.startswith(p + ".") and (best is None or len(p) > len(best)):
                best = p
        return best

    def _batch_gate(self, masks: torch.Tensor, region: int, batch: int) -> torch.Tensor:
        """[batch, N] gate of one region: each row's own mask, the one it borrows, or zeros."""
        m = masks[region]
        if not self.borrow:
            return m[:1].expand(batch, -1)
        user = self.regions[region].mask is not None  # a user mask applies to rows without the prompt too
        m = torch.cat([m, m.new_zeros(1, m.shape[1])])
        idx = torch.tensor([(0 if user else len(self.rows)) if b < 0 else b for b in self.borrow], device=m.device)
        return m.index_select(0, idx)

    # ---------------------------------------------------------------- hooks
    def _out_hook(self, path: str, regions: list[int]):
        module = self.modules[path]
        stride = getattr(module, "stride", 1)
        padding = getattr(module, "padding", 0)
        active = [i for i in regions if self.regions[i].strength != 0.0]
        pointwise = all(not isinstance(self.regions[i].layers[path], ConvLowRank) or
                        self.regions[i].layers[path].kernel == (1, 1) for i in active) and stride in (1, (1, 1))
        fusable = pointwise and len(active) > 1
        fused: dict = {}

        def factors(dtype, device):
            """All regions' factors stacked: down [R*r, in], up [out, R*r] (strength and scale folded in)."""
            key = (dtype, device)
            if key not in fused:
                layers = [self.regions[i].layers[path] for i in active]
                down = torch.cat([lay.down for lay in layers]).to(device, dtype)
                up = torch.cat([lay.up * (lay.scale * self.regions[i].strength) for i, lay in zip(active, layers,
                                                                                                   strict=True)], 1)
                ranks = tuple(lay.rank for lay in layers)
                fused[key] = (down, up.to(device, dtype), torch.tensor(ranks, device=device), ranks)
            return fused[key]

        def fused_gates(masks, b, hw, dtype, ranks, rank_key, conv):
            """[B, N, R*r] (conv: [B, R*r, h, w]) gates in rank space; built once per masks and layout, since every
            layer of a resolution uses the same masks."""
            key = (id(masks), tuple(active), b, dtype, rank_key, conv)
            hit = self._gates.get(key)
            if hit is None or hit[0] is not masks:
                gates = torch.stack([self._batch_gate(masks, i, b) for i in active], -1).to(dtype)
                gates = gates.repeat_interleave(ranks, dim=-1)
                if conv:
                    gates = gates.transpose(1, 2).reshape(b, -1, *hw)
                hit = self._gates[key] = (masks, gates)
            return hit[1]

        def hook(mod, inputs, output):
            if not active:
                return None
            x = inputs[0]
            b = output.shape[0]
            if output.ndim == 4:
                hw = tuple(output.shape[-2:])
            else:
                hw = self._token_hw(output.shape[1]) if output.ndim == 3 else None
                if hw is None:
                    self._warn_once(f"'{path}' has no spatial output; its region delta is left out")
                    return None
            masks = self._masks_for(path, hw, output.device)
            if pointwise and not (torch.is_grad_enabled() and output.requires_grad):
                plan = self._gathered_plan(masks, active, b, output.dtype)
                if plan is not None:  # small regions: each region's matmuls only on the positions it covers
                    down, up, _, rank_key = factors(output.dtype, output.device)
                    return _add_gathered(output, x.to(output.dtype), down, up, rank_key, plan)
            if fusable:  # one pair of matmuls for every region: the gate is a per-position scalar, so it can
                # multiply the rank-space activations before the up projection
                down, up, ranks, rank_key = factors(output.dtype, output.device)
                gates = fused_gates(masks, b, hw, output.dtype, ranks, rank_key, output.ndim == 4)
                if output.ndim == 4:
                    h = F.conv2d(x.to(output.dtype), down[:, :, None, None]) * gates
                    return output + F.conv2d(h, up[:, :, None, None])
                h = F.linear(x.to(output.dtype), down) * gates
                return output + F.linear(h, up)
            for i in active:
                r = self.regions[i]
                gate = self._batch_gate(masks, i, b).to(output.dtype)
                delta = lora_forward(r.layers[path], x.to(output.dtype), stride, padding)
                gate = gate.view(b, 1, *hw) if output.ndim == 4 else gate.view(b, -1, 1)
                output = torch.addcmul(output, gate, delta, value=r.strength)
            return output
        return hook

    def _gathered_plan(self, masks: torch.Tensor, active: list[int], b: int, dtype: torch.dtype = torch.float32):
        """Per active region (positions [n_i] its gate covers in any batch row, gate values [b, n_i] in ``dtype``),
        or None when the regions cover more than half of ``len(active)`` x the positions (then one dense pass is
        cheaper). Built once per masks, layout and dtype: every layer of a resolution shares it."""
        key = ("gathered", id(masks), tuple(active), b, dtype)
        hit = self._gates.get(key)
        if hit is None or hit[0] is not masks:
            plan, covered, n = [], 0, masks.shape[-1]
            for i in active:
                gate = self._batch_gate(masks, i, b)
                idx = (gate.amax(0) > 0).nonzero().squeeze(1)
                covered += idx.numel()
                plan.append((idx, gate.index_select(1, idx).to(dtype)))
            hit = self._gates[key] = (masks, plan if 2 * covered <= len(active) * n else None)
        return hit[1]

    def _token_hw(self, n: int) -> tuple[int, int] | None:
        for hw in self._known_hw:
            if hw[0] * hw[1] == n:
                return hw
        return None

    def set_latent_hw(self, hw: tuple[int, int]) -> None:
        """The latent size of the coming calls: every power-of-two downsampling of it is a layer resolution."""
        sizes, (h, w) = [], hw
        for _ in range(8):
            sizes.append((h, w))
            h, w = (h + 1) // 2, (w + 1) // 2
        self._known_hw = sizes

    @staticmethod
    def _keep(seen: dict, name: str):
        def hook(mod, inputs, output):
            seen[name] = output
            if name == "to_k":
                seen["context"] = inputs[0]
            elif name == "to_v":
                seen["value"] = inputs[0]
            elif name == "to_out":  # the block's own attention result: no need to compute it again
                seen["attention"] = inputs[0]
        return hook

    def _attn2_hook(self, attn_path: str, regions: list[int], seen: dict):
        """Blend each region's text-side K/V deltas into this cross-attention's output, inside its gate.

        With the pass's own q, k, v: a_r = softmax(q (k + dk_r)^T) (v + dv_r) per region, and the output gains
        to_out's linear map of sum_r g_r (a_r - a), where a is the same attention without deltas (to_out is linear
        and every region's to_out delta is gated the same way, so one to_out call serves all regions).
        """
        def hook(mod, inputs, output):
            if not {"to_q", "to_k", "to_v"} <= seen.keys():
                return None
            self._attn2_ran.add(attn_path)
            q, k, v = seen.pop("to_q"), seen.pop("to_k"), seen.pop("to_v")
            ctx, val = seen.pop("context"), seen.pop("value")
            base = seen.pop("attention", None)
            b, n = q.shape[0], q.shape[1]
            hw = self._token_hw(n)
            if hw is None:
                return None
            heads = mod.heads
            masks = self._masks_for(attn_path, hw, output.device)
            if base is None or base.shape != q.shape[:2] + v.shape[2:]:
                base = _attention(q, k, v, heads)
            mix = None
            for i in regions:
                r = self.regions[i]
                if r.strength == 0.0:
                    continue
                kr, vr = k, v
                if f"{attn_path}.to_k" in r.layers:
                    kr = k + r.strength * lora_forward(r.layers[f"{attn_path}.to_k"], ctx.to(k.dtype))
                if f"{attn_path}.to_v" in r.layers:
                    vr = v + r.strength * lora_forward(r.layers[f"{attn_path}.to_v"], val.to(v.dtype))
                gate = self._batch_gate(masks, i, b).to(output.dtype)
                inside = gate.amax(0) > 0
                count = int(inside.sum())
                if count == 0:
                    continue
                if mix is None:
                    mix = torch.zeros_like(base)
                if count > n // 2:  # most positions: one full attention
                    mix = mix + gate[..., None] * (_attention(q, kr, vr, heads) - base)
                    continue
                # a region's attention only where its gate is on (each query row attends on its own, so the rows
                # are exactly those of the full call): 4 strip regions cost one attention, not four
                idx = inside.nonzero().squeeze(1)
                part = gate[:, idx, None] * (_attention(q[:, idx], kr, vr, heads) - base[:, idx])
                mix = mix.index_add(1, idx, part)
            if mix is None:
                return None
            linear = mod.to_out[0]
            change = linear(mix)
            if getattr(linear, "bias", None) is not None:
                change = change - linear.bias.to(change.dtype)
            return output + change
        return hook

    def check_text_side(self) -> None:
        """Log once if text-side deltas could not be applied (another pack replaced this block's attention)."""
        missed = [p for p in self._kv_blocks if p not in self._attn2_ran]
        if missed:
            self._warn_once(f"region K/V deltas skipped in {len(missed)} blocks (e.g. {missed[0]}): another node "
                            "replaced their cross-attention")

    def _warn_once(self, message: str) -> None:
        warned = self.__dict__.setdefault("_warned", set())
        if message not in warned:
            warned.add(message)
            log.warning(message)


def _add_gathered(output: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, ranks: tuple,
                  plan: list) -> torch.Tensor:
    """``output`` plus each region's gated low-rank delta computed on its own positions only (in place: called
    without autograd). ``down`` [R*r, in], ``up`` [out, R*r] hold the regions' factors in ``plan``'s order.
    Tokens [B, N, C] or pointwise-conv maps [B, C, H, W]."""
    conv = output.ndim == 4
    xf, of = (x.flatten(2), output.flatten(2)) if conv else (x, output)  # views: the add lands in ``output``
    offset = 0
    for rank, (idx, gate) in zip(ranks, plan, strict=True):
        d, u = down[offset:offset + rank], up[:, offset:offset + rank]
        offset += rank
        if idx.numel() == 0:
            continue
        if conv:  # [B, C, n]
            h = torch.matmul(d, xf.index_select(2, idx)) * gate[:, None]
            of.index_add_(2, idx, torch.matmul(u, h))
        else:  # [B, n, C]
            h = F.linear(xf.index_select(1, idx), d) * gate[..., None]
            of.index_add_(1, idx, F.linear(h, u))
    return output


def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head softmax attention of projected q [B, N, h*d], k, v [B, L, h*d] -> [B, N, h*d]."""
    b, n, _ = q.shape

    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, n, -1)


class RegionError(ValueError):
    """Regions that cannot be applied as given."""


def dit_region_gates(sites: list, modules: dict[str, nn.Module], regions: list[Region], fam: Family,
                     grid: tuple[int, int], text_layers: str = "skip", rule: str = "argmax",
                     cache: dict | None = None, tap=None, diffusers: bool = False, mask_rule: str = "median"
                     ) -> list[LowRankGate]:
    """One gate per region on a DiT whose image tokens lie on ``grid`` (rows, columns).

    Masks are resolved against each other on the token grid by ``rule`` (``core.compose.resolve_overlaps``);
    word regions (``tokens``) gate their block sites by that block's attention from ``tap`` (set each such gate's
    ``plan`` per call, as LAG does; ``mask_rule`` binarises their maps) and add where they overlap. ``cache`` (kept
    across calls, for one list of regions) holds the resolved masks per token grid and each region's constants
    (Delta W, its mask at each layout).
    """
    cache = {} if cache is None else cache
    if text_layers not in TEXT_LAYERS:
        raise RegionError(f"unknown text_layers {text_layers!r}; choose one of {', '.join(TEXT_LAYERS)}")
    names = [r.name or f"region {i + 1}" for i, r in enumerate(regions)]
    masked = [i for i, r in enumerate(regions) if r.mask is not None]
    resolved = cache.get(("resolved", grid, rule))  # the same for every call of a run at this latent size
    if resolved is None:
        resolved = {}
        if masked:
            stack = torch.stack([resize_mask(regions[i].mask, grid) for i in masked])[:, None]  # [K, 1, N]
            for i, m in zip(masked, resolve_overlaps(stack, rule, names=[names[i] for i in masked]), strict=True):
                resolved[i] = m.view(grid)
        cache[("resolved", grid, rule)] = resolved
    site_kinds = {s.target: s.tokens for s, _ in sites}  # learned residuals are keyed by their sites
    gates = []
    for i, region in enumerate(regions):
        kinds = {p: site_kinds.get(p) or row_kind(fam, p, diffusers) for p in region.layers}
        keep = {p: lay for p, lay in region.layers.items()
                if text_layers == "everywhere" or kinds[p] in ("image", "joint")}
        if len(keep) < len(region.layers):
            log.info("region '%s': %d text-stream / modulation layers left out (text_layers 'skip')", names[i],
                     len(region.layers) - len(keep))
        if not keep:
            raise RegionError(f"region '{names[i]}' has no layer on image tokens; set text_layers to 'everywhere' "
                              "or use a LoRA that trains the image stream")
        for path, lay in keep.items():
            if isinstance(lay, ConvLowRank) and lay.kernel != (1, 1):
                raise RegionError(f"region '{names[i]}': '{path}' is a {lay.kernel} conv LoRA layer (the patch "
                                  "embedder), which regions cannot gate; apply this LoRA with LoraLoaderModelOnly")
        rs = ResidualSet(keep, {})
        if region.mask is None:
            outside = sorted(p for p in keep if p not in site_kinds)
            if outside:
                raise RegionError(
                    f"region '{names[i]}' is gated by words, which on {fam.label} reach only the blocks' residual "
                    f"sites, but it has other layers (e.g. {outside[0]}): give this region a mask")
            if tap is None:
                raise RegionError(f"region '{names[i]}' is gated by words but no attention tap was given")
            gates.append(LowRankGate(sites, rs, region.strength, localized=True, rule=mask_rule,
                                     cache=cache.setdefault(i, {}), tap=tap))
        else:
            gates.append(LowRankGate(sites, rs, region.strength, cache=cache.setdefault(i, {}), mask=resolved[i],
                                     modules=modules, grid=grid, kinds=kinds,
                                     text_rows=1.0 if text_layers == "everywhere" else 0.0))
    return gates
