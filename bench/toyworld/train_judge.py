"""Train the toy world's judge and report its accuracy on held-out true renders.

    python -m bench.toyworld.train_judge [--steps 1200] [--out bench/toyworld/weights/judge.safetensors]

Training scenes: seeds 10,000,000+ (see judge.training_scenes); evaluation scenes: seeds 90,000,000+.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time

import numpy as np
import torch

from . import judge as J
from . import scenes as S

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "weights", "judge.safetensors")
EVAL_SEED0 = 90_000_000


def held_out_scenes(n: int, seed0: int = EVAL_SEED0) -> list[S.Scene]:
    return [S.make_scene(seed0 + i, shapes=S.SHAPES, textures=S.TEXTURES) for i in range(n)]


def evaluate(net: J.JudgeNet, scenes: list[S.Scene], batch: int = 256) -> dict:
    per_kind: dict[str, list[bool]] = {}
    scene_ok, ious = [], []
    for i in range(0, len(scenes), batch):
        chunk = scenes[i:i + batch]
        renders = [S.render(s) for s in chunk]
        readings = J.read(net, torch.from_numpy(np.stack([r.image for r in renders])))
        for sc, r, rd in zip(chunk, renders, readings, strict=False):
            checks = J.attribute_checks(rd, sc)
            for k, v in checks.items():
                per_kind.setdefault(k, []).append(v)
            scene_ok.append(J.all_ok(checks))
            if checks["count"]:
                ious.extend(J.iou(o.mask, m) for o, m in zip(rd.objects, r.masks, strict=False))
    return {"scenes": len(scenes), "all_attributes": float(np.mean(scene_ok)),
            "per_kind": {k: float(np.mean(v)) for k, v in per_kind.items()},
            "mask_iou_mean": float(np.mean(ious)) if ious else 0.0,
            "mask_iou_min": float(np.min(ious)) if ious else 0.0}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=2000)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.time()
    net = J.train_judge(args.steps, seed=args.seed)
    train_s = time.time() - t0
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    J.save(net, args.out)
    res = evaluate(J.load(args.out), held_out_scenes(args.eval))
    res.update(train_seconds=round(train_s, 1), steps=args.steps, train_seed=args.seed, eval_seed0=EVAL_SEED0)
    print(json.dumps(res, indent=1))
    with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
        json.dump(res, f, indent=1)
    if os.path.abspath(args.out) == os.path.abspath(DEFAULT_OUT):
        from .model import write_checksums

        write_checksums()


if __name__ == "__main__":
    main()
