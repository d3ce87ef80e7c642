"""Train the toy world's base model (UNet + text encoder, from scratch) and evaluate it with the judge.

    python -m bench.toyworld.train_base --steps 1500 [--out bench/toyworld/weights/base.safetensors]
    python -m bench.toyworld.train_base --arch dit ...   # the toy DiT (model_dit: SD3Transformer2DModel), same
                                                         # scenes, noise, objective, judge and seeds

Deterministic for a given --seed and --steps on one machine with the same thread count (1, the default): the
scenes come from seeds, the noise from one torch generator. Training scenes: seeds 0, 1, 2, ... of the base
distribution (base shapes and textures only), skipping every scene whose caption is a held-out prompt
(``scenes.is_held_out_prompt``). The checkpoints during training are judged on the validation split (held-out
prompts from scene seeds 40,000,000+, noise seed ``VAL_SAMPLE_SEED``); the reported numbers come from
``--eval-only`` on the test split (held-out prompts from scene seeds 50,000,000+, noise seed ``EVAL_SAMPLE_SEED``),
which never steers a run.
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
from . import model_dit as D
from . import scenes as S

log = logging.getLogger(__name__)

EVAL_SCENE_SEED0 = 50_000_000
EVAL_SAMPLE_SEED = 4242
# validation (choosing sampler settings such as the CFG scale, never the reported numbers): held-out prompts
# from scene seeds 40M+, sampling noise seed 4141
VAL_SCENE_SEED0 = 40_000_000
VAL_SAMPLE_SEED = 4141
DEFAULT_JUDGE = os.path.join(M.HERE, "weights", "judge.safetensors")


def training_scene_stream(seed: int, colourless_p: float = 0.0):
    """Base-model training scenes in a fixed order: base shapes/textures, no held-out caption."""
    i = seed * 100_000_000
    while True:
        sc = S.make_scene(i, class_word_p=0.1, colourless_p=colourless_p)
        i += 1
        if not S.is_held_out_prompt(sc.caption()):
            yield sc


def eval_scenes(n: int, n_objects: int, shapes=S.BASE_SHAPES, textures=S.BASE_TEXTURES,
                seed0: int = EVAL_SCENE_SEED0) -> list[S.Scene]:
    """The first ``n`` held-out-prompt scenes with ``n_objects`` objects from seeds ``seed0`` (50M) on."""
    out, i = [], seed0
    while len(out) < n:
        sc = S.make_scene(i, n_objects=n_objects, shapes=shapes, textures=textures)
        i += 1
        if S.is_held_out_prompt(sc.caption()):
            out.append(sc)
    return out


def evaluate(unet, text_encoder, tokenizer, judge, n_single: int = 48, n_two: int = 24,
             steps: int = M.SAMPLE_STEPS, seed: int = EVAL_SAMPLE_SEED, guidance: float = M.GUIDANCE,
             scene_seed0: int = EVAL_SCENE_SEED0, generate=M.generate) -> dict:
    """Per attribute kind, the share of samples in which the judge finds what the held-out prompt asks
    (``generate``: ``model.generate`` for the UNet, ``model_dit.generate_dit`` for the DiT)."""
    res = {}
    for name, n_obj, n in (("single", 1, n_single), ("two", 2, n_two)):
        scs = eval_scenes(n, n_obj, seed0=scene_seed0)
        imgs = generate(unet, text_encoder, tokenizer, [s.caption() for s in scs], seed=seed, steps=steps,
                        guidance=guidance).cpu()
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
    ap.add_argument("--arch", choices=("unet", "dit"), default="unet",
                    help="unet (model.py, the committed model) or dit (model_dit.py: an SD3 transformer)")
    ap.add_argument("--out", default="", help="weights file (default: model.DEFAULT_WEIGHTS, or "
                    "model_dit.DEFAULT_DIT_WEIGHTS with --arch dit)")
    ap.add_argument("--judge", default=DEFAULT_JUDGE)
    ap.add_argument("--threads", type=int, default=1, help="1: two torch threads crawl when another process runs")
    ap.add_argument("--init", default="", help="start from these weights (a continuation, not from scratch)")
    ap.add_argument("--eval-only", action="store_true", help="evaluate --out with the judge and exit")
    ap.add_argument("--n-single", type=int, default=48)
    ap.add_argument("--n-two", type=int, default=24)
    ap.add_argument("--guidance", type=float, default=M.GUIDANCE, help="CFG scale of the evaluation samples")
    ap.add_argument("--sample-steps", type=int, default=M.SAMPLE_STEPS)
    ap.add_argument("--val", action="store_true", help="--eval-only on the validation split (40M+, noise 4141)")
    ap.add_argument("--unet", default="", help="'shuffle' (model.SHUFFLE_UNET_CONFIG) or JSON overrides of "
                    "model.UNET_CONFIG; the config is saved with the weights")
    ap.add_argument("--dit", default="", help="--arch dit: JSON overrides of model_dit.DIT_CONFIG (saved with "
                    "the weights)")
    ap.add_argument("--t-dist", default="uniform", help="training timesteps: uniform, or logitnormal:M,S")
    ap.add_argument("--min-snr", type=float, default=0, help="min-SNR-gamma loss weighting (0: off)")
    ap.add_argument("--snr-plus-one", action="store_true", help="with --min-snr G: weight min(snr + 1, G) / (snr + 1) "
                    "(high-noise steps keep the plain v-loss weight)")
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--colourless", type=float, default=0.0,
                    help="per object, the chance its caption leaves the colour word out (a class word alone then "
                         "draws an object)")
    ap.add_argument("--obj-weight", type=float, default=0,
                    help="loss weight 1 + this on the objects' pixels (masks dilated by one pixel); 0: plain MSE")
    ap.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the forward pass (fp32 weights)")
    ap.add_argument("--device", default="cpu", help="cpu (the committed model) or cuda (recipe sweeps only: "
                    "same scenes and noise, not bit-identical to a CPU run)")
    args = ap.parse_args(argv)
    dit = args.arch == "dit"
    args.out = args.out or (D.DEFAULT_DIT_WEIGHTS if dit else M.DEFAULT_WEIGHTS)
    load, save, generate = (D.load_dit, D.save_dit, D.generate_dit) if dit else (M.load, M.save, M.generate)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    if args.eval_only:
        net, te, tok = load(args.out)
        net, te = net.to(dev), te.to(dev)
        seed0, noise = (VAL_SCENE_SEED0, VAL_SAMPLE_SEED) if args.val else (EVAL_SCENE_SEED0, EVAL_SAMPLE_SEED)
        res = evaluate(net, te, tok, J.load(args.judge), args.n_single, args.n_two, args.sample_steps,
                       seed=noise, guidance=args.guidance, scene_seed0=seed0, generate=generate)
        res.update(guidance=args.guidance, sample_steps=args.sample_steps,
                   weights_sha256=M.sha256(args.out), eval_scene_seed0=seed0, eval_sample_seed=noise,
                   n_single=args.n_single, n_two=args.n_two)
        print(json.dumps(res, indent=1))
        return

    tok = M.build_tokenizer()
    if dit:
        net = D.build_dit(args.seed, json.loads(args.dit) if args.dit else {}).train()
    else:
        unet_over = M.SHUFFLE_UNET_CONFIG if args.unet == "shuffle" else json.loads(args.unet) if args.unet else {}
        net = M.build_unet(args.seed, unet_over).train()
    latent = net.config.in_channels != 3
    te = M.build_text_encoder(len(tok), args.seed).train()
    if args.init:
        n0, t0_, _ = load(args.init)
        net.load_state_dict(n0.state_dict())
        te.load_state_dict(t0_.state_dict())
        net.requires_grad_(True)
        te.requires_grad_(True)
    net, te = net.to(dev), te.to(dev)
    ema_net, ema_te = copy.deepcopy(net).eval(), copy.deepcopy(te).eval()
    params = list(net.parameters()) + list(te.parameters())
    ema_params = list(ema_net.parameters()) + list(ema_te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2, fused=dev.type == "cuda" or None)
    warm = args.warmup

    def lr_at(step):
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    ac = M.train_alphas_cumprod()
    gen = torch.Generator().manual_seed(args.seed)
    n_t = ac.shape[0]

    def sample_t(b):
        if args.t_dist == "uniform":
            return torch.randint(0, n_t, (b,), generator=gen)
        kind, ms = args.t_dist.split(":")
        m, s = (float(v) for v in ms.split(","))
        if kind != "logitnormal":
            raise ValueError(f"unknown --t-dist {args.t_dist!r}")
        u = torch.sigmoid(m + s * torch.randn(b, generator=gen))
        return (u * n_t).long().clamp(0, n_t - 1)
    stream = training_scene_stream(args.seed, args.colourless)
    id_cache: dict[str, list[int]] = {}
    log_path = os.path.splitext(args.out)[0] + ".log.jsonl"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    logf = open(log_path, "w")
    t0 = time.time()
    train_s = 0.0
    meta = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "seed": args.seed, "ema": args.ema,
            "warmup": args.warmup, "t_dist": args.t_dist, "min_snr": args.min_snr, "snr_plus_one": args.snr_plus_one,
            "bf16": args.bf16, "obj_weight": args.obj_weight,
            "colourless": args.colourless}
    if dit:
        meta["arch"] = "dit"
    if args.init:
        meta["init_sha256"] = M.sha256(args.init)

    def checkpoint(step, final=False):
        save(ema_net, ema_te, args.out, dict(meta, steps_done=step))  # no timings: the file is reproducible
        rec = {"step": step, "train_seconds": round(train_s, 1), "final": final}
        if os.path.exists(args.judge):
            te0 = time.time()
            try:
                # the validation split: the held-out test split (--eval-only) never steers a run
                rec["val"] = evaluate(ema_net, ema_te, tok, J.load(args.judge), args.n_single, args.n_two,
                                      args.sample_steps, seed=VAL_SAMPLE_SEED, guidance=args.guidance,
                                      scene_seed0=VAL_SCENE_SEED0, generate=generate)
            except Exception as e:  # a judge being rewritten must not end a long training run
                log.warning("evaluation failed: %s", e)
            rec["eval_seconds"] = round(time.time() - te0, 1)
        log.info("checkpoint %s", json.dumps(rec))
        logf.write(json.dumps(rec) + "\n")
        logf.flush()

    losses = []
    skipped = 0
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
        ids = torch.tensor([id_cache[c] for c in caps], device=dev)
        rens = [S.render(sc) for sc in scs]
        x0 = torch.from_numpy(np.stack([r.image for r in rens])).permute(0, 3, 1, 2) * 2 - 1
        w = None
        if args.obj_weight:
            m = torch.from_numpy(np.stack([r.masks.any(0) for r in rens])).float()[:, None]
            w = 1 + args.obj_weight * F.max_pool2d(m, 3, 1, 1)
        if latent:
            x0 = M.unshuffle(x0)
            w = M.unshuffle(w.expand(-1, 3, -1, -1)) if w is not None else None
        noise = torch.randn(x0.shape, generator=gen)
        t = sample_t(args.batch)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        v = a.sqrt() * noise - (1 - a).sqrt() * x0
        x_t, v, w = x_t.to(dev), v.to(dev), (w.to(dev) if w is not None else None)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            if dit:
                pred = D.predict(net, x_t, t.to(dev), D.text_conditioning(te, ids)).float()
            else:
                pred = net(x_t, t.to(dev), encoder_hidden_states=te(ids)[0]).sample.float()
        err = (pred - v).pow(2)
        per = (err * w).mean((1, 2, 3)) / w.mean((1, 2, 3)) if w is not None else err.mean((1, 2, 3))
        if args.min_snr:  # v-prediction: weight min(snr, gamma) / (snr + 1), i.e. x0-loss weight min(snr, gamma)
            snr = (ac[t] / (1 - ac[t])).to(dev)
            # --snr-plus-one: x0-loss weight min(snr + 1, gamma): the plain v-loss's weight 1 at high noise, where
            # the layout (and so the place words) is decided, and the min-SNR cap at low noise
            per = per * (snr + 1 if args.snr_plus_one else snr).clamp(max=args.min_snr) / (snr + 1)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        if torch.isfinite(gnorm):
            opt.step()
        else:  # a bf16 overflow: skip this batch rather than poison the weights (and the EMA) with NaN
            skipped += 1
            log.warning("step %d: non-finite gradient, update skipped (%d so far)", step + 1, skipped)
        sched.step()
        with torch.no_grad():  # EMA with warm-up: early on it follows the weights, not their random start
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema_params, params, 1 - decay)
        losses.append(loss.item() if torch.isfinite(loss) else float("nan"))
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
