"""LAG and global residuals on tiny diffusers UNets: the identities a user relies on."""
import pytest
import torch

from core import residuals as R
from core.hooks.gate import LocalizationError, LowRankGate
from core.hooks.plan import cfg_plan
from core.patching.diffusers import concept_positions, encode_text, unet_family, unet_sites

PROMPT = "a photo of a sks dog on the beach"


@pytest.fixture
def batch(tokenizer, text_encoder):
    """A CFG batch: uncond row first, then the concept prompt (ComfyUI's order varies; here [1, 0])."""
    ctx = encode_text(tokenizer, text_encoder, ["", PROMPT])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([500, 500])
    idx = concept_positions(tokenizer, PROMPT, ["sks", "dog"])
    return x, t, ctx, idx


def residuals_for(unet, zero=False, seed=0):
    rs = R.init_residuals([s for s, _ in unet_sites(unet)], seed=seed, init_scale=0.5,
                          metadata={"base_family": unet_family(unet)})
    if zero:
        for layer in rs.layers.values():
            layer.up.zero_()
    return rs


@torch.no_grad()
def run(unet, batch, gate=None):
    x, t, ctx, idx = batch
    if gate is not None:
        gate.plan = cfg_plan(2, [1, 0], idx)
    return unet(x, t, encoder_hidden_states=ctx).sample


def test_zero_residual_is_the_base_model_exactly(unet, batch):
    base = run(unet, batch)
    rs = residuals_for(unet, zero=True)
    for localized in (False, True):
        with LowRankGate(unet_sites(unet), rs, localized=localized) as gate:
            assert torch.equal(run(unet, batch, gate), base)


def test_lag_mask_of_zeros_is_base_and_mask_of_ones_is_global_exactly(unet, batch):
    rs = residuals_for(unet)
    base = run(unet, batch)
    with LowRankGate(unet_sites(unet), rs) as gate:
        global_out = run(unet, batch, gate)
    assert not torch.allclose(global_out, base)
    with LowRankGate(unet_sites(unet), rs, localized=True, mask_fn=torch.zeros_like) as gate:
        assert torch.equal(run(unet, batch, gate), base)
    with LowRankGate(unet_sites(unet), rs, localized=True, mask_fn=torch.ones_like) as gate:
        assert torch.equal(run(unet, batch, gate), global_out)


def test_median_lag_turns_on_half_of_each_block_and_uncond_borrows_the_cond_mask(unet, batch):
    rs = residuals_for(unet)
    with LowRankGate(unet_sites(unet), rs, localized=True) as gate:
        out = run(unet, batch, gate)
        masks = dict(gate.last_masks)
    assert set(masks) == {s.path for s, _ in unet_sites(unet)}
    for gate_rows in masks.values():
        n = gate_rows.shape[1]
        assert gate_rows[1].sum().item() == n // 2  # cond row (index 1): half of the positions
        assert torch.equal(gate_rows[0], gate_rows[1])  # the uncond row uses the same mask
    assert torch.isfinite(out).all()


def test_hooks_are_gone_after_the_with_block(unet, batch):
    base = run(unet, batch)
    with LowRankGate(unet_sites(unet), residuals_for(unet), localized=True) as gate:
        run(unet, batch, gate)
    assert torch.equal(run(unet, batch), base)
    assert all(not m._forward_hooks for m in unet.modules())


def test_strength_zero_and_inactive_plan_are_base(sd1_unet, batch):
    base = run(sd1_unet, batch)
    rs = residuals_for(sd1_unet)
    with LowRankGate(unet_sites(sd1_unet), rs, strength=0.0, localized=True) as gate:
        assert torch.equal(run(sd1_unet, batch, gate), base)
    with LowRankGate(unet_sites(sd1_unet), rs, localized=True) as gate:
        x, t, ctx, idx = batch
        gate.plan = cfg_plan(2, [1, 0], idx, active=False)
        assert torch.equal(sd1_unet(x, t, encoder_hidden_states=ctx).sample, base)


def test_lag_composes_with_another_attention_processor(sd1_unet, batch):
    """Another pack's cross-attention replacement still runs, and LAG still sees the maps."""
    from diffusers.models.attention_processor import AttnProcessor

    calls = []

    class Counting(AttnProcessor):
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, *a, **kw):
            calls.append(1)
            return super().__call__(attn, hidden_states, encoder_hidden_states, *a, **kw)

    sites = unet_sites(sd1_unet)
    originals = {}
    for _, module in sites:
        for block in module.transformer_blocks:
            originals[block] = block.attn2.processor
            block.attn2.set_processor(Counting())
    try:
        with LowRankGate(sites, residuals_for(sd1_unet), localized=True) as gate:
            run(sd1_unet, batch, gate)
            assert len(gate.last_masks) == len(sites)
        assert len(calls) == len(sites)
    finally:
        for block, proc in originals.items():
            block.attn2.set_processor(proc)


def test_missing_maps_are_an_error_not_a_silent_global_residual(sd1_unet, batch):
    sites = unet_sites(sd1_unet)
    gate = LowRankGate(sites, residuals_for(sd1_unet), localized=True)
    gate.install()
    try:
        for h in gate.tap._handles[:2]:  # drop the first block's q/k hooks
            h.remove()
        with pytest.raises(LocalizationError, match="attention map"):
            run(sd1_unet, batch, gate)
    finally:
        gate.remove()


def test_cfg_plan_uncond_rows_borrow_the_same_latent():
    plan = cfg_plan(4, [0, 1], [5, 6])
    assert plan.rows == (0, 1) and plan.tokens == (5, 6)
    assert plan.borrow == (0, 1, 0, 1)  # rows 2, 3 (uncond) use the masks of rows 0, 1: the same latents
    plan = cfg_plan(2, [1], [5])
    assert not plan.gated and plan.borrow == (-1, -1)  # an uncond-only call has no concept: no residual


def test_lag_on_a_non_square_latent_keeps_half_of_each_block(unet, tokenizer, text_encoder):
    ctx = encode_text(tokenizer, text_encoder, ["", PROMPT])
    x = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(2))
    idx = concept_positions(tokenizer, PROMPT, ["sks", "dog"])
    with LowRankGate(unet_sites(unet), residuals_for(unet), localized=True) as gate:
        gate.plan = cfg_plan(2, [1, 0], idx)
        with torch.no_grad():
            out = unet(x, torch.tensor([10, 10]), encoder_hidden_states=ctx).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    sizes = sorted({m.shape[1] for m in gate.last_masks.values()})
    assert sizes == [4 * 6, 8 * 12]  # each block at its own resolution
    assert all(m[1].sum().item() == m.shape[1] // 2 for m in gate.last_masks.values())
