"""Diffusion-loss training of residual parameters with a frozen base (Ham et al. 2024, Sec. 3.2).

Backend-neutral: the backend supplies ``predict(x_t, t, context)`` (the model with the residual hooks installed)
and the noise schedule; this module owns the data views, the loss, the optimiser loop and determinism.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

PREDICTIONS = ("eps", "v", "x0")


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainConfig:
    steps: int = 150
    batch_size: int = 4
    learning_rate: float = 1e-3
    seed: int = 0
    weight_decay: float = 1e-2
    objective: str = "eps"  # the paper's plain noise-prediction loss


def training_prompt(token: str, class_word: str) -> str:
    """The paper's prompt for every reference image: "a photo of a V* <class>"."""
    return f"a photo of a {token} {class_word}"


def image_prompts(token: str, class_word: str, captions: list[str] | None, n_images: int) -> list[str]:
    """The training prompt of each image: the paper's one prompt (``[training_prompt]``) when ``captions`` is empty,
    else one caption per image (one caption is shared), each naming ``token`` and ``class_word`` as words.

    Why captions: the residual is trained with the prompts it sees; a caption that also names what the picture
    shows besides the concept (place, background) keeps those words working when the concept is prompted with them.
    """
    captions = [c.strip() for c in (captions or []) if c.strip()]
    if not captions:
        return [training_prompt(token, class_word)]
    if len(captions) == 1:
        captions = captions * n_images
    if len(captions) != n_images:
        raise ValueError(f"{len(captions)} captions for {n_images} images: give one caption per image (one line "
                         "each) or a single caption for all")
    for c in captions:
        text = " " + " ".join(c.lower().replace(",", " ").replace(".", " ").split()) + " "
        missing = [w for w in (token, class_word) if f" {' '.join(w.lower().split())} " not in text]
        if missing:
            raise ValueError(f"the caption '{c}' does not name {' and '.join(repr(w) for w in missing)}: every "
                             f"caption must contain the token and the class word, e.g. 'a {token} {class_word} on "
                             "a beach'")
    return captions


def residual_metadata(family: str, class_word: str, token: str, config: TrainConfig, resolution: int,
                      prompts: list[str] | None = None) -> dict:
    """What a residual file records about how it was made (strings, as safetensors metadata must be); ``prompts``
    (``image_prompts``) are recorded as ``captions`` when they are not the paper's one prompt."""
    meta = {"technique": "personalized_residuals", "base_family": family, "class_word": class_word, "token": token,
            "steps": config.steps, "seed": config.seed, "learning_rate": config.learning_rate,
            "batch_size": config.batch_size, "resolution": resolution,
            "prompt": training_prompt(token, class_word)}
    if prompts and set(prompts) != {meta["prompt"]}:
        meta["captions"] = json.dumps(list(prompts))
    return {k: str(v) for k, v in meta.items()}


def check_images(images: torch.Tensor | None, masks: torch.Tensor | None) -> torch.Tensor | None:
    """Validate an image batch [N, H, W, C] and optional masks; returns masks as [N, H, W] (one mask is shared)."""
    if images is None or images.shape[0] == 0:
        raise ValueError("the image batch is empty: give at least one image of the concept")
    if masks is None:
        return None
    if masks.dim() == 2:
        masks = masks[None]
    if masks.shape[0] == 1 and images.shape[0] > 1:
        masks = masks.expand(images.shape[0], -1, -1)
    if tuple(masks.shape) != tuple(images.shape[:3]):
        raise ValueError(
            f"the mask batch is {tuple(masks.shape)} (count, height, width) but the images are "
            f"{tuple(images.shape[:3])}: give one mask per image, each the size of its image")
    if (masks.flatten(1).amax(1) <= 0).any():
        raise ValueError("one of the masks is empty (all zero): every mask must mark the concept in its image")
    return masks


def latent_masks(view_masks: torch.Tensor | None, latent_hw) -> torch.Tensor | None:
    """Pixel masks [V, H, W] -> loss weights [V, 1, h, w] at latent resolution (area average)."""
    if view_masks is None:
        return None
    out = F.interpolate(view_masks[:, None].float(), size=tuple(latent_hw), mode="area")
    if (out.flatten(1).sum(1) == 0).any():
        raise ValueError("a mask is empty at latent resolution: every mask must cover part of its image")
    return out


def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
    """The SD1.x/SDXL training schedule."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


def convert_prediction(pred, kind: str, to: str, x_t, alpha_bar):
    """Re-express a model output of ``kind`` (eps, v, x0) as ``to`` given x_t = sqrt(a) x0 + sqrt(1-a) eps."""
    if kind == to:
        return pred
    a = alpha_bar.sqrt().view(-1, 1, 1, 1)
    s = (1 - alpha_bar).sqrt().view(-1, 1, 1, 1)
    if kind == "eps":
        eps, x0 = pred, (x_t - s * pred) / a
    elif kind == "v":
        eps, x0 = a * pred + s * x_t, a * x_t - s * pred
    elif kind == "x0":
        eps, x0 = (x_t - a * pred) / s, pred
    else:
        raise ValueError(f"unknown prediction type {kind!r}")
    return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[to]


def objective_target(noise: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                     objective: str) -> torch.Tensor:
    """The regression target in ``objective``'s space (eps, v or x0) for x_t = sqrt(a) x0 + sqrt(1-a) noise."""
    return x0 if objective == "x0" else convert_prediction(noise, "eps", objective, x_t, alpha_bar)


def diffusion_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error; with ``mask`` [B, 1, h, w] only masked positions count (exactly zero weight outside)."""
    err = (pred.float() - target.float()) ** 2
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


def make_views(images: torch.Tensor, masks: torch.Tensor | None, resolution: int, views: int, seed: int,
               flip: bool = True):
    """Random square crops (80-100% of the short side) and, if ``flip``, horizontal flips (leave them off where
    left and right matter); view 0 is the plain centre crop.

    images [N, H, W, 3] in [0, 1]; masks [N, H, W] or None. Returns ([N*views, res, res, 3], [N*views, res, res]).
    """
    gen = torch.Generator().manual_seed(seed)
    n, h, w, _ = images.shape
    out_i, out_m = [], []
    for i in range(n):
        for v in range(views):
            side = min(h, w)
            if v > 0:
                side = int(side * (0.8 + 0.2 * torch.rand((), generator=gen).item()))
            top = (h - side) // 2 if v == 0 else int(torch.randint(0, h - side + 1, (), generator=gen))
            left = (w - side) // 2 if v == 0 else int(torch.randint(0, w - side + 1, (), generator=gen))
            mirror = v > 0 and bool(torch.rand((), generator=gen) < 0.5) and flip
            img = images[i, top:top + side, left:left + side].permute(2, 0, 1)[None].float()
            img = F.interpolate(img, size=(resolution, resolution), mode="bilinear", antialias=True,
                                align_corners=False)[0].permute(1, 2, 0).clamp(0, 1)
            out_i.append(img.flip(1) if mirror else img)
            if masks is not None:
                m = masks[i, top:top + side, left:left + side][None, None].float()
                m = F.interpolate(m, size=(resolution, resolution), mode="bilinear", align_corners=False)[0, 0]
                out_m.append(m.flip(1) if mirror else m)
    return torch.stack(out_i), (torch.stack(out_m) if masks is not None else None)


def train(params: list[torch.Tensor], predict, latents: torch.Tensor, contexts: torch.Tensor,
          alphas_cumprod: torch.Tensor, prediction: str = "eps", masks: torch.Tensor | None = None,
          config: TrainConfig = TrainConfig(), progress=None, extra_loss=None) -> list[float]:
    """Optimise ``params`` (AdamW) on the diffusion loss; returns the loss of every step.

    latents [V, C, h, w]; contexts [V or 1, L, D]; masks [V, 1, h, w] (latent resolution) or None.
    ``predict(x_t, t, context)`` returns the model's output of type ``prediction``.
    ``progress(step, total, loss)`` is called after each step. Deterministic for a given ``config.seed``.
    ``extra_loss()``, when given, is called after each prediction and its value added (a regulariser that reads
    what the prediction left behind, e.g. attention maps).
    """
    if config.objective not in PREDICTIONS:
        raise ValueError(f"unknown objective {config.objective!r}")
    gen = torch.Generator().manual_seed(config.seed)
    device = latents.device
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    ac = alphas_cumprod.to(device=device, dtype=torch.float32)
    n_views = latents.shape[0]
    order: list[int] = []
    losses = []
    for step in range(config.steps):
        batch = []
        while len(batch) < config.batch_size:
            if not order:
                order = torch.randperm(n_views, generator=gen).tolist()
            batch.append(order.pop())
        idx = torch.tensor(batch)
        x0 = latents[idx]
        ctx = contexts[idx] if contexts.shape[0] == n_views else contexts.expand(len(batch), *contexts.shape[1:])
        noise = torch.randn(x0.shape, generator=gen).to(device, x0.dtype)
        t = torch.randint(0, ac.shape[0], (len(batch),), generator=gen).to(device)
        a = ac[t]
        x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
        target = objective_target(noise, x0, x_t, a, config.objective)
        pred = convert_prediction(predict(x_t, t, ctx), prediction, config.objective, x_t, a)
        loss = diffusion_loss(pred, target, masks[idx] if masks is not None else None)
        if extra_loss is not None:
            loss = loss + extra_loss()
        optimizer_step(opt, loss, step, config, losses, progress, "check the images for NaNs, ")
    for p in params:
        p.requires_grad_(False)
    return losses


def optimizer_step(opt, loss: torch.Tensor, step: int, config: TrainConfig, losses: list[float], progress=None,
                   hint: str = "") -> None:
    """One AdamW step on ``loss``, shared by every trainer: stop on a non-finite loss (``hint`` is added to the
    advice), record the loss, report progress."""
    value = loss.item()
    if not math.isfinite(value):
        raise TrainingDivergedError(
            f"the training loss became {value} at step {step + 1}: lower the learning rate "
            f"(now {config.learning_rate:g}), {hint}or train in fp32")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    losses.append(value)
    if progress is not None:
        progress(step + 1, config.steps, value)
