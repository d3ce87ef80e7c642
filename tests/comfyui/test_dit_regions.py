"""Apply Regions on SD3 and Flux in a real ComfyUI, in-process (a subprocess in ComfyUI's own Python).

Random conditioning stands in for the text encoders, so no T5 runs. For each LoRA key format users download (kohya
``lora_unet_*``, diffusers / PEFT ``transformer.*`` with to_q / to_k / to_v slices of the fused qkv, ComfyUI's own
``diffusion_model.*``), a random LoRA on every layer ComfyUI's key map names in that format:
- Apply Regions with one region covering the image (text_layers "everywhere") samples the latent the stock loader
  (what LoraLoaderModelOnly calls) gives, to float32 rounding (forward-time W x + Delta W x against merged weights);
- an empty-mask region is the base model exactly; two regions on the two halves sample a finite latent;
- an SD1.5 LoRA on the DiT is refused naming both families.
"""

import pytest

from . import harness
from .make_checkpoints import FLUX_NAME, SD3_NAME

pytestmark = pytest.mark.dit

FORMATS = {"kohya": "lora_unet_", "diffusers": "transformer.", "comfyui": "diffusion_model."}

SCRIPT = """
    import comfy.lora, comfy.sample, comfy.sd, comfy.utils
    from safetensors.torch import save_file
    from comfyui_concepts.core import lora_files as L
    from comfyui_concepts.core.patching.comfy import apply_regions, model_family
    from comfyui_concepts.core.regions import Region
    from comfyui_concepts.nodes.compose.regions import lora_region_layers

    family, path, out_dir, formats = {family!r}, {path!r}, {out_dir!r}, {formats!r}
    folder_paths.add_model_folder_path("loras", out_dir)
    if family == "flux":
        model = comfy.sd.load_diffusion_model(path)
    else:
        model = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=False)[0]
    flux = family == "flux"
    gen = torch.Generator().manual_seed(0)
    context = torch.randn(1, 256 if flux else 154, 4096, generator=gen) * 0.5
    pooled = torch.randn(1, 768 if flux else 2048, generator=gen) * 0.5
    cond = [[context, {{"pooled_output": pooled}}]]
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    cfg = 1.0 if flux else 4.5

    def sample(m):
        return comfy.sample.sample(m, noise, 2, cfg, "euler", "simple", cond, cond, latent, seed=0, disable_pbar=True)

    weights = dict(model.model.diffusion_model.named_parameters())
    key_map = comfy.lora.model_lora_keys_unet(model.model, {{}})

    def random_lora(prefix, seed, rank=4, scale=0.05):
        g = torch.Generator().manual_seed(seed)
        sd, seen = {{}}, set()
        for stem, target in sorted(key_map.items()):
            name, piece = (target, None) if isinstance(target, str) else target[:2]
            offset, size = (0, None) if piece is None else piece[1:3]
            if not stem.startswith(prefix) or (name, offset) in seen or name[len("diffusion_model."):] not in weights:
                continue
            w = weights[name[len("diffusion_model."):]]
            if w.dim() != 2:
                continue
            seen.add((name, offset))
            out = size or w.shape[0]
            sd[stem + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * scale
            sd[stem + ".lora_up.weight"] = torch.randn(out, rank, generator=g) * scale
            sd[stem + ".alpha"] = torch.tensor(float(rank))
        return sd

    res = {{"family": model_family(model)}}
    base = sample(model)
    layers = {{}}
    for i, (fmt, prefix) in enumerate(formats.items()):
        sd = random_lora(prefix, i)
        save_file(sd, out_dir + f"/{{fmt}}.safetensors")
        stock = sample(comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)[0])
        layers[fmt] = lora_region_layers(model, f"{{fmt}}.safetensors")
        full = Region(layers[fmt], 1.0, mask=torch.ones(64, 64), name=fmt)
        regions = sample(apply_regions(model, [full], None, text_layers="everywhere"))
        res[fmt] = {{"keys": len(sd) // 3, "layers": len(layers[fmt]),
                     "stock_vs_base": (stock - base).abs().max().item(),
                     "regions_vs_stock": (regions - stock).abs().max().item(),
                     "scale": stock.abs().max().item()}}
    empty = Region(layers["kohya"], 1.0, mask=torch.zeros(64, 64))
    res["empty_equal"] = torch.equal(sample(apply_regions(model, [empty], None)), base)
    left = torch.zeros(64, 64)
    left[:, :32] = 1
    two = sample(apply_regions(model, [Region(layers["kohya"], 1.0, mask=left, name="A"),
                                       Region(layers["diffusers"], 1.0, mask=1 - left, name="B")], None))
    res["two_finite"] = bool(torch.isfinite(two).all())
    res["two_vs_base"] = (two - base).abs().max().item()
    res["plain_after_equal"] = torch.equal(sample(model), base)
    sd1 = {{"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight":
           torch.zeros(4, 768),
           "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": torch.zeros(320, 4)}}
    save_file(sd1, out_dir + "/sd15.safetensors")
    try:
        lora_region_layers(model, "sd15.safetensors")
        res["sd15_error"] = ""
    except L.LoraFileError as e:
        res["sd15_error"] = str(e)
    print("RESULT " + json.dumps(res))
"""


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_dit_regions_match_the_stock_loader_in_every_key_format(dit_checkpoints, family, tmp_path):
    path = str(dit_checkpoints[SD3_NAME if family == "sd3" else FLUX_NAME])
    res = harness.run_in_process(SCRIPT, family=family, path=path, out_dir=str(tmp_path), formats=FORMATS)
    label = {"sd3": "SD3", "flux": "Flux"}[family]
    assert res["family"] == label
    for fmt in FORMATS:
        r = res[fmt]
        assert r["keys"] >= 10 and r["layers"] >= 10, r  # the LoRA covers many layers in this format
        assert r["stock_vs_base"] > 1e-2, r  # the LoRA changes the latent: the identity below can fail
        assert r["regions_vs_stock"] <= 1e-4 * max(1.0, r["scale"]), (fmt, r)
    assert res["empty_equal"] and res["plain_after_equal"]
    assert res["two_finite"] and res["two_vs_base"] > 1e-2
    assert "Stable Diffusion 1.x (SD1)" in res["sd15_error"] and "sd15.safetensors" in res["sd15_error"]
