"""The toy world's judge: reads each object's shape, colour, texture and position, the background, and masks.

A small fully convolutional net labels every pixel with a colour (object colours, then backgrounds), a shape
(or background) and a texture (or background); objects are the 4-connected components of the pixels it calls
an object, each read by majority vote inside its component. Trained here on true renders of random scenes
(all shapes and textures, the new concepts included), with noise and blur so that it also reads samples.
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import scenes as S

log = logging.getLogger(__name__)

N_COLOUR = len(S.COLOUR_NAMES) + len(S.BACKGROUND_NAMES)
MIN_AREA = 8  # components smaller than this many pixels are noise
CROP = 16  # objects are read from a square crop around their component, resized to CROP x CROP


class PixelNet(nn.Module):
    """Per-pixel colour: an object colour (the pixel belongs to an object) or a background colour."""

    def __init__(self, width: int = 24):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for d in (1, 2, 4, 1):
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.GroupNorm(4, width), nn.GELU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, N_COLOUR, 1)

    def forward(self, x):  # x [B, 3, H, W] in [0, 1]
        return self.head(self.body(x * 2 - 1))


class ObjectNet(nn.Module):
    """Shape and texture of one object from its crop: RGB plus the component's mask, [B, 4, CROP, CROP]."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(4, width, 3, padding=1), nn.GELU(), nn.Conv2d(width, width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2), nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.GELU(), nn.Flatten(),
            nn.Linear(2 * width * (CROP // 4) ** 2, 128), nn.GELU(), nn.Linear(128, len(S.SHAPES) + len(S.TEXTURES)))

    def forward(self, x):
        return self.body(x).split([len(S.SHAPES), len(S.TEXTURES)], 1)


class JudgeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pixel = PixelNet()
        self.object = ObjectNet()


def crops(images: torch.Tensor, masks: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """[K, 4, CROP, CROP]: for each (image index, mask), the square around the mask's box with one pixel of margin."""
    out = []
    h, w = images.shape[-2:]
    for i, m in masks:
        ys, xs = np.nonzero(m)
        cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
        half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2 + 1
        # an affine grid samples the square [c - half, c + half] with bilinear filtering, zeros outside
        theta = torch.tensor([[half / (w / 2), 0, cx / (w / 2) - 1], [0, half / (h / 2), cy / (h / 2) - 1]],
                             dtype=torch.float32)
        grid = F.affine_grid(theta[None], [1, 4, CROP, CROP], align_corners=False)
        src = torch.cat([images[i:i + 1].float() * 2 - 1, torch.from_numpy(m)[None, None].float()], 1)
        out.append(F.grid_sample(src, grid, align_corners=False, padding_mode="zeros")[0])
    return torch.stack(out) if out else torch.zeros(0, 4, CROP, CROP)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Noise, blur and a little colour jitter, so the judge also reads imperfect samples."""
    b = x.shape[0]
    k = torch.tensor([1.0, 2.0, 1.0])
    k = (k[:, None] * k[None]) / 16
    blurred = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    a = torch.rand(b, 1, 1, 1, generator=gen) * 0.6
    x = x * (1 - a) + blurred * a
    x = x + (torch.rand(b, 3, 1, 1, generator=gen) - 0.5) * 0.08
    x = x + torch.randn(x.shape, generator=gen) * torch.rand(b, 1, 1, 1, generator=gen) * 0.06
    return x.clamp(0, 1)


def training_scenes(seed: int, n: int, start: int = 0) -> list[S.Scene]:
    """Judge training scenes: all shapes and textures; scene seeds 10M + seed * 1M + i, apart from every other split."""
    return [S.make_scene(10_000_000 + seed * 1_000_000 + i, shapes=S.SHAPES, textures=S.TEXTURES)
            for i in range(start, start + n)]


def train_judge(steps: int = 800, batch: int = 32, seed: int = 0, lr: float = 3e-3) -> JudgeNet:
    torch.manual_seed(seed)
    net = JudgeNet()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        scs = training_scenes(seed, batch, start=step * batch)
        rs = [S.render(sc) for sc in scs]
        x = _augment(torch.from_numpy(np.stack([r.image for r in rs])).permute(0, 3, 1, 2), gen)
        colour = torch.from_numpy(np.stack([r.labels["colour"] for r in rs]))
        objs = [(i, m) for i, r in enumerate(rs) for m in r.masks]
        shape = torch.tensor([S.SHAPES.index(o.shape) for sc in scs for o in sc.objects])
        texture = torch.tensor([S.TEXTURES.index(o.texture) for sc in scs for o in sc.objects])
        s_logits, t_logits = net.object(crops(x, objs))
        loss = F.cross_entropy(net.pixel(x), colour) + F.cross_entropy(s_logits, shape) + \
            F.cross_entropy(t_logits, texture)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % 100 == 0:
            log.info("judge step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), time.time() - t0)
    return net.eval()


@dataclass
class ObjReading:
    shape: str
    colour: str
    texture: str
    position: str
    x: float
    mask: np.ndarray  # [H, W] bool


@dataclass
class Reading:
    objects: list[ObjReading]  # sorted left to right
    background: str


def components(fg: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean [H, W] map, as boolean masks (no scipy needed)."""
    h, w = fg.shape
    seen = np.zeros_like(fg, bool)
    out = []
    for y0 in range(h):
        for x0 in range(w):
            if not fg[y0, x0] or seen[y0, x0]:
                continue
            stack = [(y0, x0)]
            seen[y0, x0] = True
            m = np.zeros_like(fg, bool)
            while stack:
                y, x = stack.pop()
                m[y, x] = True
                for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= ny < h and 0 <= nx < w and fg[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
            out.append(m)
    return out


def _vote(labels: np.ndarray, names, offset: int = 0) -> str:
    counts = Counter(int(v) - offset for v in labels if 0 <= int(v) - offset < len(names))
    return names[counts.most_common(1)[0][0]] if counts else names[0]


@torch.no_grad()
def read(net: JudgeNet, images: torch.Tensor) -> list[Reading]:
    """images [N, H, W, 3] or [N, 3, H, W] in [0, 1] -> one Reading per image."""
    x = (images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)).float()
    c = net.pixel(x)
    n_obj_col = len(S.COLOUR_NAMES)
    lab = c.argmax(1).numpy()
    c_obj = c[:, :n_obj_col].argmax(1).numpy()
    found: list[tuple[int, np.ndarray]] = []
    for i in range(x.shape[0]):
        found.extend((i, m) for m in components(lab[i] < n_obj_col) if m.sum() >= MIN_AREA)
    shapes, textures = [], []
    if found:
        s_logits, t_logits = net.object(crops(x, found))
        shapes, textures = s_logits.argmax(1).tolist(), t_logits.argmax(1).tolist()
    per_image: list[list[ObjReading]] = [[] for _ in range(x.shape[0])]
    for (i, m), s, t in zip(found, shapes, textures, strict=True):
        cx = float(np.nonzero(m)[1].mean()) + 0.5
        per_image[i].append(ObjReading(S.SHAPES[s], _vote(c_obj[i][m], S.COLOUR_NAMES), S.TEXTURES[t],
                                       S.position_of(cx), cx, m))
    out = []
    for i, objs in enumerate(per_image):
        objs.sort(key=lambda o: o.x)
        fg = lab[i] < n_obj_col
        bg_pixels = lab[i][~fg] if (~fg).any() else lab[i].ravel()
        out.append(Reading(objs, _vote(bg_pixels, S.BACKGROUND_NAMES, offset=n_obj_col)))
    return out


def attribute_checks(reading: Reading, scene: S.Scene, skip_position: bool = False) -> dict[str, bool]:
    """Per attribute kind: did the judge find what ``scene`` requests? Two objects: left one first.

    Kinds: count, shape, colour, texture, position (single object) / order (two objects), background.
    A wrong object count fails every per-object kind.
    """
    want = scene.objects
    got = reading.objects
    ok_count = len(got) == len(want)
    res = {"count": ok_count, "background": reading.background == scene.background}
    for kind in ("shape", "colour", "texture"):
        res[kind] = ok_count and all(getattr(g, kind) == getattr(w, kind) for g, w in zip(got, want, strict=False))
    if not skip_position:
        res["position"] = ok_count and all(g.position == w.position for g, w in zip(got, want, strict=False))
    return res


def all_ok(checks: dict[str, bool]) -> bool:
    return all(checks.values())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    u = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / u) if u else 1.0


def save(net: JudgeNet, path: str) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().half().contiguous() for k, v in net.state_dict().items()}, path)


def load(path: str) -> JudgeNet:
    from safetensors.torch import load_file

    net = JudgeNet()
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return net.eval()
