"""API-format prompts (what POST /prompt runs) for the real-ComfyUI tests.

Node ids of the stock text-to-image prompt, so tests can splice nodes in (see ``insert_model_node``).
"""
import copy
import uuid
from pathlib import Path

from .make_checkpoints import CLIP_L_NAME, FLUX_NAME, SD3_NAME, T5XXL_NAME, VAE16_NAME

CKPT, POSITIVE, NEGATIVE, EMPTY_LATENT, KSAMPLER, VAE_DECODE, SAVE_IMAGE, SAVE_LATENT = (
    "1", "2", "3", "4", "5", "6", "7", "8")


def stock_t2i_prompt(ckpt, seed, steps=2, size=64, prefix="harness", positive="a photo of a cat",
                     negative="blurry", cfg=7.0, sampler_name="euler", scheduler="normal", save_latent=True):
    """CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage,
    plus SaveLatent of the KSampler output (written to output/latents/<prefix>_NNNNN_.latent)."""
    p = {
        CKPT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        POSITIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": positive, "clip": [CKPT, 1]}},
        NEGATIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": [CKPT, 1]}},
        EMPTY_LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        KSAMPLER: {"class_type": "KSampler", "inputs": {
            "model": [CKPT, 0], "positive": [POSITIVE, 0], "negative": [NEGATIVE, 0],
            "latent_image": [EMPTY_LATENT, 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler_name, "scheduler": scheduler, "denoise": 1.0}},
        VAE_DECODE: {"class_type": "VAEDecode", "inputs": {"samples": [KSAMPLER, 0], "vae": [CKPT, 2]}},
        SAVE_IMAGE: {"class_type": "SaveImage", "inputs": {"images": [VAE_DECODE, 0], "filename_prefix": prefix}},
    }
    if save_latent:
        p[SAVE_LATENT] = {"class_type": "SaveLatent",
                          "inputs": {"samples": [KSAMPLER, 0], "filename_prefix": "latents/" + prefix}}
    return p


def insert_model_node(prompt, node_id, class_type, inputs, model_input="model", model_output=0):
    """Return a copy of ``prompt`` with a MODEL -> MODEL node put between the checkpoint loader and the KSampler.

    ``inputs`` are the node's other inputs; its ``model_input`` is wired to whatever fed the KSampler's model.
    """
    p = copy.deepcopy(prompt)
    p[node_id] = {"class_type": class_type, "inputs": dict(inputs, **{model_input: p[KSAMPLER]["inputs"]["model"]})}
    p[KSAMPLER]["inputs"]["model"] = [node_id, model_output]
    return p


WORKFLOWS = Path(__file__).resolve().parent.parent.parent / "workflows"

# The diffusion-transformer workflows are named <technique>_<family>; TINY_DIT_MODELS points each family's loaders at
# the random test files (make_checkpoints.DIT_NAMES) in place of the real models named in the workflow files.
TINY_DIT_MODELS = {
    "sd35": {"CheckpointLoaderSimple": {"ckpt_name": SD3_NAME}},
    "flux": {"UNETLoader": {"unet_name": FLUX_NAME, "weight_dtype": "default"},
             "DualCLIPLoader": {"clip_name1": CLIP_L_NAME, "clip_name2": T5XXL_NAME, "type": "flux"},
             "VAELoader": {"vae_name": VAE16_NAME}},
}
DIT_FAMILIES = tuple(TINY_DIT_MODELS)


def dit_family(workflow_name):
    """The DiT family a workflow file is for ('sd35', 'flux'), or None for the UNet (SD1.x / SDXL) workflows."""
    suffix = workflow_name.rsplit("_", 1)[-1]
    return suffix if suffix in DIT_FAMILIES else None


def workflow_prompt(name, ckpt, *, size=64, steps=2, train_steps=3, residual_name=None, save_name=None,
                    concepts_name=None, **node_inputs):
    """workflows/api/<name>.json shrunk for a CPU test: the given checkpoint, ``size`` px, few steps.

    ``ckpt`` replaces CheckpointLoaderSimple's file; a DiT workflow (``dit_family(name)``) instead gets every loader
    pointed at the tiny random files (``TINY_DIT_MODELS``), and ``ckpt`` may be None.
    ``node_inputs`` maps a class_type to extra input values, e.g. ``ConceptsApplyResidualsLocalized={"strength": 0}``.
    """
    import json

    p = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    family = dit_family(name)
    models = TINY_DIT_MODELS[family] if family else {}
    for node in p.values():
        ins, kind = node["inputs"], node["class_type"]
        if kind in models:
            ins.update(models[kind])
        elif kind == "CheckpointLoaderSimple":
            ins["ckpt_name"] = ckpt
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            ins.update(width=size, height=size)
        elif kind == "KSampler":
            ins["steps"] = steps
        elif kind == "ConceptsTrainResiduals":
            ins.update(steps=train_steps, resolution=size, views=1, batch_size=2)
        elif kind == "ConceptsTrainTogether":
            ins.update(steps=train_steps, resolution=size, views=1, batch_size=2, max_pairs=2)
        elif kind == "ConceptsLearnConcepts":
            ins.update(handle_steps=train_steps, joint_steps=train_steps, resolution=size, views=1, batch_size=1)
        elif kind in ("ConceptsTrainSlider", "ConceptsTrainEsd"):
            ins.update(steps=train_steps, resolution=size, batch_size=1)
        elif kind == "ConceptsTrainCustomDiffusion":
            ins.update(steps=train_steps, resolution=size, views=1, batch_size=1)
        elif kind == "ConceptsFreeCustom":
            ins.update(resolution=size)
        elif kind == "ConceptsSaveConcepts":  # a fresh file per run: saving never meets an existing one
            ins["save_name"] = f"tests/concepts_{uuid.uuid4().hex[:8]}"
        elif kind == "ConceptsLoadConcepts" and concepts_name is not None:
            ins["concepts_name"] = concepts_name
        elif kind == "ConceptsSaveResiduals" and save_name is not None:
            ins["save_name"] = save_name
        elif kind == "ConceptsLoadResiduals" and residual_name is not None:
            ins["residual_name"] = residual_name
        elif kind == "ConceptsRegion" and residual_name is not None and ins.get("lora_name", "none") != "none":
            ins["lora_name"] = residual_name
        elif kind == "SolidMask":
            ins.update(width=size * ins["width"] // 512, height=size * ins["height"] // 512)
        elif kind == "MaskComposite":
            ins.update(x=size * ins["x"] // 512, y=size * ins["y"] // 512)
        ins.update(node_inputs.get(kind, {}))
    if save_name == "":  # no file wanted: drop the Save Residuals node
        p = {k: v for k, v in p.items() if v["class_type"] != "ConceptsSaveResiduals"}
    return p


def node_id(prompt, class_type):
    """The id of the only node of ``class_type`` in ``prompt``."""
    ids = [k for k, v in prompt.items() if v["class_type"] == class_type]
    assert len(ids) == 1, f"{class_type}: {ids}"
    return ids[0]
