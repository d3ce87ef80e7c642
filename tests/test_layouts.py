from core.layouts import diffusers_to_ldm_namer, family_from_config
from core.patching.diffusers import unet_family, unet_sites
from core.residuals import init_residuals, rank_for
from core.toy_models import sd15_unet_on_meta, sdxl_unet_on_meta

SD15_BLOCKS = ["input_blocks.1.1", "input_blocks.2.1", "input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1",
               "input_blocks.8.1", "middle_block.1"] + [f"output_blocks.{i}.1" for i in range(3, 12)]


def test_sd15_layout_has_the_16_transformers_comfyui_names():
    sites = unet_sites(sd15_unet_on_meta())
    assert sorted(s.path for s, _ in sites) == sorted(SD15_BLOCKS)
    assert all(not s.linear and s.depth == 1 for s, _ in sites)


def test_sd15_residual_parameter_count_matches_the_paper():
    """5% rank on 320/640/1280 -> 16/32/64; sum of 2*m*r over the 16 blocks = 1,239,040 (about 1.2M)."""
    sites = [s for s, _ in unet_sites(sd15_unet_on_meta())]
    assert {s.width: rank_for(s.width) for s in sites} == {320: 16, 640: 32, 1280: 64}
    assert init_residuals(sites, device="meta").parameter_count() == 1_239_040


def test_sdxl_layout_matches_comfyui_block_ids_and_uses_linear_projections():
    unet = sdxl_unet_on_meta()
    sites = {s.path: s for s, _ in unet_sites(unet)}
    assert sorted(sites) == sorted(["input_blocks.4.1", "input_blocks.5.1", "input_blocks.7.1", "input_blocks.8.1",
                                    "middle_block.1"] + [f"output_blocks.{i}.1" for i in range(6)])
    assert sites["input_blocks.7.1"].depth == 10 and all(s.linear for s in sites.values())
    assert unet_family(unet) == "SDXL"


def test_namer_handles_per_block_layer_counts():
    namer = diffusers_to_ldm_namer([1, 2])
    assert namer("down_blocks.0.attentions.0") == "input_blocks.1.1"
    assert namer("down_blocks.1.attentions.1") == "input_blocks.4.1"
    # up blocks mirror the down blocks: (2 + 1) then (1 + 1) layers
    assert namer("up_blocks.1.attentions.0") == "output_blocks.3.1"


def test_family_from_config():
    assert family_from_config(768, False) == "SD1"
    assert family_from_config(2048, True) == "SDXL"
    assert family_from_config(32, False).startswith("custom")
