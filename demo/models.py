"""The main job's models: the toy world's trained base model (default), the built-in random tiny model, or a
Stable Diffusion 1.x model from disk, each with the prompts, sampler and training settings that suit it."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from core import training
from core.patching import diffusers as D

TOY, TINY = "toy", "tiny"


class UsageError(Exception):
    """Bad command-line input: the message says what to fix; the job exits with code 2 and writes nothing."""


@dataclass(frozen=True)
class PromptSpec:
    """A sampling prompt and, on the toy world, what its words ask of the scene besides the concept."""

    text: str
    label: str  # column heading on the contact sheet
    position: str | None = None  # the concept alone, asked to stand here (left / middle / right)
    background: str | None = None
    other: tuple[str, str, str] | None = None  # a second object (shape, colour, texture), right of the concept


@dataclass
class Setup:
    """Everything the job needs from a model: parts for training, a sampler, defaults, a judge where one exists."""

    kind: str  # "toy", "tiny" or "file"
    description: str
    unet: torch.nn.Module
    vae: object
    tokenizer: object
    text_encoder: torch.nn.Module
    resolution: int
    class_word: str
    defaults: dict  # steps, lr, rank, sample_steps, cfg for this model
    train_kwargs: dict = field(default_factory=dict)  # prediction objective and schedule for D.train_residuals
    judge: object = None  # the toy world's judge network, None elsewhere
    sampler: Callable | None = None  # (prompts, seed, steps, cfg, resolution, gate, token_idx) -> [N, H, W, 3]
    default_images: Callable | None = None  # (resolution) -> the images to learn when --images is not given
    default_captions: list[str] | None = None  # one caption per default image, each naming V* and the class word


TOY_DEFAULTS = dict(steps=150, lr=1e-2, rank=32, sample_steps=20, cfg=None, batch_size=4)
OTHER_DEFAULTS = dict(steps=150, lr=1e-3, rank=0, sample_steps=25, cfg=7.0, batch_size=4)


def toy_weights() -> str:
    from bench.toyworld import model as M

    return M.COLOURLESS_WEIGHTS


def check_model_path(path: str) -> None:
    """Refuse a --model that cannot be a Stable Diffusion model before anything is loaded."""
    if not os.path.exists(path):
        raise UsageError(f"--model {path}: no such file or folder; give a diffusers folder, an SD1.x .safetensors "
                         f"file, '{TOY}' (default) or '{TINY}'")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise UsageError(f"--model {path}: the folder has no model_index.json, so it is not a diffusers model "
                             "folder; give the folder that holds model_index.json, unet/, vae/, text_encoder/")
        return
    if path.endswith(".safetensors"):
        try:
            with open(path, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict):
            raise UsageError(f"--model {path}: not a safetensors file (its header does not parse); give an SD1.x "
                             "checkpoint or a diffusers folder")
        if not any(k.startswith("model.diffusion_model.") for k in header):
            raise UsageError(f"--model {path}: a safetensors file without a UNet (no model.diffusion_model.* "
                             "keys), so not a Stable Diffusion checkpoint; is it a LoRA or a residual file?")
    elif not path.endswith((".ckpt", ".pt", ".pth")):
        raise UsageError(f"--model {path}: not a model file (.safetensors or .ckpt) nor a diffusers folder")


def load(model: str, device: torch.device) -> Setup:
    """The Setup for ``model``: 'toy', 'tiny', or a path (checked with ``check_model_path`` first)."""
    if model == TOY:
        setup = _toy()
    elif model == TINY:
        setup = _tiny()
    else:
        check_model_path(model)
        setup = _from_disk(model)
    for m in (setup.unet, setup.text_encoder):
        m.to(device).eval()
    if hasattr(setup.vae, "to"):
        setup.vae.to(device).eval()
    return setup


def _toy() -> Setup:
    from bench.toyworld import judge as J
    from bench.toyworld import measure as Me
    from bench.toyworld import model as M
    from bench.toyworld import scenes as S

    path = toy_weights()
    unet, te, tok = M.load(path)

    def sampler(prompts, seed, steps, cfg, resolution, gate=None, token_idx=None):
        return M.generate(unet, te, tok, prompts, seed=seed, steps=steps, guidance=cfg if cfg else M.GUIDANCE,
                          gate=gate, token_idx=token_idx)

    judge = J.load(os.path.join(M.HERE, "weights", "judge.safetensors"))
    rel = os.path.relpath(path, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    scenes = Me.concept_scenes(4, Me.CONCEPTS["known"])  # a yellow striped diamond, which the toy model can draw

    def renders(resolution):
        return torch.from_numpy(S.render_batch(scenes)).float()

    captions = Me.concept_captions(scenes)
    return Setup(TOY, f"toy-world base model ({rel}): 32 px, trained from scratch on synthetic scenes", unet,
                 M.vae_for(unet), tok, te, S.SIZE, S.CLASS_WORD, dict(TOY_DEFAULTS, cfg=M.GUIDANCE),
                 dict(prediction="v", alphas_cumprod=M.train_alphas_cumprod()), judge, sampler, renders, captions)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1)


def _ldm_sampler(unet, vae, tok, te, scheduler_factory):
    def sampler(prompts, seed, steps, cfg, resolution, gate=None, token_idx=None):
        cond = D.encode_text(tok, te, prompts)
        uncond = D.encode_text(tok, te, [""])
        hw = resolution // (2 ** (len(vae.config.block_out_channels) - 1))
        shape = (len(prompts), unet.config.in_channels, hw, hw)
        lat = D.sample(unet, scheduler_factory(), cond, uncond, shape, steps, cfg, seed, gate, token_idx)
        return D.decode_latents(vae, lat)
    return sampler


def _tiny() -> Setup:
    from core.toy_models import tiny_text_encoder, tiny_tokenizer, tiny_unet, tiny_vae

    tok = tiny_tokenizer()
    unet, vae, te = tiny_unet("sd1", sample_size=32), tiny_vae(), tiny_text_encoder(len(tok))
    return Setup(TINY, "built-in tiny random SD1-style model: shows that the pipeline runs, not a learned concept",
                 unet, vae, tok, te, 64, "toy", dict(OTHER_DEFAULTS), {}, None,
                 _ldm_sampler(unet, vae, tok, te, _ddim), _made_up_renders)


def _from_disk(path: str) -> Setup:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    try:
        if os.path.isdir(path):
            pipe = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, safety_checker=None)
        else:
            pipe = StableDiffusionPipeline.from_single_file(path, local_files_only=True, safety_checker=None)
    except Exception as e:  # noqa: BLE001 - one line that says what to give instead
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        raise UsageError(f"--model {path}: diffusers could not load it offline ({type(e).__name__}: {first}); "
                         "give a complete diffusers folder or an SD1.x single-file checkpoint") from None
    config = pipe.scheduler.config
    sampler = _ldm_sampler(pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder,
                           lambda: DDIMScheduler.from_config(config))
    return Setup("file", path, pipe.unet, pipe.vae, pipe.tokenizer, pipe.text_encoder, 512, "toy",
                 dict(OTHER_DEFAULTS), {}, None, sampler, _made_up_renders)


def _made_up_renders(resolution: int) -> torch.Tensor:
    from core.toy_models import concept_renders

    return concept_renders(4, resolution, seed=0)


def prompts_for(setup: Setup, token: str, class_word: str, extra: str | None,
                caption: str | None = None) -> list[PromptSpec]:
    """The contact sheet's columns: a training prompt, a new place, a new background, a second object.

    Within a set the prompts start alike, so V* sits at one token position and LAG samples them in one batch.
    ``caption``: one of the training captions, the first column when the images trained with captions (in the toy
    world's caption form: "a V* shape on the left on a white background")."""
    head = training.training_prompt(token, class_word)
    if setup.kind == TOY and caption:
        v = f"a {token} {class_word}"
        specs = [PromptSpec(caption, "training caption", *_toy_asks(caption)),
                 PromptSpec(f"{v} on the right on a gray background", "new place and background",
                            position="right", background="gray"),
                 PromptSpec(f"{v} in the middle on a black background", "new background", position="middle",
                            background="black"),
                 PromptSpec(f"{v} and a blue circle on a sand background", "two objects", background="sand",
                            other=("circle", "blue", "plain"))]
    elif setup.kind == TOY:
        specs = [PromptSpec(head, "training prompt"),
                 PromptSpec(f"{head} on the left", "new place", position="left"),
                 PromptSpec(f"{head} on a black background", "new background", background="black"),
                 PromptSpec(f"{head} and a blue circle on a sand background", "two objects", background="sand",
                            other=("circle", "blue", "plain"))]
    else:
        specs = [PromptSpec(head, "training prompt"), PromptSpec(f"{head} on the beach", "new place"),
                 PromptSpec(f"{head} in the snow", "new background"),
                 PromptSpec(f"{head} and a red ball", "two objects")]
    if extra:
        specs.append(PromptSpec(extra, "your prompt"))
    return specs


def _toy_asks(caption: str) -> tuple[str | None, str | None]:
    """(position, background) a toy caption names ("... on the left on a white background")."""
    from bench.toyworld import scenes as S

    position = next((p for p, phrase in S.POSITION_PHRASE.items() if phrase in caption), None)
    background = next((b for b in S.BACKGROUND_NAMES if f"on a {b} background" in caption), None)
    return position, background
