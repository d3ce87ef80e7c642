"""Concept sliders (Gandikota et al., ECCV 2024) and ESD-style erasure (Gandikota et al., ICCV 2023): a residual
set trained so that the model *with* the residual, on one prompt, predicts a guided combination of the frozen
model's predictions on others.

    slider:  eps'(x_t, c_neutral) -> eps(x_t, c_neutral) + eta (eps(x_t, c_plus) - eps(x_t, c_minus))
    ESD:     eps'(x_t, c_erase)   -> eps(x_t, c_erase)   - eta (eps(x_t, c_erase) - eps(x_t, empty))

ESD is the slider objective with neutral = minus = the erased prompt and plus = the empty prompt, so one
trainer serves both. Several prompt triples may be given (one is drawn per step: e.g. the concept in several
sentences, so the edit is not tied to one wording), and preserved prompts (neutral = plus = minus, whose target is
the frozen model's own prediction), drawn on every other step when given, keep what the residual must not change.

The trainer is blind to where the residual sits (``predict`` switches it): the nodes use the pack's low-rank
``proj_out`` residual set (core.residuals, applied globally by ``ResidualGate``) or, for ESD-x, low-rank residuals
on the cross-attention K/V projections. A slider at strength s adds s * Delta W, so strength 0 is the base model
exactly and a negative strength turns the attribute down.

Samples x_t, with no images: by default each step draws pure noise, takes the frozen model's x0 estimate for the
neutral prompt and noises it again to a random timestep (one evaluation, but a blurry x0). With
``denoise_steps`` = n > 0, as the ESD paper does, x_t is where the frozen model's own deterministic DDIM
trajectory for the neutral prompt (n steps from pure noise, no CFG) is after a random number of steps: the
states the sampler really visits, at about n / 2 more evaluations per step.
"""
from __future__ import annotations

import difflib
import json
from collections.abc import Sequence

import torch

from .training import TrainConfig, convert_prediction, diffusion_loss, optimizer_step

PROMPTS = ("neutral", "plus", "minus")


class SliderPromptError(ValueError):
    """A slider's positive and negative prompts that do not differ in exactly one word."""


def slider_words(positive: str, negative: str) -> tuple[str, str]:
    """The one word in which ``positive`` and ``negative`` differ (a word may be missing on one side, returned as
    ''); raises SliderPromptError naming every difference otherwise. Case and spacing do not count."""
    a, b = positive.lower().split(), negative.lower().split()
    ops = [op for op in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes() if op[0] != "equal"]
    if not ops:
        raise SliderPromptError(f"the positive and negative prompts are the same (\"{positive}\"): a slider needs "
                                "two prompts that differ in the attribute, e.g. 'an old person' / 'a young person'")
    changes = [(" ".join(a[i1:i2]), " ".join(b[j1:j2])) for _, i1, i2, j1, j2 in ops]
    if len(ops) > 1 or any(len(p.split()) > 1 or len(n.split()) > 1 for p, n in changes):
        listed = "; ".join(f"'{p}' vs '{n}'" for p, n in changes)
        raise SliderPromptError(
            f"the positive and negative prompts differ in more than one word ({listed}): a slider learns one "
            "attribute, so write two prompts that differ only in it, e.g. 'a photo of an old person' / "
            "'a photo of a young person' (articles count as words: keep them equal or leave them out)")
    return changes[0]


def neutral_prompt(positive: str, negative: str) -> str:
    """The words both prompts share, in order (the slider's neutral prompt when none is given)."""
    a, b = positive.split(), negative.split()
    blocks = difflib.SequenceMatcher(a=[w.lower() for w in a], b=[w.lower() for w in b], autojunk=False)
    return " ".join(w for m in blocks.get_matching_blocks() for w in a[m.a:m.a + m.size])


def guided_target(neutral: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor, eta: float) -> torch.Tensor:
    """The slider / ESD target eps(neutral) + eta (eps(plus) - eps(minus)) (Gandikota et al., Eq. 5)."""
    return neutral + eta * (plus - minus)


def ddim_trajectory_point(predict, x_start: torch.Tensor, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor,
                          prediction: str, prompt: str = "neutral") -> torch.Tensor:
    """x at ``timesteps[-1]`` on the frozen model's deterministic DDIM path (eta 0, Song et al. 2021) for ``prompt``
    from ``x_start`` at ``timesteps[0]``: x' = sqrt(a') x0 + sqrt(1 - a') eps at every step."""
    x = x_start
    for t_now, t_next in zip(timesteps[:-1].tolist(), timesteps[1:].tolist(), strict=True):
        a_now = alphas_cumprod[t_now].expand(x.shape[0])
        tt = torch.full((x.shape[0],), t_now, device=x.device)
        out = predict(x, tt, prompt, False)
        x0 = convert_prediction(out, prediction, "x0", x, a_now)
        eps = convert_prediction(out, prediction, "eps", x, a_now)
        a_next = alphas_cumprod[t_next]
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
    return x


def draw_triple(gen: torch.Generator, sets: Sequence[tuple[str, str, str]], preserve: Sequence[str]):
    """The (neutral, plus, minus) prompt keys of one step: with ``preserve``, a preserved prompt p as (p, p, p) on
    half the steps; otherwise one of ``sets``, uniformly. Draws nothing from ``gen`` for one set and no preserve."""
    if preserve and bool(torch.randint(2, (), generator=gen)):
        p = preserve[int(torch.randint(len(preserve), (), generator=gen))] if len(preserve) > 1 else preserve[0]
        return (p, p, p)
    return sets[int(torch.randint(len(sets), (), generator=gen))] if len(sets) > 1 else sets[0]


def train_guided(params: list[torch.Tensor], predict, shape, alphas_cumprod: torch.Tensor, eta: float,
                 prediction: str = "eps", config: TrainConfig = TrainConfig(), progress=None, device="cpu",
                 denoise_steps: int = 0, sets: Sequence[tuple[str, str, str]] = (PROMPTS,),
                 preserve: Sequence[str] = ()):
    """Optimise ``params`` (AdamW) so the residual model follows ``guided_target``; returns the loss per step.

    ``predict(x_t, t, prompt, residual)`` returns the model output of kind ``prediction`` for the prompt key
    ``prompt`` with the residual on or off; ``shape`` is one latent's [C, h, w]. Deterministic per seed.
    ``sets``: (neutral, plus, minus) key triples, one drawn per step; ``preserve``: keys whose prediction the
    residual must keep (see ``draw_triple``). ``denoise_steps`` > 0 draws x_t on the frozen model's DDIM trajectory
    for the step's neutral prompt (see the module docstring).
    """
    if not sets:
        raise ValueError("train_guided needs at least one (neutral, plus, minus) prompt triple")
    gen = torch.Generator().manual_seed(config.seed)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    ac = alphas_cumprod.to(device=device, dtype=torch.float32)
    last = ac.shape[0] - 1
    losses = []
    for step in range(config.steps):
        neutral, plus, minus = draw_triple(gen, sets, preserve)
        b = config.batch_size
        noise_start = torch.randn((b, *shape), generator=gen).to(device)
        noise = torch.randn((b, *shape), generator=gen).to(device)
        t = torch.randint(0, ac.shape[0], (b,), generator=gen).to(device)
        t_start = torch.full((b,), last, device=device)
        a, a_start = ac[t], ac[t_start]
        with torch.no_grad():
            x_start = (1 - a_start).sqrt().view(-1, 1, 1, 1) * noise_start  # x_T of a zero-mean x0
            if denoise_steps > 0:
                path = torch.linspace(last, 0, denoise_steps + 1).round().long()
                stop = int(torch.randint(0, denoise_steps, (), generator=gen))  # 0 .. n-1 steps taken
                x_t = ddim_trajectory_point(predict, x_start, path[:stop + 1], ac, prediction, neutral)
                t = path[stop].expand(b).to(device)
                a = ac[t]
            else:
                x0 = convert_prediction(predict(x_start, t_start, neutral, False), prediction, "x0", x_start,
                                        a_start)
                x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
            base = {key: convert_prediction(predict(x_t, t, key, False), prediction, "eps", x_t, a)
                    for key in dict.fromkeys((neutral, plus, minus))}  # a preserved prompt: one call
            target = guided_target(base[neutral], base[plus], base[minus], eta)
        pred = convert_prediction(predict(x_t, t, neutral, True), prediction, "eps", x_t, a)
        optimizer_step(opt, diffusion_loss(pred, target), step, config, losses, progress)
    for p in params:
        p.requires_grad_(False)
    return losses


def esd_sets(concepts: Sequence[str], anchors: Sequence[str] = ()) -> list[tuple[str, str, str]]:
    """ESD's triple (c, anchor, c) for each prompt c that holds the concept, keyed by the prompt text itself.

    ``anchors``: what each prompt should become instead (one per prompt, or one for all; e.g. the prompt without
    the concept word: the anchor concept of Kumari et al.'s Ablating Concepts); none: the empty prompt, as in ESD.
    """
    concepts = [c.strip() for c in concepts]
    anchors = [a.strip() for a in anchors]
    if not any(concepts):
        raise ValueError("give the concept to erase (a word or short phrase, or one prompt per line)")
    if anchors and len(anchors) not in (1, len(concepts)):
        raise ValueError(f"give one anchor prompt, none, or one per concept prompt (got {len(anchors)} anchors for "
                         f"{len(concepts)} concept prompts)")
    pairs = zip(concepts, anchors * len(concepts) if len(anchors) == 1 else anchors or [""] * len(concepts),
                strict=True)
    return list(dict.fromkeys((c, a, c) for c, a in pairs if c))


def slider_sets(positives: Sequence[str], negatives: Sequence[str], neutrals: Sequence[str] = ()):
    """A slider's triple (neutral, plus, minus) per prompt pair, keyed by text: pairs line up one to one, each pair
    differs in one word (see ``slider_words``); an empty or missing neutral is the pair's shared words."""
    if len(positives) != len(negatives) or not positives:
        raise SliderPromptError(f"give as many positive prompts as negative ones, one per line (got {len(positives)} "
                                f"and {len(negatives)})")
    if neutrals and len(neutrals) not in (1, len(positives)):
        raise SliderPromptError(f"give one neutral prompt, none, or one per pair (got {len(neutrals)} for "
                                f"{len(positives)} pairs)")
    out = []
    for i, (plus, minus) in enumerate(zip(positives, negatives, strict=True)):
        try:
            slider_words(plus, minus)
        except SliderPromptError as e:
            raise (SliderPromptError(f"pair {i + 1}: {e}") if len(positives) > 1 else e) from None
        given = (neutrals[i] if len(neutrals) > 1 else neutrals[0]).strip() if neutrals else ""
        out.append((given or neutral_prompt(plus, minus), plus, minus))
    return out


def sets_prompts(sets: Sequence[tuple[str, str, str]], preserve: Sequence[str] = ()) -> list[str]:
    """Every distinct prompt text the sets and preserved prompts use (what to encode), in first-use order."""
    return list(dict.fromkeys([k for triple in sets for k in triple] + list(preserve)))


def slider_metadata(family: str, sets: Sequence[tuple[str, str, str]], eta: float, config: TrainConfig,
                    technique: str, preserve: Sequence[str] = ()):
    """String metadata for the saved file: the first triple as prompt_neutral / plus / minus (as before several
    were possible), every triple and preserved prompt as JSON."""
    meta = {"technique": technique, "base_family": family, "eta": eta, "steps": config.steps, "seed": config.seed,
            "learning_rate": config.learning_rate, "batch_size": config.batch_size}
    meta.update({f"prompt_{k}": v for k, v in zip(PROMPTS, sets[0], strict=True)})
    if len(sets) > 1:
        meta["prompt_sets"] = json.dumps([list(t) for t in sets])
    if preserve:
        meta["prompt_preserve"] = json.dumps(list(preserve))
    return {k: str(v) for k, v in meta.items()}
