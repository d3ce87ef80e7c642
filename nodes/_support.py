"""The support layer of the nodes: socket types, file locations, input checks, the inputs the training nodes
share, and training run inside ComfyUI's guider."""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..core import residuals as R
from ..core import training
from ..core.erase import KV_SUFFIXES, cross_attention_projections
from ..core.layouts import family_label
from ..core.patching.comfy import model_family, model_sites, trainable_clone
from ..core.tokens import DEFAULT_TOKEN

log = logging.getLogger("comfyui-concepts")

Residuals = io.Custom("CONCEPT_RESIDUALS")
CATEGORY = "concepts"


def lora_path(name: str) -> str:
    """Where a residual named ``name`` (relative, without extension) is saved under models/loras."""
    name = name.strip().replace("\\", "/")
    if not name:
        raise ValueError("give the residual file a name")
    if not name.endswith(".safetensors"):
        name += ".safetensors"
    root = os.path.realpath(folder_paths.get_folder_paths("loras")[0])
    path = os.path.realpath(os.path.join(root, name))
    if not path.startswith(root + os.sep):
        raise ValueError(f"'{name}' points outside models/loras; use a plain relative name like 'concepts/my_dog'")
    return path


def check_free(path: str, overwrite: bool) -> None:
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(
            f"{path} already exists. Choose another file name or switch 'overwrite' on to replace it.")


def save_path(save_name: str, overwrite: bool) -> str | None:
    """Where a result named ``save_name`` will be saved (None: empty name, not saved), checked free before any
    work so that a taken name stops the run before minutes of training, not after."""
    if not (save_name or "").strip():
        return None
    path = lora_path(save_name)
    check_free(path, overwrite)
    return path


def save_residuals(rs: R.ResidualSet, name: str, overwrite: bool) -> str:
    path = lora_path(name)
    check_free(path, overwrite)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    R.save(rs, path, overwrite=overwrite)
    log.info("saved residuals to %s", path)
    return path


def checked_sites(model, rs: R.ResidualSet):
    """The model's transformer sites after checking that ``rs`` was made for this model family and layout."""
    sites = model_sites(model)
    R.check_compatible(rs, model_family(model), [s for s, _ in sites])
    return sites


def kv_modules(model) -> dict:
    """{path: module} of the model's cross-attention key/value projections."""
    return dict(cross_attention_projections(model_sites(model)))


def check_kv_concept(rs: R.ResidualSet, model, label: str) -> dict:
    """The model's K/V modules after checking that ``rs`` is a Custom Diffusion K/V set for this model."""
    family = model_family(model)
    file_family = rs.metadata.get("base_family")
    if file_family and file_family != family:
        raise R.ResidualFileError(
            f"{label} was trained for {family_label(file_family)} ({file_family}) but the model is "
            f"{family_label(family)} ({family}); use concepts trained on this checkpoint's family")
    modules = kv_modules(model)
    for path, layer in rs.layers.items():
        if not path.endswith(KV_SUFFIXES):
            raise R.ResidualFileError(
                f"{label}: '{path}' is not a cross-attention key/value projection; the merge takes Custom "
                "Diffusion K/V concepts (Train Custom Diffusion), not personalized residuals or other LoRAs")
        if path not in modules:
            raise R.ResidualFileError(f"{label} targets '{path}', which this {family_label(family)} model does "
                                      "not have: it was trained on a model with another block layout")
        w = modules[path].weight
        if tuple(layer.delta().shape) != tuple(w.shape):
            raise R.ResidualFileError(f"{label}: '{path}' is {tuple(w.shape)} in this model but "
                                      f"{tuple(layer.delta().shape)} in the concept: another model layout")
    return modules


def residuals_to_cpu(rs: R.ResidualSet) -> R.ResidualSet:
    """A detached copy of a trained set with its factors on the CPU, as the nodes output and save it."""
    rs = rs.detached()
    for layer in rs.layers.values():
        layer.down, layer.up = layer.down.cpu(), layer.up.cpu()
    return rs


def sigma_range(model, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(start sigma, end sigma) of a part of the sampling schedule; the whole schedule is (inf, 0)."""
    if start_percent > end_percent:
        raise ValueError(f"start_percent ({start_percent}) is after end_percent ({end_percent})")
    if start_percent <= 0.0 and end_percent >= 1.0:
        return float("inf"), 0.0
    ms = model.get_model_object("model_sampling")
    return float(ms.percent_to_sigma(start_percent)), float(ms.percent_to_sigma(end_percent))


def comma_list(text: str) -> list[str]:
    """The entries of a comma-, semicolon- or line-separated input, stripped, empty ones dropped."""
    return [w.strip() for w in (text or "").replace(";", ",").replace("\n", ",").split(",") if w.strip()]


def encode_rows(clip, text: str) -> torch.Tensor:
    """[L, D] conditioning rows of ``text`` as CLIPTextEncode makes them (SDXL: both encoders, concatenated)."""
    with torch.no_grad():
        return clip.encode_from_tokens(clip.tokenize(text))[0].float().cpu()


def lines(text: str) -> list[str]:
    """The non-empty lines of a multiline input, stripped."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def strengths_for(text: str, rs: R.ResidualSet) -> dict[str, float]:
    return R.parse_block_strengths(text or "", list(rs.layers))


def encode_views(vae, images: torch.Tensor) -> torch.Tensor:
    """Latents of a batch of images, encoded four at a time."""
    return torch.cat([vae.encode(images[i:i + 4]) for i in range(0, len(images), 4)])


def step_progress(total: int):
    """A ``progress(step, total, loss)`` callback for the core's training loops: drives ComfyUI's progress bar and
    stops the run when the user cancels."""
    pbar = comfy.utils.ProgressBar(total)

    def progress(step, n, loss):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(step, n)
    return progress


def training_patcher(model):
    """(a trainable clone of ``model``, the torch device): bf16 compute on CUDA where the card has it (autograd in
    fp16 would need loss scaling). Call inside ``torch.inference_mode(False)``."""
    mp = trainable_clone(model)
    device = comfy.model_management.get_torch_device()
    if device.type == "cuda":
        mp.set_model_compute_dtype(torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32)
    return mp, device


# ------------------------------------------------------------------------------------------ shared inputs
_TRAINING_INPUTS = {
    "vae": (io.Vae, {}, "The VAE that encodes the images into latents."),
    "images": (io.Image, {}, "3-8 photos of the concept, as one batch."),
    "class_word": (io.String, dict(default="dog"),
                   "The concept's broad class ('dog', 'mug'): the prompt is 'a photo of a <token> <class word>'."),
    "token": (io.String, dict(default=DEFAULT_TOKEN), "A rare word that will stand for this concept in prompts (V*)."),
    "steps": (io.Int, dict(min=1, max=10000), "Optimisation steps."),
    "learning_rate": (io.Float, dict(min=1e-6, max=1.0, step=1e-4), "AdamW learning rate."),
    "batch_size": (io.Int, dict(min=1, max=64), "Images per step."),
    "seed": (io.Int, dict(min=0, max=0xFFFFFFFF, control_after_generate=False),
             "Seeds the initial values, crops, noise and timesteps: same seed, same result."),
    "resolution": (io.Int, dict(min=64, max=2048, step=8),
                   "Square training resolution in pixels (images are cropped and resized)."),
    "views": (io.Int, dict(min=1, max=32), "Augmented views per image (random crops and flips), encoded once."),
    "save_name": (io.String, dict(default=""), "File name under models/loras (no extension). Empty: do not save."),
    "overwrite": (io.Boolean, dict(default=False), "Replace an existing file of the same name."),
    "masks": (io.Mask, dict(optional=True), "Optional: one mask per image; the loss only counts pixels inside it."),
}


def training_inputs(**inputs: dict) -> list:
    """The inputs the training nodes share, in the order given. Each keyword names one (vae, images, class_word,
    token, steps, learning_rate, batch_size, seed, resolution, views, save_name, overwrite, masks) and maps to the
    ``io.*.Input`` keywords this node sets on top of the shared ones (default, range, tooltip), e.g.
    ``training_inputs(vae={}, steps=dict(default=150), learning_rate=dict(default=1e-3))``."""
    out = []
    for name, own in inputs.items():
        kind, shared, tooltip = _TRAINING_INPUTS[name]
        out.append(kind.Input(name, **{**shared, "tooltip": tooltip, **own}))
    return out


# ------------------------------------------------------------------------------------------ training in the guider
class NamedCondGuider(comfy.samplers.CFGGuider):
    """A guider holding named conds (``{name: conditioning}``); ComfyUI processes them as it does positive and
    negative, and a trainer calls ``comfy.samplers.calc_cond_batch`` with the one it needs."""

    def set_prompts(self, conds: dict):
        self.inner_set_conds(conds)


class GuidedModel:
    """What a function run inside ComfyUI's guider gets: the wrapped model with its conds and options, the
    latents as the model sees them, and the model's noise schedule."""

    def __init__(self, model_wrap, extra_args: dict, latent: torch.Tensor):
        self.model_wrap, self.extra_args, self.latent = model_wrap, extra_args, latent
        ms = model_wrap.inner_model.model_sampling
        self.sigmas = ms.sigmas.float().to(latent.device)  # one per timestep
        self.alphas_cumprod, self.input_divisor = training_schedule(ms, self.sigmas)

    @property
    def model_options(self) -> dict:
        return self.extra_args["model_options"]

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The model's denoised x0 for ``x`` (k-diffusion scaling) at ``sigma``, with the guider's conds."""
        return self.model_wrap(x, sigma, **self.extra_args)

    def predict_x0_with(self, cond_name: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """As ``predict_x0`` with one of a ``NamedCondGuider``'s conds."""
        (x0,) = comfy.samplers.calc_cond_batch(self.model_wrap.inner_model, [self.model_wrap.conds[cond_name]], x,
                                               sigma, self.model_options)
        return x0


def training_schedule(model_sampling, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas_cumprod, input_divisor) per timestep: the training loop noises as x_t = sqrt(a) x0 + sqrt(1 - a)
    noise, and ``x_t / input_divisor`` is what ComfyUI's model expects at that sigma.

    The model's own ``noise_scaling`` gives its input as c_x x0 + c_n noise: c_x = 1, c_n = sigma for the UNet
    families (eps, v), c_x = 1 - sigma, c_n = sigma for rectified flow (SD3, Flux). Matching the ratio gives
    a = c_x^2 / (c_x^2 + c_n^2) and the input x_t * sqrt(c_x^2 + c_n^2)."""
    ones, zeros = torch.ones_like(sigmas), torch.zeros_like(sigmas)
    c_x = model_sampling.noise_scaling(sigmas, zeros, ones).float()
    c_n = model_sampling.noise_scaling(sigmas, ones, zeros).float()
    if bool((c_x == 1).all()):  # the UNet families: exactly the k-diffusion scaling x0 + sigma * noise
        a = 1.0 / (1.0 + sigmas ** 2)
        return a, a.sqrt()
    return c_x ** 2 / (c_x ** 2 + c_n ** 2), (c_x ** 2 + c_n ** 2).rsqrt()


class _CallInGuider(comfy.samplers.Sampler):
    """A 'sampler' that calls ``fn(GuidedModel)`` once instead of sampling; the latent passes through unchanged."""

    def __init__(self, fn):
        self.fn = fn
        self.result = None

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.result = self.fn(GuidedModel(model_wrap, extra_args, latent_image))
        return latent_image


def run_in_guider(model, conds, latents: torch.Tensor, fn, seed: int = 0):
    """``fn(GuidedModel)``'s result, run inside ComfyUI's guider so that model loading, patches, wrappers,
    conditioning and latent scaling are ComfyUI's own (SD1.x and SDXL alike). ``conds``: one conditioning, or
    ``{name: conditioning}`` for ``GuidedModel.predict_x0_with``."""
    if isinstance(conds, dict):
        guider = NamedCondGuider(model)
        guider.set_prompts(conds)
    else:
        guider = Guider_Basic(model)
        guider.set_conds(conds)
    call = _CallInGuider(fn)
    guider.sample(torch.zeros_like(latents), latents, call, torch.zeros(len(latents)), seed=seed)
    return call.result


def train_on_latents(model, conds, latents: torch.Tensor, params, config: training.TrainConfig, progress,
                     masks: torch.Tensor | None = None, caption_of_view: torch.Tensor | None = None,
                     extra_loss=None, seed: int = 0) -> list[float]:
    """Runs ``core.training.train`` on image latents inside ComfyUI's guider; returns the loss per step.
    ``conds``: one conditioning for every view, or, with ``caption_of_view`` ([V] caption index of each view), a
    list of them, one per caption. ``extra_loss`` is added to every step's loss."""
    if caption_of_view is not None:
        conds = {f"caption_{i}": c for i, c in enumerate(conds)}

    def train(guided: GuidedModel) -> list[float]:
        table, alphas_cumprod, latent = guided.sigmas, guided.alphas_cumprod, guided.latent

        def predict(x_t, t, ctx):
            sigma = table[t]
            x = x_t / guided.input_divisor[t].view(-1, 1, 1, 1)
            if caption_of_view is None:
                return guided.predict_x0(x, sigma)
            keys = ctx[:, 0, 0].long()
            out = torch.empty_like(x_t)
            for k in keys.unique().tolist():  # one model call per caption in the batch
                rows = (keys == k).nonzero().flatten()
                out[rows] = guided.predict_x0_with(f"caption_{k}", x[rows], sigma[rows])
            return out

        view_masks = masks.to(latent.device) if masks is not None else None
        if caption_of_view is None:
            context = torch.zeros(1, 1, 1, device=latent.device)  # conditioning comes from the guider
        else:  # each view's caption index travels as its "context"
            context = caption_of_view.to(latent.device, torch.float32).view(-1, 1, 1)
        return training.train(params, predict, latent.float(), context, alphas_cumprod, "x0", view_masks, config,
                              progress, extra_loss)

    return run_in_guider(model, conds, latents, train, seed)
