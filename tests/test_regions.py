"""Regions: several low-rank deltas in one pass, each inside its own mask or attention region."""
import copy

import pytest
import torch

from core import residuals as R
from core.compose import OverlapError
from core.hooks.gate import LowRankGate, resize_mask
from core.hooks.plan import cfg_plan, plan_batch
from core.lora_files import ConvLowRank, lora_forward
from core.patching.diffusers import concept_positions, encode_text, unet_modules, unet_sites
from core.regions import Region, RegionGate, _attention
from core.residuals import LowRank

PROMPT = "a photo of a sks dog on the beach"


def random_lora(modules, paths, seed=0, rank=2, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for p in paths:
        w = modules[p].weight
        out_dim, in_dim = w.shape[0], w.shape[1]
        if w.ndim == 4 and w.shape[-1] > 1:
            k = w.shape[-1]
            layers[p] = ConvLowRank(torch.randn(rank, in_dim * k * k, generator=gen) * scale,
                                    torch.randn(out_dim, rank, generator=gen) * scale, float(rank), True, (k, k))
        else:
            layers[p] = LowRank(torch.randn(rank, in_dim, generator=gen) * scale,
                                torch.randn(out_dim, rank, generator=gen) * scale, float(rank), w.ndim == 4)
    return layers


def merged(unet, layers, strength=1.0):
    m = copy.deepcopy(unet)
    mods = unet_modules(m)
    with torch.no_grad():
        for p, layer in layers.items():
            w = mods[p].weight
            if isinstance(layer, ConvLowRank):
                delta = (layer.up @ layer.down).reshape(w.shape) * layer.scale
            else:
                delta = layer.delta().reshape(w.shape)
            w += strength * delta
    return m


@pytest.fixture
def call(tokenizer, text_encoder):
    ctx = encode_text(tokenizer, text_encoder, ["", PROMPT])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([300, 300]), ctx


def some_paths(modules):
    """One layer of each kind the gate treats differently."""
    want = ("attn1.to_q", "attn2.to_out.0", "ff.net.2", "proj_out", "attn2.to_k", "attn2.to_v", "0.in_layers.2")
    picked = {}
    for p in modules:
        for w in want:
            if p.endswith(w) and w not in picked:
                picked[w] = p
    return list(picked.values())


@torch.no_grad()
def run_gate(unet, call, regions, rule="argmax", rows=(), borrow=()):
    x, t, ctx = call
    gate = RegionGate(unet_modules(unet), unet_sites(unet), regions, rule)
    gate.set_latent_hw(tuple(x.shape[-2:]))
    with gate:
        gate.begin_call(rows, borrow)
        return unet(x, t, encoder_hidden_states=ctx).sample


@torch.no_grad()
def test_a_full_mask_is_the_lora_applied_globally(unet, call):
    modules = unet_modules(unet)
    layers = random_lora(modules, some_paths(modules))
    assert any(p.endswith("attn2.to_k") for p in layers) and any(isinstance(v, ConvLowRank) for v in layers.values())
    out = run_gate(unet, call, [Region(layers, 0.8, mask=torch.ones(16, 16))])
    x, t, ctx = call
    ref = merged(unet, layers, 0.8)(x, t, encoder_hidden_states=ctx).sample
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(out, unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-3)


@torch.no_grad()
def test_fused_regions_with_an_empty_and_a_full_mask_are_the_full_one_applied_globally(unet, call):
    # two active regions take the fused path (one matmul pair per layer, gates shared by every layer of a
    # resolution); over two calls, so gates built for one call are not reused for the next
    modules = unet_modules(unet)
    paths = [p for p in modules if p.endswith(("attn1.to_q", "ff.net.2", "proj_out", "attn2.to_k", "attn2.to_v"))]
    empty, full = random_lora(modules, paths, seed=3), random_lora(modules, paths, seed=4)
    x, t, ctx = call
    gate = RegionGate(modules, unet_sites(unet), [Region(empty, 1.0, mask=torch.zeros(16, 16)),
                                                    Region(full, 0.7, mask=torch.ones(16, 16))])
    gate.set_latent_hw(tuple(x.shape[-2:]))
    ref = merged(unet, full, 0.7)(x, t, encoder_hidden_states=ctx).sample
    with gate:
        for _ in range(2):
            gate.begin_call((), ())
            out = unet(x, t, encoder_hidden_states=ctx).sample
            assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_small_regions_computed_on_their_own_positions_equal_the_dense_pass(unet, call, monkeypatch):
    # three strips (soft-edged gates) cover a third of 3 x the positions: each region's matmuls then run on its
    # own positions; forcing the dense fused pass must give the same output
    modules = unet_modules(unet)
    paths = [p for p in modules if p.endswith(("attn1.to_q", "attn1.to_v", "ff.net.2", "proj_in", "proj_out"))]
    masks = [torch.zeros(16, 16) for _ in range(3)]
    masks[0][:, :5], masks[1][:, 5:11], masks[2][:, 11:] = 1.0, 0.5, 1.0
    masks[1][:, 5] = 0.25
    regions = [Region(random_lora(modules, paths, seed=10 + i), 0.9, mask=m) for i, m in enumerate(masks)]
    plans = []
    real = RegionGate._gathered_plan
    monkeypatch.setattr(RegionGate, "_gathered_plan", lambda self, *a: plans.append(real(self, *a)) or plans[-1])
    gathered = run_gate(unet, call, regions)
    assert any(p is not None for p in plans)  # the gathered path really ran
    monkeypatch.setattr(RegionGate, "_gathered_plan", lambda self, *a: None)
    dense = run_gate(unet, call, regions)
    assert torch.allclose(gathered, dense, atol=1e-5, rtol=1e-5)
    x, t, ctx = call
    assert not torch.allclose(dense, unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-3)


@torch.no_grad()
def test_an_empty_mask_is_the_base_model_exactly(unet, call):
    modules = unet_modules(unet)
    out = run_gate(unet, call, [Region(random_lora(modules, some_paths(modules)), 1.0, mask=torch.zeros(16, 16))])
    x, t, ctx = call
    assert torch.equal(out, unet(x, t, encoder_hidden_states=ctx).sample)


@torch.no_grad()
def test_disjoint_masks_change_only_their_own_half_at_the_first_gated_layer(sd1_unet, call):
    modules = unet_modules(sd1_unet)
    first = next(p for p in modules if p.endswith("proj_in"))  # the first transformer layer, 1x1 conv on SD1
    left, right = torch.zeros(8, 8), torch.zeros(8, 8)
    left[:, :4], right[:, 4:] = 1, 1
    seen = {}
    site = next(m for s, m in unet_sites(sd1_unet) if first.startswith(s.path + "."))
    # proj_in's output (after the regions' hooks) is what the first transformer block receives
    hook = site.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args: seen.setdefault("out", []).append(args[0].clone()))
    try:
        run_gate(sd1_unet, call, [])
        base = seen["out"][-1]
        run_gate(sd1_unet, call, [Region(random_lora(modules, [first], seed=1), 1.0, mask=left)])
        only_left = seen["out"][-1] - base
        run_gate(sd1_unet, call, [Region(random_lora(modules, [first], seed=1), 1.0, mask=left),
                                  Region(random_lora(modules, [first], seed=2), 1.0, mask=right)])
        both = seen["out"][-1] - base
    finally:
        hook.remove()
    only_left, both = (d.reshape(d.shape[0], 8, 8, -1) for d in (only_left, both))  # tokens [B, h*w, C]
    assert only_left[:, :, 4:].abs().max() == 0 and only_left[:, :, :4].abs().max() > 0
    # the right region's LoRA leaves the left half alone (to rounding: both regions go through one fused matmul)
    assert torch.allclose(both[:, :, :4], only_left[:, :, :4], atol=1e-6, rtol=0)
    assert both[:, :, 4:].abs().max() > 0


@torch.no_grad()
def test_one_attention_region_on_proj_out_is_lag(unet, call, tokenizer):
    x, t, ctx = call
    rs = R.init_residuals([s for s, _ in unet_sites(unet)], seed=3, init_scale=0.5)
    idx = concept_positions(tokenizer, PROMPT, ["sks", "dog"])
    with LowRankGate(unet_sites(unet), rs, localized=True) as lag:
        lag.plan = cfg_plan(2, [1, 0], idx)
        ref = unet(x, t, encoder_hidden_states=ctx).sample
    plan = plan_batch(2, [1, 0], [False, True])
    rows, borrow = plan.rows, plan.borrow
    out = run_gate(unet, call, [Region(dict(rs.layers), 1.0, tokens=idx)], rows=rows, borrow=borrow)
    assert torch.allclose(out, ref, atol=1e-6)


@torch.no_grad()
def test_overlapping_user_masks_with_the_error_rule_name_both(sd1_unet, call):
    modules = unet_modules(sd1_unet)
    paths = [next(p for p in modules if p.endswith("proj_out"))]
    regions = [Region(random_lora(modules, paths), mask=torch.ones(8, 8), name="cat"),
               Region(random_lora(modules, paths, seed=1), mask=torch.ones(8, 8), name="dog")]
    with pytest.raises(OverlapError, match="'cat' and 'dog'"):
        run_gate(sd1_unet, call, regions, rule="error")


def test_the_batch_plan_borrows_the_concept_chunk():
    plan = plan_batch(4, [1, 0], [False, True])
    assert (plan.rows, plan.borrow) == ((2, 3), (0, 1, 0, 1))
    plan = plan_batch(2, [1], [False])
    assert (plan.rows, plan.borrow) == ((), (-1, -1))


@torch.no_grad()
def test_a_half_mask_text_side_region_is_its_gated_attention_change_at_the_first_cross_attention(unet, call):
    # the text-side K/V delta of a region covering half the positions (computed on those positions only) equals
    # to_out(gate * (softmax(q (k + dk)^T)(v + dv) - softmax(q k^T) v)) of the full computation
    modules = unet_modules(unet)
    attn_path = next(p for p in modules if p.endswith("attn2.to_k")).rsplit(".", 1)[0]
    layers = random_lora(modules, [f"{attn_path}.to_k", f"{attn_path}.to_v"], seed=6)
    attn = next(m for m in unet.modules() if getattr(m, "to_k", None) is modules[f"{attn_path}.to_k"])
    seen = {}

    def keep(m, args, kwargs, out):
        seen.update(x=args[0], out=out)

    x, t, ctx = call
    hook = attn.register_forward_hook(keep, with_kwargs=True)
    unet(x, t, encoder_hidden_states=ctx)
    hook.remove()
    base_out, hidden = seen["out"], seen["x"]
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    gate = RegionGate(modules, unet_sites(unet), [Region(layers, 0.9, mask=left)])
    gate.set_latent_hw(tuple(x.shape[-2:]))
    with gate:  # installed first, so the kept output is the gated one
        hook = attn.register_forward_hook(keep, with_kwargs=True)
        try:
            gate.begin_call((), ())
            unet(x, t, encoder_hidden_states=ctx)
        finally:
            hook.remove()
    got = seen["out"]
    n = hidden.shape[1]
    side = int(round(n ** 0.5))
    g = resize_mask(left, (side, side)).reshape(1, n, 1)
    q, k, v = attn.to_q(hidden), attn.to_k(ctx), attn.to_v(ctx)
    kr = k + 0.9 * lora_forward(layers[f"{attn_path}.to_k"], ctx)
    vr = v + 0.9 * lora_forward(layers[f"{attn_path}.to_v"], ctx)
    change = g * (_attention(q, kr, vr, attn.heads) - _attention(q, k, v, attn.heads))
    want = base_out + change @ attn.to_out[0].weight.T
    assert 0 < int((g > 0).sum()) <= n // 2  # at most half the positions: the gated-positions-only path
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got, base_out, atol=1e-4)
