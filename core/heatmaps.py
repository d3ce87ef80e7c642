"""Per-word cross-attention heatmaps of a sampling run (Hertz et al., Prompt-to-Prompt; Tang et al., DAAM).

Recording sums, on the fly, the head-averaged cross-attention probabilities of every prompt token for each
conditional prompt ("source"), map resolution and step bin, so memory is fixed by the number of bins and does
not grow with the number of steps. Maps come from the pack's one attention tap (``core.hooks.tap``); a heatmap is then
the sum of a word's sub-token columns, averaged over the chosen resolutions and steps, upsampled to the image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .attention import token_probabilities
from .hooks.tap import AttentionEvent, Tap, UNetTap
from .masks import block_hw
from .tokens import same_prompt

DEFAULT_BINS = 10


class RecordError(RuntimeError):
    """The record cannot give what was asked (nothing recorded, another prompt, a resolution never seen)."""


@dataclass
class AttentionRecord:
    """Running sums of per-token cross-attention: ``sums[(source, positions, bin)]`` is [rows, positions, tokens].

    ``counts`` holds how many layer maps went into each sum, ``contexts`` one reference context row [L, D] per
    source (the prompt whose tokens the columns are), ``latent_hw`` the latent size of the run.
    """

    bins: int = DEFAULT_BINS
    max_sources: int = 8
    sums: dict[tuple[int, int, int], torch.Tensor] = field(default_factory=dict)
    counts: dict[tuple[int, int, int], int] = field(default_factory=dict)
    contexts: list[torch.Tensor] = field(default_factory=list)
    latent_hw: tuple[int, int] | None = None
    runs: int = 0

    def reset(self) -> None:
        """Forget the last run (called when a sampling run starts)."""
        self.sums.clear()
        self.counts.clear()
        self.contexts.clear()
        self.latent_hw = None
        self.runs += 1

    def source_of(self, context_row: torch.Tensor, same=None) -> int | None:
        """Index of the source whose reference context is ``context_row`` (a new one if room is left)."""
        same = same or same_prompt
        for i, ref in enumerate(self.contexts):
            if same(context_row, ref):
                return i
        if len(self.contexts) >= self.max_sources:
            return None
        self.contexts.append(context_row.detach().to("cpu", torch.float32).clone())
        return len(self.contexts) - 1

    def add(self, source: int, step_bin: int, probs: torch.Tensor) -> None:
        """Add head-averaged probabilities [rows, positions, tokens] of one layer."""
        key = (source, probs.shape[1], step_bin)
        prev = self.sums.get(key)
        self.sums[key] = probs.float() if prev is None else prev.add_(probs.float())
        self.counts[key] = self.counts.get(key, 0) + 1

    def widths(self) -> list[int]:
        """Map widths recorded (e.g. 8, 16, 32, 64 for SD1.5 at 512 px), for the user's resolution choice."""
        if self.latent_hw is None:
            return []
        return sorted({block_hw(n, self.latent_hw)[1] for _, n, _ in self.sums})


def step_bin(step_fraction: float, bins: int) -> int:
    """The bin of a step at ``step_fraction`` (0 = first step, 1 = last) among ``bins`` equal bins."""
    return min(bins - 1, max(0, int(step_fraction * bins)))


def step_fraction(sigma: float, sample_sigmas: torch.Tensor) -> float:
    """Where ``sigma`` lies in a run's schedule: the nearest schedule entry's index over the number of steps."""
    s = sample_sigmas.detach().float().cpu()
    steps = max(1, s.shape[0] - 1)
    return float((s - sigma).abs().argmin()) / steps


class AttentionRecorder:
    """A listener on an attention tap (``core.hooks.tap``) adding each call's maps to ``record``.

    ``source`` is a tap or, for a UNet, its sites (``[(site, module)]``: the recorder then hooks their
    ``attn2``). Before each model call set ``rows`` ({source: (row, ...)} of the batch: the conditional rows to
    record) and ``bin``; an empty ``rows`` records nothing. On a DiT the maps are the image queries' softmax over
    the text keys alone (the cross-attention map the UNet families have; docs/model-families.md).
    """

    def __init__(self, source, record: AttentionRecord):
        self.tap = source if isinstance(source, Tap) else UNetTap(source)
        self._own = self.tap if not isinstance(source, Tap) else None
        self.record = record
        self.rows: dict[int, tuple[int, ...]] = {}
        self.bin = 0

    def install(self) -> AttentionRecorder:
        self.tap.listen(self._on_attention, lambda: bool(self.rows))
        if self._own is not None:
            self._own.install()
        return self

    def remove(self) -> None:
        self.tap.unlisten(self._on_attention)
        if self._own is not None:
            self._own.remove()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.remove()

    def _on_attention(self, ev: AttentionEvent) -> None:
        with torch.no_grad():
            for source, rows in self.rows.items():
                idx = torch.tensor(rows, device=ev.q.device)
                probs = token_probabilities(ev.queries().index_select(0, idx), ev.keys().index_select(0, idx))
                self.record.add(source, self.bin, probs)


def word_maps(record: AttentionRecord, source: int, positions: list[list[int]], widths: list[int] | None = None,
              start: float = 0.0, end: float = 1.0, size: tuple[int, int] | None = None,
              normalize: bool = True) -> torch.Tensor:
    """Heatmaps [words, rows, H, W] for each word's token positions (its sub-tokens' probabilities summed).

    Per resolution: the mean over the layers and steps in [start, end] of the step range; resolutions (map
    widths; None = all) are averaged after upsampling to ``size`` (default: the largest map). ``normalize``
    scales each word's map to a maximum of 1 per row; without it a pixel's values over the prompt's words sum
    to at most 1 (each layer's probabilities over the tokens do).
    """
    if record.latent_hw is None or not record.sums:
        raise RecordError("nothing was recorded: connect the Record node's MODEL to the sampler and run it first")
    if not 0.0 <= start <= end <= 1.0:
        raise RecordError(f"step range {start}..{end} must satisfy 0 <= start <= end <= 1")
    lo, hi = step_bin(start, record.bins), step_bin(end, record.bins) if end < 1.0 else record.bins - 1
    available = record.widths()
    chosen = available if not widths else sorted(set(widths))
    missing = [w for w in chosen if w not in available]
    if missing:
        raise RecordError(f"no attention maps of width {missing} were recorded; available widths: {available}")
    per_width: dict[int, tuple[torch.Tensor, int]] = {}
    for (src, n, b), total in record.sums.items():
        hw = block_hw(n, record.latent_hw)
        if src != source or not lo <= b <= hi or hw[1] not in chosen:
            continue
        prev, count = per_width.get(n, (None, 0))
        per_width[n] = (total if prev is None else prev + total, count + record.counts[(src, n, b)])
    if not per_width:
        raise RecordError(f"no steps were recorded between {start:.2f} and {end:.2f} of the run; widen the range")
    largest = max(per_width)
    out_hw = size or block_hw(largest, record.latent_hw)
    cols = [torch.tensor(p, dtype=torch.long) for p in positions]
    acc = None
    for n, (total, count) in per_width.items():
        h, w = block_hw(n, record.latent_hw)
        mean = total.cpu() / count  # [rows, n, tokens]
        words = torch.stack([mean[..., c].sum(-1) for c in cols])  # [words, rows, n]
        words = words.reshape(-1, 1, h, w)
        up = F.interpolate(words, size=out_hw, mode="bilinear", align_corners=False)
        acc = up if acc is None else acc + up
    maps = (acc / len(per_width)).reshape(len(positions), -1, *out_hw)
    if normalize:
        maps = maps / maps.amax(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    return maps


def peak(heatmap: torch.Tensor) -> tuple[int, int]:
    """(y, x) of a 2-D map's maximum."""
    i = int(heatmap.flatten().argmax())
    return i // heatmap.shape[-1], i % heatmap.shape[-1]


def colorize(maps: torch.Tensor) -> torch.Tensor:
    """Maps [..., H, W] in [0, 1] -> RGB [..., H, W, 3] on a blue-cyan-yellow-red ramp (dark blue = 0)."""
    stops = torch.tensor([[0.0, 0.0, 0.35], [0.0, 0.6, 1.0], [1.0, 0.9, 0.0], [0.9, 0.0, 0.0]], device=maps.device)
    x = maps.clamp(0, 1) * (len(stops) - 1)
    i = x.floor().long().clamp(max=len(stops) - 2)
    f = (x - i)[..., None]
    return stops[i] * (1 - f) + stops[i + 1] * f


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """images [B, H, W, 3] and maps [words, B, H, W] (same H, W) -> overlays [words * B, H, W, 3], word-major."""
    heat = colorize(maps)
    mixed = (1 - alpha) * images[None].to(heat) + alpha * heat
    return mixed.reshape(-1, *mixed.shape[2:]).clamp(0, 1)
