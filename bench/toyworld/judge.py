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
N_SHAPE = len(S.SHAPES) + 1
N_TEXTURE = len(S.TEXTURES) + 1
MIN_AREA = 8  # components smaller than this many pixels are noise


class JudgeNet(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for d in (1, 1, 2, 4, 8, 1):
            layers += [nn.Conv2d(c, width, 3, padding=d, dilation=d), nn.GroupNorm(4, width), nn.GELU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, N_COLOUR + N_SHAPE + N_TEXTURE, 1)

    def forward(self, x):  # x [B, 3, H, W] in [0, 1]
        out = self.head(self.body(x * 2 - 1))
        return out.split([N_COLOUR, N_SHAPE, N_TEXTURE], 1)


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


def batch_tensors(scenes: list[S.Scene]):
    rs = [S.render(s) for s in scenes]
    x = torch.from_numpy(np.stack([r.image for r in rs])).permute(0, 3, 1, 2)
    lab = {k: torch.from_numpy(np.stack([r.labels[k] for r in rs])) for k in ("colour", "shape", "texture")}
    return x, lab


def train_judge(steps: int = 1200, batch: int = 32, seed: int = 0, lr: float = 3e-3) -> JudgeNet:
    torch.manual_seed(seed)
    net = JudgeNet()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    t0 = time.time()
    for step in range(steps):
        x, lab = batch_tensors(training_scenes(seed, batch, start=step * batch))
        c, s, t = net(_augment(x, gen))
        loss = F.cross_entropy(c, lab["colour"]) + F.cross_entropy(s, lab["shape"]) + \
            F.cross_entropy(t, lab["texture"])
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
    x = images if images.shape[1] == 3 else images.permute(0, 3, 1, 2)
    c, s, t = net(x.float())
    n_obj_col = len(S.COLOUR_NAMES)
    # object colours only where the pixel is an object, background colours only elsewhere
    c_obj = c[:, :n_obj_col].argmax(1).numpy()
    c_bg = c[:, n_obj_col:].argmax(1).numpy()
    s_lab = s.argmax(1).numpy()
    s_obj = s[:, :-1].argmax(1).numpy()
    t_obj = t[:, :-1].argmax(1).numpy()
    out = []
    for i in range(x.shape[0]):
        fg = s_lab[i] != len(S.SHAPES)
        objs = []
        for m in components(fg):
            if m.sum() < MIN_AREA:
                continue
            cx = float(np.nonzero(m)[1].mean()) + 0.5
            objs.append(ObjReading(_vote(s_obj[i][m], S.SHAPES), _vote(c_obj[i][m], S.COLOUR_NAMES),
                                   _vote(t_obj[i][m], S.TEXTURES), S.position_of(cx), cx, m))
        objs.sort(key=lambda o: o.x)
        bg_pixels = c_bg[i][~fg] if (~fg).any() else c_bg[i].ravel()
        out.append(Reading(objs, _vote(bg_pixels, S.BACKGROUND_NAMES)))
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
