
"""The pure-torch parts of core/patching/comfy_compose.py: the factorised Custom Diffusion merge, the K/V hooks,
FreeCustom's mask resampling and override, T2I-Zero's NMS attn2 patch, and the patch-key helpers."""
import torch
from torch import nn

from core import compose as C
from core.hooks.plan import conditional_rows
from core.patching import comfy_compose as CC


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _merge_case(seed=0, widths=((6, 16), (10, 16)), n=(2, 3)):
    g = _gen(seed)
    base = {f"l{i}": torch.randn(o, i_, generator=g, dtype=torch.float64) for i, (o, i_) in enumerate(widths)}
    deltas = [{k: 0.1 * torch.randn(w.shape, generator=g, dtype=torch.float64) for k, w in base.items()}
              for _ in n]
    feats = [torch.randn(k, widths[0][1], generator=g, dtype=torch.float64) for k in n]
    c_reg = torch.randn(40, widths[0][1], generator=g, dtype=torch.float64)
    return base, deltas, feats, c_reg


def test_factorised_merge_equals_the_core_closed_form():
    base, deltas, feats, c_reg = _merge_case()
    result = CC.merge_lowrank(base, deltas, feats, c_reg)
    expect = C.custom_diffusion_merge_layers(base, [{k: base[k] + d[k] for k in d} for d in deltas], feats, c_reg)
    for k, w0 in base.items():
        layer = result.layers[k]
        assert layer.rank == sum(f.shape[0] for f in feats)  # rank s = number of constraint rows
        assert torch.allclose(w0 + layer.delta().double(), expect[k], atol=1e-5)
    assert result.constraint_error < 1e-9


def test_factorised_merge_satisfies_each_concepts_constraint_and_a_missing_layer_keeps_w0():
    base, deltas, feats, c_reg = _merge_case(seed=3)
    del deltas[1]["l1"]  # concept 2 has no update on l1: there it must keep W0's outputs
    result = CC.merge_lowrank(base, deltas, feats, c_reg)
    for k, w0 in base.items():
        w = w0 + result.layers[k].delta().double()
        for d, c in zip(deltas, feats, strict=True):
            target = (w0 + d.get(k, torch.zeros_like(w0))) @ c.T
            assert torch.allclose(w @ c.T, target, atol=1e-4)


def test_kv_hooks_add_the_low_rank_update_and_start_at_the_base():
    torch.manual_seed(0)
    lin = nn.Linear(8, 5, bias=False)
    x = torch.randn(3, 7, 8)
    rs = CC.init_kv_residuals([("a.to_k", 8, 5)], rank=2, seed=1)
    with CC.kv_residuals({"a.to_k": lin}, rs):
        assert torch.equal(lin(x), x @ lin.weight.T)  # up = 0: exactly the base
    rs.layers["a.to_k"].up = torch.randn(5, 2)
    with CC.kv_residuals({"a.to_k": lin}, rs, strength=0.5):
        got = lin(x)
    expect = x @ (lin.weight + 0.5 * rs.layers["a.to_k"].delta()).T
    assert torch.allclose(got, expect, atol=1e-5)
    assert torch.equal(lin(x), x @ lin.weight.T)  # hooks removed


def test_block_keys_and_word_pool():
    paths = ["input_blocks.1.1", "middle_block.1", "output_blocks.3.1", "output_blocks.3.1"]
    assert CC.block_keys(paths) == [("input", 1), ("middle", 0), ("output", 3)]
    assert CC.word_pool([49406, 320, 1125, 49407, 49407, -1], 49406, 49407) == [1, 2]


def test_mask_at_is_nearest_neighbour_and_conditional_rows():
    m = torch.zeros(1, 8, 8)
    m[:, :4, :4] = 0.5
    assert torch.equal(CC.mask_at(m, (2, 2)), torch.tensor([[0.5, 0.0, 0.0, 0.0]]))
    assert conditional_rows(4, [1, 0]) == (2, 3) and conditional_rows(3, [0]) == (0, 1, 2)
    assert conditional_rows(2, [1]) == ()


def test_decoder_finest_levels_are_freecustoms_layers_on_sd15():
    from core.layouts import TransformerSite

    ins = [TransformerSite(f"input_blocks.{i}.1", w, False, 1) for i, w in ((1, 320), (2, 320), (4, 640),
                                                                             (5, 640), (7, 1280), (8, 1280))]
    outs = [TransformerSite(f"output_blocks.{i}.1", 1280 if i < 6 else 640 if i < 9 else 320, False, 1)
            for i in range(3, 12)]
    chosen = CC.decoder_finest_levels(ins + [TransformerSite("middle_block.1", 1280, False, 1)] + outs)
    assert [s.path for s in chosen] == [f"output_blocks.{i}.1" for i in range(6, 12)]


def test_reference_noise_is_fresh_per_step_and_seeded():
    refs = CC.References(torch.zeros(2, 4, 3, 3), torch.zeros(2, 3, 8), torch.ones(2, 8, 8), [1.0, 1.0], set(),
                         seed=5)
    assert torch.equal(refs.noise(0), refs.noise(0)) and not torch.equal(refs.noise(0), refs.noise(1))


def test_freecustom_override_captures_then_extends_self_attention():
    """Capture mode stores the references' k/v and runs the backend; apply mode is mrsa_attention over them;
    calls that are not self-attention in a chosen block go to the backend (or the previous override)."""
    g = _gen(0)
    heads, n, width = 2, 16, 8
    masks = torch.zeros(1, 8, 8)
    masks[:, :, :4] = 1.0
    refs = CC.References(torch.zeros(1, 4, 4, 4), torch.zeros(1, 3, 8), masks, [2.0], {("output", 3)})
    _, _, override_for, attn1_patch, attn1_out = CC.freecustom_patches(refs, model_sampling=None)
    calls = []

    def backend(q, k, v, heads, **kw):
        calls.append(kw.get("transformer_options"))
        return C.mrsa_attention(q, k, v, (), heads)

    def previous(func, *args, **kw):
        calls.append("previous")
        return func(*args, **kw)

    override = override_for(previous)
    q, k, v = (torch.randn(1, n, width, generator=g) for _ in range(3))
    opts = {"block": ("output", 3), "block_index": 0, "activations_shape": [1, width, 4, 4]}
    state = CC._MRSAState(capture=True)
    opts[CC.MRSA_KEY] = state
    attn1_patch(None, None, None, opts)
    override(backend, q, k, v, heads, transformer_options=opts)
    attn1_out(None, opts)
    assert set(state.feats) == {("output", 3, 0)} and calls[-1] is opts
    applied = CC._MRSAState(capture=False, feats=state.feats, rows=(1,))  # row 0 unconditional, row 1 the prompt
    opts[CC.MRSA_KEY] = applied
    q2 = torch.randn(2, n, width, generator=g)
    k2, v2 = torch.randn(2, n, width, generator=g), torch.randn(2, n, width, generator=g)
    attn1_patch(None, None, None, opts)
    got = override(backend, q2, k2, v2, heads, transformer_options=opts)
    ref_mask = CC.mask_at(masks, (4, 4))[0]
    expect = C.mrsa_attention(q2[1:], k2[1:], v2[1:], [(k[0], v[0], ref_mask, 2.0)], heads)
    assert torch.equal(got[1:], expect)
    assert torch.equal(got[:1], C.mrsa_attention(q2, k2, v2, (), heads)[:1])  # plain self-attention
    attn1_out(None, opts)
    n_calls = len(calls)
    override(backend, q2, k2, v2, heads, transformer_options=opts)  # not flagged as self-attention: backend
    assert calls[n_calls:] == ["previous", opts]


def test_nms_replace_rows_and_default():
    """Rows the wrapper marks get nms_attention; other rows get the backend's attention untouched."""
    g = _gen(1)
    heads, n, width, length = 2, 16, 8, 6
    q = torch.randn(2, n, width, generator=g)
    k, v = torch.randn(2, length, width, generator=g), torch.randn(2, length, width, generator=g)
    concepts = [[1], [3]]

    def attention(q, k, v, heads, attn_precision=None, transformer_options=None):
        return C.mrsa_attention(q, k, v, (), heads)

    _, replace_for = CC.nms_patches(concepts, torch.zeros(length, width), attention, (float("inf"), 0.0))
    attn2 = replace_for(None)
    extra = {"n_heads": heads, "activations_shape": [2, width, 4, 4], CC.NMS_KEY: (1,)}
    out = attn2(q, k, v, extra)
    assert torch.equal(out[0], attention(q, k, v, heads)[0])
    assert torch.allclose(out[1:], C.nms_attention(q[1:], k[1:], v[1:], heads, concepts, (4, 4)))
    extra[CC.NMS_KEY] = ()
    assert torch.equal(attn2(q, k, v, extra), attention(q, k, v, heads))
