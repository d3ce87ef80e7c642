"""Several low-rank residuals in one UNet pass, each limited to its own region (issue "Compose").

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
the block's cross-attention runs once more per such region with only that region's K/V deltas, and the outputs
are blended by the gate: ``out = base + sum_r g_r * (out_r - base)``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import token_attention
from .capture import qk_hooks, remove_hooks
from .compose import resolve_overlaps
from .layouts import TransformerSite
from .lora_files import lora_forward
from .masks import binarize
from .residuals import LowRank

log = logging.getLogger(__name__)

TEXT_SIDE = ("attn2.to_k", "attn2.to_v")


@dataclass
class Region:
    """One region: its layers {ldm module path: LowRank}, strength, and gate source (tokens or a mask)."""

    layers: dict[str, LowRank]
    strength: float = 1.0
    tokens: list[int] | None = None  # prompt positions of the words whose attention gates the region
    mask: torch.Tensor | None = None  # [H, W] in [0, 1]
    name: str = ""


def resize_gate(mask: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """A user mask [H, W] at a layer's resolution, flattened: [h*w] (area-averaged, so values stay in [0, 1])."""
    m = mask.float()[None, None]
    if tuple(m.shape[-2:]) != tuple(hw):
        m = F.interpolate(m, size=hw, mode="area") if m.shape[-1] >= hw[1] else \
            F.interpolate(m, size=hw, mode="bilinear", align_corners=False)
    return m.flatten()


class RegionGate:
    """Installs the hooks for ``regions`` on a UNet; keep one per sampling run (it remembers masks between calls).

    ``modules`` maps ldm paths to the UNet's modules; ``sites`` are its transformers (``core.layouts``).
    Before each call set ``rows`` (the batch rows whose prompt holds the regions' words) and ``borrow`` (per batch
    row, the index into ``rows`` whose masks it uses, or -1), e.g. with ``plan_rows``.
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
        self._kv_blocks: dict[str, list[int]] = {}
        self._known_hw: list[tuple[int, int]] = []
        self._kv_region: int | None = None  # while re-running attn2 for one region's K/V deltas
        self._attn2_ran: set[str] = set()
        self._handles: list = []
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
            for site, module in self.sites:
                for block in module.transformer_blocks:
                    self._handles += qk_hooks(block.attn2, self._on_qk(site.path, block.attn2.heads), self._wanted)
        by_module: dict[str, list[int]] = {}
        for i, r in enumerate(self.regions):
            for path in r.layers:
                by_module.setdefault(path, []).append(i)
        kv_blocks: dict[str, list[int]] = {}
        for path, idx in by_module.items():
            if path.endswith(TEXT_SIDE):
                self._handles.append(self.modules[path].register_forward_hook(self._kv_hook(path)))
                kv_blocks.setdefault(path.rsplit(".", 1)[0], [])
                kv_blocks[path.rsplit(".", 1)[0]] = sorted(set(kv_blocks[path.rsplit(".", 1)[0]]) | set(idx))
            else:
                self._handles.append(self.modules[path].register_forward_hook(self._out_hook(path, idx)))
        for attn_path, idx in kv_blocks.items():
            self._handles.append(self._attn2[attn_path].register_forward_hook(
                self._attn2_hook(attn_path, idx), with_kwargs=True))
        self._kv_blocks = kv_blocks
        return self

    def remove(self) -> None:
        remove_hooks(self._handles)
        self._maps.clear()
        self._site_masks.clear()

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

    # ---------------------------------------------------------------- maps and masks
    def _wanted(self) -> bool:
        return bool(self.rows) and self._kv_region is None

    def _on_qk(self, path: str, heads: int):
        def on_qk(q, k):
            idx = torch.tensor(self.rows, device=q.device)
            q, k = q.index_select(0, idx), k.index_select(0, idx)
            maps = self._maps.setdefault(path, [None] * len(self.regions))
            self._version[path] = self._version.get(path, 0) + 1
            for i in self.token_regions:
                m = token_attention(q, k, heads, torch.tensor(self.regions[i].tokens, device=q.device))
                maps[i] = m if maps[i] is None else maps[i] + m
        return on_qk

    def _resolve(self, maps: list[torch.Tensor | None], n: int, hw: tuple[int, int], device) -> torch.Tensor:
        """Masks [K, len(rows), n] of all regions at one resolution, overlaps resolved."""
        rows = max(1, len(self.rows))
        masks, scores = [], []
        for i, r in enumerate(self.regions):
            if r.mask is not None:
                m = resize_gate(r.mask.to(device), hw).expand(rows, n)
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

        def hook(mod, inputs, output):
            # also while attn2 re-runs for a region's K/V: both outputs of the blend then carry the same deltas
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
            for i in regions:
                r = self.regions[i]
                if r.strength == 0.0:
                    continue
                gate = self._batch_gate(masks, i, b).to(output.dtype)
                delta = lora_forward(r.layers[path], x.to(output.dtype), stride, padding)
                gate = gate.view(b, 1, *hw) if output.ndim == 4 else gate.view(b, -1, 1)
                output = torch.addcmul(output, gate, delta, value=r.strength)
            return output
        return hook

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

    def _kv_hook(self, path: str):
        def hook(mod, inputs, output):
            i = self._kv_region
            if i is None or path not in self.regions[i].layers:
                return None
            return output + self.regions[i].strength * lora_forward(self.regions[i].layers[path],
                                                                     inputs[0].to(output.dtype))
        return hook

    def _attn2_hook(self, attn_path: str, regions: list[int]):
        def hook(mod, args, kwargs, output):
            if self._kv_region is not None:
                return None
            self._attn2_ran.add(attn_path)
            b, n = output.shape[0], output.shape[1]
            hw = self._token_hw(n)
            if hw is None:
                return None
            masks = self._masks_for(attn_path, hw, output.device)
            out = output
            for i in regions:
                if self.regions[i].strength == 0.0:
                    continue
                self._kv_region = i
                try:
                    with_kv = mod(*args, **kwargs)
                finally:
                    self._kv_region = None
                gate = self._batch_gate(masks, i, b).to(output.dtype).view(b, n, 1)
                out = torch.addcmul(out, gate, with_kv - output)
            return out
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


def plan_rows(batch: int, cond_or_uncond: list[int], concept_chunks: list[bool]) -> tuple[tuple, tuple]:
    """(rows, borrow) for a batch of equal chunks: the rows of chunks holding the regions' prompt compute masks;
    every row borrows the mask of the same latent in the first such chunk (CFG: the unconditional half too)."""
    n = len(cond_or_uncond)
    size = batch // n
    src = next((c for c, yes in enumerate(concept_chunks) if yes), None)
    if src is None:
        return (), tuple(-1 for _ in range(batch))
    rows = tuple(range(src * size, (src + 1) * size))
    return rows, tuple(i % size for i in range(batch))
