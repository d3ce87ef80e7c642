"""The toy world's scenes: a deterministic generator of small RGB images with one or two objects and a caption.

Every scene is a function of an integer seed. Objects are shapes with a colour, a texture, a place and a
size on a plain background. Captions name each colour with one of two words ("red" or "crimson"), so
erasing one word can be tested on its neighbour. Position words are deterministic: a single object is
"on the left", "in the middle" or "on the right" by its horizontal third; of two objects the first named
one is always the left one. Nothing is ever flipped.

Some shapes and textures (``NEW_SHAPES``, ``NEW_TEXTURES``) are kept out of the base model's training: they
are the "new concepts" a user personalises. The judge is trained on all of them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

SIZE = 32

COLOURS = {  # name -> (RGB in [0, 1], the two words captions use)
    "red": ((0.90, 0.15, 0.15), ("red", "crimson")),
    "blue": ((0.15, 0.30, 0.90), ("blue", "azure")),
    "green": ((0.15, 0.75, 0.20), ("green", "lime")),
    "yellow": ((0.95, 0.85, 0.10), ("yellow", "gold")),
    "purple": ((0.60, 0.20, 0.80), ("purple", "violet")),
}
BACKGROUNDS = {
    "gray": (0.50, 0.50, 0.50),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "sand": (0.85, 0.75, 0.55),
}
BASE_SHAPES = ("circle", "square", "triangle", "diamond")
NEW_SHAPES = ("ring",)
SHAPES = BASE_SHAPES + NEW_SHAPES
BASE_TEXTURES = ("plain", "striped")
NEW_TEXTURES = ("checkered",)
TEXTURES = BASE_TEXTURES + NEW_TEXTURES
POSITIONS = ("left", "middle", "right")
POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
SHADE = 0.45  # the second tone of a textured object: its colour times SHADE

COLOUR_NAMES = tuple(COLOURS)
BACKGROUND_NAMES = tuple(BACKGROUNDS)
CONCEPT_TOKEN = "sks"
CLASS_WORD = "shape"  # the class word of personalisation prompts; base captions use it for some objects
# Every word any caption or benchmark prompt uses (the tokenizer gets whole-word merges for these).
VOCABULARY = sorted({"a", "and", "on", "the", "in", "left", "right", "middle", "background", "photo", "of",
                     CONCEPT_TOKEN, CLASS_WORD, *SHAPES, *(t for t in TEXTURES if t != "plain"), *BACKGROUNDS,
                     *(w for _, words in COLOURS.values() for w in words)})


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    texture: str
    x: float  # centre, pixels
    y: float
    r: float  # radius, pixels

    @property
    def position(self) -> str:
        """The horizontal third the centre falls in."""
        return position_of(self.x)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    colour_words: tuple[int, ...] = field(default=())  # per object: which of the colour's two words (0 or 1)
    class_word: tuple[bool, ...] = field(default=())  # per object: say "shape" instead of the shape name
    colourless: tuple[bool, ...] = field(default=())  # per object: leave the colour word out of the caption

    def caption(self) -> str:
        return caption(self)


def position_of(x: float) -> str:
    if x < SIZE * 13 / 32:
        return "left"
    if x > SIZE * 19 / 32:
        return "right"
    return "middle"


def object_phrase(o: Obj, word: int = 0, class_word: bool = False, colourless: bool = False) -> str:
    parts = ["a"] if colourless else ["a", COLOURS[o.colour][1][word]]
    if o.texture != "plain":
        parts.append(o.texture)
    parts.append(CLASS_WORD if class_word else o.shape)
    return " ".join(parts)


def caption(scene: Scene) -> str:
    """``a red circle on the left on a gray background``; two objects: left one first, no position words."""
    words = scene.colour_words or (0,) * len(scene.objects)
    cls = scene.class_word or (False,) * len(scene.objects)
    bare = scene.colourless or (False,) * len(scene.objects)
    phrases = [object_phrase(o, w, c, b) for o, w, c, b in zip(scene.objects, words, cls, bare, strict=False)]
    if len(scene.objects) == 1:
        text = f"{phrases[0]} {POSITION_PHRASE[scene.objects[0].position]}"
    else:
        text = " and ".join(phrases)
    return f"{text} on a {scene.background} background"


def shape_mask(shape: str, x: float, y: float, r: float, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size] mask of a shape centred at (x, y) with radius r (pixel centres at i + 0.5)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - x, yy - y
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.8 * r
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= 0.8 * r) & (np.abs(dx) <= 0.6 * (dy + r))
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.05 * r
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= (0.5 * r) ** 2)
    raise ValueError(f"unknown shape {shape!r}")


def texture_dark(texture: str, size: int = SIZE) -> np.ndarray:
    """Boolean [size, size]: where a texture shows the darker tone."""
    yy, xx = np.mgrid[0:size, 0:size]
    if texture == "plain":
        return np.zeros((size, size), bool)
    if texture == "striped":
        return (yy // 2) % 2 == 1
    if texture == "checkered":
        return ((yy // 2) + (xx // 2)) % 2 == 1
    raise ValueError(f"unknown texture {texture!r}")


@dataclass
class Render:
    image: np.ndarray  # [H, W, 3] float32 in [0, 1]
    masks: np.ndarray  # [n_objects, H, W] bool, visible part of each object
    labels: dict[str, np.ndarray]  # per-pixel class maps for the judge: colour, shape, texture, instance


def render(scene: Scene, size: int = SIZE) -> Render:
    """Paint a scene; later objects are drawn over earlier ones (the generator keeps them apart)."""
    bg = BACKGROUND_NAMES.index(scene.background)
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUNDS[scene.background]
    colour = np.full((size, size), len(COLOUR_NAMES) + bg, np.int64)  # object colours, then backgrounds
    shape = np.full((size, size), len(SHAPES), np.int64)  # last class = background
    texture = np.full((size, size), len(TEXTURES), np.int64)
    inst = np.zeros((size, size), np.int64)
    masks = np.zeros((len(scene.objects), size, size), bool)
    for i, o in enumerate(scene.objects):
        m = shape_mask(o.shape, o.x, o.y, o.r, size)
        rgb = np.asarray(COLOURS[o.colour][0], np.float32)
        dark = texture_dark(o.texture, size)
        img[m] = rgb
        img[m & dark] = rgb * SHADE
        masks[:i][:, m] = False
        masks[i] = m
        colour[m] = COLOUR_NAMES.index(o.colour)
        shape[m] = SHAPES.index(o.shape)
        texture[m] = TEXTURES.index(o.texture)
        inst[m] = i + 1
    return Render(img, masks, {"colour": colour, "shape": shape, "texture": texture, "instance": inst})


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def random_object(rng: np.random.Generator, shapes, textures, colours, place: str, two: bool) -> Obj:
    r = float(rng.uniform(4.0, 5.5) if two else rng.uniform(5.0, 8.0))
    lo_y, hi_y = r + 1.0, SIZE - r - 1.0
    y = float(rng.uniform(lo_y, hi_y))
    # two objects stay at least 2 px apart: left centres <= 9.5, right centres >= 22.5 (at 32 px)
    if place == "left":
        lo, hi = r + 1.0, SIZE * (9.5 if two else 12) / 32
    elif place == "right":
        lo, hi = SIZE * (22.5 if two else 20) / 32, SIZE - r - 1.0
    else:
        lo, hi = SIZE * 14 / 32, SIZE * 18 / 32
    x = float(rng.uniform(lo, max(lo, hi)))
    return Obj(_pick(rng, shapes), _pick(rng, colours), _pick(rng, textures), x, y, r)


def make_scene(seed: int, n_objects: int | None = None, shapes=BASE_SHAPES, textures=BASE_TEXTURES,
               colours=COLOUR_NAMES, backgrounds=BACKGROUND_NAMES, class_word_p: float = 0.0,
               position: str | None = None, colourless_p: float = 0.0) -> Scene:
    """The scene of ``seed``: one or two objects (``n_objects`` None: either, evenly), deterministic.

    ``colourless_p``: per object, the chance that its caption leaves the colour out ("a striped shape"), so that a
    prompt without a colour word (a class word, "a sks shape") still draws an object, as "a dog" does in SD; drawn
    after every other choice, so the scenes of a seed are the same at any value."""
    rng = np.random.default_rng([seed, 7919])
    n = int(rng.integers(1, 3)) if n_objects is None else n_objects
    if n == 1:
        objs = (random_object(rng, shapes, textures, colours, position or _pick(rng, POSITIONS), False),)
    elif n == 2:
        objs = (random_object(rng, shapes, textures, colours, "left", True),
                random_object(rng, shapes, textures, colours, "right", True))
    else:
        raise ValueError("scenes have one or two objects")
    bg = _pick(rng, backgrounds)
    words = tuple(int(rng.integers(2)) for _ in objs)
    cls = tuple(bool(rng.random() < class_word_p) for _ in objs)
    bare = tuple(bool(rng.random() < colourless_p) for _ in objs) if colourless_p > 0 else ()
    return Scene(objs, bg, words, cls, bare)


def prompt_bucket(text: str, buckets: int = 10) -> int:
    """A stable bucket of a caption (sha1): bucket 0 holds the base model's held-out prompts."""
    return int(hashlib.sha1(text.encode()).hexdigest(), 16) % buckets


def is_held_out_prompt(text: str) -> bool:
    return prompt_bucket(text) == 0


def render_batch(scenes: list[Scene], size: int = SIZE) -> np.ndarray:
    """[N, H, W, 3] float32 images."""
    return np.stack([render(s, size).image for s in scenes])
