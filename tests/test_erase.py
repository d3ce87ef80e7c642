"""Closed-form cross-attention erasure (UCE + RealEra neighbour mining): the least-squares identities."""
import copy

import pytest
import torch

from core import erase as E
from core.patching.diffusers import unet_sites
from core.toy_models import tiny_tokenizer


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_feasible_edit_maps_erased_rows_to_anchors_and_keeps_preserved_rows():
    d = 32
    rows = E.EditRows(rand(5, d, seed=1), rand(5, d, seed=2), rand(10, d, seed=3))  # 15 rows < 32 dims
    w = rand(48, d, seed=4)
    delta = E.edit_deltas([("w", w)], E.edit_operator(rows, lam=1e-6), torch.float64)["w"]
    new = w + delta
    assert torch.allclose(rows.erase @ new.T, rows.anchor @ w.T, atol=1e-4)
    assert torch.allclose(rows.preserve @ new.T, rows.preserve @ w.T, atol=1e-4)


def test_overdetermined_edit_is_the_least_squares_optimum():
    """Gradient of sum_e ||W'c_e - Wa_e||^2 + p sum_p ||W'c_p - Wc_p||^2 + lam ||W' - W||^2 vanishes at W'."""
    d, lam, pw = 8, 0.3, 2.0
    rows = E.EditRows(rand(20, d, seed=5), rand(20, d, seed=6), rand(30, d, seed=7))
    w = rand(12, d, seed=8)
    new = w + E.edit_deltas([("w", w)], E.edit_operator(rows, lam, pw), torch.float64)["w"]
    grad = ((rows.erase @ new.T - rows.anchor @ w.T).T @ rows.erase
            + pw * (rows.preserve @ (new - w).T).T @ rows.preserve + lam * (new - w))
    assert grad.abs().max() < 1e-9 * w.abs().max() * rows.erase.abs().max() ** 2 * 100


def test_neighbours_lie_in_the_ball_and_share_the_anchor():
    e, a = rand(3, 16, seed=9), rand(3, 16, seed=10)
    pts, anchors = E.mine_neighbours(e, a, count=50, radius=0.2, seed=1)
    assert pts.shape == (150, 16) and torch.equal(anchors, a.repeat_interleave(50, 0))
    dist = (pts - e.repeat_interleave(50, 0)).norm(dim=1)
    assert (dist <= 0.2 * e.norm(dim=1).repeat_interleave(50, 0) + 1e-9).all()
    assert E.mine_neighbours(e, a, 0, 0.2)[0].shape == (0, 16)


def test_neighbour_mining_erases_unseen_nearby_embeddings_better():
    """A held-out point near the erased row (a 'synonym') maps closer to the anchor with RealEra's mining."""
    d = 64
    rows = E.EditRows(rand(2, d, seed=11), rand(2, d, seed=12), rand(20, d, seed=13))
    w = rand(40, d, seed=14)
    synonyms, _ = E.mine_neighbours(rows.erase, rows.anchor, count=20, radius=0.3, seed=99)  # unseen seed
    target = rows.anchor.repeat_interleave(20, 0) @ w.T

    def error(neighbours):
        delta = E.closed_form_edit([("w", w)], rows, lam=1e-3, neighbours=neighbours, radius=0.3, seed=0)["w"]
        return ((synonyms @ (w + delta.double()).T - target).norm() / target.norm()).item()

    assert error(100) < 0.6 * error(0), (error(100), error(0))


@pytest.fixture(scope="module")
def short_text():
    """A tokenizer with 8-token prompts and a tiny text encoder: few enough rows that the edit is exact."""
    from core.toy_models import tiny_text_encoder

    tok = tiny_tokenizer(max_length=8)
    enc = tiny_text_encoder(len(tok))

    @torch.no_grad()
    def encode(text):
        ids = tok(text, padding="max_length", max_length=8, truncation=True).input_ids
        words = len(tok(text, add_special_tokens=False).input_ids)
        return enc(torch.tensor([ids]))[0][0], words
    return encode


def test_unet_edit_erases_keys_and_values_and_never_touches_the_model(unet, short_text):
    rows = E.build_rows(short_text, ["red"], "", ["dog"])
    projections = E.cross_attention_projections(unet_sites(unet))
    assert len(projections) == 2 * sum(s.depth for s, _ in unet_sites(unet))
    before = {n: m.weight.clone() for n, m in projections}
    deltas = E.closed_form_edit([(n, m.weight) for n, m in projections], rows, lam=1e-7)  # feasible: exact as lam->0
    assert all(torch.equal(m.weight, before[n]) for n, m in projections)  # read only
    edited = copy.deepcopy(unet)
    new = dict(E.cross_attention_projections(unet_sites(edited)))
    with torch.no_grad():
        for name, layer in new.items():
            layer.weight += deltas[name]
            e_out, a_out = layer(rows.erase.float()), before[name] @ rows.anchor.float().T
            assert torch.allclose(e_out, a_out.T, atol=1e-3 * a_out.abs().max()), name
            kept = short_text("dog")[0]
            assert torch.allclose(layer(kept), kept @ before[name].T, atol=1e-3 * a_out.abs().max()), name


def test_multi_token_word_maps_every_sub_token_to_the_anchor():
    concept, anchor = rand(8, 4, seed=15), rand(8, 4, seed=16)
    e, a = E.aligned_rows(concept, 3, anchor, 1)  # a word split into 3 sub-tokens, a one-token anchor
    assert torch.equal(e[:2], concept[1:3]) and torch.equal(a[:2], anchor[1].expand(2, 4))
    assert torch.equal(e[2:], concept[3:8]) and torch.equal(a[2:], anchor[1:6])  # tails aligned
    e1, a1 = E.aligned_rows(concept, 3, anchor, 1, tail_rows=1)  # the word rows and the end token only
    assert torch.equal(e1, concept[1:5]) and torch.equal(a1[2:], anchor[1:3])


def test_lowrank_file_reproduces_the_edit_and_loads_in_lora_keys(tmp_path):
    """Delta W = W G = (W L) R^T: exact at G's rank (<= erase rows), saved as ordinary LoRA keys, bit-identical."""
    from core import residuals as R

    d = 32
    rows = E.EditRows(rand(6, d, seed=30), rand(6, d, seed=31), rand(8, d, seed=32))
    weights = [("input_blocks.1.1.transformer_blocks.0.attn2.to_k", rand(20, d, seed=33).float())]
    op = E.closed_form_operator(rows, lam=0.1)
    full = E.edit_deltas(weights, op)[weights[0][0]]
    layers, error = E.lowrank_edit(weights, op)
    layer = layers[weights[0][0]]
    assert layer.rank <= 6 and error < 1e-6
    assert torch.allclose(layer.delta(), full, atol=1e-5 * full.abs().max())
    truncated, error2 = E.lowrank_edit(weights, op, rank=2)
    assert truncated[weights[0][0]].rank == 2 and 0 < error2 < 1
    path = R.save(R.ResidualSet(layers, {"technique": "uce_realera"}), str(tmp_path / "e.safetensors"))
    loaded = R.load(path)
    assert torch.equal(loaded.layers[weights[0][0]].up, layer.up) and loaded.metadata["technique"] == "uce_realera"
    assert sorted(R.to_state_dict(loaded)) == [f"diffusion_model.{weights[0][0]}.{k}"
                                               for k in ("alpha", "lora_down.weight", "lora_up.weight")]


def test_bad_inputs_get_clear_messages(short_text):
    with pytest.raises(ValueError, match="at least one word"):
        E.build_rows(short_text, [], "", [])
    with pytest.raises(ValueError, match="both erased and preserved"):
        E.build_rows(short_text, ["red"], "", ["red"])
    with pytest.raises(ValueError, match="no tokens"):
        E.build_rows(short_text, [" "], "", [])
    with pytest.raises(ValueError, match="wide"):
        E.edit_deltas([("w", torch.zeros(3, 5))], torch.eye(4))
    assert E.split_words(" red, crimson ,,red\nscarlet") == ["red", "crimson", "scarlet"]


def test_edit_quality_reports_zero_residual_for_a_feasible_edit_and_one_for_no_edit():
    d = 16
    rows = E.EditRows(rand(3, d, seed=20), rand(3, d, seed=21), rand(4, d, seed=22))
    w = rand(10, d, seed=23)
    deltas = E.edit_deltas([("w", w)], E.edit_operator(rows, lam=1e-8), torch.float64)
    residual, change = E.edit_quality([("w", w)], deltas.__getitem__, rows)
    assert residual < 1e-5 and change < 1e-5
    assert E.edit_quality([("w", w)], lambda name: torch.zeros_like(w), rows) == (1.0, 0.0)


def test_empty_preservation_list_is_allowed_with_a_warning(caplog):
    d = 16
    rows = E.EditRows(rand(3, d, seed=40), rand(3, d, seed=41), rand(0, d, seed=42))
    w = rand(10, d, seed=43)
    with caplog.at_level("WARNING"):
        deltas = E.closed_form_edit([("w", w)], rows, lam=1e-8)
    assert "without a preservation list" in caplog.text
    assert torch.allclose(rows.erase @ (w + deltas["w"].double()).T, rows.anchor @ w.T, atol=1e-4)
