"""core.lora_files: community LoRA state dicts -> {ComfyUI ldm module path: LowRank}."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core import lora_files as L
from core import residuals as R
from core.layouts import diffusers_to_ldm_namer
from core.toy_models import sd15_unet_on_meta, sdxl_unet_on_meta, tiny_unet


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _kohya(stem, out, inp, rank=4, alpha=2.0, conv=False, seed=0):
    g = _gen(seed)
    down, up = torch.randn(rank, inp, generator=g), torch.randn(out, rank, generator=g)
    if conv:
        down, up = down[:, :, None, None], up[:, :, None, None]
    return {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}


def _meta_layers(unet):
    """{diffusers module name: module} for every Linear/Conv2d of a diffusers UNet built on the meta device."""
    return {n: m for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _kind(m):
    return "linear" if isinstance(m, nn.Linear) else f"conv{m.kernel_size[0]}"


def _ldm_shapes(unet, family):
    to_ldm, _ = L.unet_module_map(L.SPECS[family])
    return {to_ldm[n]: tuple(m.weight.shape) for n, m in _meta_layers(unet).items()}


# ------------------------------------------------------------------------------------------ the name map
@pytest.mark.parametrize("family,build", [("SD1", sd15_unet_on_meta), ("SDXL", sdxl_unet_on_meta)])
def test_module_map_covers_every_layer_of_the_real_unet_with_its_kind(family, build):
    """Every Linear/Conv2d of the real SD1.5/SDXL UNet (diffusers names) maps to one ldm path of the right kind."""
    to_ldm, kinds = L.unet_module_map(L.SPECS[family])
    layers = _meta_layers(build())
    assert set(layers) <= set(to_ldm)
    assert len({to_ldm[n] for n in layers}) == len(layers)  # one-to-one
    assert all(kinds[to_ldm[n]] == _kind(m) for n, m in layers.items())
    extra = set(to_ldm) - set(layers)
    assert all(".conv_shortcut" in n for n in extra)  # listed for every res block; exists where channels change
    # the transformers agree with the pack's own attention namer
    namer = diffusers_to_ldm_namer(2)
    for name in layers:
        if name.endswith(".proj_out"):
            assert to_ldm[name] == namer(name[:-len(".proj_out")]) + ".proj_out"


def test_underscore_names_are_unambiguous():
    """No two module names collapse to the same kohya spelling (dots -> underscores) with different targets."""
    for spec in L.SPECS.values():
        to_ldm, kinds = L.unet_module_map(spec)
        spelled = {}
        for name, path in list(to_ldm.items()) + [(m, m) for m in kinds]:
            assert spelled.setdefault(name.replace(".", "_"), path) == path
        assert L.underscore_names(spec) == spelled


def test_spec_from_comfyui_unet_config_matches_the_presets():
    """ComfyUI's unet_config of the real SD1.5 / SDXL gives the built-in specs."""
    sd15 = {"num_res_blocks": [2] * 4, "channel_mult": [1, 2, 4, 4], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
            "transformer_depth_output": [1] * 9 + [0] * 3, "transformer_depth_middle": 1,
            "use_linear_in_transformer": False, "adm_in_channels": None}
    sdxl = {"num_res_blocks": [2] * 3, "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 2, 2, 10, 10],
            "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "transformer_depth_middle": 10,
            "use_linear_in_transformer": True, "adm_in_channels": 2816}
    assert L.spec_from_unet_config(sd15, "SD1") == L.SPECS["SD1"]
    assert L.spec_from_unet_config(sdxl, "SDXL") == L.SPECS["SDXL"]


@pytest.mark.parametrize("family,build", [("SD1", sd15_unet_on_meta), ("SDXL", sdxl_unet_on_meta)])
def test_spec_from_diffusers_config_matches_the_presets(family, build):
    assert L.spec_from_diffusers_config(build().config, family) == L.SPECS[family]


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_spec_from_diffusers_config_covers_the_toy_unets(kind):
    """The core tests' tiny diffusers UNets (2 levels, 1 res block): every layer maps, kinds agree."""
    unet = tiny_unet(kind)
    to_ldm, kinds = L.unet_module_map(L.spec_from_diffusers_config(unet.config, "custom-ctx32"))
    layers = _meta_layers(unet)
    assert set(layers) <= set(to_ldm) and all(kinds[to_ldm[n]] == _kind(m) for n, m in layers.items())
    assert all(".conv_shortcut" in n for n in set(to_ldm) - set(layers))
    namer = diffusers_to_ldm_namer(1)
    assert all(to_ldm[n] == namer(n[:-len(".proj_out")]) + ".proj_out" for n in layers if n.endswith(".proj_out"))
    spec = L.spec_from_diffusers_config(unet.config, "custom-ctx32")
    sd = _kohya("lora_unet_up_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v", 64, 32)
    lf = L.read_lora(sd, spec=spec)  # a family outside SD1/SD2/SDXL resolves through the model's own spec
    assert list(lf.layers) == ["output_blocks.1.1.transformer_blocks.0.attn2.to_v"]
    assert lf.detected_family == spec.family


def test_tiny_test_checkpoints_layouts():
    """The pack's tiny ComfyUI checkpoints (one level): attention where their configs put it, no middle on SDXL."""
    from tests.comfyui.make_checkpoints import SD15_UNET, SDXL_UNET

    _, sd1 = L.unet_module_map(L.spec_from_unet_config(SD15_UNET, "SD1"))
    assert {p.rsplit(".", 1)[0] for p in sd1 if p.endswith(".proj_out")} == {
        "input_blocks.1.1", "middle_block.1", "output_blocks.0.1", "output_blocks.1.1"}
    _, sdxl = L.unet_module_map(L.spec_from_unet_config(SDXL_UNET, "SDXL"))
    assert {p.rsplit(".", 1)[0] for p in sdxl if p.endswith(".proj_out")} == {
        f"input_blocks.{i}.1" for i in (3, 4, 5, 6)}
    assert "input_blocks.6.1.transformer_blocks.9.attn2.to_k" in sdxl
    assert not any(p.startswith("middle_block") for p in sdxl)
    assert not any(p.endswith((".op", ".conv")) for p in sdxl)  # one level: no down/upsampler


# ------------------------------------------------------------------------------------------ key formats
TB = "transformer_blocks.0"
SD15_KOHYA = {  # kohya SD1.x names (diffusers modules, underscores) -> ComfyUI ldm paths
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k": f"input_blocks.1.1.{TB}.attn2.to_k",
    "lora_unet_down_blocks_0_attentions_1_proj_in": "input_blocks.2.1.proj_in",
    "lora_unet_down_blocks_2_attentions_1_transformer_blocks_0_attn1_to_out_0": f"input_blocks.8.1.{TB}.attn1.to_out.0",
    "lora_unet_mid_block_attentions_0_proj_in": "middle_block.1.proj_in",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v": f"middle_block.1.{TB}.attn2.to_v",
    "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_ff_net_0_proj": f"output_blocks.3.1.{TB}.ff.net.0.proj",
    "lora_unet_up_blocks_3_attentions_2_proj_out": "output_blocks.11.1.proj_out",
    "lora_unet_up_blocks_2_attentions_1_transformer_blocks_0_attn2_to_q": f"output_blocks.7.1.{TB}.attn2.to_q",
}


def test_kohya_sd15_keys_map_to_comfyui_paths_with_real_shapes():
    shapes = _ldm_shapes(sd15_unet_on_meta(), "SD1")
    sd = {}
    for i, (stem, path) in enumerate(SD15_KOHYA.items()):
        shape = shapes[path]
        sd.update(_kohya(stem, shape[0], shape[1], conv=len(shape) == 4, seed=i))
    sd["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 768)
    lf = L.read_lora(sd, family="SD1")
    assert set(lf.layers) == set(SD15_KOHYA.values())
    assert lf.detected_family == "SD1" and lf.formats == ("kohya",)
    assert lf.skipped_text_encoder == ["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"]
    L.check_shapes(lf.layers, shapes, "SD1")
    assert lf.layers["middle_block.1.proj_in"].conv and not lf.layers[f"middle_block.1.{TB}.attn2.to_v"].conv


def test_kohya_sdxl_keys_in_both_spellings():
    """SDXL kohya files use ldm names (input_blocks_4_1_...); diffusers-named SDXL files map to the same paths."""
    shapes = _ldm_shapes(sdxl_unet_on_meta(), "SDXL")
    cases = {
        "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k":
            "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
        "lora_unet_output_blocks_0_1_transformer_blocks_9_ff_net_2": "output_blocks.0.1.transformer_blocks.9.ff.net.2",
        "lora_unet_middle_block_1_proj_out": "middle_block.1.proj_out",
        "lora_unet_down_blocks_2_attentions_1_transformer_blocks_9_attn2_to_v":
            "input_blocks.8.1.transformer_blocks.9.attn2.to_v",
        "lora_unet_up_blocks_1_attentions_2_proj_in": "output_blocks.5.1.proj_in",
    }
    sd = {}
    for i, (stem, path) in enumerate(cases.items()):
        sd.update(_kohya(stem, shapes[path][0], shapes[path][1], seed=i))
    sd["lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"] = torch.zeros(4, 1280)
    lf = L.read_lora(sd)
    assert lf.family == "SDXL" and lf.detected_family == "SDXL"
    assert {p: tuple(lf.layers[p].delta().shape) for p in cases.values()} == {p: shapes[p] for p in cases.values()}
    L.check_shapes(lf.layers, shapes, "SDXL")


def test_generic_diffusion_model_keys_round_trip_the_packs_own_files():
    rs = R.ResidualSet({"input_blocks.1.1.proj_out": R.LowRank(torch.randn(16, 320), torch.randn(320, 16), 8.0, True),
                        "output_blocks.11.1.proj_out": R.LowRank(torch.randn(16, 320), torch.randn(320, 16), 16.0,
                                                                 True)})
    lf = L.read_lora(R.to_state_dict(rs), family="SD1")
    assert lf.formats == ("generic",) and lf.detected_family == "SD1"  # 4-D proj factors: SD1
    for path, layer in rs.layers.items():
        got = lf.layers[path]
        assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
        assert got.alpha == layer.alpha and got.conv


def test_diffusers_and_peft_keys():
    """unet.<path>.lora_A/lora_B (PEFT), .processor.<x>_lora.down/up (old diffusers), to_out for to_out.0."""
    k_stem = f"unet.down_blocks.0.attentions.0.{TB}.attn2.to_k"
    out_stem = f"unet.up_blocks.3.attentions.0.{TB}.attn1.processor.to_out"
    sd = {
        f"{k_stem}.lora_A.weight": torch.randn(4, 768), f"{k_stem}.lora_B.weight": torch.randn(320, 4),
        f"{out_stem}_lora.down.weight": torch.randn(4, 320), f"{out_stem}_lora.up.weight": torch.randn(320, 4),
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(4, 768),
    }
    lf = L.read_lora(sd, family="SD1")
    assert set(lf.layers) == {"input_blocks.1.1.transformer_blocks.0.attn2.to_k",
                              "output_blocks.9.1.transformer_blocks.0.attn1.to_out.0"}
    assert lf.formats == ("diffusers",) and len(lf.skipped_text_encoder) == 1
    assert lf.layers["input_blocks.1.1.transformer_blocks.0.attn2.to_k"].scale == 1.0  # no alpha: scale 1 (ComfyUI)


# ------------------------------------------------------------------------------------------ math of a layer
def test_linear_layer_scale_is_alpha_over_rank():
    """Delta W = (alpha / r) up @ down, and lora_forward(x) = x Delta W^T."""
    sd = _kohya("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k", 1280, 768, rank=8, alpha=2.0)
    layer = L.read_lora(sd).layers["middle_block.1.transformer_blocks.0.attn2.to_k"]
    up = sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight"]
    down = sd["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"]
    assert torch.allclose(layer.delta(), (2.0 / 8) * up @ down)
    x = torch.randn(2, 5, 768)
    assert torch.allclose(L.lora_forward(layer, x), x @ layer.delta().T, atol=1e-4)


def test_1x1_conv_layer_forward_equals_conv_with_delta():
    sd = _kohya("lora_unet_down_blocks_1_attentions_0_proj_out", 640, 640, conv=True)
    layer = L.read_lora(sd, family="SD1").layers["input_blocks.4.1.proj_out"]
    x = torch.randn(1, 640, 4, 4)
    expect = F.conv2d(x, layer.delta()[:, :, None, None])
    assert torch.allclose(L.lora_forward(layer, x), expect, atol=1e-4)


def test_locon_3x3_conv_runs_as_a_kxk_conv_then_1x1():
    """LoCon on a 3x3 conv: lora_forward(x) = conv2d(x, Delta W [out, in, 3, 3], base stride/padding)."""
    g = _gen(2)
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"
    sd = {f"{stem}.lora_down.weight": torch.randn(4, 320, 3, 3, generator=g),
          f"{stem}.lora_up.weight": torch.randn(320, 4, 1, 1, generator=g), f"{stem}.alpha": torch.tensor(1.0)}
    sd.update(_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768))
    lf = L.read_lora(sd, family="SD1")
    layer = lf.layers["input_blocks.1.0.in_layers.2"]
    assert isinstance(layer, L.ConvLowRank) and layer.kernel == (3, 3)
    x = torch.randn(1, 320, 6, 6)
    weight = layer.delta().reshape(320, 320, 3, 3)
    assert torch.allclose(L.lora_forward(layer, x, padding=1), F.conv2d(x, weight, padding=1), atol=1e-3)
    assert torch.allclose(L.lora_forward(layer, x, stride=2, padding=1), F.conv2d(x, weight, stride=2, padding=1),
                          atol=1e-3)
    base = torch.randn(320, 320, 3, 3)
    assert torch.equal(R.merged_weight(base, layer), base + weight)  # merging works on the flattened factors
    L.check_shapes(lf.layers, _ldm_shapes(sd15_unet_on_meta(), "SD1"), "SD1")


def test_locon_cp_mid_factor_is_folded_exactly():
    """down 1x1 [r, in], mid [r, r, 3, 3], up [out, r]: the folded k x k down gives the same convolution."""
    g = _gen(3)
    stem = "lora_unet_up_blocks_0_upsamplers_0_conv"
    down, mid = torch.randn(4, 64, 1, 1, generator=g), torch.randn(4, 4, 3, 3, generator=g)
    up = torch.randn(64, 4, 1, 1, generator=g)
    sd = {f"{stem}.lora_down.weight": down, f"{stem}.lora_mid.weight": mid, f"{stem}.lora_up.weight": up}
    sd.update(_kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768))
    layer = L.read_lora(sd, family="SD1").layers["output_blocks.2.1.conv"]
    x = torch.randn(1, 64, 5, 5)
    expect = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    assert torch.allclose(L.lora_forward(layer, x, padding=1), expect, atol=1e-3)


# ------------------------------------------------------------------------------------------ errors
def test_family_detection_and_the_other_family_error():
    sdxl = _kohya("lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k", 640, 2048)
    sd1 = _kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768)
    assert L.detect_family(sdxl) == "SDXL" and L.detect_family(sd1) == "SD1"
    assert L.detect_family({"lora_te2_x.lora_down.weight": torch.zeros(1, 1)}) == "SDXL"
    with pytest.raises(L.LoraFamilyError, match=r"Stable Diffusion XL \(SDXL\) but the model is Stable Diffusion 1.x"):
        L.read_lora(sdxl, family="SD1")
    with pytest.raises(L.LoraFamilyError, match="cannot tell"):
        L.read_lora(_kohya("lora_unet_down_blocks_0_resnets_0_time_emb_proj", 320, 1280))


def test_shape_check_names_the_layer_and_the_family():
    shapes = _ldm_shapes(sd15_unet_on_meta(), "SD1")
    sd = _kohya("lora_unet_down_blocks_0_attentions_0_proj_out", 640, 640, conv=True)
    lf = L.read_lora(sd, family="SD1")
    with pytest.raises(L.LoraFamilyError, match="input_blocks.1.1.proj_out.*another model family"):
        L.check_shapes(lf.layers, shapes, "SD1")
    with pytest.raises(L.LoraFamilyError, match="does not have"):
        L.check_shapes({"input_blocks.1.0.skip_connection": lf.layers["input_blocks.1.1.proj_out"]}, shapes, "SD1")


def test_unknown_and_unsupported_keys_are_clear_errors():
    ok = _kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768)
    with pytest.raises(L.LoraFileError, match="match no Stable Diffusion 1.x UNet layer, e.g. lora_unet_foo_bar"):
        L.read_lora({**ok, **_kohya("lora_unet_foo_bar", 4, 4)}, family="SD1")
    with pytest.raises(L.LoraFileError, match="not plain low-rank.*LoHa"):
        L.read_lora({**ok, "lora_unet_down_blocks_0_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, family="SD1")
    with pytest.raises(L.LoraFileError, match="no matching up factor"):
        L.read_lora({k: v for k, v in ok.items() if not k.endswith("lora_up.weight")}, family="SD1")
    with pytest.raises(L.LoraFileError, match="up factor but no down"):
        L.read_lora({k: v for k, v in ok.items() if not k.endswith("lora_down.weight")}, family="SD1")
    dup = {k.replace("lora_unet_down_blocks_0_attentions_0", "lora_unet_input_blocks_1_1"): v for k, v in ok.items()}
    with pytest.raises(L.LoraFileError, match="same layer"):
        L.read_lora({**ok, **dup}, family="SD1")
    with pytest.raises(L.LoraFileError, match="only text-encoder"):
        L.read_lora({"lora_te_x.lora_down.weight": torch.zeros(1, 1)}, family="SD1")


# ------------------------------------------------------------------------------------------ DiT LoRAs (key map)
FLUX_WIDTHS = {"double_blocks.0.img_attn.qkv": 3 * 8, "double_blocks.0.img_attn.proj": 8}
FLUX_KEY_MAP = {  # as comfy.lora.model_lora_keys_unet gives it: whole layers, and slices of fused ones
    "lora_unet_double_blocks_0_img_attn_proj": "diffusion_model.double_blocks.0.img_attn.proj.weight",
    "diffusion_model.double_blocks.0.img_attn.proj": "diffusion_model.double_blocks.0.img_attn.proj.weight",
    **{f"transformer.transformer_blocks.0.attn.to_{n}": ("diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                                          (0, 8 * i, 8)) for i, n in enumerate("qkv")},
}


def test_a_dit_lora_reads_through_comfyuis_key_map_whole_layers_and_fused_slices():
    """Kohya and generic keys name whole layers; diffusers' to_q / to_k / to_v each patch 8 rows of the fused qkv:
    the three become one LowRank of rank 3 x 2 whose Delta W holds each part's alpha/rank x up @ down at its rows
    (what ComfyUI's slice patches add to the weight) and zeros nowhere else."""
    sd = _kohya("lora_unet_double_blocks_0_img_attn_proj", 8, 8, rank=2, alpha=1.0)
    parts = {n: _kohya(f"transformer.transformer_blocks.0.attn.to_{n}", 8, 8, rank=2, alpha=a, seed=i + 1)
             for i, (n, a) in enumerate(zip("qkv", (2.0, 1.0, 4.0), strict=True))}
    for p in parts.values():
        sd |= p
    lf = L.read_keyed_lora(sd, FLUX_KEY_MAP, FLUX_WIDTHS, "Flux")
    assert set(lf.layers) == {"double_blocks.0.img_attn.proj", "double_blocks.0.img_attn.qkv"}
    proj = lf.layers["double_blocks.0.img_attn.proj"]
    assert torch.equal(proj.delta(), 0.5 * sd["lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"]
                       @ sd["lora_unet_double_blocks_0_img_attn_proj.lora_down.weight"])
    qkv = lf.layers["double_blocks.0.img_attn.qkv"]
    assert qkv.rank == 6 and qkv.delta().shape == (24, 8)
    for i, (n, alpha) in enumerate(zip("qkv", (2.0, 1.0, 4.0), strict=True)):
        stem = f"transformer.transformer_blocks.0.attn.to_{n}"
        expect = alpha / 2 * parts[n][f"{stem}.lora_up.weight"] @ parts[n][f"{stem}.lora_down.weight"]
        assert torch.allclose(qkv.delta()[8 * i:8 * (i + 1)], expect, rtol=1e-6, atol=1e-6)


def test_a_lora_for_another_family_is_refused_naming_both():
    sd1 = _kohya("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 320, 768)
    with pytest.raises(L.LoraFamilyError, match=r"Stable Diffusion 1.x \(SD1\) but the model is Flux.1"):
        L.read_keyed_lora(sd1, FLUX_KEY_MAP, FLUX_WIDTHS, "Flux")
    flux = _kohya("lora_unet_double_blocks_0_img_attn_proj", 8, 8)
    with pytest.raises(L.LoraFamilyError, match=r"Flux.1 \(Flux\) but the model is Stable Diffusion 3"):
        L.read_keyed_lora(flux, {}, {}, "SD3")
    with pytest.raises(L.LoraFamilyError, match=r"Flux.1 \(Flux\) but the model is Stable Diffusion 1.x"):
        L.read_lora(flux, family="SD1")
    unknown = _kohya("lora_unet_double_blocks_7_img_attn_proj", 8, 8)
    with pytest.raises(L.LoraFileError, match="1 key.*match no Flux.1 layer.*double_blocks_7"):
        L.read_keyed_lora(unknown, FLUX_KEY_MAP, FLUX_WIDTHS, "Flux")
