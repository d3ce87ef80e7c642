import torch

from core.attention import all_token_attention, token_attention


def reference(q, k, heads):
    b, n, d = q.shape
    qh = q.view(b, n, heads, -1).transpose(1, 2)
    kh = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    return ((qh @ kh.transpose(-1, -2)) / (d // heads) ** 0.5).softmax(-1)  # [b, h, n, L]


def test_token_maps_equal_the_softmax_columns_summed_over_heads_and_tokens():
    q, k = torch.randn(2, 40, 16), torch.randn(2, 7, 16)
    idx = torch.tensor([2, 5])
    expect = reference(q, k, 4)[..., idx].sum(dim=(1, 3))
    # a chunk of 3 query rows at a time must give the same numbers as one big chunk
    assert torch.allclose(token_attention(q, k, 4, idx, max_elements=2 * 4 * 7 * 3), expect, atol=1e-5)
    assert torch.allclose(token_attention(q, k, 4, idx), expect, atol=1e-5)


def test_maps_of_all_tokens_sum_to_one_per_position():
    q, k = torch.randn(1, 64, 8), torch.randn(1, 77, 8)
    probs = all_token_attention(q, k, 2, max_elements=500)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 64), atol=1e-5)
