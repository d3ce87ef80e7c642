"""Benchmark for "Compose": region-limited LoRAs in one pass against plain sampling and ComfyUI's own ways.

    COMFYUI_PATH=... $COMFYUI_PYTHON bench/bench_compose.py [--size 128] [--steps 3] [--repeats 2] [--rank 16]

In one process (ComfyUI in-process, full-size random SD1.5), interleaved round-robin, median time per sampling step:
- base: plain sampling;
- ours k (k = 1, 2, 4): Apply Regions with k random LoRAs (kohya's usual targets: attn1/attn2 q, k, v, out, ff,
  proj_in/out; rank ``--rank``), each limited to one of k vertical strips;
- hooks k: ComfyUI's hook-based masked LoRAs (each strip's positive conditioning carries its LoRA as a hook;
  ComfyUI runs one UNet pass per hook group);
- per-region samplers k: k sampling runs with one LoRA each (LoraLoader), composited afterwards: k x the time of
  one LoRA-patched run (measured once, multiplied).
Prints each ÷ base (fastest run of each mode: interference only adds time); the target is ours 4 <= 1.15.
With ``--dit`` (a Flux or SD3 diffusion model alone): 1 / 2 / 4 / 10 regions (targets 1.15 at 4, 1.30 at 10), hooks
up to 4.
"ours 4 no K/V" drops the LoRAs' text-side attn2.to_k/to_v layers, whose gating costs one more cross-attention
per region and block.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_learn_localize as B  # noqa: E402  (shares the ComfyUI setup and checkpoint helpers)

TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k", "attn2.to_v",
           "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")


def random_lora_sd(model, rank: int, seed: int) -> dict:
    """A generic-key LoRA state dict on the usual kohya targets of this model, small random factors."""
    import torch
    from comfyui_concepts.core.patching.comfy import model_modules

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in model_modules(model).items():
        if not path.endswith(TARGETS):
            continue
        w = m.weight
        key = f"diffusion_model.{path}"
        down = torch.randn(rank, *w.shape[1:], generator=gen) * 0.01
        up = torch.randn(w.shape[0], rank, *([1, 1] if w.ndim == 4 else []), generator=gen) * 0.01
        sd.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                   f"{key}.alpha": torch.tensor(float(rank))})
    return sd


def random_dit_lora_sd(model, rank: int, seed: int) -> dict:
    """A generic-key LoRA state dict on every linear layer of the DiT's blocks (what DiT LoRA trainers target),
    small random factors."""
    import torch
    from comfyui_concepts.core.patching.comfy import model_modules

    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for path, m in model_modules(model).items():
        w = m.weight
        if w.ndim != 2 or not path.startswith(("double_blocks.", "single_blocks.", "joint_blocks.")):
            continue
        key = f"diffusion_model.{path}"
        sd.update({f"{key}.lora_down.weight": torch.randn(rank, w.shape[1], generator=gen) * 0.01,
                   f"{key}.lora_up.weight": torch.randn(w.shape[0], rank, generator=gen) * 0.01,
                   f"{key}.alpha": torch.tensor(float(rank))})
    return sd


def strips(k: int, size: int):
    import torch

    masks = []
    for i in range(k):
        m = torch.zeros(size, size)
        m[:, i * size // k:(i + 1) * size // k] = 1
        masks.append(m)
    return masks


def run(args):
    import comfy.hooks
    import comfy.lora
    import comfy.sample
    import torch
    from comfyui_concepts.core import lora_files as L
    from comfyui_concepts.core.patching.comfy import apply_regions, model_family, model_modules
    from comfyui_concepts.core.regions import Region

    counts = (1, 2, 4, 10) if args.dit else (1, 2, 4)
    if args.dit:  # a diffusion model alone (e.g. Flux at full width, few blocks): random conditioning, no text
        import comfy.sd

        base = comfy.sd.load_diffusion_model(args.ckpt)
        flux = model_family(base) in ("Flux", "Chroma")
        gen = torch.Generator().manual_seed(0)
        context = torch.randn(1, 256 if flux else 154, 4096, generator=gen) * 0.1
        pooled = torch.randn(1, 768 if flux else 2048, generator=gen) * 0.1
        positive = negative = [[context, {"pooled_output": pooled}]]
        cfg, channels, scheduler = (1.0 if flux else 4.5), 16, "simple"
        key_map = comfy.lora.model_lora_keys_unet(base.model, {})
        widths = {p: int(m.weight.shape[0]) for p, m in model_modules(base).items()}
        sds = [random_dit_lora_sd(base, args.rank, seed) for seed in range(max(counts))]
        layers = [L.read_keyed_lora(sd, key_map, widths, model_family(base)).layers for sd in sds]
    else:
        base, clip, _ = B.load(args.ckpt)
        text = "a photo of a dog and a cat and a bird and a horse"
        positive = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
        cfg, channels, scheduler = 7.0, 4, "normal"
        family = model_family(base)
        spec = L.spec_from_unet_config(base.model.model_config.unet_config, family)
        sds = [random_lora_sd(base, args.rank, seed) for seed in range(4)]
        layers = [L.read_lora(sd, family=family, spec=spec).layers for sd in sds]
    setups = {"base": (base, positive)}
    for k in counts:
        regions = [Region(layers[i], 1.0, mask=m, name=f"lora {i}") for i, m in enumerate(strips(k, args.size))]
        setups[f"ours {k}"] = (apply_regions(base, regions, None, "argmax"), positive)
        conds = []
        for i, m in enumerate(strips(k, args.size // 8)):
            hooks = comfy.hooks.create_hook_lora(sds[i], 1.0, 0.0)
            conds += comfy.hooks.set_conds_props([positive], 1.0, "default", mask=m[None], hooks=hooks)[0]
        if k <= 4:  # a pass per hook group: 10 would take minutes per step here
            setups[f"hooks {k}"] = (base, conds)
    if not args.dit:
        no_kv = [{p: v for p, v in layer.items() if not p.endswith(("attn2.to_k", "attn2.to_v"))} for layer in layers]
        regions = [Region(no_kv[i], 1.0, mask=m, name=f"lora {i}") for i, m in enumerate(strips(4, args.size))]
        setups["ours 4 no K/V"] = (apply_regions(base, regions, None, "argmax"), positive)
    key_map = comfy.lora.model_lora_keys_unet(base.model, {})
    patched = base.clone()
    patched.add_patches(comfy.lora.load_lora(sds[0], key_map), 1.0)
    setups["one LoRA run"] = (patched, positive)

    if args.modes:
        keep = ["base"] + [m.strip() for m in args.modes.split(",") if m.strip() != "base"]
        unknown = [m for m in keep if m not in setups]
        if unknown:
            raise SystemExit(f"unknown --modes {unknown}; modes: {', '.join(setups)}")
        setups = {m: setups[m] for m in keep}
    latent = torch.zeros(1, channels, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    times = {m: [] for m in setups}

    def sample(mode, steps):
        stamps = []

        def callback(step, x0, x, total):
            B.sync()
            stamps.append(time.perf_counter())

        model, pos = setups[mode]
        comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, pos, negative, latent, seed=0,
                            disable_pbar=True, callback=callback)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    for mode in setups:
        sample(mode, 2)  # warm-up: weights, patches, hooks
    for _ in range(args.repeats):
        for mode in setups:
            times[mode].append(sample(mode, args.steps))
    # the fastest run of each mode: on a shared machine, interference only ever adds time
    med = {m: min(t) for m, t in times.items()}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    print(f"# bench: compose | {device} | {Path(args.ckpt).name} | {args.size}px | rank {args.rank} | "
          f"{sum(len(x) for x in layers[:1])} LoRA layers each | torch {torch.__version__}")
    for m in setups:
        print(f"{m:14s}: {med[m] * 1000:8.1f} ms/step  ÷ base {med[m] / med['base']:.3f}  "
              f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times[m])})")
    for k in counts if "one LoRA run" in med else ():
        print(f"per-region samplers {k}: {k * med['one LoRA run'] / med['base']:.3f} x base per step "
              f"(k runs of one LoRA-patched sampler)")
    if "ours 4" in med:
        print(f"ours 4 ÷ base: {med['ours 4'] / med['base']:.3f}  (target <= 1.15)")
    if "ours 10" in med:
        print(f"ours 10 ÷ base: {med['ours 10'] / med['base']:.3f}  (target <= 1.30)")
    if "hooks 4" in med:
        print(f"hooks 4 ÷ base: {med['hooks 4'] / med['base']:.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128, help="image side in pixels (GPU: use 512)")
    ap.add_argument("--steps", type=int, default=3, help="sampling steps per timed run")
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per mode (median reported)")
    ap.add_argument("--rank", type=int, default=16, help="rank of the random LoRAs")
    ap.add_argument("--modes", default="", help="comma-separated subset of the modes (base always runs), e.g. "
                    "'ours 1,ours 4,hooks 4' at 512 px, where every mode of a full run takes long on a CPU")
    ap.add_argument("--ckpt", default="", help=f"checkpoint path (default: {B.CKPT} in the test cache)")
    ap.add_argument("--dit", action="store_true",
                    help="--ckpt is a DiT diffusion model alone (SD3, Flux; e.g. the 1 + 1-block Flux at full width "
                         "that tests/comfyui/make_checkpoints.py --dit builds): random conditioning, LoRAs on every "
                         "block's linear layers, 1 / 2 / 4 / 10 regions (text_layers skip)")
    args = ap.parse_args()
    if not args.dit:
        args.ckpt = B.ensure_checkpoint(args)
    B.setup_comfy()
    run(args)


if __name__ == "__main__":
    main()
