"""Compose in a real ComfyUI: regions of learned residuals and LoRA files in one pass, against ComfyUI's own."""
import copy
import uuid

import pytest
import torch

from . import harness
from .prompts import (
    CKPT,
    EMPTY_LATENT,
    KSAMPLER,
    NEGATIVE,
    POSITIVE,
    SAVE_LATENT,
    insert_model_node,
    node_id,
    stock_t2i_prompt,
    workflow_prompt,
)
from .test_learn_localize import train

SD15, SDXL = harness.SD15_CKPT, harness.SDXL_CKPT
TEXT = "a photo of a sks toy and a cat on the beach"


@pytest.fixture(scope="module")
def sd15_lora(comfy_server):
    return train(comfy_server, SD15, "tests/compose_sd15")[0]


@pytest.fixture(scope="module")
def sdxl_lora(comfy_server):
    return train(comfy_server, SDXL, "tests/compose_sdxl")[0]


def latent(server, prompt):
    return server.read_latent(harness.output_refs(server.run(prompt), "latents")[0])


def with_regions(base, regions, text=TEXT, overlap="argmax", prefix="reg"):
    """``base`` with Apply Regions between the checkpoint and the KSampler; ``regions``: Concept Region inputs."""
    p = insert_model_node(base, "40", "ConceptsApplyRegions", {
        "clip": [CKPT, 1], "regions": ["50", 0], "text": text, "overlap": overlap, "mask_rule": "median"})
    p[KSAMPLER]["inputs"]["positive"] = ["40", 1]
    prev = None
    for i, inputs in enumerate(regions):
        nid = str(50 + i) if i == 0 else str(60 + i)
        ins = dict({"strength": 1.0, "words": "", "lora_name": "none"}, **inputs)
        if prev:
            ins["regions"] = [prev, 0]
        p[nid] = {"class_type": "ConceptsRegion", "inputs": ins}
        prev = nid
    p["40"]["inputs"]["regions"] = [prev, 0]
    p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/{prefix}"
    return p


def solid(value, size=64):
    return {"class_type": "SolidMask", "inputs": {"value": value, "width": size, "height": size}}


def test_a_full_mask_lora_region_matches_loraloader_and_comfys_hooked_lora(comfy_server, sd15_lora):
    base = stock_t2i_prompt(SD15, seed=21, positive=TEXT, prefix="full_base")
    ours = with_regions(base, [{"lora_name": sd15_lora, "strength": 0.8, "mask": ["70", 0]}], prefix="full_ours")
    ours["70"] = solid(1.0)
    stock = insert_model_node(base, "20", "LoraLoaderModelOnly", {"lora_name": sd15_lora, "strength_model": 0.8})
    stock[SAVE_LATENT]["inputs"]["filename_prefix"] = "latents/full_stock"
    hooked = stock_t2i_prompt(SD15, seed=21, positive=TEXT, prefix="full_hooked")
    hooked["80"] = {"class_type": "CreateHookLora", "inputs": {"lora_name": sd15_lora, "strength_model": 0.8,
                                                                "strength_clip": 0.0}}
    hooked["81"] = solid(1.0)
    hooked["82"] = {"class_type": "PairConditioningSetProperties", "inputs": {
        "positive_NEW": [POSITIVE, 0], "negative_NEW": [NEGATIVE, 0], "strength": 1.0, "set_cond_area": "default",
        "mask": ["81", 0], "hooks": ["80", 0]}}
    hooked[KSAMPLER]["inputs"].update(positive=["82", 0], negative=["82", 1])
    lat = {k: latent(comfy_server, p) for k, p in (("base", base), ("ours", ours), ("stock", stock),
                                                    ("hooked", hooked))}
    scale = float(lat["base"].abs().max())
    assert not torch.allclose(lat["ours"], lat["base"], atol=1e-3 * scale)
    for other in ("stock", "hooked"):  # forward-time W x + dW x against merged (W + dW) x: rounding only
        assert torch.allclose(lat["ours"], lat[other], atol=1e-4 * scale, rtol=1e-4), other


def test_strength_zero_region_is_the_base_latent_exactly(comfy_server, sd15_lora):
    base = stock_t2i_prompt(SD15, seed=22, positive=TEXT, prefix="zero_base")
    ours = with_regions(base, [{"lora_name": sd15_lora, "strength": 0.0, "words": "cat"},
                               {"residuals": ["71", 0], "strength": 0.0, "mask": ["70", 0]}], prefix="zero_ours")
    ours["70"] = solid(1.0)
    ours["71"] = {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": sd15_lora}}
    assert latent(comfy_server, base).equal(latent(comfy_server, ours))


def test_word_and_mask_regions_with_sampler_custom_advanced_on_sdxl(comfy_server, sdxl_lora):
    p = with_regions(stock_t2i_prompt(SDXL, seed=3, positive=TEXT, prefix="sca"),
                     [{"residuals": ["71", 0]}, {"lora_name": sdxl_lora, "strength": 0.5, "mask": ["70", 0]}])
    p["70"] = solid(1.0, 32)  # another size than the latent: resized
    p["71"] = {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": sdxl_lora}}
    p["30"] = {"class_type": "CFGGuider", "inputs": {"model": ["40", 0], "positive": ["40", 1],
                                                     "negative": [NEGATIVE, 0], "cfg": 5.0}}
    p["31"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["32"] = {"class_type": "BasicScheduler", "inputs": {"model": ["40", 0], "scheduler": "normal", "steps": 2,
                                                          "denoise": 1.0}}
    p["33"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    p["34"] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["33", 0], "guider": ["30", 0],
                                                                 "sampler": ["31", 0], "sigmas": ["32", 0],
                                                                 "latent_image": [EMPTY_LATENT, 0]}}
    p[SAVE_LATENT]["inputs"]["samples"] = ["34", 0]
    del p[KSAMPLER]
    p[node_id(p, "VAEDecode")]["inputs"]["samples"] = ["34", 0]
    assert harness.output_refs(comfy_server.run(p), "images")


@pytest.mark.parametrize("case, message", [
    ("word", "the word 'dog' is not in the prompt"),
    ("family", "was made for Stable Diffusion XL but the model is Stable Diffusion 1.x"),
    ("overlap", "overlap on"),
    ("empty", "the region's mask is empty"),
])
def test_compose_errors_say_what_to_fix(comfy_server, sd15_lora, sdxl_lora, case, message):
    base = stock_t2i_prompt(SD15, seed=1, positive=TEXT, prefix="err")
    regions = {
        "word": [{"lora_name": sd15_lora, "words": "dog"}],
        "family": [{"lora_name": sdxl_lora, "words": "cat"}],
        "overlap": [{"lora_name": sd15_lora, "mask": ["70", 0]}, {"lora_name": sd15_lora, "mask": ["70", 0]}],
        "empty": [{"lora_name": sd15_lora, "mask": ["72", 0]}],
    }[case]
    p = with_regions(base, regions, overlap="error")
    p["70"], p["72"] = solid(1.0), solid(0.0)
    err = comfy_server.run_expect_error(p)
    assert message in err, err


def test_compose_workflow_runs(comfy_server, sd15_lora):
    out = comfy_server.run(workflow_prompt("compose_regions", SD15, residual_name=sd15_lora))
    assert harness.output_refs(out, "images")


@pytest.fixture(scope="module")
def kohya_lora(comfy_server):
    """A kohya-named LoRA on text-side K/V, attn1, ff and a 3x3 LoCon conv of the tiny SD1.5 model."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    shapes = {"input_blocks_1_1_transformer_blocks_0_attn2_to_k": (320, 768),
              "middle_block_1_transformer_blocks_0_attn2_to_v": (320, 768),
              "output_blocks_1_1_transformer_blocks_0_attn1_to_q": (320, 320),
              "output_blocks_0_1_transformer_blocks_0_ff_net_2": (320, 1280),
              "input_blocks_1_0_in_layers_2": (320, 320, 3, 3)}
    sd = {}
    for name, shape in shapes.items():
        r = 4
        down = torch.randn(r, *shape[1:], generator=gen) * 0.05
        up = torch.randn(shape[0], r, *([1, 1] if len(shape) == 4 else []), generator=gen) * 0.05
        sd.update({f"lora_unet_{name}.lora_down.weight": down, f"lora_unet_{name}.lora_up.weight": up,
                   f"lora_unet_{name}.alpha": torch.tensor(2.0)})
    path = comfy_server.base_dir / "models" / "loras" / "tests" / "kohya_kv.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return "tests/kohya_kv.safetensors"


def test_a_kohya_lora_with_text_side_kv_and_locon_matches_loraloader_at_full_mask(comfy_server, kohya_lora):
    base = stock_t2i_prompt(SD15, seed=23, positive=TEXT, prefix="kv_base")
    ours = with_regions(base, [{"lora_name": kohya_lora, "strength": 1.0, "mask": ["70", 0]}], prefix="kv_ours")
    ours["70"] = solid(1.0)
    stock = insert_model_node(base, "20", "LoraLoaderModelOnly", {"lora_name": kohya_lora, "strength_model": 1.0})
    stock[SAVE_LATENT]["inputs"]["filename_prefix"] = "latents/kv_stock"
    word = with_regions(base, [{"lora_name": kohya_lora, "words": "cat"}], prefix="kv_word")
    lat = {k: latent(comfy_server, p) for k, p in (("base", base), ("ours", ours), ("stock", stock), ("word", word))}
    scale = float(lat["base"].abs().max())
    assert not torch.allclose(lat["stock"], lat["base"], atol=1e-3 * scale)
    assert torch.allclose(lat["ours"], lat["stock"], atol=1e-4 * scale, rtol=1e-4)
    assert not torch.allclose(lat["word"], lat["ours"], atol=1e-3 * scale)  # a word region is not everywhere


# ------------------------------------------------------------------------------------------ Cut-Mix
def cut_mix_prompt(tag, **together):
    """The Cut-Mix workflow with both trainings saved and both jointly trained sets saved too."""
    from .test_learn_localize import add_inputs

    p = workflow_prompt("compose_cut_mix", SD15, ConceptsTrainTogether=together)
    p["7"]["inputs"]["save_name"] = f"tests/{tag}_a"
    p["8"]["inputs"]["save_name"] = f"tests/{tag}_b"
    for nid, out in (("90", 0), ("91", 1)):
        p[nid] = {"class_type": "ConceptsSaveResiduals",
                  "inputs": {"residuals": ["9", out], "save_name": f"tests/{tag}_together_{out}", "overwrite": False}}
    return p, add_inputs


def test_cut_mix_trains_copies_of_both_sets_and_names_the_partner(comfy_server):
    from core.residuals import load

    tag = f"cutmix_{uuid.uuid4().hex[:6]}"
    p, add_inputs = cut_mix_prompt(tag)
    add_inputs(comfy_server)
    out = comfy_server.run(p)
    loras = comfy_server.base_dir / "models" / "loras" / "tests"
    files = {k: load(str(loras / f"{tag}_{k}.safetensors")) for k in ("a", "b", "together_0", "together_1")}
    for before, after, partner in (("a", "together_0", "ohwx"), ("b", "together_1", "sks")):
        assert files[after].metadata["cut_mix_with"] == partner
        assert files[after].metadata["token"] == files[before].metadata["token"]
        assert set(files[after].layers) == set(files[before].layers)
        assert any(not torch.equal(files[after].layers[k].up, files[before].layers[k].up)
                   for k in files[before].layers)  # trained, as a new set
    assert files["together_0"].metadata["cut_mix_caption"] == "a photo of a sks toy and a ohwx ball"
    images = harness.output_refs({"9": out["9"]}, "images")
    assert images  # the Cut-Mix images are previewed


@pytest.mark.parametrize("change, message", [
    ({"caption": "a photo of a sks toy and a ball"}, "ohwx"),
])
def test_cut_mix_bad_input_says_what_to_fix(comfy_server, change, message):
    p, add_inputs = cut_mix_prompt(f"cutmix_bad_{uuid.uuid4().hex[:6]}", **change)
    add_inputs(comfy_server)
    assert message in comfy_server.run_expect_error(p)


def test_cut_mix_refuses_two_sets_with_one_token(comfy_server):
    p, add_inputs = cut_mix_prompt(f"cutmix_same_{uuid.uuid4().hex[:6]}")
    p["8"]["inputs"]["token"] = "sks"
    add_inputs(comfy_server)
    assert "both residual sets use the token 'sks'" in comfy_server.run_expect_error(p)


def test_cut_mix_unmix_changes_the_training_and_is_recorded(comfy_server):
    from core.residuals import load

    tag = f"cutmix_unmix_{uuid.uuid4().hex[:6]}"
    p, add_inputs = cut_mix_prompt(tag)
    p["92"] = {"class_type": "ConceptsTrainTogether", "inputs": dict(p["9"]["inputs"], unmix_weight=20.0)}
    p["93"] = {"class_type": "ConceptsSaveResiduals",
               "inputs": {"residuals": ["92", 0], "save_name": f"tests/{tag}_unmix_0", "overwrite": False}}
    add_inputs(comfy_server)
    comfy_server.run(p)
    loras = comfy_server.base_dir / "models" / "loras" / "tests"
    plain, unmixed = (load(str(loras / f"{tag}_{k}.safetensors")) for k in ("together_0", "unmix_0"))
    assert (plain.metadata["cut_mix_unmix"], unmixed.metadata["cut_mix_unmix"]) == ("0", "20")
    assert any(not torch.equal(plain.layers[k].up, unmixed.layers[k].up) for k in plain.layers)


def test_cut_mix_takes_a_written_caption_for_a_file_without_a_token(comfy_server, sd15_lora):
    """A LoRA file that names no token (not trained by this pack) composes when the caption is written; the empty
    caption and the Unmix term, which need its token, say so."""
    from core import residuals as R

    loras = comfy_server.base_dir / "models" / "loras"
    rs = R.load(str(loras / sd15_lora))
    for key in ("token", "class_word"):
        rs.metadata.pop(key, None)
    tag = f"cutmix_notoken_{uuid.uuid4().hex[:6]}"
    R.save(rs, str(loras / "tests" / f"{tag}_file.safetensors"))
    p, add_inputs = cut_mix_prompt(tag, caption="a photo of a sks toy and a ball")
    p["8"] = {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": f"tests/{tag}_file.safetensors"}}
    add_inputs(comfy_server)
    for change, message in (({"caption": ""}, "write the caption yourself"),
                            ({"unmix_weight": 1.0}, "unmix_weight needs each residual set's token")):
        bad = copy.deepcopy(p)
        bad["9"]["inputs"].update(change)
        assert message in comfy_server.run_expect_error(bad)
    comfy_server.run(p)
    together_b = R.load(str(loras / "tests" / f"{tag}_together_1.safetensors"))
    assert together_b.metadata["cut_mix_with"] == "sks" and "token" not in together_b.metadata
