"""One description of a model call's batch: which rows carry the concept's prompt, which borrow whose gate.

ComfyUI (and our diffusers sampler) batch a model call as ``len(cond_or_uncond)`` equal chunks, 0 = conditional,
1 = unconditional. Rows of a chunk whose prompt is the reference prompt compute their own attention maps; every
other row borrows the maps of the same latent in the first such chunk (CFG: the unconditional half uses the
conditional half's masks, so an all-ones gate is the global residual on the image tokens and an all-zeros gate
the base model, for the guided result too). Rows with nothing to borrow get no gate.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..tokens import same_prompt


@dataclass(frozen=True)
class BatchPlan:
    """Rows of one model call: ``rows`` compute maps (concept prompt), ``borrow[b]`` is the index into ``rows``
    whose gate batch row ``b`` uses (-1: none). ``tokens`` are the concept's prompt positions; ``active=False``
    runs the call without the residual (outside its step range)."""

    batch: int = 0
    rows: tuple[int, ...] = ()
    borrow: tuple[int, ...] = ()
    tokens: tuple[int, ...] = ()
    active: bool = True

    @property
    def gated(self) -> bool:
        """Whether this call computes attention gates at all."""
        return self.active and bool(self.rows) and bool(self.tokens)

    @property
    def consecutive(self) -> bool:
        """``rows`` is one run start..start+n (the usual CFG chunk): slicing it is a view."""
        return bool(self.rows) and self.rows == tuple(range(self.rows[0], self.rows[0] + len(self.rows)))

    def broadcast(self) -> bool:
        """Every row uses gate row 0 (one concept row, or every other row borrows it): a gate of one row
        broadcasts over the batch."""
        return len(self.rows) == 1 and all(b == 0 for b in self.borrow)

    def identity(self) -> bool:
        """Each batch row uses its own gate row, in order."""
        return self.borrow == tuple(range(self.batch)) and len(self.rows) == self.batch


def chunk_rows(batch: int, chunks: int, chunk: int) -> range:
    if batch % chunks:
        raise ValueError(f"batch {batch} is not a multiple of {chunks} chunks")
    size = batch // chunks
    return range(chunk * size, (chunk + 1) * size)


def plan_batch(batch: int, cond_or_uncond: list[int], matches: list[bool], tokens=(), active: bool = True) -> BatchPlan:
    """The plan of a batch of ``len(cond_or_uncond)`` equal chunks; ``matches[c]`` tells whether conditional chunk
    ``c`` carries the reference prompt. Matching chunks compute their own maps; the others borrow the first
    matching chunk's row of the same latent."""
    n = len(cond_or_uncond)
    if len(matches) != n:
        raise ValueError(f"{len(matches)} chunk matches for {n} chunks")
    own = [c for c, (kind, hit) in enumerate(zip(cond_or_uncond, matches, strict=True)) if kind == 0 and hit]
    rows = tuple(r for c in own for r in chunk_rows(batch, n, c))
    if not own:
        return BatchPlan(batch, (), tuple(-1 for _ in range(batch)), tuple(tokens), active)
    size = batch // n
    where = {r: i for i, r in enumerate(rows)}
    first = own[0] * size
    borrow = tuple(where.get(b, where[first + b % size]) for b in range(batch))
    return BatchPlan(batch, rows, borrow, tuple(tokens), active)


def source_rows(source_of, sources: dict, context: torch.Tensor, cond_or_uncond: list[int],
                uuids: list | None = None) -> dict[int, tuple[int, ...]]:
    """{source: batch rows} of a call's conditional chunks, for recorders that keep one record per prompt:
    ``source_of(context_row)`` names (or makes) the source of a prompt, remembered per conditioning uuid in
    ``sources`` (reset it per sampling run); a prompt ``source_of`` has no room for is left out."""
    n = len(cond_or_uncond)
    uuids = list(uuids or [None] * n)
    size = context.shape[0] // n
    rows: dict[int, tuple[int, ...]] = {}
    for c, kind in enumerate(cond_or_uncond):
        if kind != 0:
            continue
        key = uuids[c]
        src = sources.get(key) if key is not None else None
        if src is None:
            src = source_of(context[c * size])
            if key is not None:
                sources[key] = src
        if src is not None:
            rows[src] = rows.get(src, ()) + tuple(range(c * size, (c + 1) * size))
    return rows


def conditional_rows(batch: int, cond_or_uncond: list[int]) -> tuple[int, ...]:
    """Rows of the conditional chunks of a batch made of ``len(cond_or_uncond)`` equal chunks."""
    n = max(1, len(cond_or_uncond))
    return tuple(r for c, kind in enumerate(cond_or_uncond) if kind == 0 for r in chunk_rows(batch, n, c))


class PromptMatcher:
    """Which chunks of a model call carry the reference prompt [L, D], remembered per conditioning uuid (one
    comparison per run instead of one per call)."""

    LIMIT = 4096  # a long-lived server: forget old runs beyond this many conditionings

    def __init__(self, reference: torch.Tensor | None):
        self.reference = reference
        self._seen: dict = {}

    def reset(self) -> None:
        self._seen.clear()

    def matches(self, context: torch.Tensor, cond_or_uncond: list[int], uuids: list | None = None) -> list[bool]:
        """Per chunk: conditional and its context row starts with the reference prompt."""
        n = len(cond_or_uncond)
        uuids = list(uuids or [None] * n)
        size = context.shape[0] // n
        out = []
        for c, kind in enumerate(cond_or_uncond):
            if kind != 0 or self.reference is None:
                out.append(False)
                continue
            key = uuids[c]
            hit = self._seen.get(key) if key is not None else None
            if hit is None:
                hit = same_prompt(context[c * size], self.reference)
                if key is not None:
                    if len(self._seen) > self.LIMIT:
                        self._seen.clear()
                    self._seen[key] = hit
            out.append(hit)
        return out


def cfg_plan(batch: int, cond_or_uncond: list[int], tokens=(), active: bool = True) -> BatchPlan:
    """The plan when every conditional chunk carries the concept's prompt (our own samplers and the toy world)."""
    return plan_batch(batch, cond_or_uncond, [kind == 0 for kind in cond_or_uncond], tokens, active)
