"""The main job: learn a concept as personalized residuals, then sample it globally and with LAG.

    python -m core --out out/                         # standalone core, built-in tiny model, generated images
    python -m core --model PATH --images DIR ...      # a diffusers folder or a single-file SD checkpoint
    python -m core --server http://127.0.0.1:8188     # the same job as API prompts to a running ComfyUI

Writes the training images, base / global / LAG samples, the loss curve and report.{md,json} into --out.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

import numpy as np
import torch

from . import residuals as R
from . import training
from .localize import ResidualGate
from .plots import line_plot
from .tokens import DEFAULT_TOKEN

log = logging.getLogger("comfyui-concepts")


def save_png(img: torch.Tensor, path: Path) -> None:
    from PIL import Image

    Image.fromarray((img.clamp(0, 1).numpy() * 255).round().astype(np.uint8)).save(path)


def load_images(folder: str, size: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"})
    if not files:
        raise SystemExit(f"no .png/.jpg/.webp images in {folder}")
    imgs = []
    for f in files:
        im = Image.open(f).convert("RGB")
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        imgs.append(torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0))
    return torch.stack(imgs)


def load_pipeline_parts(model: str | None):
    """(unet, vae, tokenizer, text_encoder, scheduler, description): a built-in tiny model, a diffusers folder,
    or a single-file SD checkpoint. Never downloads."""
    from diffusers import DDIMScheduler

    if model is None:
        from .toy_models import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

        tok = tiny_tokenizer()
        sched = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        return tiny_unet("sd1", sample_size=32), tiny_vae(), tok, tiny_text_encoder(len(tok)), sched, \
            "built-in tiny random SD1-style model (no trained base model yet: images are not meaningful)"
    from diffusers import StableDiffusionPipeline

    try:
        if os.path.isdir(model):
            pipe = StableDiffusionPipeline.from_pretrained(model, local_files_only=True, safety_checker=None)
        else:
            pipe = StableDiffusionPipeline.from_single_file(model, local_files_only=True, safety_checker=None)
    except Exception as e:  # noqa: BLE001 - explain what to give instead
        raise SystemExit(f"could not load {model} offline ({type(e).__name__}: {e}). Give a diffusers folder "
                         "(model_index.json, unet/, vae/, text_encoder/, tokenizer/) or an SD1.x single file "
                         "whose config diffusers knows offline.") from None
    sched = DDIMScheduler.from_config(pipe.scheduler.config)
    return pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder, sched, f"{model}"


def run_local(args) -> dict:
    from .patching import diffusers as D

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    unet, vae, tok, te, sched, desc = load_pipeline_parts(args.model)
    for m in (unet, vae, te):
        m.to(device).eval()
    size = args.resolution
    if args.images:
        images = load_images(args.images, size)
    else:
        from .toy_models import concept_renders

        images = concept_renders(4, size, seed=0)
    for i, img in enumerate(images):
        save_png(img, out / f"train_{i + 1}.png")
    config = training.TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    def progress(step, total, loss):
        if step % max(1, total // 10) == 0:
            log.info("step %d/%d loss %.4f", step, total, loss)

    t0 = time.perf_counter()
    rs, losses = D.train_residuals(unet, vae, tok, te, images, args.class_word, args.token, resolution=size,
                                   views=args.views, config=config, progress=progress)
    train_s = time.perf_counter() - t0
    R.save(rs, str(out / "residuals.safetensors"), overwrite=True)
    save_png(line_plot(losses)[0], out / "loss_curve.png")

    prompt = args.prompt or f"a photo of a {args.token} {args.class_word} on the beach"
    cond = D.encode_text(tok, te, [prompt])
    uncond = D.encode_text(tok, te, [""])
    idx = D.concept_positions(tok, prompt, [args.token, args.class_word])
    latent_hw = size // (2 ** (len(vae.config.block_out_channels) - 1))
    shape = (1, unet.config.in_channels, latent_hw, latent_hw)
    sites = D.unet_sites(unet)
    samples, times, coverage = {}, {}, []
    for mode in ("base", "global", "lag"):
        t0 = time.perf_counter()
        if mode == "base":
            lat = D.sample(unet, sched, cond, uncond, shape, args.sample_steps, args.cfg, args.seed)
        else:
            with ResidualGate(sites, rs, localized=mode == "lag") as gate:
                lat = D.sample(unet, sched, cond, uncond, shape, args.sample_steps, args.cfg, args.seed, gate, idx)
                coverage = [float(m[1].mean()) for m in gate.last_masks.values()] if mode == "lag" else coverage
        times[mode] = time.perf_counter() - t0
        samples[mode] = D.decode_latents(vae, lat)[0]
        save_png(samples[mode], out / f"sample_{mode}.png")
    diff = {m: float((samples[m] - samples["base"]).abs().mean()) for m in ("global", "lag")}
    report = {
        "model": desc, "prompt": prompt, "training_prompt": rs.metadata["prompt"], "images": len(images),
        "residual_parameters": rs.parameter_count(), "steps": args.steps, "train_seconds": round(train_s, 2),
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "sample_seconds": {k: round(v, 3) for k, v in times.items()},
        "lag_mask_coverage_last_step": round(float(np.mean(coverage)), 3) if coverage else None,
        "mean_abs_change_vs_base": {k: round(v, 4) for k, v in diff.items()},
    }
    write_report(out, report)
    return report


def write_report(out: Path, report: dict) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["# Personalized residuals: learn and localize", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.items()]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m core", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="diffusers folder or single-file SD checkpoint (default: built-in tiny model)")
    ap.add_argument("--images", help="folder of concept images (default: generated renders of a made-up concept)")
    ap.add_argument("--class-word", default="toy", help="the concept's class word (default: toy)")
    ap.add_argument("--token", default=DEFAULT_TOKEN, help="the rare token standing for the concept (default: sks)")
    ap.add_argument("--prompt", help="sampling prompt (default: 'a photo of a <token> <class> on the beach')")
    ap.add_argument("--steps", type=int, default=150, help="training steps (paper: 150)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--views", type=int, default=4, help="augmented views per image")
    ap.add_argument("--resolution", type=int, default=None, help="pixels (default: 64 tiny model, 512 otherwise)")
    ap.add_argument("--sample-steps", type=int, default=25)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="out", help="output folder (default: out/)")
    ap.add_argument("--server", help="run the job on this ComfyUI server instead (API prompts)")
    ap.add_argument("--ckpt", default="v1-5-pruned-emaonly.safetensors", help="with --server: checkpoint name")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.resolution is None:
        args.resolution = 64 if args.model is None and not args.server else 512
    if args.server:
        from .comfy_client import run_on_server

        run_on_server(args)
    else:
        run_local(args)
