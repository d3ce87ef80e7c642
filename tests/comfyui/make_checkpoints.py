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
"""
import argparse
import contextlib
import os
import sys
import time

SD15_NAME = "tiny_sd15_random.safetensors"
SDXL_NAME = "tiny_sdxl_random.safetensors"
FULL_SD15_NAME = "full_sd15_random.safetensors"  # the real SD1.5 UNet layout (860M params), for benchmarks only
ALL_NAMES = (SD15_NAME, SDXL_NAME)

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


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI work tree (default $COMFYUI_PATH)")
    ap.add_argument("--out-dir", default=os.environ.get("COMFYUI_CONCEPTS_CACHE",
                                                        os.path.expanduser("~/.cache/comfyui-concepts")))
    ap.add_argument("--only", action="append", choices=tuple(KINDS), help="build only this file (repeatable)")
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


def build_one(name, out_dir, seed):
    import safetensors.torch
    import torch

    kind, unet_cfg = KINDS[name]
    t0 = time.time()
    torch.manual_seed(seed)
    sd = build_state_dict(kind, unet_cfg)
    detected = check_detection(sd, kind, unet_cfg)
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
    names = a.only or list(ALL_NAMES)
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
