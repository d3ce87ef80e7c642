"""The main job's command line. Every input is checked before anything is written; bad input ends with one line
that says what to fix and exit code 2."""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from pathlib import Path

import torch

from core.tokens import DEFAULT_TOKEN

from . import models
from .models import TINY, TOY, UsageError

PROG = "python -m demo"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
log = logging.getLogger("comfyui-concepts")

DESCRIPTION = """\
The main job: learn a concept from a few images as personalized residuals (Ham et al., CVPR 2024), sample it
with the residual applied globally and with LAG beside the base model, and write a contact sheet and a report.

By default it runs on the toy world's trained base model and learns a concept from 4 of its renders; the toy
world's judge reads every sample (did the concept's colour, shape and texture appear, did the prompt's other
words hold, did the background stay the base model's).
"""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad argument ends with one line (what to fix) and exit code 2, not the usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        raise SystemExit(2)


def parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog=PROG, description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=TOY,
                    help=f"'{TOY}' (default: the toy world's trained base model), '{TINY}' (a random tiny model: "
                         "shows the pipeline runs), or a diffusers folder / single-file SD1.x checkpoint")
    ap.add_argument("--images", help="folder of the concept's images (default with the toy model: 4 renders of a "
                                     "yellow striped diamond; with other models: generated renders)")
    ap.add_argument("--class-word", help="the concept's class word (default: 'shape' on the toy model, else 'toy')")
    ap.add_argument("--token", default=DEFAULT_TOKEN, help="the rare token standing for the concept (default: sks)")
    ap.add_argument("--prompt", help="one more sampling prompt, added as the sheet's last column")
    ap.add_argument("--paper-prompt", action="store_true",
                    help="train every image on the paper's one prompt 'a photo of a V* <class>', even where the "
                         "images' captions are known (the toy model's own renders train on their captions)")
    ap.add_argument("--steps", type=int, help="training steps (default: 150)")
    ap.add_argument("--batch-size", type=int, help="training batch (default: 4)")
    ap.add_argument("--lr", type=float, help="learning rate (default: 1e-2 on the toy model, else the paper's 1e-3)")
    ap.add_argument("--rank", type=int, help="residual rank per layer; 0: the paper's 5%% of each layer's width "
                                             "(default: 32 on the toy model, else 0)")
    ap.add_argument("--views", type=int, default=4, help="augmented views per image (default: 4)")
    ap.add_argument("--resolution", type=int, help="pixels (toy: 32 only; tiny: 64; files: 512)")
    ap.add_argument("--samples", type=int, default=4, help="samples per prompt (default: 4; 16 over 4 prompts)")
    ap.add_argument("--sample-steps", type=int, help="sampling steps (default: 20 on the toy model, else 25)")
    ap.add_argument("--cfg", type=float, help="classifier-free guidance (default: 1.25 on the toy model, else 7)")
    ap.add_argument("--seed", type=int, default=0, help="training and sampling seed (default: 0)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="out", help="output folder (default: out/)")
    ap.add_argument("--server", help="run the job on this ComfyUI server instead (API prompts), e.g. "
                                     "http://127.0.0.1:8188")
    ap.add_argument("--ckpt", default="v1-5-pruned-emaonly.safetensors", help="with --server: checkpoint name")
    return ap


def image_files(folder: str) -> list[Path]:
    """The readable images in ``folder``; refuses a missing or empty folder and names an unreadable image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(folder)
    if not path.exists():
        raise UsageError(f"--images {folder}: no such folder; give a folder of 3-8 photos of the concept")
    if not path.is_dir():
        raise UsageError(f"--images {folder}: a file, not a folder; put the concept's photos in a folder")
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--images {folder}: no .png/.jpg/.jpeg/.webp images in it; add 3-8 photos of the concept")
    for f in files:
        try:
            with Image.open(f) as im:
                im.load()
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UsageError(f"--images: cannot read {f} ({type(e).__name__}); remove it or replace it with a "
                             "valid image") from None
    return files


def load_images(files: list[Path], size: int) -> torch.Tensor:
    """Centre-cropped squares [N, size, size, 3] in [0, 1]."""
    import numpy as np
    from PIL import Image

    out = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).astype(np.float32) / 255.0))
    return torch.stack(out)


def check_numbers(args) -> None:
    positive_ints = {"--steps": args.steps, "--batch-size": args.batch_size, "--views": args.views,
                     "--samples": args.samples, "--sample-steps": args.sample_steps}
    for name, value in positive_ints.items():
        if value is not None and value < 1:
            raise UsageError(f"{name} {value}: must be 1 or more")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise UsageError(f"--lr {args.lr}: must be a positive number, e.g. 1e-3")
    if args.rank is not None and args.rank < 0:
        raise UsageError(f"--rank {args.rank}: must be 0 (the paper's 5% of each width) or more")
    if args.cfg is not None and not (math.isfinite(args.cfg) and args.cfg >= 0):
        raise UsageError(f"--cfg {args.cfg}: must be 0 or more")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution {args.resolution}: must be a multiple of 8, at least 8")
    if not args.token.strip() or " " in args.token.strip():
        raise UsageError(f"--token '{args.token}': must be one word, e.g. sks")


def check_out(out: str) -> None:
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: a file is in the way; give a folder name (it is created if missing)")
    parent = next((p for p in [path, *path.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UsageError(f"--out {out}: cannot write in {parent}; give a folder you can write to")


def fill_defaults(args, setup: models.Setup) -> None:
    for name in ("steps", "lr", "rank", "sample_steps", "cfg", "batch_size"):
        if getattr(args, name) is None:
            setattr(args, name, setup.defaults[name])
    if args.class_word is None:
        args.class_word = setup.class_word
    if args.resolution is None:
        args.resolution = setup.resolution
    if setup.kind == TOY and args.resolution != setup.resolution:
        raise UsageError(f"--resolution {args.resolution}: the toy model draws {setup.resolution} px only; "
                         "leave --resolution out")


def prepare(args) -> tuple[models.Setup, torch.Tensor, object]:
    """Check everything, load the model and the images; nothing is written. Raises UsageError."""
    from .job import Phases

    check_numbers(args)
    check_out(args.out)
    files = image_files(args.images) if args.images else None
    if args.model not in (TOY, TINY):
        models.check_model_path(args.model)
    phases = Phases(4)
    phases.start(f"load the model: {args.model}")
    setup = models.load(args.model, torch.device(args.device))
    fill_defaults(args, setup)
    phases.done(setup.description)
    images = load_images(files, args.resolution) if files else setup.default_images(args.resolution)
    if setup.judge is not None and files:
        log.info("      your images are read by the toy world's judge as 32-px renders; its readings may be "
                 "meaningless for photos")
    return setup, images, phases


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parser().parse_args(argv)
    try:
        if args.server:
            for name, value in models.OTHER_DEFAULTS.items():
                if getattr(args, name, None) is None:
                    setattr(args, name, value)
            args.class_word = args.class_word or "toy"
            args.resolution = args.resolution or 512
            check_numbers(args)
            check_out(args.out)
            if args.images:
                image_files(args.images)
            from .comfy_client import run_on_server

            run_on_server(args)
            return 0
        setup, images, phases = prepare(args)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        from .job import run

        run(args, setup, images, phases)
        return 0
    except UsageError as e:
        sys.stderr.write(f"{PROG}: error: {e}\n")
        return 2
