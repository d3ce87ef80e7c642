"""API-format prompts (what POST /prompt runs) for the real-ComfyUI tests.

Node ids of the stock text-to-image prompt, so tests can splice nodes in (see ``insert_model_node``).
"""
import copy

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
