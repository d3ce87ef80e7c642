"""Personalisation on the toy world: one command, a table on stdout and a JSON file.

    python -m bench.toyworld.measure [--steps 300] [--lr 1e-3] [--json bench/toyworld/results/toyworld.json]

A held-out concept (``CONCEPT``: a shape the base model never saw) is learned from 4 true renders, then sampled
with V* prompts. Per row: fidelity (the judge sees the concept where the prompt puts V*), editability (the
prompt's other attributes: place, background, the second object), background kept (share of background pixels,
outside every object the judge finds in either image, that stay within 0.1 of the no-residual sample with the
same prompt and seed), trainable parameters and training time.

Seeds. Training: concept renders from scene seeds 70,000,000+; the trainer's seed ``TRAIN_SEED`` (views,
noise, timesteps) for every row. Evaluation: prompts from scene seeds 60,000,000+ and sampling noise seeds
``EVAL_SEEDS``; none of them is used in training.

``--concept known`` learns a yellow striped diamond instead (same render seeds): an object the base model can draw,
so that the method is measured where the held-out ring is out of the model's reach.

Adding a row (composition, erasure, ...): write a function ``ctx -> Row`` (train what it needs, return a sampler)
and register it in ``ROWS``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from core import training
from core.hooks.gate import LowRankGate
from core.patching import diffusers as D

from . import judge as J
from . import model as M
from . import scenes as S

log = logging.getLogger(__name__)

CONCEPT = dict(shape="ring", colour="yellow", texture="plain")
# --concept known: an object the base model can draw (learned, like the ring, from 4 renders under the token), to
# measure the method where the held-out shape is out of the toy model's reach
CONCEPTS = {"new": CONCEPT, "known": dict(shape="diamond", colour="yellow", texture="striped")}
CONCEPT_RENDER_SEED0 = 70_000_000
EVAL_SCENE_SEED0 = 60_000_000
EVAL_SEEDS = (777, 778)
TRAIN_SEED = 0
TOKEN, CLASS_WORD = S.CONCEPT_TOKEN, S.CLASS_WORD


def _training_prompt() -> str:
    """The core trainer's prompt ("a photo of a sks shape")."""
    return training.training_prompt(TOKEN, CLASS_WORD)


def concept_scenes(n: int = 4, concept: dict = CONCEPT) -> list[S.Scene]:
    return [S.make_scene(CONCEPT_RENDER_SEED0 + i, n_objects=1, shapes=(concept["shape"],),
                         textures=(concept["texture"],), colours=(concept["colour"],)) for i in range(n)]


@dataclass
class Prompt:
    text: str
    position: str | None  # single object: where V* goes; None for two objects (V* is the left one)
    background: str
    other: S.Obj | None  # the second object, on the right


def eval_prompts() -> list[Prompt]:
    """Every place x background with V* alone, and 8 two-object prompts with V* on the left."""
    out = [Prompt(f"a {TOKEN} {CLASS_WORD} {S.POSITION_PHRASE[p]} on a {bg} background", p, bg, None)
           for p in S.POSITIONS for bg in S.BACKGROUND_NAMES]
    for i in range(8):
        sc = S.make_scene(EVAL_SCENE_SEED0 + i, n_objects=2)
        o = sc.objects[1]
        out.append(Prompt(f"a {TOKEN} {CLASS_WORD} and {S.object_phrase(o)} on a {sc.background} background",
                          None, sc.background, o))
    return out


def score(reading: J.Reading, p: Prompt, concept_wanted: dict = CONCEPT) -> dict[str, bool]:
    objs = reading.objects
    n_want = 1 if p.other is None else 2
    concept = objs[0] if objs else None
    if p.position is not None and len(objs) == 1:
        concept = objs[0]
    parts = {k: concept is not None and getattr(concept, k) == v for k, v in concept_wanted.items()}
    fid = all(parts.values())
    edit = len(objs) == n_want and reading.background == p.background
    if p.other is None:
        edit = edit and objs[0].position == p.position
    elif edit:
        o = objs[1]
        edit = (o.shape, o.colour, o.texture) == (p.other.shape, p.other.colour, p.other.texture)
    return {"fidelity": bool(fid), "editability": bool(edit), **{f"concept_{k}": bool(v) for k, v in parts.items()}}


def dilate(m: np.ndarray) -> np.ndarray:
    out = m.copy()
    out[1:] |= m[:-1]
    out[:-1] |= m[1:]
    out[:, 1:] |= m[:, :-1]
    out[:, :-1] |= m[:, 1:]
    return out


def background_kept(img: np.ndarray, ref: np.ndarray, masks: list[np.ndarray], tol: float = 0.1) -> float:
    obj = np.zeros(img.shape[:2], bool)
    for m in masks:
        obj |= dilate(m)
    bg = ~obj
    if not bg.any():
        return 0.0
    same = np.abs(img - ref).max(-1) < tol
    return float(same[bg].mean())


# ------------------------------------------------------------------------------------------ context and rows
@dataclass
class Ctx:
    unet: nn.Module
    text_encoder: nn.Module
    tokenizer: object
    judge: J.JudgeNet
    images: torch.Tensor  # [4, H, W, 3] concept renders
    config: training.TrainConfig
    cache: dict
    concept: dict = field(default_factory=lambda: dict(CONCEPT))
    rank: int = 0  # fixed residual rank per layer; 0: the paper's rule (0.05 of the width)


@dataclass
class Row:
    sample: Callable[[list[str], int], torch.Tensor]  # (prompts, seed) -> images [N, H, W, 3]
    params: int = 0
    train_seconds: float = 0.0
    note: str = ""


def _plain_sample(ctx: Ctx, prompts, seed, gate=None, token_idx=None):
    return M.generate(ctx.unet, ctx.text_encoder, ctx.tokenizer, prompts, seed=seed, gate=gate, token_idx=token_idx)


def row_none(ctx: Ctx) -> Row:
    return Row(lambda prompts, seed: _plain_sample(ctx, prompts, seed), note="base model, V* untrained")


def concept_captions(scenes: list[S.Scene], token: str = TOKEN) -> list[str]:
    """Each concept render's caption with the concept written "V* <class word>": what a user would type for it."""
    return [f"a {token} {CLASS_WORD} {S.POSITION_PHRASE[sc.objects[0].position]} on a {sc.background} background"
            for sc in scenes]


def _residuals(ctx: Ctx, captions: bool = False):
    key = "residuals_captions" if captions else "residuals"
    if key not in ctx.cache:
        t0 = time.time()
        # with captions that name the place, views are not mirrored (a mirrored "on the left" would be wrong)
        extra = dict(captions=concept_captions(concept_scenes(concept=ctx.concept)), flip=False) if captions else {}
        rs, losses = D.train_residuals(ctx.unet, M.vae_for(ctx.unet), ctx.tokenizer, ctx.text_encoder, ctx.images,
                                       CLASS_WORD, token=TOKEN, resolution=S.SIZE, config=ctx.config,
                                       prediction="v", alphas_cumprod=M.train_alphas_cumprod(),
                                       fixed_rank=ctx.rank, **extra)
        ctx.cache[key] = (rs, time.time() - t0, losses)
        log.info("%s: %d params, loss %.4f -> %.4f", key, rs.parameter_count(), np.mean(losses[:10]),
                 np.mean(losses[-10:]))
    return ctx.cache[key]


def _token_idx(ctx: Ctx, prompts: list[str]) -> list[int]:
    idx = {tuple(D.concept_positions(ctx.tokenizer, p, [TOKEN, CLASS_WORD])) for p in prompts}
    if len(idx) != 1:
        raise ValueError(f"V* sits at different token positions in one batch: {idx}")
    return list(idx.pop())


def _residual_row(ctx: Ctx, localized: bool, captions: bool = False) -> Row:
    rs, secs, _ = _residuals(ctx, captions)
    sites = D.unet_sites(ctx.unet)

    def sample(prompts, seed):
        with LowRankGate(sites, rs, localized=localized) as gate:
            return _plain_sample(ctx, prompts, seed, gate=gate, token_idx=_token_idx(ctx, prompts))

    note = "LAG: median-gated by each block's V* cross-attention" if localized else "global residual"
    return Row(sample, rs.parameter_count(), secs, note + (", trained on per-image captions" if captions else ""))


def row_residual_global(ctx: Ctx) -> Row:
    return _residual_row(ctx, False)


def row_residual_lag(ctx: Ctx) -> Row:
    return _residual_row(ctx, True)


def row_residual_global_captions(ctx: Ctx) -> Row:
    """The residuals trained on each render's caption ("a V* shape on the left on a white background")."""
    return _residual_row(ctx, False, captions=True)


def row_residual_lag_captions(ctx: Ctx) -> Row:
    return _residual_row(ctx, True, captions=True)


def _views(ctx: Ctx):
    imgs, _ = training.make_views(ctx.images, None, S.SIZE, 4, ctx.config.seed)
    return D.encode_images(M.vae_for(ctx.unet), imgs).float()


class LowRankHooks:
    """LoRA on a list of linear layers through forward hooks: y + (alpha/r) * up(down(x)), up starts at zero."""

    def __init__(self, layers: list[nn.Linear], rank: int, seed: int):
        gen = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.down = [torch.randn(rank, m.in_features, generator=gen) / m.in_features ** 0.5 for m in layers]
        self.up = [torch.zeros(m.out_features, rank) for m in layers]
        self.handles: list = []

    def parameters(self):
        return self.down + self.up

    def __enter__(self):
        for m, d, u in zip(self.layers, self.down, self.up, strict=True):
            self.handles.append(m.register_forward_hook(lambda mod, inp, out, d=d, u=u: out + inp[0] @ d.T @ u.T))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()


def row_lora_kv(ctx: Ctx) -> Row:
    """Custom-Diffusion-style LoRA on every cross-attention's to_k and to_v, rank matched to the residual budget."""
    rs, _, _ = _residuals(ctx)
    layers = [m for name, m in ctx.unet.named_modules() if name.endswith(("attn2.to_k", "attn2.to_v"))]
    per_rank = sum(m.in_features + m.out_features for m in layers)
    rank = max(1, round(rs.parameter_count() / per_rank))
    lora = LowRankHooks(layers, rank, ctx.config.seed)
    prompt = _training_prompt()
    context = D.encode_text(ctx.tokenizer, ctx.text_encoder, [prompt])
    unet = ctx.unet.requires_grad_(False)
    t0 = time.time()
    with lora:
        training.train(lora.parameters(), lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, _views(ctx),
                       context, M.train_alphas_cumprod(), "v", None, ctx.config)
    secs = time.time() - t0

    def sample(prompts, seed):
        with lora:
            return _plain_sample(ctx, prompts, seed)

    return Row(sample, sum(p.numel() for p in lora.parameters()), secs, f"rank {rank} on {len(layers)} layers")


class TokenEmbedding:
    """Textual inversion: the V* token's input embedding replaced by a learned vector (hook on the embedding)."""

    def __init__(self, text_encoder, token_id: int, init: torch.Tensor):
        self.emb = text_encoder.get_input_embeddings()
        self.token_id = token_id
        self.vec = init.detach().clone()
        self.handle = None

    def _hook(self, mod, inp, out):
        sel = (inp[0] == self.token_id).unsqueeze(-1)
        return torch.where(sel, self.vec.to(out.dtype), out)

    def __enter__(self):
        self.handle = self.emb.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def row_text_embedding(ctx: Ctx) -> Row:
    tok = ctx.tokenizer
    tid = tok(TOKEN, add_special_tokens=False).input_ids[0]
    cls_id = tok(CLASS_WORD, add_special_tokens=False).input_ids[0]
    te = ctx.text_encoder.requires_grad_(False)
    ti = TokenEmbedding(te, tid, te.get_input_embeddings().weight[cls_id])
    ids = torch.tensor([D.token_ids(tok, _training_prompt())])
    unet = ctx.unet.requires_grad_(False)
    cfg = training.TrainConfig(**{**ctx.config.__dict__, "learning_rate": 5 * ctx.config.learning_rate})

    def predict(x, t, _ctx):
        with torch.enable_grad():
            c = te(ids)[0]
        return unet(x, t, encoder_hidden_states=c.expand(x.shape[0], -1, -1)).sample

    t0 = time.time()
    with ti:
        training.train([ti.vec], predict, _views(ctx), torch.zeros(1, 1, 1), M.train_alphas_cumprod(), "v",
                       None, cfg)
    secs = time.time() - t0

    def sample(prompts, seed):
        with ti:
            return _plain_sample(ctx, prompts, seed)

    return Row(sample, ti.vec.numel(), secs, f"one vector, lr {cfg.learning_rate:g}")


def row_full_finetune(ctx: Ctx) -> Row:
    """DreamBooth-style: every UNet weight trained (a copy; the text encoder frozen), same prompt, steps and batch,
    at a tenth of the row learning rate (all 1.7 M weights move, not 2.7 k)."""
    unet = copy.deepcopy(ctx.unet).requires_grad_(True)
    context = D.encode_text(ctx.tokenizer, ctx.text_encoder, [_training_prompt()])
    cfg = training.TrainConfig(**{**ctx.config.__dict__, "learning_rate": ctx.config.learning_rate / 10})
    t0 = time.time()
    params = list(unet.parameters())
    training.train(params, lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample, _views(ctx), context,
                   M.train_alphas_cumprod(), "v", None, cfg)
    secs = time.time() - t0
    unet.requires_grad_(False)

    def sample(prompts, seed):
        return M.generate(unet, ctx.text_encoder, ctx.tokenizer, prompts, seed=seed)

    return Row(sample, sum(p.numel() for p in params), secs, f"all UNet weights, lr {cfg.learning_rate:g}")


ROWS: dict[str, Callable[[Ctx], Row]] = {
    "none": row_none,
    "residual_global": row_residual_global,
    "residual_lag": row_residual_lag,
    "residual_global_captions": row_residual_global_captions,
    "residual_lag_captions": row_residual_lag_captions,
    "lora_kv_equal_params": row_lora_kv,
    "text_embedding": row_text_embedding,
    "full_finetune": row_full_finetune,
}


def run(weights: str, judge_path: str, steps: int, rows: list[str], lr: float = 1e-3, concept: str = "new",
        rank: int = 0) -> dict:
    unet, te, tok = M.load(weights)
    judge = J.load(judge_path)
    wanted = CONCEPTS[concept]
    images = torch.from_numpy(S.render_batch(concept_scenes(concept=wanted)))
    cfg = training.TrainConfig(steps=steps, batch_size=4, learning_rate=lr, seed=TRAIN_SEED, objective="v")
    ctx = Ctx(unet, te, tok, judge, images, cfg, {}, dict(wanted), rank)
    prompts = eval_prompts()
    texts = [p.text for p in prompts]
    refs = {s: _plain_sample(ctx, texts, s).numpy() for s in EVAL_SEEDS}
    ref_read = {s: J.read(judge, torch.from_numpy(refs[s])) for s in EVAL_SEEDS}
    results = {}
    for name in rows:
        t0 = time.time()
        row = ROWS[name](ctx)
        fid, edit, kept, parts = [], [], [], {f"concept_{k}": [] for k in wanted}
        for s in EVAL_SEEDS:
            imgs = row.sample(texts, s).numpy()
            for i, (rd, p) in enumerate(zip(J.read(judge, torch.from_numpy(imgs)), prompts, strict=True)):
                sc = score(rd, p, wanted)
                fid.append(sc["fidelity"])
                edit.append(sc["editability"])
                for k in parts:  # which of the concept's attributes came out (fidelity needs all of them)
                    parts[k].append(sc[k])
                masks = [o.mask for o in rd.objects] + [o.mask for o in ref_read[s][i].objects]
                kept.append(background_kept(imgs[i], refs[s][i], masks))
        results[name] = {"fidelity": float(np.mean(fid)), "editability": float(np.mean(edit)),
                         "background_kept": float(np.mean(kept)), "params": row.params,
                         "train_seconds": round(row.train_seconds, 1), "samples": len(fid), "note": row.note,
                         "row_seconds": round(time.time() - t0, 1),
                         **{k: float(np.mean(v)) for k, v in parts.items()}}
        log.info("%s %s", name, results[name])
    return {"concept": wanted, "concept_set": concept, "token": TOKEN, "class_word": CLASS_WORD, "train_steps": steps,
            "lr": lr, "fixed_rank": rank,
            "train_seed": TRAIN_SEED, "concept_render_seeds": [CONCEPT_RENDER_SEED0 + i for i in range(4)],
            "eval_sample_seeds": list(EVAL_SEEDS), "eval_prompt_scene_seed0": EVAL_SCENE_SEED0,
            "eval_prompts": texts, "weights_sha256": M.sha256(weights), "rows": results}


def table(res: dict) -> str:
    head = (f"{'row':<24} {'fidelity':>8} {'shape':>6} {'colour':>6} {'edit':>6} {'bg kept':>7} {'params':>7} "
            f"{'train s':>7}  note")
    lines = [head, "-" * len(head)]
    for name, r in res["rows"].items():
        lines.append(f"{name:<24} {r['fidelity']:>8.3f} {r.get('concept_shape', 0):>6.3f} "
                     f"{r.get('concept_colour', 0):>6.3f} {r['editability']:>6.3f} {r['background_kept']:>7.3f} "
                     f"{r['params']:>7d} {r['train_seconds']:>7.1f}  {r['note']}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", default=M.DEFAULT_WEIGHTS)
    ap.add_argument("--judge", default=os.path.join(M.HERE, "weights", "judge.safetensors"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-3, help="residual and LoRA rows; the text embedding gets 5x")
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concept", choices=sorted(CONCEPTS), default="new",
                    help="new: the held-out ring (the table); known: a yellow striped diamond the base model can draw")
    ap.add_argument("--rank", type=int, default=0,
                    help="fixed residual rank for every layer (0: the paper's rule, 0.05 of the width)")
    ap.add_argument("--json", default=os.path.join(M.HERE, "results", "toyworld.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    res = run(args.weights, args.judge, args.steps, [r for r in args.rows.split(",") if r], args.lr, args.concept,
              args.rank)
    print(table(res))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
