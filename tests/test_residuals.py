import pytest
import torch
from safetensors import safe_open

from core import residuals as R
from core.patching.diffusers import unet_family, unet_sites


def make_set(unet, seed=0):
    sites = [s for s, _ in unet_sites(unet)]
    return R.init_residuals(sites, seed=seed, metadata={"base_family": unet_family(unet), "class_word": "dog",
                                                         "token": "sks", "steps": 150})


def test_both_factors_start_random_and_rank_follows_the_rule(unet):
    rs = make_set(unet)
    for layer in rs.layers.values():
        assert layer.down.abs().sum() > 0 and layer.up.abs().sum() > 0  # the paper: no zero-initialised factor
        assert layer.rank == R.rank_for(layer.down.shape[1])


def test_save_then_load_is_bit_identical_with_metadata(unet, tmp_path):
    rs = make_set(unet)
    path = R.save(rs, str(tmp_path / "c.safetensors"))
    back = R.load(path)
    assert back.metadata == rs.metadata
    assert back.layers.keys() == rs.layers.keys()
    for k, layer in rs.layers.items():
        assert torch.equal(back.layers[k].down, layer.down) and torch.equal(back.layers[k].up, layer.up)
        assert back.layers[k].alpha == layer.alpha and back.layers[k].conv == layer.conv


def test_file_uses_generic_lora_keys_stock_loaders_read(sd1_unet, tmp_path):
    path = R.save(make_set(sd1_unet), str(tmp_path / "c.safetensors"))
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
        down = f.get_tensor("diffusion_model.input_blocks.1.1.proj_out.lora_down.weight")
    assert "diffusion_model.input_blocks.1.1.proj_out.lora_up.weight" in keys
    assert "diffusion_model.middle_block.1.proj_out.alpha" in keys
    assert down.dim() == 4  # a 1x1 conv target gets conv-shaped factors


def test_merged_weight_equals_forward_residual(unet):
    """W' x = W x + Delta W x: merging and the forward-time residual agree."""
    rs = make_set(unet)
    site, module = unet_sites(unet)[0]
    layer = rs.layers[site.target]
    w = module.proj_out.weight
    x = torch.randn(2, site.width, 3, 3) if not site.linear else torch.randn(2, 9, site.width)
    merged = R.merged_weight(w, layer)
    if site.linear:
        expect = x @ merged.t()
        got = x @ w.t() + R.residual_forward(layer, x)
    else:
        expect = torch.nn.functional.conv2d(x, merged)
        got = torch.nn.functional.conv2d(x, w) + R.residual_forward(layer, x)
    assert torch.allclose(expect, got, atol=1e-5)
    assert not torch.equal(merged, w)  # the input weight is untouched (new tensor)


def test_refuses_to_overwrite_without_the_option(sd1_unet, tmp_path):
    path = str(tmp_path / "c.safetensors")
    R.save(make_set(sd1_unet), path)
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite"):
        R.save(make_set(sd1_unet, seed=1), path)
    assert open(path, "rb").read() == before
    R.save(make_set(sd1_unet, seed=1), path, overwrite=True)
    assert open(path, "rb").read() != before


def test_file_for_another_family_names_both_families(sd1_unet):
    rs = make_set(sd1_unet)
    rs.metadata["base_family"] = "SDXL"
    sites = [s for s, _ in unet_sites(sd1_unet)]
    with pytest.raises(R.ResidualFileError, match=r"Stable Diffusion XL.*custom"):
        R.check_compatible(rs, unet_family(sd1_unet), sites)


def test_file_for_another_layout_is_refused(sd1_unet, unet):
    rs = make_set(sd1_unet)
    sites = [s for s, _ in unet_sites(unet)]
    if not any(s.linear for s in sites):  # same layout: make the file target a block the model lacks
        rs.layers["input_blocks.99.1.proj_out"] = next(iter(rs.layers.values()))
    with pytest.raises(R.ResidualFileError, match="layout"):
        R.check_compatible(rs, rs.family, sites)


def test_block_strengths_longest_prefix_wins_and_unknown_names_fail():
    paths = ["input_blocks.1.1.proj_out", "input_blocks.2.1.proj_out", "middle_block.1.proj_out"]
    got = R.parse_block_strengths("input=0.5, input_blocks.2=0, middle = 2", paths)
    assert got == {"input_blocks.1.1.proj_out": 0.5, "input_blocks.2.1.proj_out": 0.0, "middle_block.1.proj_out": 2.0}
    assert R.parse_block_strengths("", paths) == {}
    with pytest.raises(ValueError, match="matches no residual layer"):
        R.parse_block_strengths("output=1", paths)
    with pytest.raises(ValueError, match="name=value"):
        R.parse_block_strengths("middle", paths)


def test_target_blocks_select_a_subset():
    from core.toy_models import sd15_unet_on_meta

    sites = [s for s, _ in unet_sites(sd15_unet_on_meta())]
    assert [s.path for s in R.select_sites(sites, "middle")] == ["middle_block.1"]
    assert len(R.select_sites(sites, "input, output_blocks.11")) == 7
    assert R.select_sites(sites, "") == sites
    with pytest.raises(ValueError, match="match no transformer block"):
        R.select_sites(sites, "output_blocks.0")


def test_an_ordinary_lora_is_pointed_to_loraloader(sd1_unet):
    rs = make_set(sd1_unet)
    layer = next(iter(rs.layers.values()))
    rs.layers["input_blocks.1.1.transformer_blocks.0.attn2.to_k"] = layer
    with pytest.raises(R.ResidualFileError, match="LoraLoader"):
        R.check_compatible(rs, rs.family, [s for s, _ in unet_sites(sd1_unet)])


def test_saved_files_get_the_umask_mode_not_owner_only(sd1_unet, tmp_path):
    """A ComfyUI server running as another user must be able to read a saved residual file."""
    import os
    import stat

    rs = R.init_residuals([s for s, _ in unet_sites(sd1_unet)], seed=0)
    path = R.save(rs, str(tmp_path / "r.safetensors"))
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]  # no temporary file left behind


def test_a_flux_lora_in_kohya_keys_is_refused_naming_the_file_its_format_and_the_stock_loader(tmp_path):
    from safetensors.torch import save_file

    from core.file_checks import BrokenFileError

    path = tmp_path / "flux_style.safetensors"
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{stem}.lora_down.weight": torch.randn(4, 64), f"{stem}.lora_up.weight": torch.randn(64, 4)},
              str(path))
    with pytest.raises(BrokenFileError) as err:
        R.load(str(path))
    message = str(err.value)
    assert "flux_style.safetensors" in message and "kohya" in message and "LoraLoaderModelOnly" in message
