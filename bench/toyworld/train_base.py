"""Train the toy world's base model (UNet + text encoder, from scratch) and evaluate it with the judge.

    python -m bench.toyworld.train_base --steps 1500 [--out bench/toyworld/weights/base.safetensors]

Deterministic for a given --seed and --steps on one machine with the same thread count (2): the scenes come
from seeds, the noise from one torch generator. Training scenes: seeds 0, 1, 2, ... of the base distribution
(base shapes and textures only), skipping every scene whose caption is a held-out prompt
(``scenes.is_held_out_prompt``). Evaluation: held-out prompts from scene seeds 50,000,000+, sampled with
noise seed ``EVAL_SAMPLE_SEED``; evaluation never feeds back into training.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from core.patching.diffusers import token_ids

from . import judge as J
from . import model as M
from . import scenes as S

log = logging.getLogger(__name__)

EVAL_SCENE_SEED0 = 50_000_000
EVAL_SAMPLE_SEED = 4242
DEFAULT_JUDGE = os.path.join(M.HERE, "weights", "judge.safetensors")


def training_scene_stream(seed: int):
    """Base-model training scenes in a fixed order: base shapes/textures, no held-out caption."""
    i = seed * 100_000_000
    while True:
        sc = S.make_scene(i, class_word_p=0.1)
        i += 1
        if not S.is_held_out_prompt(sc.caption()):
            yield sc


def eval_scenes(n: int, n_objects: int, shapes=S.BASE_SHAPES, textures=S.BASE_TEXTURES) -> list[S.Scene]:
    """The first ``n`` held-out-prompt scenes with ``n_objects`` objects from seeds 50M+."""
    out, i = [], EVAL_SCENE_SEED0
    while len(out) < n:
        sc = S.make_scene(i, n_objects=n_objects, shapes=shapes, textures=textures)
        i += 1
        if S.is_held_out_prompt(sc.caption()):
            out.append(sc)
    return out


def evaluate(unet, text_encoder, tokenizer, judge, n_single: int = 48, n_two: int = 24,
             steps: int = M.SAMPLE_STEPS, seed: int = EVAL_SAMPLE_SEED) -> dict:
    """Per attribute kind, the share of samples in which the judge finds what the held-out prompt asks."""
    res = {}
    for name, n_obj, n in (("single", 1, n_single), ("two", 2, n_two)):
        scs = eval_scenes(n, n_obj)
        imgs = M.generate(unet, text_encoder, tokenizer, [s.caption() for s in scs], seed=seed, steps=steps)
        checks = [J.attribute_checks(r, s) for r, s in zip(J.read(judge, imgs), scs, strict=True)]
        kinds = {k: float(np.mean([c[k] for c in checks])) for k in checks[0]}
        kinds["all"] = float(np.mean([J.all_ok(c) for c in checks]))
        res[name] = kinds
    return res


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch", type=int, default=24)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--max-minutes", type=float, default=0, help="stop early (breaks determinism)")
    ap.add_argument("--stop-at", type=int, default=0, help="stop after this many steps (the schedule still spans "
                    "--steps): reproduces a run that --max-minutes stopped")
    ap.add_argument("--out", default=M.DEFAULT_WEIGHTS)
    ap.add_argument("--judge", default=DEFAULT_JUDGE)
    ap.add_argument("--threads", type=int, default=1, help="1: two torch threads crawl when another process runs")
    ap.add_argument("--init", default="", help="start from these weights (a continuation, not from scratch)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out with the judge and exit")
    ap.add_argument("--n-single", type=int, default=48)
    ap.add_argument("--n-two", type=int, default=24)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.eval_only:
        unet, te, tok = M.load(args.out)
        res = evaluate(unet, te, tok, J.load(args.judge), args.n_single, args.n_two)
        res.update(weights_sha256=M.sha256(args.out), eval_scene_seed0=EVAL_SCENE_SEED0,
                   eval_sample_seed=EVAL_SAMPLE_SEED, n_single=args.n_single, n_two=args.n_two)
        print(json.dumps(res, indent=1))
        return

    tok = M.build_tokenizer()
    unet = M.build_unet(args.seed).train()
    te = M.build_text_encoder(len(tok), args.seed).train()
    if args.init:
        u0, t0_, _ = M.load(args.init)
        unet.load_state_dict(u0.state_dict())
        te.load_state_dict(t0_.state_dict())
        unet.requires_grad_(True)
        te.requires_grad_(True)
    ema_unet, ema_te = copy.deepcopy(unet).eval(), copy.deepcopy(te).eval()
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warm = 100

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ac = M.train_alphas_cumprod()
    gen = torch.Generator().manual_seed(args.seed)
    stream = training_scene_stream(args.seed)
    id_cache: dict[str, list[int]] = {}
    log_path = os.path.splitext(args.out)[0] + ".log.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    logf = open(log_path, "w")
    t0 = time.time()
    train_s = 0.0
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "ema": args.ema}
    if args.init:
        meta["init_sha256"] = M.sha256(args.init)

    def checkpoint(step, final=False):
        M.save(ema_unet, ema_te, args.out, dict(meta, steps_done=step))  # no timings: the file is reproducible
        rec = {"step": step, "train_seconds": round(train_s, 1), "final": final}
        if os.path.exists(args.judge):
            te0 = time.time()
            try:
                rec["eval"] = evaluate(ema_unet, ema_te, tok, J.load(args.judge), args.n_single, args.n_two)
            except Exception as e:  # a judge being rewritten must not end a long training run
                log.warning("evaluation failed: %s", e)
            rec["eval_seconds"] = round(time.time() - te0, 1)
        log.info("checkpoint %s", json.dumps(rec))
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    losses = []
    for step in range(args.steps):
        ts = time.time()
        scs = [next(stream) for _ in range(args.batch)]
        caps = [s.caption() for s in scs]
        u = torch.rand(args.batch, generator=gen).tolist()
        # 10 %: the empty prompt (for CFG); 15 %: "a photo of ..." (the personalisation prompts' opening)
        caps = ["" if r < 0.1 else ("a photo of " + c if r < 0.25 else c) for c, r in zip(caps, u, strict=True)]
        for c in caps:
            if c not in id_cache:
                id_cache[c] = token_ids(tok, c)
        ids = torch.tensor([id_cache[c] for c in caps])
        x0 = torch.from_numpy(S.render_batch(scs)).permute(0, 3, 1, 2) * 2 - 1
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, ac.shape[0], (args.batch,), generator=gen)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        pred = unet(x_t, t, encoder_hidden_states=te(ids)[0]).sample
        loss = F.mse_loss(pred, v)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():  # EMA with warm-up: early on it follows the weights, not their random start
            decay = min(args.ema, (1 + step) / (10 + step))
            for src, dst in ((unet, ema_unet), (te, ema_te)):
                for p, q in zip(src.parameters(), dst.parameters(), strict=True):
                    q.lerp_(p, 1 - decay)
        losses.append(loss.item())
        train_s += time.time() - ts
        if (step + 1) % 50 == 0:
            log.info("step %d/%d loss %.4f (%.0f s training, %.0f s wall)", step + 1, args.steps,
                     float(np.mean(losses[-50:])), train_s, time.time() - t0)
        if args.stop_at and step + 1 >= args.stop_at:
            log.info("stopping at step %d (--stop-at)", step + 1)
            meta["stopped_at"] = step + 1
            checkpoint(step + 1, final=True)
            break
        if args.max_minutes and time.time() - t0 > args.max_minutes * 60:
            log.info("stopping at step %d: --max-minutes reached", step + 1)
            meta["stopped_at"] = step + 1  # the file equals that of --stop-at with the same step
            checkpoint(step + 1, final=True)
            break
        if (step + 1) % args.eval_every == 0 and step + 1 < args.steps:
            checkpoint(step + 1)
    else:
        checkpoint(args.steps, final=True)
    if os.path.abspath(args.out) == os.path.abspath(M.DEFAULT_WEIGHTS):
        M.write_checksums()


if __name__ == "__main__":
    main()
