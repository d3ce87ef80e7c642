"""Benchmark for "Erase", inside ComfyUI (in-process), on a full-size random SD1.5 (860M-parameter UNet, CLIP-L).

    COMFYUI_PATH=... $COMFYUI_PYTHON bench/bench_erase.py [--neighbours 8] [--preserve "blue, green, dog, cat"]

Prints the wall time of the closed-form edit (UCE + RealEra neighbour mining) as the node runs it: encoding the
words, the solve, the LoRA factors of all 32 K/V projections and the clone with weight patches (target: under a
minute on a CPU), and the edit's quality numbers. Random weights: speed only, not quality.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_learn_localize import CKPT, load, setup_comfy  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", default=str(Path(os.environ.get("COMFYUI_CONCEPTS_CACHE",
                                                                   Path.home() / ".cache/comfyui-concepts")) / CKPT))
    parser.add_argument("--erase", default="red, crimson")
    parser.add_argument("--preserve", default="blue, green, dog, cat")
    parser.add_argument("--neighbours", type=int, default=8)
    parser.add_argument("--ranks", default="0", help="comma-separated LoRA ranks to time (0: exact rank)")
    args = parser.parse_args()
    setup_comfy()
    from comfyui_concepts.nodes.erase import EraseConceptClosedForm

    model, clip, _ = load(args.ckpt)
    for rank in (int(r) for r in args.ranks.split(",")):
        start = time.perf_counter()
        out = EraseConceptClosedForm.execute(model, clip, args.erase, "", args.preserve, args.neighbours, 0.05, -1,
                                             0.1, 1.0, 1.0, 0, rank, "", False)
        elapsed = time.perf_counter() - start
        print(f"closed-form edit of {Path(args.ckpt).name}, rank {rank or 'exact'}: {elapsed:.2f} s (target < 60 s)")
        print("  " + out.ui.as_dict()["text"][0])


if __name__ == "__main__":
    main()
