"""core.compose: Custom Diffusion merge, T2I-Zero corrections, FreeCustom MRSA, overlap rules."""
import pytest
import torch
import torch.nn.functional as F

from core import compose as C


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ Custom Diffusion
def _concepts(out=6, width=10, n=(2, 3), seed=0):
    g = _gen(seed)
    w0 = torch.randn(out, width, generator=g, dtype=torch.float64)
    weights = [w0 + 0.3 * torch.randn(out, 2, generator=g, dtype=torch.float64)
               @ torch.randn(2, width, generator=g, dtype=torch.float64) for _ in n]
    feats = [torch.randn(k, width, generator=g, dtype=torch.float64) for k in n]
    c_reg = torch.randn(40, width, generator=g, dtype=torch.float64)
    return w0, weights, feats, c_reg


def test_merge_satisfies_every_concepts_constraint():
    """W C_i^T = W_i C_i^T for every concept i: each concept's tokens see its own fine-tuned K/V."""
    w0, weights, feats, c_reg = _concepts()
    w = C.custom_diffusion_merge(w0, weights, feats, c_reg, ridge=0.0)
    for wi, ci in zip(weights, feats, strict=True):
        assert torch.allclose(w @ ci.T, wi @ ci.T, atol=1e-9)


def test_merge_equals_the_kkt_solution():
    """The closed form solves [[A, C^T], [C, 0]] [W^T; -Lambda^T] = [A W0^T; V^T] with A = C_reg^T C_reg."""
    w0, weights, feats, c_reg = _concepts(seed=1)
    w = C.custom_diffusion_merge(w0, weights, feats, c_reg, ridge=0.0)
    c = torch.cat(feats)
    v = torch.cat([wi @ ci.T for wi, ci in zip(weights, feats, strict=True)], dim=1)
    a = c_reg.T @ c_reg
    s, d = c.shape
    kkt = torch.zeros(d + s, d + s, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = a, c.T, c
    rhs = torch.cat([a @ w0.T, v.T])
    expect = torch.linalg.solve(kkt, rhs)[:d].T
    assert torch.allclose(w, expect, atol=1e-9)


def test_merge_is_the_constrained_minimum():
    """Any other feasible W + N (N C^T = 0) has ||(W + N - W0) C_reg^T||^2 >= the merge's."""
    w0, weights, feats, c_reg = _concepts(seed=2)
    w = C.custom_diffusion_merge(w0, weights, feats, c_reg, ridge=0.0)
    c = torch.cat(feats)
    null = torch.eye(c.shape[1], dtype=torch.float64) - c.T @ torch.linalg.solve(c @ c.T, c)  # projector on C's null
    best = C.merge_objective(w, w0, c_reg)
    g = _gen(3)
    for _ in range(20):
        n = torch.randn(w.shape, generator=g, dtype=torch.float64) @ null * 0.1
        assert torch.allclose((w + n) @ c.T, w @ c.T, atol=1e-9)  # still feasible
        assert C.merge_objective(w + n, w0, c_reg) >= best - 1e-9


def test_merge_with_one_concept_reduces_to_that_concept():
    """One concept: W C_1^T = W_1 C_1^T; and if W_1 C_1^T = W0 C_1^T already, the merge returns W0 (Lambda = 0)."""
    w0, weights, feats, c_reg = _concepts(n=(3,), seed=4)
    w = C.custom_diffusion_merge(w0, weights[:1], feats[:1], c_reg)
    assert torch.allclose(w @ feats[0].T, weights[0] @ feats[0].T, atol=1e-8)
    c = feats[0]
    w_null = w0 + torch.randn(w0.shape, generator=_gen(5), dtype=torch.float64) @ (
        torch.eye(c.shape[1], dtype=torch.float64) - c.T @ torch.linalg.solve(c @ c.T, c))
    assert torch.allclose(w_null @ c.T, w0 @ c.T, atol=1e-9)
    assert torch.allclose(C.custom_diffusion_merge(w0, [w_null], [c], c_reg), w0, atol=1e-9)


def test_merge_without_concepts_returns_w0():
    """No constraints: argmin ||(W - W0) C_reg^T||^2 over C_reg spanning everything is W0 itself."""
    w0, _, _, c_reg = _concepts()
    assert torch.equal(C.custom_diffusion_merge(w0, [], [], c_reg), w0)
    assert torch.linalg.matrix_rank(c_reg) == w0.shape[1]


def test_merge_layers_shares_the_projector_and_keeps_dtype():
    w0, weights, feats, c_reg = _concepts(seed=6)
    base = {"a.to_k": w0.float(), "a.to_v": (2 * w0).float()}
    concepts = [{"a.to_k": weights[0].float()}, {"a.to_k": weights[1].float(), "a.to_v": (2 * weights[1]).float()}]
    merged = C.custom_diffusion_merge_layers(base, concepts, [f.float() for f in feats], c_reg.float())
    assert merged["a.to_k"].dtype == torch.float32
    one = C.custom_diffusion_merge(base["a.to_k"], [weights[0].float(), weights[1].float()],
                                   [f.float() for f in feats], c_reg.float())
    assert torch.allclose(merged["a.to_k"], one, atol=1e-6)
    # the first concept has no to_v residual: its tokens keep W0's values there
    assert torch.allclose(merged["a.to_v"].double() @ feats[0].T, 2 * w0 @ feats[0].T, atol=1e-4)
    with pytest.raises(ValueError, match="one per concept"):
        C.custom_diffusion_merge(w0, weights, feats[:1], c_reg)


# ------------------------------------------------------------------------------------------ T2I-Zero
def test_correction_leaves_non_concept_tokens_of_a_one_concept_prompt_untouched():
    """Only concept tokens are corrected: every other position, BOS and padding included, is bit-identical."""
    cond = torch.randn(2, 12, 16, generator=_gen(0))
    out = C.correction_by_similarities(cond, [[3, 4]])
    others = [i for i in range(12) if i not in (3, 4)]
    assert torch.equal(out[:, others], cond[:, others])
    assert not torch.equal(out[:, 3], cond[:, 3])
    assert torch.allclose(out[:, 3].norm(dim=-1), cond[:, 3].norm(dim=-1), atol=1e-5)  # keep_norm


def test_correction_identities():
    """strength 0 or top_k 1 (the only neighbour is the token itself): e_p' = e_p exactly."""
    cond = torch.randn(1, 10, 8, generator=_gen(1))
    assert torch.equal(C.correction_by_similarities(cond, [[2], [5]], strength=0.0), cond)
    assert torch.equal(C.correction_by_similarities(cond, [[2], [5]], top_k=1), cond)


def test_correction_formula_and_that_concepts_never_borrow_from_each_other():
    """e_p' = e_p + s (sum_{top-k} softmax(cos / T) e_j - e_p), the pool excluding BOS and the other concepts."""
    cond = torch.randn(1, 8, 6, generator=_gen(2), dtype=torch.float64)
    cond[0, 5] = cond[0, 2] * 1.5 + 0.01  # concept B's token is the closest to concept A's
    out = C.correction_by_similarities(cond, [[2], [5]], top_k=3, temperature=0.2, strength=0.7, keep_norm=False)
    pool = [1, 3, 4, 6, 7, 2]
    e = cond[0]
    sims = F.cosine_similarity(e[2][None], e[pool], dim=-1)
    top, idx = sims.topk(3)
    target = ((top / 0.2).softmax(0)[:, None] * e[pool][idx]).sum(0)
    assert torch.allclose(out[0, 2], e[2] + 0.7 * (target - e[2]), atol=1e-12)
    moved = cond.clone()
    moved[0, 5] = torch.randn(6, generator=_gen(3), dtype=torch.float64)
    again = C.correction_by_similarities(moved, [[2], [5]], top_k=3, temperature=0.2, strength=0.7, keep_norm=False)
    assert torch.equal(again[0, 2], out[0, 2])  # A's correction does not depend on B's embedding
    words = C.correction_by_similarities(cond, [[2], [5]], top_k=2, keep_norm=False, pool=[1, 3])
    near = 1 if F.cosine_similarity(e[2], e[1], dim=0) > F.cosine_similarity(e[2], e[3], dim=0) else 3
    w = (torch.stack([F.cosine_similarity(e[2], e[near], dim=0), torch.tensor(1.0, dtype=e.dtype)]) / 0.1).softmax(0)
    assert torch.allclose(words[0, 2], w[0] * e[near] + w[1] * e[2], atol=1e-12)  # pool: given words + itself
    with pytest.raises(ValueError, match="two concepts"):
        C.correction_by_similarities(cond, [[2], [2]])


def _peak(h, w, cy, cx, scale=1.0):
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return (scale * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / 4.0)).flatten()


def test_nms_with_one_concept_is_the_identity():
    probs = torch.rand(2, 64, 7, generator=_gen(4)).softmax(-1)
    assert torch.equal(C.cross_token_nms(probs, [[1, 2]]), probs)


def test_nms_two_disjoint_peaks_keep_their_own():
    """Each concept keeps its attention where its (smoothed) map is the larger, and is 0 where the other's is."""
    h = w = 8
    probs = torch.full((1, h * w, 5), 0.01)
    probs[0, :, 1] += _peak(h, w, 1, 1)
    probs[0, :, 3] += _peak(h, w, 6, 6)
    out = C.cross_token_nms(probs, [[1], [3]])
    tl, br = 1 * w + 1, 6 * w + 6
    assert out[0, tl, 1] == probs[0, tl, 1] and out[0, tl, 3] == 0
    assert out[0, br, 3] == probs[0, br, 3] and out[0, br, 1] == 0
    assert ((out[0, :, 1] > 0) & (out[0, :, 3] > 0)).sum() == 0  # no position keeps both concepts
    assert torch.equal(out[..., [0, 2, 4]], probs[..., [0, 2, 4]])  # non-concept tokens untouched


def test_nms_ties_go_to_the_lower_concept_and_hw_is_required_off_square():
    probs = torch.full((1, 6, 3), 0.2)
    out = C.cross_token_nms(probs, [[1], [2]], hw=(2, 3))
    assert torch.equal(out[0, :, 1], probs[0, :, 1]) and out[0, :, 2].abs().sum() == 0
    with pytest.raises(ValueError, match="hw"):
        C.cross_token_nms(probs, [[1], [2]])


def test_nms_attention_is_attention_with_suppressed_probabilities():
    """nms_attention = NMS(softmax(q k^T / sqrt d)) v per head, winners from the head mean; one concept: plain."""
    g = _gen(13)
    q, k, v = torch.randn(2, 16, 8, generator=g), torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    assert torch.allclose(C.nms_attention(q, k, v, 2, [[1, 2]]), _plain(q, k, v, 2), atol=1e-5)
    out = C.nms_attention(q, k, v, 2, [[1], [3]])
    split = [t.reshape(2, -1, 2, 4).transpose(1, 2) for t in (q, k, v)]
    probs = (split[0] @ split[1].transpose(-1, -2) / 2.0).softmax(-1)
    winner = C.nms_winners(probs.mean(1), [[1], [3]])[:, None]
    probs[..., 1] *= winner == 0
    probs[..., 3] *= winner == 1
    assert torch.allclose(out, (probs @ split[2]).transpose(1, 2).reshape(2, 16, 8), atol=1e-5)


def test_gaussian_smooth_keeps_constants_and_mass_centre():
    maps = torch.full((2, 16), 3.0)
    assert torch.allclose(C.gaussian_smooth(maps, (4, 4)), maps)
    peak = _peak(5, 5, 2, 2)
    assert C.gaussian_smooth(peak, (5, 5)).argmax() == 12


# ------------------------------------------------------------------------------------------ FreeCustom MRSA
def _qkv(b=2, n=16, width=8, seed=0):
    g = _gen(seed)
    return (torch.randn(b, n, width, generator=g) for _ in range(3))


def _plain(q, k, v, heads):
    def split(t):
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
    return F.scaled_dot_product_attention(split(q), split(k), split(v)).transpose(1, 2).reshape(q.shape)


def test_mrsa_without_references_or_with_empty_masks_is_plain_sdpa_exactly():
    q, k, v = _qkv()
    assert torch.equal(C.mrsa_attention(q, k, v, heads=2), _plain(q, k, v, 2))
    k_r, v_r = torch.randn(9, 8, generator=_gen(1)), torch.randn(9, 8, generator=_gen(2))
    refs = [(k_r, v_r, torch.zeros(9), 3.0), (k_r, v_r, torch.ones(9), 0.0)]  # all-zero mask; zero weight
    assert torch.equal(C.mrsa_attention(q, k, v, refs, heads=2), _plain(q, k, v, 2))


def test_mrsa_equals_softmax_over_concatenated_keys_with_the_weighted_mask_bias():
    """out = softmax([q k^T/sqrt d, q k_r^T/sqrt d + w M (M > 0), -inf (M = 0)]) [v; v_r], per head."""
    q, k, v = _qkv(b=1, n=6, width=4, seed=3)
    k_r, v_r = torch.randn(5, 4, generator=_gen(4)), torch.randn(5, 4, generator=_gen(5))
    mask = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0])
    out = C.mrsa_attention(q, k, v, [(k_r, v_r, mask, 2.0)], heads=1)
    logits = torch.cat([q[0] @ k[0].T, q[0] @ k_r.T], dim=1) / 2.0
    bias = torch.cat([torch.zeros(6), torch.where(mask > 0, 2.0 * mask, torch.tensor(float("-inf")))])
    expect = (logits + bias).softmax(-1) @ torch.cat([v[0], v_r])
    assert torch.allclose(out[0], expect, atol=1e-6)
    log_out = C.mrsa_attention(q, k, v, [(k_r, v_r, mask, 2.0)], heads=1, mode="log")
    log_bias = torch.cat([torch.zeros(6), (2.0 * mask).log()])
    assert torch.allclose(log_out[0], (logits + log_bias).softmax(-1) @ torch.cat([v[0], v_r]), atol=1e-6)


def test_mrsa_masked_out_reference_keys_have_no_influence():
    q, k, v = _qkv(seed=6)
    k_r, v_r = torch.randn(9, 8, generator=_gen(7)), torch.randn(9, 8, generator=_gen(8))
    mask = (torch.arange(9) < 4).float()
    out = C.mrsa_attention(q, k, v, [(k_r, v_r, mask, 1.0)], heads=2)
    k2, v2 = k_r.clone(), v_r.clone()
    k2[4:], v2[4:] = 100.0, -100.0
    assert torch.equal(C.mrsa_attention(q, k, v, [(k2, v2, mask, 1.0)], heads=2), out)


@pytest.mark.parametrize("mode,weights", [("add", [0.0, 2.0, 5.0, 20.0]), ("log", [1e-3, 1.0, 1e3, 1e8])])
def test_mrsa_weight_moves_attention_mass_to_the_reference(mode, weights):
    """The share of attention on the reference grows with w_r and tends to 1 (e^w or w scales its keys)."""
    q, k, _ = _qkv(seed=9)
    k_r = torch.randn(9, 8, generator=_gen(10))
    masses = []
    for w in weights:
        refs = [(k_r, torch.zeros(9, 8), torch.ones(9), w)]
        masses.append(C.reference_mass(q, k, refs, heads=2, mode=mode).mean().item())
    assert all(a < b for a, b in zip(masses, masses[1:], strict=False))
    assert masses[-1] > 0.99
    if mode == "add":
        assert masses[0] == 0.0  # w = 0 drops the reference, as the official code's masked_fill(== 0)


def test_mrsa_output_follows_the_reference_values_at_large_weight():
    q, k, v = _qkv(seed=11)
    v_r = torch.full((9, 8), 4.0)
    out = C.mrsa_attention(q, k, v, [(torch.randn(9, 8, generator=_gen(12)), v_r, torch.ones(9), 30.0)], heads=2)
    assert torch.allclose(out, torch.full_like(out, 4.0), atol=1e-3)
    with pytest.raises(ValueError, match="logarithm"):
        C.mrsa_bias(torch.ones(3), -1.0, "log")


# ------------------------------------------------------------------------------------------ overlaps
def _two_masks():
    masks = torch.tensor([[[1.0, 1.0, 1.0, 0.0, 0.0]], [[0.0, 0.0, 1.0, 1.0, 0.0]]])  # overlap at position 2
    return masks


def test_overlap_argmax_gives_the_position_to_the_larger_attention():
    masks = _two_masks()
    scores = torch.tensor([[[0.9, 0.9, 0.2, 0.0, 0.0]], [[0.0, 0.0, 0.7, 0.9, 0.0]]])
    out = C.resolve_overlaps(masks, "argmax", scores)
    assert out[:, 0, 2].tolist() == [0.0, 1.0]  # concept 2 attends more at the shared position
    keep = [0, 1, 3, 4]
    assert torch.equal(out[..., keep], masks[..., keep])  # single-owner positions unchanged
    assert ((out > 0).sum(0) <= 1).all()


def test_overlap_argmax_ties_go_to_the_lower_index():
    out = C.resolve_overlaps(_two_masks(), "argmax")  # scores = masks: 1 = 1 at the overlap
    assert out[:, 0, 2].tolist() == [1.0, 0.0]


def test_overlap_sum_keeps_both_and_error_names_the_pair():
    masks = _two_masks()
    assert torch.equal(C.resolve_overlaps(masks, "sum"), masks)
    with pytest.raises(C.OverlapError, match="'dog'.*'cat'.*1 position"):
        C.resolve_overlaps(masks, "error", names=["dog", "cat"])
    disjoint = masks.clone()
    disjoint[1, 0, 2] = 0
    assert torch.equal(C.resolve_overlaps(disjoint, "error"), disjoint)
    with pytest.raises(ValueError, match="argmax, sum, error"):
        C.resolve_overlaps(masks, "max")
