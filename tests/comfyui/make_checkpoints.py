#!/usr/bin/env python3
"""Build the random-weight test checkpoints that the real-ComfyUI tests load.

Run it with the Python of the ComfyUI install (it imports ComfyUI's own model classes):

    $COMFYUI_PYTHON tests/comfyui/make_checkpoints.py --comfy $COMFYUI_PATH --out-dir ~/.cache/comfyui-concepts

Files (each skipped when it already exists; written to a temp file, then renamed):

* ``tiny_sd15_random.safetensors`` (~289 MiB fp16): a one-level UNet with 320 channels and attention in input block 1,
  the middle block and output blocks 0-1; the full 12-layer CLIP-L (ComfyUI always builds the full CLIP-L, so missing
  layers would stay uninitialised); a TAESD-layout VAE (~2.4 M params), which ``comfy.sd.VAE`` recognises.
* ``tiny_sdxl_random.safetensors`` (~1.8 GiB fp16): one level of 6 res blocks carrying 0,0,2,2,10,10 transformer
  blocks (SDXL detection compares that list literally), no middle block; full CLIP-L + CLIP-G; TAESD-layout VAE.

Before writing, the state dict goes through ComfyUI's own detection (``comfy.model_detection``), and the script
asserts that ComfyUI sees SD15 / SDXL respectively.  Every parameter is first filled with NaN and then initialised
through torch's own ``reset_parameters`` (ComfyUI's ops make that a no-op), and the script asserts that no NaN is left.

Diffusion-transformer files (``DIT_NAMES``; not built by default: 7.4 GiB in all, ~100 s and 7.2 GB peak memory
on 2 cores; built with ``--dit`` or ``--only NAME``).  ``MODEL_FOLDER`` names the ComfyUI models/ folder of each:

* ``tiny_sd3_random.safetensors`` (checkpoints/, ~1.5 GiB fp16): CheckpointLoaderSimple's all-in-one SD3.5 layout.
  An MMDiT of depth 2 (hidden 128 = 64 x depth, 2 heads), RMS QK-norm and an image-only ``attn2`` in block 0 (SD3.5
  medium's MMDiT-X), SD3's 192x192 position grid (3.5 medium has 384x384; the grid only bounds the image size);
  the full CLIP-L + CLIP-G (fixed shapes in ComfyUI) and a
  16-channel TAESD-layout VAE.  No T5: ComfyUI's SD3 text encoder runs without it (CLIP context only).
* ``tiny_flux_random.safetensors`` (diffusion_models/, ~1.0 GiB bf16, for UNETLoader): Flux.1 dev (guidance
  embedding) with 1 double + 1 single block at the width detection fixes (3072, 24 heads): 545.5 M parameters.
* ``clip_l_random.safetensors`` (text_encoders/, ~236 MiB fp16): the full CLIP-L, as a standalone text-encoder file.
* ``t5xxl_random_fp8_scaled.safetensors`` (text_encoders/, ~4.6 GiB): T5-XXL at its full fixed shape (ComfyUI reads
  no T5 size from the file, so a smaller one would leave layers uninitialised), in ComfyUI's scaled-fp8 format:
  fp8 weights of std 1 with a per-layer ``scale_weight`` that gives each layer its init scale.  Its tensors are made
  one by one from the key list of ComfyUI's own T5 class built on the meta device (a float32 build would need 19 GB).
* ``tiny_vae16_random.safetensors`` (vae/, ~4.7 MiB): a 16-channel TAESD-layout VAE (SD3 and Flux latents) that
  ``VAELoader`` accepts by file name.

Flux takes CLIP-L + T5 through ``DualCLIPLoader`` (type flux), the Flux file through ``UNETLoader`` and the VAE
through ``VAELoader``, as Flux users load the real files.
"""
import argparse
import contextlib
import copy
import os
import sys
import time

SD15_NAME = "tiny_sd15_random.safetensors"
SDXL_NAME = "tiny_sdxl_random.safetensors"
FULL_SD15_NAME = "full_sd15_random.safetensors"  # the real SD1.5 UNet layout (860M params), for benchmarks only
ALL_NAMES = (SD15_NAME, SDXL_NAME)

SD3_NAME = "tiny_sd3_random.safetensors"
FLUX_NAME = "tiny_flux_random.safetensors"
CLIP_L_NAME = "clip_l_random.safetensors"
T5XXL_NAME = "t5xxl_random_fp8_scaled.safetensors"
VAE16_NAME = "tiny_vae16_random.safetensors"
DIT_NAMES = (SD3_NAME, FLUX_NAME, CLIP_L_NAME, T5XXL_NAME, VAE16_NAME)
# The ComfyUI models/ folder each file is loaded from (checkpoints/ for everything else).
MODEL_FOLDER = {FLUX_NAME: "diffusion_models", CLIP_L_NAME: "text_encoders", T5XXL_NAME: "text_encoders",
                VAE16_NAME: "vae"}

COMMON_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
SD15_UNET = dict(
    COMMON_UNET, adm_in_channels=None, use_linear_in_transformer=False, context_dim=768,
    channel_mult=[1], num_res_blocks=[1], transformer_depth=[1], transformer_depth_output=[1, 1],
    transformer_depth_middle=1,
)
SDXL_UNET = dict(
    COMMON_UNET, num_classes="sequential", adm_in_channels=2816, use_linear_in_transformer=True, context_dim=2048,
    channel_mult=[1], num_res_blocks=[6], transformer_depth=[0, 0, 2, 2, 10, 10], transformer_depth_output=[0] * 7,
    transformer_depth_middle=-2,
)
FULL_SD15_UNET = dict(
    COMMON_UNET, adm_in_channels=None, use_linear_in_transformer=False, context_dim=768,
    channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
    transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
)
KINDS = {SD15_NAME: ("sd15", SD15_UNET), SDXL_NAME: ("sdxl", SDXL_UNET), FULL_SD15_NAME: ("sd15", FULL_SD15_UNET)}

# What comfy.model_detection.detect_unet_config reads back from the files (checked before writing).
SD3_MMDIT = {  # hidden size and heads follow from depth (64 x depth, depth heads)
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None, "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 128}},
    "num_patches": 192 * 192, "pos_embed_max_size": 192, "qk_norm": "rms", "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [0],
}
FLUX_DIT = {  # width, heads, context and axes are fixed by detection; the block counts are counted
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
    "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI work tree (default $COMFYUI_PATH)")
    ap.add_argument("--out-dir", default=os.environ.get("COMFYUI_CONCEPTS_CACHE",
                                                        os.path.expanduser("~/.cache/comfyui-concepts")))
    ap.add_argument("--only", action="append", choices=tuple(KINDS) + DIT_NAMES,
                    help="build only this file (repeatable)")
    ap.add_argument("--dit", action="store_true", help="build the diffusion-transformer files (DIT_NAMES)")
    ap.add_argument("--force", action="store_true", help="rebuild even if the file exists")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if not a.comfy or not os.path.isfile(os.path.join(a.comfy, "main.py")):
        ap.error("--comfy (or $COMFYUI_PATH) must be a ComfyUI work tree containing main.py")
    return a


@contextlib.contextmanager
def build_lock(out_dir):
    """Serialise concurrent builders (e.g. pytest-xdist workers) on one cache directory."""
    path = os.path.join(out_dir, ".build.lock")
    with open(path, "a") as fh:
        try:
            import fcntl
        except ImportError:  # Windows: no lock; the atomic rename still keeps files whole
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def import_comfy(comfy_path):
    sys.argv = sys.argv[:1]  # ComfyUI's argument parser must not see ours
    sys.path.insert(0, os.path.abspath(comfy_path))
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = True  # like --cpu: never probe for a GPU while building


def init_random(root):
    """Give every parameter of ``root`` a finite random value (ComfyUI's ops skip weight initialisation)."""
    import torch

    with torch.no_grad():
        for p in root.parameters():
            p.fill_(float("nan"))
        for m in root.modules():
            if isinstance(m, torch.nn.Embedding):
                torch.nn.init.normal_(m.weight, std=0.02)
            elif isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
                torch_cls = next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))
                torch_cls.reset_parameters(m)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                if m.bias is not None:
                    m.bias.zero_()
            elif type(m).__name__.endswith("RMSNorm"):  # the DiTs' own RMS norms: gain 1 ("weight" or "scale")
                for gain in (getattr(m, "weight", None), getattr(m, "scale", None)):
                    if isinstance(gain, torch.nn.Parameter):
                        gain.fill_(1.0)
        for name, p in root.named_parameters():  # bare nn.Parameters
            if torch.isnan(p).any():
                if name.endswith("logit_scale"):
                    p.fill_(4.6055)
                elif name.endswith("vae_scale"):
                    p.fill_(1.0)
                elif name.endswith("vae_shift"):
                    p.zero_()
                else:
                    torch.nn.init.normal_(p, std=0.02)
        left = [n for n, p in root.named_parameters() if torch.isnan(p).any()]
        assert not left, f"parameters left uninitialised: {left[:5]}"


def build_state_dict(kind, unet_cfg):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.taesd.taesd
    import torch

    if kind == "sd15":
        model_config = comfy.supported_models.SD15(dict(unet_cfg))
        clip_model = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    else:
        model_config = comfy.supported_models.SDXL(dict(unet_cfg))
        clip_model = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float32)
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({}, "model.diffusion_model.", device=torch.device("cpu"))
    init_random(base_model.diffusion_model)
    init_random(clip_model)
    vae_model = comfy.taesd.taesd.TAESD(latent_channels=4)
    init_random(vae_model)
    # ComfyUI's own saving path adds the checkpoint prefixes (and converts CLIP-G to the OpenCLIP layout for SDXL).
    sd = base_model.state_dict_for_saving(clip_state_dict=clip_model.state_dict(),
                                          vae_state_dict=vae_model.state_dict())
    return {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous()
            for k, v in sd.items()}


def check_detection(sd, kind, want_cfg):
    import comfy.model_detection
    import comfy.supported_models

    want_cls = comfy.supported_models.SD15 if kind == "sd15" else comfy.supported_models.SDXL
    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    assert prefix == "model.diffusion_model.", prefix
    detected = comfy.model_detection.detect_unet_config(sd, prefix)
    model_config = comfy.model_detection.model_config_from_unet_config(detected, sd)
    got = type(model_config).__name__
    assert type(model_config) is want_cls, f"ComfyUI detects {kind} as {got}, expected {want_cls.__name__}"
    for k, v in want_cfg.items():
        assert detected.get(k) == v, (k, detected.get(k), v)
    if kind == "sdxl":
        for k in ("conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
                  "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight",
                  "conditioner.embedders.1.model.text_projection", "model.diffusion_model.label_emb.0.0.weight"):
            assert k in sd, k
    assert "first_stage_model.taesd_decoder.1.weight" in sd
    return type(model_config).__name__


def to_dtype(sd, dtype):
    """Floating tensors cast to ``dtype``, every tensor detached and contiguous (what safetensors writes)."""
    return {k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous() for k, v in sd.items()}


def build_sd3_checkpoint():
    """All-in-one SD3.5-style checkpoint: MMDiT + CLIP-L + CLIP-G + 16-channel TAESD, keyed as ComfyUI saves SD3."""
    import comfy.ldm.modules.diffusionmodules.mmdit as mmdit
    import comfy.supported_models
    import comfy.taesd.taesd
    import comfy.text_encoders.sd3_clip
    import torch

    model_config = comfy.supported_models.SD3(copy.deepcopy(SD3_MMDIT))
    model_config.set_inference_dtype(torch.float32, None)
    base_model = model_config.get_model({}, "model.diffusion_model.", device=torch.device("cpu"))
    dit = base_model.diffusion_model
    init_random(dit)
    with torch.no_grad():  # a buffer, so init_random does not reach it; SD3 ships a fixed 2-D sin-cos table here
        table = mmdit.get_2d_sincos_pos_embed(dit.hidden_size, SD3_MMDIT["pos_embed_max_size"])
        dit.pos_embed.copy_(torch.from_numpy(table).reshape(dit.pos_embed.shape))
    clip_model = comfy.text_encoders.sd3_clip.SD3ClipModel(clip_l=True, clip_g=True, t5=False, device="cpu",
                                                           dtype=torch.float32)
    init_random(clip_model)
    vae_model = comfy.taesd.taesd.TAESD(latent_channels=16)
    init_random(vae_model)
    sd = base_model.state_dict_for_saving(clip_state_dict=clip_model.state_dict(),
                                          vae_state_dict=vae_model.state_dict())
    return to_dtype(sd, torch.float16)


def check_sd3_checkpoint(sd):
    import comfy.model_detection
    import comfy.supported_models

    prefix = comfy.model_detection.unet_prefix_from_state_dict(sd)
    assert prefix == "model.diffusion_model.", prefix
    detected = comfy.model_detection.detect_unet_config(sd, prefix)
    model_config = comfy.model_detection.model_config_from_unet_config(detected, sd)
    assert type(model_config) is comfy.supported_models.SD3, f"ComfyUI detects {type(model_config).__name__}"
    for k, v in SD3_MMDIT.items():
        assert detected.get(k) == v, (k, detected.get(k), v)
    # what SD3.clip_target looks for: CLIP-L and CLIP-G, and no T5 (its encoder then runs without one)
    for enc in ("clip_l", "clip_g"):
        assert f"text_encoders.{enc}.transformer.text_model.final_layer_norm.weight" in sd, enc
    assert not any(k.startswith("text_encoders.t5xxl.") for k in sd)
    assert sd["first_stage_model.taesd_decoder.1.weight"].shape[1] == 16
    return "SD3"


def build_flux_unet():
    """Flux.1 dev diffusion model, bare keys as UNETLoader reads them; built and saved in bf16 like the real file."""
    import comfy.supported_models
    import torch

    model_config = comfy.supported_models.Flux(copy.deepcopy(FLUX_DIT))
    model_config.set_inference_dtype(torch.bfloat16, None)  # bf16 from the start: half the memory of fp32
    base_model = model_config.get_model({}, "", device=torch.device("cpu"))
    init_random(base_model.diffusion_model)
    return to_dtype(base_model.diffusion_model.state_dict(), torch.bfloat16)


def check_flux_unet(sd):
    import comfy.model_detection
    import comfy.supported_models

    detected = comfy.model_detection.detect_unet_config(sd, "")
    model_config = comfy.model_detection.model_config_from_unet(sd, "")  # what load_diffusion_model does
    assert type(model_config) is comfy.supported_models.Flux, f"ComfyUI detects {type(model_config).__name__}"
    for k, v in FLUX_DIT.items():
        assert detected.get(k) == v, (k, detected.get(k), v)
    return "Flux"


def build_clip_l():
    """The full CLIP-L with the keys a standalone text-encoder file has (``text_model.*``, ``text_projection``)."""
    import comfy.sd1_clip
    import torch

    clip_model = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    init_random(clip_model)
    return to_dtype(clip_model.transformer.state_dict(), torch.float16)


def check_clip_l(sd):
    import comfy.sd

    assert comfy.sd.detect_te_model(sd) is comfy.sd.TEModel.CLIP_L
    return "CLIP_L"


def _t5xxl_skeleton():
    """ComfyUI's own T5-XXL as DualCLIPLoader builds it for a scaled-fp8 file, on the meta device (no memory)."""
    import comfy.text_encoders.sd3_clip
    import torch

    return comfy.text_encoders.sd3_clip.T5XXLModel(device="meta", dtype=torch.float16,
                                                   model_options={"t5xxl_scaled_fp8": torch.float8_e4m3fn})


def build_t5xxl_fp8(seed):
    """Every tensor of the skeleton's state dict, made one at a time (peak ~ the file size, not a 19 GB fp32 model).

    Linear weights are N(0, 1) in fp8 (well inside e4m3's range, no subnormals) and their ``scale_weight`` carries
    the init scale 1/sqrt(fan_in); q gets another 1/sqrt(head dim) because T5 attention has no 1/sqrt(d) of its own.
    Embeddings are N(0, 1), the relative position bias small, the RMS norms' gains 1.
    """
    import torch

    skeleton = _t5xxl_skeleton().transformer
    modules = dict(skeleton.named_modules())
    attention = skeleton.encoder.block[0].layer[0].SelfAttention
    head_dim = attention.q.out_features // attention.num_heads
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, meta in skeleton.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        module = modules.get(owner)
        if key == "scaled_fp8":  # the marker ComfyUI's T5 detection reads (an empty fp8 tensor)
            sd[key] = torch.empty(meta.shape, dtype=meta.dtype)
        elif isinstance(module, torch.nn.Linear) and leaf == "weight":
            sd[key] = torch.randn(meta.shape, generator=gen).to(meta.dtype)
        elif isinstance(module, torch.nn.Linear) and leaf == "scale_weight":
            std = module.in_features ** -0.5 * (head_dim ** -0.5 if owner.endswith("SelfAttention.q") else 1.0)
            sd[key] = torch.full(meta.shape, std, dtype=meta.dtype)
        elif isinstance(module, torch.nn.Embedding) and "relative_attention_bias" in owner:
            sd[key] = (torch.randn(meta.shape, generator=gen) * 0.1).to(meta.dtype)
        elif isinstance(module, torch.nn.Embedding):
            sd[key] = torch.randn(meta.shape, generator=gen).to(meta.dtype)
        elif type(module).__name__.endswith("LayerNorm") and leaf == "weight":
            sd[key] = torch.ones(meta.shape, dtype=meta.dtype)
        else:
            raise AssertionError(f"no init rule for T5 tensor {key} ({type(module).__name__})")
    return sd


def check_t5xxl_fp8(sd):
    import comfy.sd
    import comfy.text_encoders.sd3_clip
    import torch

    assert comfy.sd.detect_te_model(sd) is comfy.sd.TEModel.T5_XXL
    assert comfy.text_encoders.sd3_clip.t5_xxl_detect(sd) == {"dtype_t5": torch.float16,
                                                              "t5xxl_scaled_fp8": torch.float8_e4m3fn}
    want = {k: (tuple(v.shape), v.dtype) for k, v in _t5xxl_skeleton().transformer.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in sd.items()} == want, "T5 keys differ from ComfyUI's T5-XXL"
    return "T5_XXL scaled fp8"


def build_vae16():
    """A 16-channel TAESD (SD3 / Flux latents) with the keys comfy.sd.VAE recognises."""
    import comfy.taesd.taesd
    import torch

    vae_model = comfy.taesd.taesd.TAESD(latent_channels=16)
    init_random(vae_model)
    return to_dtype(vae_model.state_dict(), torch.float16)


def check_vae16(sd):
    import comfy.sd

    vae = comfy.sd.VAE(sd=dict(sd))  # tiny: the real loader, as VAELoader calls it
    assert vae.latent_channels == 16, vae.latent_channels
    return "TAESD, 16 latent channels"


def check_finite(sd):
    import torch

    bad = [k for k, v in sd.items() if v.is_floating_point() and v.numel() and not torch.isfinite(v.float()).all()]
    assert not bad, f"non-finite values in {bad[:5]}"


def build_dit(name, seed):
    """(state dict, what ComfyUI detects, metadata kind) of one diffusion-transformer file."""
    import torch

    torch.manual_seed(seed)
    if name == SD3_NAME:
        sd = build_sd3_checkpoint()
        return sd, check_sd3_checkpoint(sd), "sd3"
    if name == FLUX_NAME:
        sd = build_flux_unet()
        return sd, check_flux_unet(sd), "flux"
    if name == CLIP_L_NAME:
        sd = build_clip_l()
        return sd, check_clip_l(sd), "clip_l"
    if name == T5XXL_NAME:
        sd = build_t5xxl_fp8(seed)
        return sd, check_t5xxl_fp8(sd), "t5xxl"
    if name == VAE16_NAME:
        sd = build_vae16()
        return sd, check_vae16(sd), "vae16"
    raise ValueError(name)


def build_one(name, out_dir, seed):
    import safetensors.torch
    import torch

    t0 = time.time()
    if name in DIT_NAMES:
        sd, detected, kind = build_dit(name, seed)
    else:
        kind, unet_cfg = KINDS[name]
        torch.manual_seed(seed)
        sd = build_state_dict(kind, unet_cfg)
        detected = check_detection(sd, kind, unet_cfg)
    check_finite(sd)
    final = os.path.join(out_dir, name)
    tmp = f"{final}.tmp-{os.getpid()}"
    try:
        safetensors.torch.save_file(sd, tmp, metadata={"note": "random weights for comfyui-concepts tests",
                                                       "kind": kind, "seed": str(seed)})
        os.replace(tmp, final)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    print(f"built {final} ({os.path.getsize(final)} bytes, detected {detected}) in {time.time() - t0:.1f}s", flush=True)


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    names = a.only or (list(DIT_NAMES) if a.dit else list(ALL_NAMES))
    with build_lock(a.out_dir):
        todo = [n for n in names if a.force or not os.path.exists(os.path.join(a.out_dir, n))]
        for n in names:
            if n not in todo:
                print("exists:", os.path.join(a.out_dir, n), flush=True)
        if not todo:
            return 0
        import_comfy(a.comfy)
        for n in todo:
            build_one(n, a.out_dir, a.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
