"""Steering away from a concept while sampling: negative guidance and Safe Latent Diffusion (Schramowski et al.,
CVPR 2023), training-free, one extra prediction per step for the concept prompt.

All predictions are noise predictions (epsilon) of the same x_t. With the usual CFG result
eps = eps_u + s (eps_c - eps_u), the correction added to it is

- ``negative``: -scale * (eps_s - eps_u)  (negative guidance, the target ESD trains towards);
- ``sld``:      -s * gamma, gamma = mu * (eps_s - eps_u), with the elementwise mu = min(scale * |eps_c - eps_s|, 1)
  where eps_c - eps_s < threshold and 0 elsewhere (SLD's safety guidance). SLD's momentum (``sld_momentum``) adds
  s_m * nu to gamma, with nu_{t+1} = beta * nu_t + (1 - beta) * gamma_t, nu_0 = 0; it accumulates from the first
  step, warm-up included, and is applied from the end of the warm-up on.

A zero scale gives a correction of exactly zero. With a neutral prediction eps_n (the concept prompt without the
concept word, e.g. "a car" for "a red car"), the direction is eps_s - eps_n instead of eps_s - eps_u: only what the
concept word adds is steered away from, not the rest of its prompt (the contrast concept sliders train on, applied
at sampling time; one more prediction per step).

With ``preserve`` predictions eps_1..eps_n (prompts to keep, e.g. the other colours), the correction is gated per
sample and step: with m the mean of eps_s, eps_1..eps_n, it applies only while eps_c - m, taken over the whole
latent, is closer in direction (cosine) to eps_s - m than to every eps_i - m, by more than ``margin``; elsewhere it
is exactly zero (one more prediction per preserved prompt and step).

The gate can be taken on the prompt instead (``prompt_gate``; no prediction at all): a sample is steered, at every
step, only if some token row of its prompt's conditioning is closer in direction to the concept text's summary (the
mean of its word rows) than to every preserved text's by more than ``margin``, directions taken from the summaries'
mean. It is decided once per prompt: a prompt that does not ask for the concept is sampled exactly as without
steering, and a synonym the text encoder places near the concept is caught (SAFREE, Yoon et al. 2024, likewise
decides from the prompt's embedding how near it is to the unwanted concept). A token learned to draw the concept
need not be near it in text space and may pass.
"""
from __future__ import annotations

import torch

MODES = ("negative", "sld")
# SLD's configurations (Schramowski et al. 2023, Table 1): warm-up steps (of 50), guidance scale s_S, threshold
# lambda, momentum scale s_m, momentum beta
SLD_PRESETS = {"weak": (15, 20.0, 0.0, 0.0, 0.0), "medium": (10, 1000.0, 0.01, 0.3, 0.4),
               "strong": (7, 2000.0, 0.025, 0.5, 0.7), "max": (0, 5000.0, 1.0, 0.5, 0.7)}


def sld_gamma(cond: torch.Tensor, base: torch.Tensor, concept: torch.Tensor, scale: float,
              threshold: float) -> torch.Tensor:
    """SLD's safety guidance gamma = mu * (eps_s - base), before momentum (see the module docstring)."""
    diff = cond - concept
    mu = torch.where(diff < threshold, (scale * diff.abs()).clamp(max=1.0), torch.zeros_like(diff))
    return mu * (concept - base)


def sld_momentum(gamma: torch.Tensor, velocity: torch.Tensor | None, momentum_scale: float,
                 beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """SLD's momentum: (gamma + s_m * nu, the next nu = beta * nu + (1 - beta) * that); ``velocity`` None: nu = 0."""
    guided = gamma if velocity is None else gamma + momentum_scale * velocity
    nxt = (1.0 - beta) * guided if velocity is None else beta * velocity + (1.0 - beta) * guided
    return guided, nxt


def preserve_gate(cond: torch.Tensor, concept: torch.Tensor, preserve: list[torch.Tensor] | tuple[torch.Tensor, ...],
                  margin: float = 0.0) -> torch.Tensor:
    """1 for each sample whose prediction is closer in direction to the concept's than to every preserved prompt's
    by more than ``margin``, else 0; shaped [B, 1, ...] to multiply a correction. Directions are taken from the
    candidates' mean (concept and preserved), over the whole latent: what they share (the object, the layout)
    cancels and what tells them apart is compared."""
    centre = torch.stack([concept, *preserve]).float().mean(0)

    def direction(eps):
        return (eps.float() - centre).flatten(1)

    sample = direction(cond)
    to_concept = torch.nn.functional.cosine_similarity(sample, direction(concept), dim=1)
    gate = torch.ones_like(to_concept, dtype=torch.bool)
    for eps in preserve:
        gate &= to_concept > torch.nn.functional.cosine_similarity(sample, direction(eps), dim=1) + margin
    return gate.to(cond.dtype).reshape(-1, *([1] * (cond.dim() - 1)))


def word_summary(rows: torch.Tensor, n_words: int) -> torch.Tensor:
    """A text's summary for ``prompt_gate``: the mean of its word rows (conditioning rows 1..n_words; row 0 is the
    start token, the same for every text)."""
    if n_words < 1:
        raise ValueError("a text to compare prompts with has no word; give it at least one")
    return rows[1:1 + n_words].float().mean(0)


def prompt_gate(prompt_rows: torch.Tensor, concept: torch.Tensor, preserve: torch.Tensor,
                margin: float = 0.0) -> torch.Tensor:
    """True for each prompt ([B, L, D] conditioning rows, start tokens left out by the caller) with a row closer in
    direction to the ``concept`` summary [D] than to every ``preserve`` summary [n, D] by more than ``margin``;
    directions are taken from the mean of the summaries, so what the texts share cancels."""
    if preserve.dim() != 2 or preserve.shape[0] < 1:
        raise ValueError("the prompt gate needs at least one preserved text to tell the concept from")
    centre = torch.cat([concept[None], preserve]).float().mean(0).to(prompt_rows.device)
    rows = prompt_rows.float() - centre

    def closeness(summary):
        return torch.nn.functional.cosine_similarity(rows, (summary.float().to(rows.device) - centre)[None, None],
                                                     dim=-1)

    to_concept = closeness(concept)
    nearest_other = torch.stack([closeness(p) for p in preserve]).max(0).values
    return ((to_concept - nearest_other) > margin).any(1)


def steering_correction(cond: torch.Tensor, uncond: torch.Tensor, concept: torch.Tensor, scale: float,
                        cfg_scale: float = 1.0, mode: str = "negative", threshold: float = 0.0,
                        neutral: torch.Tensor | None = None, preserve=(), margin: float = 0.0) -> torch.Tensor:
    """The term to add to the CFG noise prediction to steer away from ``concept`` (see the module docstring)."""
    base = uncond if neutral is None else neutral
    if mode == "negative":
        correction = -scale * (concept - base)
    elif mode == "sld":
        correction = -cfg_scale * sld_gamma(cond, base, concept, scale, threshold)
    else:
        raise ValueError(f"unknown steering mode {mode!r}; use one of {MODES}")
    if preserve:
        correction = correction * preserve_gate(cond, concept, preserve, margin)
    return correction


def steer_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, cond_denoised: torch.Tensor,
                   uncond_denoised: torch.Tensor, concept_denoised: torch.Tensor, scale: float, cfg_scale: float,
                   mode: str = "negative", threshold: float = 0.0,
                   neutral_denoised: torch.Tensor | None = None, preserve_denoised=(),
                   margin: float = 0.0) -> torch.Tensor:
    """The same steering for a sampler that works with denoised x0 = x - sigma * eps (ComfyUI, k-diffusion)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def eps(d):
        return (x - d) / s

    neutral = None if neutral_denoised is None else eps(neutral_denoised)
    correction = steering_correction(eps(cond_denoised), eps(uncond_denoised), eps(concept_denoised), scale,
                                     cfg_scale, mode, threshold, neutral, [eps(d) for d in preserve_denoised],
                                     margin)
    return denoised - s * correction
