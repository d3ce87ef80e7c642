"""Shared pieces of the ComfyUI nodes: the residual socket type, file locations, input checks."""
from __future__ import annotations

import logging
import os

import comfy.model_management
import comfy.samplers
import comfy.utils
import folder_paths
import torch
from comfy_api.v0_0_2 import io

from ..core import residuals as R
from ..core.patching.comfy import model_family, model_sites, trainable_clone

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


def strengths_for(text: str, rs: R.ResidualSet) -> dict[str, float]:
    return R.parse_block_strengths(text or "", list(rs.layers))


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


class NamedCondGuider(comfy.samplers.CFGGuider):
    """A guider holding named conds (``{name: conditioning}``); ComfyUI processes them as it does positive and
    negative, and a trainer calls ``comfy.samplers.calc_cond_batch`` with the one it needs."""

    def set_prompts(self, conds: dict):
        self.inner_set_conds(conds)
