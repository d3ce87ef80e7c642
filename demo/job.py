"""The main job on the standalone core: learn a concept as personalized residuals, sample base / global / LAG,
let the toy world's judge read every sample, write a contact sheet and a report."""
from __future__ import annotations

import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from core import residuals as R
from core import training
from core.hooks.gate import LowRankGate
from core.patching import diffusers as D
from core.plots import line_plot

from . import scoring
from .models import PromptSpec, Setup, prompts_for
from .report import save_png, settle, write_report
from .sheet import SheetRow, Tile, contact_sheet

log = logging.getLogger("comfyui-concepts")
ROWS = ("base", "global", "lag")
ROW_TITLES = {"base": "base model", "global": "global residual", "lag": "LAG"}


class Phases:
    """One line per phase on the terminal, with its time; a text bar for the training steps."""

    def __init__(self, total: int):
        self.total, self.n, self.t0 = total, 0, time.perf_counter()

    def start(self, what: str) -> None:
        self.n += 1
        self.t0 = time.perf_counter()
        log.info("[%d/%d] %s", self.n, self.total, what)

    def done(self, what: str = "") -> float:
        secs = time.perf_counter() - self.t0
        log.info("      done in %.1f s%s", secs, f": {what}" if what else "")
        return secs

    @staticmethod
    def bar(step: int, total: int, loss: float) -> None:
        if step == total or step % max(1, total // 10) == 0:
            filled = round(20 * step / total)
            log.info("      [%s%s] step %d/%d  loss %.4f", "#" * filled, "." * (20 - filled), step, total, loss)


def _mask_images(gate: LowRankGate, n: int, size: int) -> torch.Tensor:
    """[n, size, size]: per sample, where LAG applied the residual at the last step, in the finest gated blocks
    (their binary masks averaged: 1 where every one of them applied it)."""
    finest = max((m.shape[1] for m in gate.last_masks.values()), default=0)
    maps = []
    for m in gate.last_masks.values():
        if m.shape[1] != finest:
            continue
        rows = m[-n:].float()  # the conditional half of the CFG batch
        side = int(round(rows.shape[1] ** 0.5))
        maps.append(F.interpolate(rows.view(n, 1, side, side), size=(size, size), mode="nearest")[:, 0])
    return torch.stack(maps).mean(0) if maps else torch.zeros(n, size, size)


def sample_rows(setup: Setup, rs: R.ResidualSet, specs: list[PromptSpec], per_prompt: int, seed: int, steps: int,
                cfg: float, token: str, class_word: str, resolution: int):
    """{row: images [P * per_prompt, H, W, 3]} in prompt-major order, and LAG's masks; prompts whose V* and class
    word sit at the same token positions are sampled in one batch."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, spec in enumerate(specs):
        groups[tuple(D.concept_positions(setup.tokenizer, spec.text, [token, class_word]))].append(i)
    sites = D.unet_sites(setup.unet)
    images = {row: [None] * len(specs) for row in ROWS}
    masks: list = [None] * len(specs)
    for idx, members in groups.items():
        prompts = [specs[i].text for i in members for _ in range(per_prompt)]
        for row in ROWS:
            if row == "base":
                out = setup.sampler(prompts, seed, steps, cfg, resolution)
            else:
                with LowRankGate(sites, rs, localized=row == "lag") as gate:
                    out = setup.sampler(prompts, seed, steps, cfg, resolution, gate, list(idx))
                    if row == "lag":
                        lag_masks = _mask_images(gate, len(prompts), out.shape[1])
            for k, i in enumerate(members):
                images[row][i] = out[k * per_prompt:(k + 1) * per_prompt]
                if row == "lag":
                    masks[i] = lag_masks[k * per_prompt:(k + 1) * per_prompt]
    return {row: torch.cat(v) for row, v in images.items()}, torch.cat(masks)


def run(args, setup: Setup, images: torch.Tensor, phases: Phases) -> dict:
    """Train, sample, judge and write into ``args.out`` (created by the caller after every check passed)."""
    out = Path(args.out)
    token, class_word = args.token, args.class_word
    for i, img in enumerate(images):
        save_png(img, out / f"train_{i + 1}.png")
    concept = None
    if setup.judge is not None:
        concept = scoring.read_concept(setup.judge, images)
        log.info("      the judge reads the training images as: %s", concept.words())

    phases.start(f"train residuals: {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}, "
                 f"rank {args.rank or '5% of each width'}")
    config = training.TrainConfig(steps=args.steps, batch_size=args.batch_size, learning_rate=args.lr, seed=args.seed)
    captions = None if args.images or args.paper_prompt else setup.default_captions
    if captions:
        log.info("      each render trains with its own caption, e.g. \"%s\"", captions[0])
    # captions name the place, so views are not mirrored ("on the left" would become wrong)
    rs, losses = D.train_residuals(setup.unet, setup.vae, setup.tokenizer, setup.text_encoder, images, class_word,
                                   token, resolution=args.resolution, views=args.views, config=config,
                                   fixed_rank=args.rank, progress=Phases.bar, captions=captions,
                                   flip=captions is None, **setup.train_kwargs)
    train_s = phases.done(f"{rs.parameter_count():,} residual parameters")
    R.save(rs, str(out / "residuals.safetensors"), overwrite=True)
    settle(out / "residuals.safetensors")
    objective = "v-prediction" if setup.train_kwargs.get("prediction") == "v" else "noise-prediction"
    save_png(line_plot(losses, xlabel="training step", ylabel=f"loss (MSE of the {objective})",
                       title=f"training loss per step (thin) and its 10-step mean (thick); {len(images)} images, "
                             f"batch {args.batch_size}",
                       smooth=10 if len(losses) >= 20 else 0)[0], out / "loss_curve.png")

    specs = prompts_for(setup, token, class_word, args.prompt, captions[0] if captions else None)
    per_prompt = args.samples
    phases.start(f"sample {len(specs)} prompts x {per_prompt} seeds, {args.sample_steps} steps: base, global, LAG")
    rows, masks = sample_rows(setup, rs, specs, per_prompt, args.seed, args.sample_steps, args.cfg, token,
                              class_word, args.resolution)
    sample_s = phases.done()
    row_specs = [s for s in specs for _ in range(per_prompt)]

    phases.start("judge and write the contact sheet and report")
    scores = {}
    if setup.judge is not None:
        for row in ROWS:
            scores[row] = scoring.score(setup.judge, rows[row], row_specs, concept,
                                        None if row == "base" else rows["base"])
    sheet_rows = []
    for row in ROWS:
        tiles = []
        for p in range(len(specs)):
            k = p * per_prompt
            if scores:
                s = scores[row][k]
                tiles.append(Tile(rows[row][k], s.reading, s.colour))
            else:
                tiles.append(Tile(rows[row][k], "no judge for this model"))
        note = ""
        if scores:
            hits = sum(s.colour for s in scores[row])
            note = f"{concept.colour}: {hits}/{len(scores[row])}"
        sheet_rows.append(SheetRow(ROW_TITLES[row], note, tiles))
    sheet_rows.append(SheetRow("LAG mask", "finest blocks; white: on",
                               [Tile(masks[p * per_prompt], f"{float(masks[p * per_prompt].mean()):.0%} of the image")
                                for p in range(len(specs))]))
    what = f"a {concept.words()}" if concept else f"'{token} {class_word}'"
    title = f"{what} learned from {len(images)} images in {train_s:.0f} s; captions: the judge's reading " \
            f"(green: the concept's colour)" if concept else f"{what} learned from {len(images)} images"
    sheet = contact_sheet(title, images, [f'"{s.text}"' for s in specs], sheet_rows)
    save_png(sheet, out / "contact_sheet.png")

    report = {
        "model": setup.description, "concept_read_by_judge": concept.words() if concept else None,
        "training_prompts": captions or [rs.metadata.get("prompt")], "images": len(images),
        "residual_parameters": rs.parameter_count(), "rank": args.rank or "5% of each layer's width",
        "steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr, "seed": args.seed,
        "train_seconds": round(train_s, 2), "sample_seconds": round(sample_s, 2),
        "loss_first10": float(np.mean(losses[:10])), "loss_last10": float(np.mean(losses[-10:])),
        "prompts": [s.text for s in specs], "samples_per_prompt": per_prompt,
        "lag_mask_coverage_last_step": round(float(masks.mean()), 3),
        "mean_abs_change_vs_base": {r: round(float((rows[r] - rows["base"]).abs().mean()), 4)
                                    for r in ("global", "lag")},
    }
    if scores:
        report["rows"] = {row: scoring.summary(scores[row]) for row in ROWS}
        report["per_prompt_colour"] = [
            {"prompt": s.text, **{row: float(np.mean([x.colour for x in scores[row][p * per_prompt:
                                                                              (p + 1) * per_prompt]]))
                                  for row in ROWS}} for p, s in enumerate(specs)]
    report = write_report(out, report)
    phases.done(f"wrote {out}/contact_sheet.png, report.md, report.json")
    if scores:
        for row in ROWS:
            r = report["rows"][row]
            log.info("      %-16s colour %.2f  fidelity %.2f  editability %s  background kept %s", ROW_TITLES[row],
                     r["colour"], r["fidelity"], _fmt(r["editability"]), _fmt(r["background_kept"]))
    return report


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"
