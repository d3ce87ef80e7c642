"""Benchmark for "See": the cost of recording cross-attention, inside ComfyUI (in-process), full-size random SD1.5.

    COMFYUI_PATH=... $COMFYUI_PYTHON bench/bench_see.py [--size 128] [--steps 4] [--repeats 3]

Prints the time per sampling step with Record Cross-Attention / without it (target <= 1.15), measured in one
process, interleaved round-robin so drift hits both alike, plus the record's memory and the peak memory.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learn_localize as B  # noqa: E402  (shares the ComfyUI setup and checkpoint helpers)


def run(args):
    import comfy.sample
    import torch
    from comfyui_concepts.nodes.inspect import RecordAttention

    base, clip, _ = B.load(args.ckpt)
    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a dog on the beach"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    recorded, record = RecordAttention.execute(base).args
    setups = {"base": base, "recorded": recorded}
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    times = {m: [] for m in setups}

    def sample(mode, steps):
        stamps = []

        def callback(step, x0, x, total):
            B.sync()
            stamps.append(time.perf_counter())

        comfy.sample.sample(setups[mode], noise, steps, 7.0, "euler", "normal", positive, negative, latent, seed=0,
                            disable_pbar=True, callback=callback)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    for mode in setups:
        sample(mode, 3)  # warm-up
    for _ in range(args.repeats):
        for mode in setups:
            times[mode].append(sample(mode, args.steps))
    med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
    record_mb = sum(t.numel() * t.element_size() for t in record.sums.values()) / 2 ** 20
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"# bench: see | {device} | {Path(args.ckpt).name} | {args.size}px | torch {torch.__version__}")
    for m in setups:
        print(f"sample {m:9s}: {med[m] * 1000:8.1f} ms/step  (runs: {', '.join(f'{t * 1000:.0f}' for t in times[m])})")
    print(f"record: {len(record.sums)} running sums, {record_mb:.1f} MB after {args.steps} steps (bins: {record.bins})")
    print(f"peak memory: {B.peak_memory_mb():.0f} MB")
    print(f"recording / plain sampling time per step: {med['recorded'] / med['base']:.3f}  (target <= 1.15)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (GPU: use 512)")
    ap.add_argument("--steps", type=int, default=4, help="sampling steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    ap.add_argument("--ckpt", default="", help=f"checkpoint path (default: {B.CKPT} in the test cache)")
    args = ap.parse_args()
    args.ckpt = B.ensure_checkpoint(args)
    B.setup_comfy()
    run(args)


if __name__ == "__main__":
    main()
