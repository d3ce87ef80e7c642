"""The toy world's judge reading the main job's samples: did the concept appear, did the prompt's other words hold,
did the background stay the base model's."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from .models import PromptSpec

ATTRIBUTES = ("shape", "colour", "texture")


@dataclass(frozen=True)
class Concept:
    """What the judge reads on the training images (the majority over them)."""

    shape: str
    colour: str
    texture: str

    def words(self) -> str:
        return f"{self.colour} {self.texture} {self.shape}"


@dataclass(frozen=True)
class SampleScore:
    reading: str  # what the judge saw, e.g. "yellow striped diamond + blue plain circle on sand"
    colour: bool  # the concept's colour on the concept object
    fidelity: bool  # colour, shape and texture all the concept's
    editability: bool | None  # the prompt's other words (place, background, second object) held; None: nothing asked
    background_kept: float | None  # share of background pixels equal to the base sample's (None for the base row)


def read_concept(judge, images: torch.Tensor) -> Concept:
    """The concept as the judge reads it on ``images`` [N, H, W, 3]: the majority of each attribute over the
    images' largest objects."""
    from bench.toyworld import judge as J

    found = []
    for reading in J.read(judge, images):
        if reading.objects:
            found.append(max(reading.objects, key=lambda o: int(o.mask.sum())))
    if not found:
        raise ValueError("the judge found no object in the training images; the toy world's judge reads 32-px "
                         "renders of one object on a plain background")
    return Concept(*(Counter(getattr(o, a) for o in found).most_common(1)[0][0] for a in ATTRIBUTES))


def _describe(reading) -> str:
    objs = " + ".join(f"{o.colour} {o.texture} {o.shape}" for o in reading.objects) or "no object"
    return f"{objs} on {reading.background}"


def score(judge, images: torch.Tensor, specs: list[PromptSpec], concept: Concept,
          base: torch.Tensor | None = None) -> list[SampleScore]:
    """One SampleScore per image; ``specs[i]`` is image i's prompt; ``base`` the base model's images at the same
    seeds, for how much of the background the residual left alone."""
    from bench.toyworld import judge as J
    from bench.toyworld.measure import background_kept

    out = []
    for i, (reading, spec) in enumerate(zip(J.read(judge, images), specs, strict=True)):
        objs = reading.objects
        obj = objs[0] if objs else None  # the concept is the left (or only) object
        parts = {a: obj is not None and getattr(obj, a) == getattr(concept, a) for a in ATTRIBUTES}
        asked = spec.position is not None or spec.background is not None or spec.other is not None
        edit = None
        if asked:
            edit = len(objs) == (2 if spec.other else 1)
            if spec.position is not None:
                edit = edit and objs[0].position == spec.position
            if spec.background is not None:
                edit = edit and reading.background == spec.background
            if spec.other is not None:
                edit = edit and (objs[1].shape, objs[1].colour, objs[1].texture) == spec.other
        kept = None
        if base is not None:
            img, ref = images[i].numpy(), base[i].numpy()
            kept = background_kept(img, ref, [o.mask for o in objs])
        out.append(SampleScore(_describe(reading), parts["colour"], all(parts.values()), edit, kept))
    return out


def summary(scores: list[SampleScore]) -> dict:
    """Shares over the samples (editability over the prompts that ask for something)."""
    edits = [s.editability for s in scores if s.editability is not None]
    kept = [s.background_kept for s in scores if s.background_kept is not None]
    return {
        "samples": len(scores),
        "colour": float(np.mean([s.colour for s in scores])),
        "fidelity": float(np.mean([s.fidelity for s in scores])),
        "editability": float(np.mean(edits)) if edits else None,
        "background_kept": float(np.mean(kept)) if kept else None,
    }
