"""Erasure on the toy world: one command, a table on stdout and a JSON file.

    python -m bench.toyworld.measure_erase [--rows none,uce,uce_realera,leace,steer_negative,steer_sld,esd]

The erased concept is the colour red (caption words "red" and, as its synonym, "crimson"). Prompts: one object,
every colour x base shape x two backgrounds, in the middle; red prompts also with "crimson". Per row, read by the
judge over sampling seeds ``EVAL_SEEDS``:
- efficacy: share of "red" prompts whose object the judge reads as red (target <= 0.05);
- synonym: the same for "crimson" prompts (target <= 0.10);
- specificity: share of the other colours' prompts whose object has the asked colour, and its drop from the
  base model's (target: drop <= 0.02).
Rows: the base model; the closed-form edit without / with RealEra neighbours; LEACE on the prompt's conditioning;
steering during sampling (negative guidance, SLD; from "a red shape", also relative to "a shape", or towards "a blue
shape" gated by the other colours as ``preserve``: at every step from the predictions, or once from the prompt);
ESD-style residual
fine-tuning (on each transformer's proj_out; on the model's own DDIM path; ESD-x: on the cross-attention keys and
values only), on "a red shape" or on 16 caption-form prompts (``training_captions``: places and backgrounds the
evaluation never uses), with preserved captions of the other colours or anchors (each caption without its colour
word); a concept slider ("a red shape" / "a shape", or the 16 caption pairs) applied at strength -1 and -2. With
``--attack``, also
the concept-inversion attack: a new token learned on 4 red renders through each erased pipeline, and how often
"a sks <shape> ..." prompts then draw red (``attack_red_rate``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from core import erase as E
from core import leace as L
from core import residuals as R
from core import sliders as SL
from core import training
from core.hooks.gate import LowRankGate
from core.hooks.plan import BatchPlan
from core.patching import diffusers as D
from core.patching.comfy_compose import kv_residuals
from core.patching.comfy_erase import guided_residuals
from core.steering import SLD_PRESETS, prompt_gate, sld_gamma, sld_momentum, steering_correction, word_summary
from core.tokens import find_subsequence

from . import judge as J
from . import model as M
from . import scenes as S

log = logging.getLogger(__name__)

ERASED, SYNONYM = "red", "crimson"
PRESERVE = ["blue", "green", "yellow", "purple"]
EVAL_SEEDS = (901, 902)
ATTACK_RENDER_SEED0 = 71_000_000
ATTACK_SEEDS = (903, 904)
BACKGROUNDS = ("gray", "sand")


def eval_prompts() -> list[tuple[str, str, str]]:
    """(prompt, asked colour, the word used) for every colour word x base shape x background, object in the middle."""
    out = []
    for colour, (_, words) in S.COLOURS.items():
        for word in (words if colour == ERASED else words[:1]):
            for shape in S.BASE_SHAPES:
                for bg in BACKGROUNDS:
                    out.append((f"a {word} {shape} in the middle on a {bg} background", colour, word))
    return out


def encode_word(tok, te):
    """``encode(text) -> ([L, D] rows, word tokens)`` for core.erase.build_rows."""
    @torch.no_grad()
    def encode(text):
        ids = torch.tensor([D.token_ids(tok, text)])
        return te(ids)[0][0].float(), len(tok(text, add_special_tokens=False).input_ids)
    return encode


@torch.no_grad()
def generate(unet, te, tok, prompts, seed, cond_fn=None, steer=None, gate=None, sld=None):
    """M.generate's DDIM CFG sampler with hooks: ``cond_fn`` transforms the prompt conditioning (LEACE);
    ``steer = (concept conditioning, scale, mode, threshold[, neutral conditioning or None[, preserved prompts'
    conditioning [n, L, D] or None[, (concept summary, preserved summaries, margin)]]])`` adds the steering
    correction in epsilon space (gated by the preserved prompts' predictions, or by ``prompt_gate`` on each prompt);
    ``sld = (warm-up steps, momentum scale, beta)``: SLD's warm-up and momentum (mode sld)."""
    cond = D.encode_text(tok, te, prompts)
    if cond_fn is not None:
        cond = cond_fn(cond)
    uncond = D.encode_text(tok, te, [""])
    sched = M.build_scheduler()
    c = unet.config
    b = len(prompts)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((b, c.in_channels, c.sample_size, c.sample_size), generator=gen) * sched.init_noise_sigma
    sched.set_timesteps(M.SAMPLE_STEPS)
    parts = [uncond.expand(b, -1, -1), cond]
    neutral_at, n_preserve = None, 0
    if steer is not None:
        parts.append(steer[0].expand(b, -1, -1))
        if len(steer) > 4 and steer[4] is not None:
            neutral_at = len(parts)
            parts.append(steer[4].expand(b, -1, -1))
        if len(steer) > 5 and steer[5] is not None:
            n_preserve = len(steer[5])
            parts += [row[None].expand(b, -1, -1) for row in steer[5]]
    context = torch.cat(parts)
    by_prompt = None
    if steer is not None and len(steer) > 6 and steer[6] is not None:
        by_prompt = prompt_gate(cond[:, 1:], *steer[6]).to(cond.dtype).reshape(-1, 1, 1, 1)
    ac = sched.alphas_cumprod
    velocity = None
    for step, t in enumerate(sched.timesteps):
        inp = sched.scale_model_input(torch.cat([x] * len(parts)), t)
        if gate is not None:
            gate.plan = BatchPlan(active=True)
        out = unet(inp, t, encoder_hidden_states=context).sample.chunk(len(parts))
        a = ac[int(t)].expand(b)
        eps = [training.convert_prediction(o, "v", "eps", x, a) for o in out]
        guided = eps[0] + M.GUIDANCE * (eps[1] - eps[0])
        neutral = None if neutral_at is None else eps[neutral_at]
        kept = eps[len(eps) - n_preserve:] if n_preserve else []
        if steer is not None and sld is not None:
            gamma = sld_gamma(eps[1], eps[0] if neutral is None else neutral, eps[2], steer[1], steer[3])
            g, velocity = sld_momentum(gamma, velocity, sld[1], sld[2])
            if step >= sld[0]:
                guided = guided - M.GUIDANCE * g
        elif steer is not None:
            correction = steering_correction(eps[1], eps[0], eps[2], steer[1], M.GUIDANCE, steer[2], steer[3],
                                             neutral, kept)
            guided = guided + (correction if by_prompt is None else correction * by_prompt)
        v = training.convert_prediction(guided, "eps", "v", x, a)
        x = sched.step(v, t, x).prev_sample
    z = M.from_latents(x.float()) if c.in_channels != 3 else x.float()
    return ((z + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)


# ------------------------------------------------------------------------------------------ rows
@dataclass
class Erased:
    """An erased pipeline: a (possibly edited) UNet, a conditioning transform, steering, residuals."""

    unet: torch.nn.Module
    note: str = ""
    cond_fn: Callable | None = None
    steer: tuple | None = None
    residuals: R.ResidualSet | None = None
    strength: float = 1.0  # of the residuals (a slider turned down: negative)
    kv: bool = False  # residuals on attn2.to_k / to_v (ESD-x) instead of each transformer's proj_out
    sld: tuple | None = None  # SLD's (warm-up steps, momentum scale, beta)


def _kv_hooks(e: Erased) -> kv_residuals:
    return kv_residuals(dict(E.cross_attention_projections(D.unet_sites(e.unet))), e.residuals, e.strength)


def sample(e: Erased, te, tok, prompts, seed):
    if e.residuals is None:
        return generate(e.unet, te, tok, prompts, seed, e.cond_fn, e.steer, sld=e.sld)
    if e.kv:
        with _kv_hooks(e):
            return generate(e.unet, te, tok, prompts, seed, e.cond_fn, e.steer)
    with LowRankGate(D.unet_sites(e.unet), e.residuals, e.strength) as gate:
        return generate(e.unet, te, tok, prompts, seed, e.cond_fn, e.steer, gate)


def row_none(unet, te, tok):
    return Erased(unet, "base model")


def _closed_form(unet, te, tok, neighbours, preserve_weight=1.0, tail_rows=-1):
    rows = E.build_rows(encode_word(tok, te), [ERASED], "", PRESERVE, tail_rows)
    projections = E.cross_attention_projections(D.unet_sites(unet))
    deltas = E.closed_form_edit([(n, m.weight) for n, m in projections], rows, lam=0.1, neighbours=neighbours,
                                radius=0.05, seed=0, preserve_weight=preserve_weight)
    edited = copy.deepcopy(unet)
    with torch.no_grad():
        for name, layer in E.cross_attention_projections(D.unet_sites(edited)):
            layer.weight += deltas[name].to(layer.weight.dtype)
    residual, change = E.edit_quality([(n, m.weight) for n, m in projections], deltas.__getitem__, rows)
    return Erased(edited, f"erase rows keep {residual:.1%} of the gap, preserved change {change:.1%}"
                          + (f", preserve weight {preserve_weight:g}" if preserve_weight != 1.0 else "")
                          + (f", {tail_rows} tail rows" if tail_rows >= 0 else ""))


def row_uce(unet, te, tok):
    return _closed_form(unet, te, tok, 0)


def row_uce_realera(unet, te, tok):
    return _closed_form(unet, te, tok, 8)


def row_uce_strong_preserve(unet, te, tok):
    return _closed_form(unet, te, tok, 0, preserve_weight=10.0)


def row_uce_word_rows(unet, te, tok):
    return _closed_form(unet, te, tok, 0, tail_rows=1)


def row_leace(unet, te, tok, per_position=False, centre="mean", held_out=False, shrinkage=0.0):
    """LEACE fitted on every shape x place x background caption in red and in the other colours (the evaluation's
    wordings among them; never "crimson"), or, ``held_out``, on ``training_captions`` only (wordings the
    evaluation never uses)."""
    shapes, places = S.BASE_SHAPES, list(S.POSITION_PHRASE.values())
    if held_out:
        concept = training_captions(ERASED)
        neutral = [c for colour in PRESERVE for c in training_captions(colour)]
    else:
        concept = [f"a red {s} {p} on a {bg} background" for s in shapes for p in places
                   for bg in S.BACKGROUND_NAMES]
        neutral = [f"a {c} {s} {p} on a {bg} background" for c in PRESERVE for s in shapes for p in places
                   for bg in S.BACKGROUND_NAMES]
    eraser = L.fit_on_conditioning(D.encode_text(tok, te, concept), D.encode_text(tok, te, neutral), per_position,
                                   centre, shrinkage)
    return Erased(unet, f"{'per position' if per_position else 'pooled'}, rank {eraser.rank}, "
                        f"centred on the {centre}, " + (f"shrinkage {shrinkage:g}, " if shrinkage else "")
                        + f"fitted on {'held-out wordings: ' if held_out else ''}"
                        f"{len(concept)} red / {len(neutral)} other captions (no 'crimson')", cond_fn=eraser)


def row_leace_per_position(unet, te, tok):
    return row_leace(unet, te, tok, per_position=True)


def row_leace_per_position_neutral(unet, te, tok):
    """Per position, centred on the other colours' mean: red captions move all the way to "another colour"."""
    return row_leace(unet, te, tok, per_position=True, centre="neutral")


def row_leace_per_position_neutral_held_out(unet, te, tok):
    return row_leace(unet, te, tok, per_position=True, centre="neutral", held_out=True)


def row_leace_per_position_held_out(unet, te, tok):
    return row_leace(unet, te, tok, per_position=True, held_out=True)


def row_leace_by_word(unet, te, tok):
    """One pooled LEACE eraser for any wording (``core.leace.fit_by_word``: rows labelled by their offset from
    "red"), neutral centre, shrinkage 0.01, fitted on ``training_captions`` only (wordings the evaluation never
    uses)."""
    concept = training_captions(ERASED)
    neutral = [c for colour in PRESERVE for c in training_captions(colour)]
    word = tok(ERASED, add_special_tokens=False).input_ids
    starts = [find_subsequence(D.token_ids(tok, c), word)[0] for c in concept]
    eraser = L.fit_by_word(D.encode_text(tok, te, concept), D.encode_text(tok, te, neutral), starts, "neutral", 0.01)
    return Erased(unet, f"pooled by offset from the word, rank {eraser.rank}, centred on the neutral, shrinkage "
                        f"0.01, fitted on held-out wordings: {len(concept)} red / {len(neutral)} other captions",
                  cond_fn=eraser)


def _leace_shrunk(held_out: bool):
    def row(unet, te, tok):
        return row_leace(unet, te, tok, per_position=True, centre="neutral", held_out=held_out, shrinkage=0.01)
    return row


def row_leace_neutral(unet, te, tok):
    return row_leace(unet, te, tok, centre="neutral")


def text_summaries(tok, te, texts: list[str]) -> torch.Tensor:
    """``core.steering.word_summary`` of each text [n, D]."""
    end = D.token_ids(tok, "")[1]
    with torch.no_grad():
        return torch.stack([word_summary(D.encode_text(tok, te, [t])[0], D.token_ids(tok, t).index(end) - 1)
                            for t in texts])


def _steer(unet, te, tok, scale, mode, threshold, concept=ERASED, neutral=None, preserve=None, by_prompt=None):
    """``by_prompt``: gate with ``prompt_gate`` at that margin (no preserved predictions) instead of per step."""
    steer = (D.encode_text(tok, te, [concept]), scale, mode, threshold)
    if neutral is not None or preserve:
        steer = (*steer, None if neutral is None else D.encode_text(tok, te, [neutral]))
    if preserve and by_prompt is None:
        steer = (*steer, D.encode_text(tok, te, preserve))
    elif preserve:
        summaries = text_summaries(tok, te, [concept, *preserve])
        steer = (*steer, None, (summaries[0], summaries[1:], by_prompt))
    note = (f"{mode}, scale {scale:g}" + (f", threshold {threshold:g}" if mode == "sld" else "")
            + (f", concept '{concept}'" if concept != ERASED else "")
            + (f", neutral '{neutral}'" if neutral is not None else "")
            + (f", preserve {preserve}" if preserve else "")
            + (f", gated by the prompt (margin {by_prompt:g})" if preserve and by_prompt is not None else ""))
    return Erased(unet, note, steer=steer)


def row_steer_negative(unet, te, tok):
    return _steer(unet, te, tok, M.GUIDANCE, "negative", 0.0)


def row_steer_sld(unet, te, tok):
    return _steer(unet, te, tok, 1000.0, "sld", 0.01)


def _steer_sld_preset(preset: str, concept: str):
    """SLD with one of the paper's configurations: warm-up (of 50 steps, scaled to the toy's 20), s_S, lambda and
    momentum."""
    def row(unet, te, tok):
        warmup, scale, threshold, momentum, beta = SLD_PRESETS[preset]
        e = _steer(unet, te, tok, scale, "sld", threshold, concept)
        steps = round(warmup * M.SAMPLE_STEPS / 50)
        return dataclasses.replace(e, sld=(steps, momentum, beta),
                                   note=f"{e.note}, SLD {preset}: warm-up {steps} of {M.SAMPLE_STEPS} steps, "
                                        f"momentum {momentum:g} (beta {beta:g})")
    return row


def row_steer_negative_shape(unet, te, tok):
    return _steer(unet, te, tok, 3.0, "negative", 0.0, f"a {ERASED} shape")


def row_steer_contrast(unet, te, tok):
    """Steering along eps("a red shape") - eps("a shape") (the node's ``neutral`` input) instead of from eps_u."""
    return _steer(unet, te, tok, 3.0, "negative", 0.0, f"a {ERASED} shape", "a shape")


def row_steer_anchor_preserved(unet, te, tok):
    """Towards "a blue shape" (a direction that does not vanish where red is already drawn), only for samples
    whose prediction is nearer red's than each other colour's (``core.steering.preserve_gate``)."""
    return _steer(unet, te, tok, 2.0, "negative", 0.0, f"a {ERASED} shape", f"a {PRESERVE[0]} shape",
                  [f"a {c} shape" for c in PRESERVE])


def row_steer_anchor_prompt_gated(unet, te, tok):
    """The same steering, decided once per prompt: only prompts with a token nearer "a red shape"'s words than each
    other colour's by 0.25 (``core.steering.prompt_gate``; no preserved predictions)."""
    return _steer(unet, te, tok, 2.0, "negative", 0.0, f"a {ERASED} shape", f"a {PRESERVE[0]} shape",
                  [f"a {c} shape" for c in PRESERVE], by_prompt=0.25)


def row_esd(unet, te, tok, steps=200):
    return _guided_residuals(unet, te, tok, SL.esd_sets([f"a {ERASED} shape"]), steps)


def row_esd_trajectory(unet, te, tok, steps=200):
    """ESD with x_t drawn on the frozen model's own DDIM path for the erased prompt (the paper's sampling)."""
    return _guided_residuals(unet, te, tok, SL.esd_sets([f"a {ERASED} shape"]), steps, M.SAMPLE_STEPS)


def row_esd_x(unet, te, tok, steps=200):
    """ESD-x: the residuals on the cross-attention keys and values only (the ESD paper's variant for erasing one
    concept while leaving prompts without it alone)."""
    return _guided_residuals(unet, te, tok, SL.esd_sets([f"a {ERASED} shape"]), steps, kv=True)


TRAIN_PLACES, TRAIN_BACKGROUNDS = ("on the left", "on the right"), ("white", "black")


def training_captions(colour: str) -> list[str]:
    """Captions with ``colour`` for training erasers: every base shape, places and backgrounds the evaluation
    prompts never use (they are all "in the middle on a gray / sand background")."""
    return [f"a {colour} {s} {p} on a {bg} background" for s in S.BASE_SHAPES for p in TRAIN_PLACES
            for bg in TRAIN_BACKGROUNDS]


def _captions_rows(kv: bool, preserve: bool, steps: int, eta: float = 1.0, lr: float = 3e-3, anchored=False):
    """ESD on ``training_captions``; ``anchored``: each caption's anchor is itself without the colour word."""
    def row(unet, te, tok):
        kept = [c for colour in PRESERVE for c in training_captions(colour)] if preserve else []
        captions = training_captions(ERASED)
        anchors = [c.replace(f" {ERASED} ", " ") for c in captions] if anchored else []
        return _guided_residuals(unet, te, tok, SL.esd_sets(captions, anchors), steps, kv=kv, preserve=kept,
                                 eta=eta, lr=lr)
    return row


def row_slider(unet, te, tok, steps=200, strength=-1.0):
    """A concept slider "a red shape" / "a shape" (neutral: their shared words), turned down: ``strength`` < 0."""
    plus, minus = f"a {ERASED} shape", "a shape"
    hit = _SLIDERS.get(steps)
    if hit is None or hit[0] is not unet:  # one training serves every strength of the same model
        hit = _SLIDERS[steps] = (unet, _guided_residuals(unet, te, tok, SL.slider_sets([plus], [minus]), steps))
    trained = hit[1]
    return dataclasses.replace(trained, strength=strength, note=f"strength {strength:g}, {trained.note}")


_SLIDERS: dict = {}  # steps or (kind, steps, lr) -> (model, trained slider)


def row_slider_strong(unet, te, tok):
    return row_slider(unet, te, tok, strength=-2.0)


def _slider_captions_row(strength: float, steps: int = 400, lr: float = 1e-2):
    """A slider trained on ``training_captions`` pairs ("a red circle on the left ..." / "a circle on the left
    ..."; neutral: the colourless caption), one pair per step, turned down to ``strength``."""
    def row(unet, te, tok):
        key = ("captions", steps, lr)
        hit = _SLIDERS.get(key)
        if hit is None or hit[0] is not unet:
            plus = training_captions(ERASED)
            sets = SL.slider_sets(plus, [c.replace(f" {ERASED} ", " ") for c in plus])
            hit = _SLIDERS[key] = (unet, _guided_residuals(unet, te, tok, sets, steps, lr=lr))
        trained = hit[1]
        return dataclasses.replace(trained, strength=strength, note=f"strength {strength:g}, {trained.note}")
    return row


def _guided_residuals(unet, te, tok, sets: list[tuple[str, str, str]], steps: int, denoise_steps: int = 0,
                      kv: bool = False, preserve: list[str] = (), eta: float = 1.0, lr: float = 3e-3) -> Erased:
    """Residuals trained to follow core.sliders.guided_target for prompt triples ``sets`` (ESD and sliders alike),
    keeping ``preserve``; ``kv``: on the cross-attention K/V projections, else on each transformer's proj_out."""
    contexts = {text: D.encode_text(tok, te, [text]) for text in SL.sets_prompts(sets, preserve)}
    rs, patch, switch = guided_residuals(D.unet_sites(unet), "cross_attention_kv" if kv else "proj_out", 4)
    cfg = training.TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=0)
    unet.requires_grad_(False)
    c = unet.config

    def predict(x_t, t, prompt, residual):
        switch(residual)
        return unet(x_t, t, encoder_hidden_states=contexts[prompt].expand(x_t.shape[0], -1, -1)).sample

    t0 = time.time()
    with patch:
        losses = SL.train_guided(rs.parameters(), predict, (c.in_channels, c.sample_size, c.sample_size),
                                 M.train_alphas_cumprod(), eta, "v", cfg, denoise_steps=denoise_steps, sets=sets,
                                 preserve=preserve)
    return Erased(unet, f"{'K/V' if kv else 'proj_out'} {rs.parameter_count()} params, {steps} steps in "
                        f"{time.time() - t0:.0f} s, "
                        + (f"{len(sets)} prompts, " if len(sets) > 1 else "")
                        + (f"{len(preserve)} preserved, " if preserve else "")
                        + (f"eta {eta:g}, " if eta != 1.0 else "") + (f"lr {lr:g}, " if lr != 3e-3 else "")
                        + (f"x_t on {denoise_steps}-step DDIM paths, " if denoise_steps else "")
                        + f"loss {losses[0]:.4f}->{losses[-1]:.4f}", residuals=rs.detached(), kv=kv)


# ------------------------------------------------------------------------------------------ the attack
def attack_prompts() -> list[str]:
    return [f"a {S.CONCEPT_TOKEN} {shape} in the middle on a {bg} background" for shape in S.BASE_SHAPES
            for bg in BACKGROUNDS]


def attack_rate(e: Erased, te, tok, judge, steps: int = 300, lr: float = 5e-3) -> float:
    """Concept inversion (Pham et al., "Circumventing Concept Erasure Methods"): textual inversion of a new token
    on 4 renders of red objects, trained through the erased pipeline (edited weights, LEACE on the conditioning,
    ESD residuals; steering only acts at sampling); returns how often "a sks <shape> ..." then draws red."""
    from .measure import TokenEmbedding

    scenes = [S.make_scene(ATTACK_RENDER_SEED0 + i, n_objects=1, colours=(ERASED,), textures=("plain",))
              for i in range(4)]
    views, _ = training.make_views(torch.from_numpy(S.render_batch(scenes)), None, S.SIZE, 4, 0)
    pixels = views.permute(0, 3, 1, 2).float() * 2 - 1  # the committed base model works in pixel space
    latents = M.to_latents(pixels) if e.unet.config.in_channels != 3 else pixels
    token_id = tok(S.CONCEPT_TOKEN, add_special_tokens=False).input_ids[0]
    class_id = tok(S.CLASS_WORD, add_special_tokens=False).input_ids[0]
    te.requires_grad_(False)
    e.unet.requires_grad_(False)
    inversion = TokenEmbedding(te, token_id, te.get_input_embeddings().weight[class_id])
    ids = torch.tensor([D.token_ids(tok, training.training_prompt(S.CONCEPT_TOKEN, S.CLASS_WORD))])
    cfg = training.TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=0, objective="v")

    def predict(x, t, _ctx):
        with torch.enable_grad():
            c = te(ids)[0]
            c = e.cond_fn(c) if e.cond_fn is not None else c
        return e.unet(x, t, encoder_hidden_states=c.expand(x.shape[0], -1, -1)).sample

    patch = contextlib.nullcontext()
    if e.residuals is not None:
        # the erased pipeline as it samples: a slider at its (negative) strength
        patch = _kv_hooks(e) if e.kv else LowRankGate(D.unet_sites(e.unet), e.residuals, e.strength)
    with inversion:
        with patch:
            training.train([inversion.vec], predict, latents, torch.zeros(1, 1, 1), M.train_alphas_cumprod(), "v",
                           None, cfg)
        reds = []
        for seed in ATTACK_SEEDS:
            for reading in J.read(judge, sample(e, te, tok, attack_prompts(), seed)):
                reds.append(len(reading.objects) == 1 and reading.objects[0].colour == ERASED)
    return float(np.mean(reds))


ROWS: dict[str, Callable] = {"none": row_none, "uce": row_uce, "uce_realera": row_uce_realera,
                             "uce_strong_preserve": row_uce_strong_preserve, "uce_word_rows": row_uce_word_rows,
                             "leace": row_leace,
                             "leace_per_position": row_leace_per_position, "leace_neutral": row_leace_neutral,
                             "leace_per_position_neutral": row_leace_per_position_neutral,
                             "leace_per_position_held_out": row_leace_per_position_held_out,
                             "leace_per_position_neutral_held_out": row_leace_per_position_neutral_held_out,
                             "leace_per_position_neutral_shrunk": _leace_shrunk(False),
                             "leace_per_position_neutral_held_out_shrunk": _leace_shrunk(True),
                             "leace_by_word": row_leace_by_word,
                             "steer_negative": row_steer_negative,
                             "steer_sld": row_steer_sld,
                             "steer_sld_max_shape": _steer_sld_preset("max", f"a {ERASED} shape"),
                             "steer_negative_shape": row_steer_negative_shape,
                             "steer_contrast": row_steer_contrast,
                             "steer_anchor_preserved": row_steer_anchor_preserved,
                             "steer_anchor_prompt_gated": row_steer_anchor_prompt_gated,
                             "esd": row_esd, "esd_trajectory": row_esd_trajectory,
                             "esd_x": row_esd_x,
                             "esd_captions_preserve": _captions_rows(False, True, 800, eta=3.0, lr=1e-2),
                             "esd_x_captions": _captions_rows(True, False, 400, lr=1e-2),
                             "esd_x_captions_anchor": _captions_rows(True, False, 400, lr=1e-2, anchored=True),
                             "slider": row_slider,
                             "slider_strong": row_slider_strong,
                             "slider_captions": _slider_captions_row(-1.0),
                             "slider_captions_strong": _slider_captions_row(-2.0)}


def measure(e: Erased, te, tok, judge, prompts, seeds=EVAL_SEEDS) -> dict[str, float]:
    texts = [p for p, _, _ in prompts]
    hits = {"erased": [], "synonym": [], "other": []}
    for seed in seeds:
        for reading, (_, colour, word) in zip(J.read(judge, sample(e, te, tok, texts, seed)), prompts,
                                               strict=True):
            read = reading.objects[0].colour if len(reading.objects) == 1 else None
            if word == ERASED:
                hits["erased"].append(read == ERASED)
            elif word == SYNONYM:
                hits["synonym"].append(read == ERASED)
            else:
                hits["other"].append(read == colour)
    return {"efficacy_red_rate": float(np.mean(hits["erased"])), "synonym_red_rate": float(np.mean(hits["synonym"])),
            "other_colour_adherence": float(np.mean(hits["other"])), "samples": sum(len(v) for v in hits.values())}


def run(weights: str, judge_path: str, rows: list[str], attack: bool = False, seeds=EVAL_SEEDS) -> dict:
    unet, te, tok = M.load(weights)
    judge = J.load(judge_path)
    prompts = eval_prompts()
    results = {}
    for name in rows:
        t0 = time.time()
        erased = ROWS[name](unet, te, tok)
        results[name] = dict(measure(erased, te, tok, judge, prompts, seeds), note=erased.note)
        if attack:
            results[name]["attack_red_rate"] = attack_rate(erased, te, tok, judge)
        results[name]["row_seconds"] = round(time.time() - t0, 1)
        log.info("%s %s", name, results[name])
    if "none" in results:
        for r in results.values():
            r["specificity_drop"] = results["none"]["other_colour_adherence"] - r["other_colour_adherence"]
    return {"erased": ERASED, "synonym": SYNONYM, "preserve": PRESERVE, "eval_sample_seeds": list(seeds),
            "eval_prompts": [p for p, _, _ in prompts], "weights_sha256": M.sha256(weights), "rows": results}


def table(res: dict) -> str:
    head = f"{'row':<24} {'red rate':>8} {'crimson':>8} {'others ok':>9} {'drop':>6} {'attack':>6}  note"
    lines = [head, "-" * len(head)]
    for name, r in res["rows"].items():
        lines.append(f"{name:<24} {r['efficacy_red_rate']:>8.3f} {r['synonym_red_rate']:>8.3f} "
                     f"{r['other_colour_adherence']:>9.3f} {r.get('specificity_drop', float('nan')):>6.3f} "
                     f"{r.get('attack_red_rate', float('nan')):>6.3f}  "
                     f"{r['note']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=M.DEFAULT_WEIGHTS)
    ap.add_argument("--judge", default=os.path.join(M.HERE, "weights", "judge.safetensors"))
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--attack", action="store_true", help="also run the concept-inversion attack on each row")
    ap.add_argument("--seeds", default=",".join(map(str, EVAL_SEEDS)),
                    help="sampling seeds of the evaluation (others than the default: a confirmation run)")
    ap.add_argument("--json", default=os.path.join(M.HERE, "results", "toyworld_erase.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    res = run(args.weights, args.judge, [r for r in args.rows.split(",") if r], args.attack,
              tuple(int(x) for x in args.seeds.split(",")))
    print(table(res))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
