"""Benchmark for "Learn and localize", inside ComfyUI (in-process), on a full-size random SD1.5.

    COMFYUI_PATH=... $COMFYUI_PYTHON bench/bench_learn_localize.py [--size 64] [--steps 6] [--train-steps 3]

Prints, from one run (each phase in its own process, so each has its own peak memory):
  (a) LAG sampling time per step / global-residual sampling time per step (target <= 1.10)
  (b) our training time per step / ComfyUI's TrainLoraNode per step, same resolution and batch (target <= 1.0)
  (c) peak memory (GPU: max allocated per run; CPU: peak RSS of the phase's process, so the three sampling modes
      share one number there)
With --train-150, also the absolute wall time of a full 150-step training run (the paper: ~3 min on an A100).
The checkpoint is built once with tests/comfyui/make_checkpoints.py (random weights: speed only, not quality).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CKPT = "full_sd15_random.safetensors"


# ------------------------------------------------------------------------------------------ one phase
def setup_comfy():
    comfy_path = os.environ["COMFYUI_PATH"]
    sys.argv = sys.argv[:1]
    sys.path.insert(0, comfy_path)
    import torch

    if not torch.cuda.is_available():
        sys.argv.append("--cpu")
    import comfy.options

    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401  (parses --cpu)

    import nodes  # noqa: F401  (ComfyUI's nodes.py: sets up folder_paths)

    spec = importlib.util.spec_from_file_location("comfyui_concepts", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_concepts"] = pack
    spec.loader.exec_module(pack)


def load(ckpt_path):
    import comfy.sd

    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(ckpt_path, output_vae=True, output_clip=True)
    return model, clip, vae


def random_residuals(model):
    from comfyui_concepts.core.patching.comfy import model_family, model_sites
    from comfyui_concepts.core.residuals import init_residuals

    sites = [s for s, _ in model_sites(model)]
    return init_residuals(sites, init_scale=0.1, metadata={"base_family": model_family(model), "token": "sks",
                                                            "class_word": "toy"})


def peak_memory_mb():
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def phase_sample(args, ckpt_path):
    """Base, global and LAG sampling, interleaved round-robin in one process so drift hits all three alike.

    Per-step time comes from the sampler's step callback (synchronised), so model loading and weight patching
    when switching models is not counted.
    """
    import comfy.sample
    import torch
    from comfyui_concepts.core.patching.comfy import concept_positions
    from comfyui_concepts.nodes.learn import ApplyResiduals
    from comfyui_concepts.nodes.localize import ApplyResidualsLocalized

    cfg, channels = 7.0, 4
    if args.dit:  # a diffusion model alone (e.g. Flux at full width, few blocks): random conditioning, no text
        import comfy.sd
        from comfyui_concepts.core.patching.comfy import apply_localized, lag_wrapper, model_family

        base = comfy.sd.load_diffusion_model(ckpt_path)
        flux = model_family(base) in ("Flux", "Chroma")
        gen = torch.Generator().manual_seed(0)
        context = torch.randn(1, 256 if flux else 154, 4096, generator=gen) * 0.1
        pooled = torch.randn(1, 768 if flux else 2048, generator=gen) * 0.1
        positive = negative = [[context, {"pooled_output": pooled}]]
        rs = random_residuals(base)
        lag_tokens = ([5, 6], context[0])
        lag_model = apply_localized(base, lag_wrapper(rs, *lag_tokens))
        lag_positive = positive
        cfg, channels = (1.0 if flux else 4.5), 16
    else:
        base, clip, _ = load(ckpt_path)
        text = "a photo of a sks toy on the beach"
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
        rs = random_residuals(base)
        lag_model, lag_positive = ApplyResidualsLocalized.execute(base, clip, rs, text, 1.0, 0.0, 1.0,
                                                                  "median").args
        lag_tokens = (concept_positions(clip, text, ["sks", "toy"], context_length=lag_positive[0][0].shape[1]),
                      lag_positive[0][0][0])
    setups = {"base": (base, positive), "global": (ApplyResiduals.execute(base, rs, 1.0, "").args[0], positive),
              "lag": (lag_model, lag_positive)}
    latent = torch.zeros(1, channels, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    times = {m: [] for m in setups}
    peaks = {}

    def run(mode, steps):
        stamps = []

        def callback(step, x0, x, total):
            sync()
            stamps.append(time.perf_counter())

        model, pos = setups[mode]
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        comfy.sample.sample(model, noise, steps, cfg, "euler", "simple" if args.dit else "normal", pos, negative,
                            latent, seed=0,
                            disable_pbar=True, callback=callback)
        peaks[mode] = max(peaks.get(mode, 0.0), peak_memory_mb())
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    for mode in setups:
        run(mode, 3)  # warm-up: weights, patches, kernels
    for _ in range(args.repeats):
        for mode in setups:
            times[mode].append(run(mode, args.steps))
    ops = {}
    if args.count_ops:
        # The same patches with the residual on its first block only: the difference to all blocks is what each
        # further gated block costs, apart from LAG's once-per-call work (plan, prompt check).
        setups["global_1"], setups["lag_1"] = first_block_setups(base, rs, lag_tokens, positive, lag_positive)
    for m in setups if args.count_ops else ():
        run(m, 2)  # loads and patches this mode's model outside the profiled run
        ops[m] = count_ops(lambda m=m: run(m, 2))
    return {m: {"per_step_s": sorted(t)[len(t) // 2], "peak_mb": peaks[m], "ops": ops or None,
                "gated_blocks": len(rs.layers)} for m, t in times.items()}


def first_block_setups(base, rs, lag_tokens, positive, lag_positive):
    """(global, LAG) setups like the benchmarked ones, with ``rs`` cut down to its first block."""
    import comfy.lora
    from comfyui_concepts.core.patching.comfy import apply_global, apply_localized, lag_wrapper
    from comfyui_concepts.core.residuals import ResidualSet

    first = next(iter(rs.layers))
    rs1 = ResidualSet({first: rs.layers[first]}, dict(rs.metadata))
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    global_1 = apply_global(base, rs1, 1.0, {}, comfy.lora.load_lora, key_map)
    lag_1 = apply_localized(base, lag_wrapper(rs1, *lag_tokens))
    return (global_1, positive), (lag_1, lag_positive)


def ops_line(ops: dict, blocks: int) -> str:
    """What the residual and LAG's gate add per model call and per gated block, from the op counts of the full
    setups and of their first-block-only twins (``*_1``): a further block costs the difference over blocks - 1."""
    gate_all, gate_one = ops["lag"] - ops["global"], ops["lag_1"] - ops["global_1"]
    per_block = (gate_all - gate_one) / max(blocks - 1, 1)
    return (f"tensor ops per model call: base {ops['base']}, global {ops['global']}, LAG {ops['lag']}; "
            f"the residual adds {(ops['global'] - ops['base']) / blocks:.1f} per block; LAG's gate adds "
            f"{gate_all} in all over {blocks} gated blocks: {per_block:.1f} per further block (target <= 10) "
            f"+ {gate_one - per_block:.0f} once per call (the first block: {gate_one}); the gate before the hook "
            "layer: 18.5 per block on the tiny SD1.5")


def count_ops(fn) -> int:
    """Tensor operations (top-level aten ops, as the Python code dispatches them) in one model call: ``fn`` samples
    2 steps with Euler, which calls the model twice (once per step, the CFG batch in one call)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    top = [e for e in prof.events() if e.name.startswith("aten::")
           and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]
    return len(top) // 2


def phase_train(kind, args, ckpt_path, steps):
    import torch
    from comfy_extras.nodes_train import TrainLoraNode, adapter_maps
    from comfyui_concepts.core.toy_models import concept_renders
    from comfyui_concepts.nodes.learn import TrainPersonalizedResiduals

    model, clip, vae = load(ckpt_path)
    images = concept_renders(4, args.size, seed=0)
    gpu = torch.cuda.is_available()
    if kind == "lora":
        with torch.no_grad():
            latents = {"samples": vae.encode(images)}
            positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a sks toy"))
    def run(n):
        sync()
        t0 = time.perf_counter()
        if kind == "ours":
            TrainPersonalizedResiduals.execute(model, clip, vae, images, "toy", "sks", n, 1e-3, 4, 0.05, 0,
                                               args.size, 1, "", False)
        else:
            TrainLoraNode().train(model, latents, positive, 4, n, 1, 1e-3, 8, "AdamW", "MSE", 0,
                                  "bf16" if gpu else "fp32", "bf16" if gpu else "fp32", list(adapter_maps)[0],
                                  args.lora_checkpointing, "[None]")
        sync()
        return time.perf_counter() - t0

    if steps:  # one whole run, as a user would start it
        return {"total_s": run(steps), "peak_mb": peak_memory_mb()}
    run(1)  # warm-up: loading, patching, allocator
    short, long = run(2), run(2 + args.train_steps)
    return {"per_step_s": (long - short) / args.train_steps, "peak_mb": peak_memory_mb()}


# ------------------------------------------------------------------------------------------ driver
def run_phase(name, args, **extra):
    cmd = [sys.executable, __file__, "--phase", name, "--size", str(args.size), "--steps", str(args.steps),
           "--repeats", str(args.repeats), "--ckpt", args.ckpt, "--train-steps", str(args.train_steps)]
    if args.count_ops:
        cmd.append("--count-ops")
    if args.dit:
        cmd.append("--dit")
    if extra.pop("lora_checkpointing", args.lora_checkpointing):
        cmd.append("--lora-checkpointing")
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        print(f"phase {name} FAILED:\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


def ensure_checkpoint(args) -> str:
    path = Path(args.ckpt)
    if path.is_file():
        return str(path)
    cache = Path(os.environ.get("COMFYUI_CONCEPTS_CACHE", Path.home() / ".cache" / "comfyui-concepts"))
    path = cache / CKPT
    if not path.is_file():
        subprocess.run([sys.executable, str(REPO / "tests" / "comfyui" / "make_checkpoints.py"), "--out-dir",
                        str(cache), "--only", CKPT], check=True)
    return str(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (GPU: use 512)")
    ap.add_argument("--steps", type=int, default=6, help="sampling steps per timed run")
    ap.add_argument("--repeats", type=int, default=3, help="timed sampling runs (median reported)")
    ap.add_argument("--train-steps", type=int, default=3, help="extra training steps timed beyond a 2-step run")
    ap.add_argument("--train-150", action="store_true", help="also time one full 150-step training run")
    ap.add_argument("--lora-checkpointing", action="store_true",
                    help="TrainLoraNode with gradient checkpointing (its default; slower, less memory)")
    ap.add_argument("--both-checkpointing", action="store_true",
                    help="time TrainLoraNode both without and with gradient checkpointing")
    ap.add_argument("--only-sampling", action="store_true", help="measure (a) only")
    ap.add_argument("--count-ops", action="store_true",
                    help="also count the tensor operations of one model call per mode (torch profiler) and print "
                         "what the residual and LAG's gate add per gated block")
    ap.add_argument("--ckpt", default="", help=f"checkpoint path (default: {CKPT} in the test cache)")
    ap.add_argument("--dit", action="store_true",
                    help="--ckpt is a DiT diffusion model alone (SD3, Flux; e.g. a Flux at full width with a few "
                         "blocks): sampling only, random conditioning, cfg 1 on Flux")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    ap.add_argument("--train-total", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        setup_comfy()
        if args.phase == "sample":
            res = phase_sample(args, args.ckpt)
        else:
            res = phase_train(args.phase[len("train_"):], args, args.ckpt, args.train_total)
        print(json.dumps(res))
        return
    if args.dit:
        args.only_sampling = True
    else:
        args.ckpt = ensure_checkpoint(args)
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"# bench: learn and localize | {device} | {Path(args.ckpt).name} | {args.size}px | "
          f"torch {torch.__version__}", flush=True)
    res = run_phase("sample", args) or {"base": None, "global": None, "lag": None}
    for m, r in res.items():
        if r:
            print(f"sample {m:6s}: {r['per_step_s'] * 1000:8.1f} ms/step  peak {r['peak_mb']:8.0f} MB", flush=True)
    if args.count_ops and all(res.values()):
        print(ops_line(res["lag"]["ops"], res["lag"]["gated_blocks"]), flush=True)
    if args.only_sampling:
        if all(res.values()):
            print(f"(a) LAG / global sampling time per step: "
                  f"{res['lag']['per_step_s'] / res['global']['per_step_s']:.3f}  (LAG / base "
                  f"{res['lag']['per_step_s'] / res['base']['per_step_s']:.3f})")
        return
    train = {}
    kinds = [("ours", "ours", args.lora_checkpointing), ("lora", "TrainLoraNode", args.lora_checkpointing)]
    if args.both_checkpointing:
        kinds.append(("lora", "TrainLoraNode+ckpt", True))
    for kind, label, ckpt in kinds:
        train[label] = r = run_phase(f"train_{kind}", args, lora_checkpointing=ckpt)
        if r:
            print(f"train {label:18s}: {r['per_step_s'] * 1000:8.1f} ms/step  peak {r['peak_mb']:8.0f} MB", flush=True)
    if res["lag"] and res["global"] and res["base"]:
        print(f"(a) LAG / global sampling time per step: {res['lag']['per_step_s'] / res['global']['per_step_s']:.3f}"
              f"  (target <= 1.10; LAG / base {res['lag']['per_step_s'] / res['base']['per_step_s']:.3f})")
    for label in [k for k in train if k != "ours"]:
        if train["ours"] and train[label]:
            print(f"(b) our training / {label} time per step (batch 4, {args.size}px): "
                  f"{train['ours']['per_step_s'] / train[label]['per_step_s']:.3f}  (target <= 1.0)")
    mem = {f"sampling {k}": v["peak_mb"] for k, v in res.items() if v}
    mem.update({f"training {k}": v["peak_mb"] for k, v in train.items() if v})
    print("(c) peak memory MB: " + ", ".join(f"{k} {v:.0f}" for k, v in mem.items()))
    if args.train_150:
        full = run_phase("train_ours", args, train_total=150)
        if full:
            print(f"150 training steps (batch 4, {args.size}px), whole node run: {full['total_s']:.1f} s "
                  f"(peak {full['peak_mb']:.0f} MB)")


if __name__ == "__main__":
    main()
