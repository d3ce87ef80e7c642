"""The contact sheet: rows base / global residual / LAG (and LAG's masks), a column per prompt, each tile captioned
with what the judge read, the training images on top. One picture a person reads at a glance."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import numpy as np
import torch

TILE = 128
PAD = 8
LABEL_W = 150
CAPTION_H = 34
GOOD, BAD, NEUTRAL = (20, 120, 40), (190, 30, 30), (70, 70, 70)


@dataclass(frozen=True)
class Tile:
    image: torch.Tensor  # [H, W, 3] in [0, 1], or a mask [H, W] in [0, 1]
    caption: str
    ok: bool | None = None  # green / red / gray caption


@dataclass(frozen=True)
class SheetRow:
    label: str
    note: str  # under the label, e.g. "colour 15/16"
    tiles: list[Tile]


def _pil(img: torch.Tensor, size: int):
    from PIL import Image

    arr = img.detach().float().clamp(0, 1).cpu().numpy()
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, -1)
    pic = Image.fromarray((arr * 255).round().astype(np.uint8))
    return pic.resize((size, size), Image.NEAREST)


def contact_sheet(title: str, train_images: torch.Tensor, headings: list[str], rows: list[SheetRow]) -> np.ndarray:
    """The sheet as an [H, W, 3] array in [0, 1]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=12)
    bold = ImageFont.load_default(size=14)
    cols = max(len(headings), train_images.shape[0])
    width = LABEL_W + cols * (TILE + PAD) + PAD
    head_h = 16 * max(len(textwrap.wrap(h, 20)) for h in headings) + 8
    small = TILE // 2
    title_lines = textwrap.wrap(title, max(40, (width - 2 * PAD) // 8))
    title_h = 18 * len(title_lines) + 12
    height = title_h + small + 26 + head_h + len(rows) * (TILE + CAPTION_H + PAD) + PAD
    sheet = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(sheet)
    for k, line in enumerate(title_lines):
        draw.text((PAD, 8 + 18 * k), line, fill="black", font=bold)
    y = title_h
    draw.text((PAD, y + small // 2), "training images", fill=NEUTRAL, font=font, anchor="lm")
    for i, img in enumerate(train_images):
        sheet.paste(_pil(img, small), (LABEL_W + i * (small + PAD), y))
    y += small + 26
    for c, heading in enumerate(headings):
        x = LABEL_W + c * (TILE + PAD)
        for k, line in enumerate(textwrap.wrap(heading, 20)):
            draw.text((x, y + 16 * k), line, fill="black", font=font)
    y += head_h
    for row in rows:
        draw.text((PAD, y + TILE // 2 - 10), row.label, fill="black", font=bold)
        draw.text((PAD, y + TILE // 2 + 10), row.note, fill=NEUTRAL, font=font)
        for c, tile in enumerate(row.tiles):
            x = LABEL_W + c * (TILE + PAD)
            sheet.paste(_pil(tile.image, TILE), (x, y))
            colour = NEUTRAL if tile.ok is None else GOOD if tile.ok else BAD
            for k, line in enumerate(textwrap.wrap(tile.caption, 22)[:2]):
                draw.text((x, y + TILE + 3 + 14 * k), line, fill=colour, font=font)
        y += TILE + CAPTION_H + PAD
    return np.asarray(sheet, dtype=np.float32) / 255.0
