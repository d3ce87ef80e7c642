"""Cut-Mix: two concepts' images side by side, and residuals trained each inside its own half."""
import pytest
import torch

from core import residuals as R
from core import training
from core.cut_mix import cut_mix, gated_residuals, shrink, spread_rows, trainable_copy, unmix_loss, unmix_term, window
from core.patching.diffusers import encode_text, unet_modules, unet_sites
from core.regions import Region, RegionGate
from core.residuals import LowRank


def blob_images(columns, h=8, w=12, colour=(1.0, 0.0, 0.0)):
    """One image per column: gray, with a 2-px-wide coloured object centred on that column; and its masks."""
    imgs = torch.full((len(columns), h, w, 3), 0.5)
    masks = torch.zeros(len(columns), h, w)
    for i, c in enumerate(columns):
        masks[i, 3:5, c - 1:c + 1] = 1
        imgs[i, 3:5, c - 1:c + 1] = torch.tensor(colour)
    return imgs, masks


def test_each_pair_has_a_on_the_left_and_b_on_the_right_with_its_object_kept():
    a, ma = blob_images([3, 9])
    b, mb = blob_images([6], colour=(0.0, 0.0, 1.0))
    mixed, left, right = cut_mix(a, ma, b, mb)
    assert mixed.shape == (2, 8, 12, 3)
    assert torch.equal(left + right, torch.ones(8, 12)) and left[:, :6].min() == 1 and left[:, 6:].max() == 0
    for i in range(2):  # every object pixel survives the cut, in its own half
        assert (mixed[i, :, :6, 0] == 1).sum() == ma[i].sum() and (mixed[i, :, :6, 2] == 1).sum() == 0
        assert (mixed[i, :, 6:, 2] == 1).sum() == mb[0].sum() and (mixed[i, :, 6:, 0] == 1).sum() == 0
    # pair (i, j) is row i * Nb + j: a's second image is the second row's left half
    assert torch.equal(mixed[1, :, :6], window(a[1], ma[1], 6))


def test_the_window_is_centred_on_the_object_and_stays_inside_the_image():
    img, m = blob_images([6])
    win = window(img[0], m[0], 6)
    cols = (win[..., 0] == 1).any(0).nonzero().flatten().tolist()
    assert cols == [2, 3]  # centred: the object's two columns in the middle of six
    edge, me = blob_images([1])
    assert torch.equal(window(edge[0], me[0], 6), edge[0, :, :6])  # shifted inside, not padded
    with pytest.raises(ValueError, match="wider"):
        window(img[0], m[0], 13)


def test_images_of_different_sizes_are_refused_with_what_to_do():
    a, _ = blob_images([3])
    b, _ = blob_images([3], w=10)
    with pytest.raises(ValueError, match="resize"):
        cut_mix(a, None, b, None)


def test_shrink_keeps_the_frame_and_a_uniform_background_and_scales_the_area():
    img, m = blob_images([6], h=16, w=16)
    m[0] = 0
    m[0, 4:12, 4:12] = 1
    img[0][m[0] > 0] = torch.tensor([1.0, 0.0, 0.0])
    out, om = shrink(img, m, 0.5)
    assert out.shape == img.shape and om.shape == m.shape
    assert torch.allclose(out[0, 0, 0], torch.tensor([0.5, 0.5, 0.5]))  # the border repeated outward
    assert float(om.sum()) == pytest.approx(float(m.sum()) * 0.25, rel=0.05)
    same, sm = shrink(img, m, 1.0)
    assert same is img and sm is m
    with pytest.raises(ValueError):
        shrink(img, m, 1.5)


def random_set(modules, paths, seed, scale=0.3):
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for p in paths:
        w = modules[p].weight
        layers[p] = LowRank(torch.randn(2, w.shape[1], generator=gen) * scale,
                            torch.randn(w.shape[0], 2, generator=gen) * scale, 2.0, w.ndim == 4)
    return R.ResidualSet(layers, {})


@pytest.fixture
def call(tokenizer, text_encoder):
    ctx = encode_text(tokenizer, text_encoder, ["", "a photo of a sks dog"])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    return x, torch.tensor([300, 300]), ctx


@torch.no_grad()
def test_training_hooks_give_what_apply_regions_samples_with_mask_gates(unet, call):
    """Trained as sampled: the hooks the trainer uses equal RegionGate's mask regions (one set per half)."""
    x, t, ctx = call
    modules = unet_modules(unet)
    paths = [p for p in modules if p.endswith(("proj_out", "attn2.to_out.0", "ff.net.2"))]
    sets = [random_set(modules, paths, 1), random_set(modules, paths, 2)]
    left, right = torch.zeros(16, 16), torch.zeros(16, 16)
    left[:, :8], right[:, 8:] = 1, 1
    base = unet(x, t, encoder_hidden_states=ctx).sample
    with gated_residuals(modules, [(sets[0], left), (sets[1], right)]):
        trained = unet(x, t, encoder_hidden_states=ctx).sample
    gate = RegionGate(modules, [], [Region(dict(sets[0].layers), mask=left), Region(dict(sets[1].layers), mask=right)])
    gate.set_latent_hw((8, 8))
    with gate:
        gate.begin_call((), ())
        sampled = unet(x, t, encoder_hidden_states=ctx).sample
    assert not torch.allclose(trained, base, atol=1e-3)
    assert torch.allclose(trained, sampled, atol=1e-5, rtol=1e-4)
    with gated_residuals(modules, [(sets[0], torch.zeros(16, 16))]):  # an empty mask is the base model exactly
        assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, base)
    assert torch.equal(unet(x, t, encoder_hidden_states=ctx).sample, base)  # nothing left behind


def test_gradients_reach_only_the_sets_whose_gate_is_open_and_the_original_stays(sd1_unet, call):
    x, t, ctx = call
    modules = unet_modules(sd1_unet)
    paths = [p for p in modules if p.endswith("proj_out")]
    original = random_set(modules, paths, 3)
    live, shut = trainable_copy(original), trainable_copy(original)
    for p in live.parameters() + shut.parameters():
        p.requires_grad_(True)
    with gated_residuals(modules, [(live, torch.ones(8, 8)), (shut, torch.zeros(8, 8))]):
        sd1_unet(x, t, encoder_hidden_states=ctx).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in live.parameters())
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in shut.parameters())
    with torch.no_grad():
        live.parameters()[0].add_(1.0)
    assert not torch.equal(live.parameters()[0], original.parameters()[0])


def test_spread_rows_keeps_every_row_up_to_the_limit_and_spreads_beyond_it():
    assert spread_rows(5, 16) == [0, 1, 2, 3, 4]
    rows = spread_rows(64, 16)
    assert len(rows) == len(set(rows)) == 16 and rows[0] == 0 and rows[-1] == 63
    with pytest.raises(ValueError):
        spread_rows(4, 0)


def test_unmix_loss_is_the_mean_square_of_each_concepts_attention_outside_its_own_region():
    left, right = torch.zeros(4, 4), torch.zeros(4, 4)
    left[:, :2], right[:, 2:] = 1, 1
    inside = torch.stack([left.flatten(), right.flatten()])[None] * 0.7  # [1, 2, 16]: each concept in its half
    assert unmix_loss([inside], [left, right], (4, 4)) == 0
    swapped = inside.flip(1)  # each concept entirely in the other's half: 8 of 16 positions at 0.7, per concept
    assert torch.isclose(unmix_loss([swapped], [left, right], (4, 4)), torch.tensor(0.49 * 8 / 16))
    coarse = torch.full((1, 2, 4), 0.5)  # a 2x2 layer: the regions are resized to it; the layers are averaged
    assert torch.isclose(unmix_loss([swapped, coarse], [left, right], (4, 4)), torch.tensor((0.245 + 0.125) / 2))
    with pytest.raises(ValueError, match="no attention maps"):
        unmix_loss([], [left, right], (4, 4))


def test_unmix_term_over_every_token_with_no_region_is_its_weight_and_trains_the_residuals(sd1_unet, call):
    """Attention over all tokens sums to 1 at every position, so with every token and an empty region the term
    is exactly its weight; with halves it is differentiable in the gated residuals and adds to the training loss."""
    x, t, ctx = call
    sites, modules = unet_sites(sd1_unet), unet_modules(sd1_unet)
    everything = [list(range(ctx.shape[1]))]
    with unmix_term(sites, everything, [torch.zeros(16, 16)], (8, 8), 3.0) as term, torch.no_grad():
        sd1_unet(x, t, encoder_hidden_states=ctx)
        assert torch.isclose(term(), torch.tensor(3.0), atol=1e-5)
    paths = [p for p in modules if p.endswith("proj_out")]
    live = trainable_copy(random_set(modules, paths, 4))
    for p in live.parameters():
        p.requires_grad_(True)
    left = torch.zeros(16, 16)
    left[:, :8] = 1
    with gated_residuals(modules, [(live, left)]), unmix_term(sites, [[5]], [left], (8, 8), 1.0) as term:
        sd1_unet(x, t, encoder_hidden_states=ctx)
        term().backward()
    # the maps read the hidden states that earlier blocks' residuals change (the last block's reaches no attention)
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in live.parameters())
    assert not any(m._forward_hooks for m in sd1_unet.modules())  # no hook left behind

    def losses(extra):
        params = [torch.zeros(1, requires_grad=True)]
        cfg = training.TrainConfig(steps=3, batch_size=1, learning_rate=1e-3, seed=0)
        return training.train(params, lambda x_t, t_, c: x_t * 0 + params[0], x[:1], ctx[1:],
                              torch.linspace(0.99, 0.01, 10), "eps", None, cfg, extra_loss=extra)
    assert torch.allclose(torch.tensor(losses(lambda: torch.tensor(0.25))), torch.tensor(losses(None)) + 0.25)
