"""Benchmark for Extract Concept Masks: the UNet call with self-attention recording, full-size random SD1.5 layout
(diffusers), a 64x64 latent (a 512 px image), recording every layer vs only the layers the grid uses.

    python bench/bench_extract_masks.py [--repeats 2] [--threads 2]

Prints seconds per UNet call, interleaved round-robin, and each mode's ratio to a plain call in the same run.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.extract import GRID_MAX_WIDTH, record_self_attention  # noqa: E402
from core.patching.diffusers import unet_sites  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from diffusers import UNet2DConditionModel

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                                layers_per_block=2).eval()  # diffusers' defaults are SD1.5's layout
    latent, context, t = torch.randn(1, 4, 64, 64), torch.randn(1, 77, 768), torch.tensor([300])
    sites = unet_sites(unet)

    def call(_draw=0):
        unet(latent, t, encoder_hidden_states=context)

    modes = {"plain": None, "record every layer": "all", f"record layers <= {GRID_MAX_WIDTH} wide": GRID_MAX_WIDTH}
    times = {m: [] for m in modes}
    with torch.no_grad():
        call()  # warm-up
        for _ in range(args.repeats):
            for mode, width in modes.items():
                t0 = time.perf_counter()
                if width is None:
                    call()
                else:
                    record_self_attention(sites, (64, 64), call, 1, max_width=None if width == "all" else width)
                times[mode].append(time.perf_counter() - t0)
    print(f"# bench: extract masks | CPU ({os.cpu_count()} cores, {args.threads} threads) | SD1.5 layout, random | "
          f"64x64 latent | torch {torch.__version__}")
    best = {m: min(v) for m, v in times.items()}
    for m in modes:
        print(f"{m:26s} {best[m]:6.2f} s per UNet call ({best[m] / best['plain']:.2f}x plain; runs "
              f"{', '.join(f'{v:.2f}' for v in times[m])})")


if __name__ == "__main__":
    main()
