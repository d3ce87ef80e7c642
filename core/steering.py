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


def steering_correction(cond: torch.Tensor, uncond: torch.Tensor, concept: torch.Tensor, scale: float,
                        cfg_scale: float = 1.0, mode: str = "negative", threshold: float = 0.0,
                        neutral: torch.Tensor | None = None) -> torch.Tensor:
    """The term to add to the CFG noise prediction to steer away from ``concept`` (see the module docstring)."""
    base = uncond if neutral is None else neutral
    if mode == "negative":
        return -scale * (concept - base)
    if mode == "sld":
        return -cfg_scale * sld_gamma(cond, base, concept, scale, threshold)
    raise ValueError(f"unknown steering mode {mode!r}; use one of {MODES}")


def steer_denoised(denoised: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor, cond_denoised: torch.Tensor,
                   uncond_denoised: torch.Tensor, concept_denoised: torch.Tensor, scale: float, cfg_scale: float,
                   mode: str = "negative", threshold: float = 0.0,
                   neutral_denoised: torch.Tensor | None = None) -> torch.Tensor:
    """The same steering for a sampler that works with denoised x0 = x - sigma * eps (ComfyUI, k-diffusion)."""
    s = sigma.reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)

    def eps(d):
        return (x - d) / s

    neutral = None if neutral_denoised is None else eps(neutral_denoised)
    correction = steering_correction(eps(cond_denoised), eps(uncond_denoised), eps(concept_denoised), scale,
                                     cfg_scale, mode, threshold, neutral)
    return denoised - s * correction
