"""ConceptAttention's math: saliency is a softmax over concepts in the attention output space, the concept stream is
the block's text stream run on other tokens, and it attends to the image one way."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.concept_attention import (
    ConceptAttentionRecord,
    FluxStream,
    MMDiTStream,
    block_step,
    concept_attention,
    concept_saliency,
    default_blocks,
    heads_first,
    parse_blocks,
    parse_concepts,
)
from core.heatmaps import word_maps

D, H = 32, 4


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Modulation(nn.Module):
    """Flux's double modulation: silu(vec) -> 6 chunks (shift, scale, gate) x 2, each [B, 1, D]."""

    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Linear(dim, 6 * dim)

    def forward(self, vec):
        out = self.lin(F.silu(vec[:, None, :])).chunk(6, dim=-1)
        return SimpleNamespace(shift=out[0], scale=out[1], gate=out[2]), SimpleNamespace(
            shift=out[3], scale=out[4], gate=out[5])


class QKNorm(nn.Module):
    def __init__(self, head_dim):
        super().__init__()
        self.q = nn.RMSNorm(head_dim, eps=1e-6)
        self.k = nn.RMSNorm(head_dim, eps=1e-6)

    def forward(self, q, k, v):
        return self.q(q).to(v), self.k(k).to(v)


def stream_modules(dim, heads):
    return dict(mod=Modulation(dim), norm1=nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
                attn=SimpleNamespace(qkv=nn.Linear(dim, 3 * dim), norm=QKNorm(dim // heads), proj=nn.Linear(dim, dim)),
                norm2=nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6),
                mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim)))


class ToyDoubleBlock(nn.Module):
    """A Flux double-stream block as ComfyUI writes it (names and math), without RoPE: the text positions are 0, where
    RoPE is the identity, and the image tokens here carry no position."""

    def __init__(self, dim=D, heads=H, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.num_heads = heads
        for side in ("img", "txt"):
            m = stream_modules(dim, heads)
            setattr(self, f"{side}_mod", m["mod"])
            setattr(self, f"{side}_norm1", m["norm1"])
            setattr(self, f"{side}_attn", nn.Module())
            attn = getattr(self, f"{side}_attn")
            attn.qkv, attn.norm, attn.proj = m["attn"].qkv, m["attn"].norm, m["attn"].proj
            setattr(self, f"{side}_norm2", m["norm2"])
            setattr(self, f"{side}_mlp", m["mlp"])
        for p in self.parameters():  # RMSNorm scales away from 1, so QK-norm matters
            p.data.add_(0.1 * torch.randn(p.shape, generator=gen(p.numel())))

    def qkv(self, side, x, mod):
        x = torch.addcmul(mod.shift, getattr(self, f"{side}_norm1")(x), 1 + mod.scale)
        qkv = getattr(self, f"{side}_attn").qkv(x)
        q, k, v = qkv.view(x.shape[0], x.shape[1], 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k = getattr(self, f"{side}_attn").norm(q, k, v)
        return q, k, v

    def forward(self, img, txt, vec):
        """(img, txt, joint k, joint v, joint attention output [B, L, H*d]) with the sequence [txt | img]."""
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)
        iq, ik, iv = self.qkv("img", img, img_mod1)
        tq, tk, tv = self.qkv("txt", txt, txt_mod1)
        k, v = torch.cat((tk, ik), 2), torch.cat((tv, iv), 2)
        attn = F.scaled_dot_product_attention(torch.cat((tq, iq), 2), k, v).transpose(1, 2).flatten(2)
        t_attn, i_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
        img = img + img_mod1.gate * self.img_attn.proj(i_attn)
        img = img + img_mod2.gate * self.img_mlp(torch.addcmul(img_mod2.shift, self.img_norm2(img), 1 + img_mod2.scale))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(t_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(torch.addcmul(txt_mod2.shift, self.txt_norm2(txt), 1 + txt_mod2.scale))
        return img, txt, k, v, attn


@pytest.fixture
def block_inputs():
    g = gen(1)
    return torch.randn(2, 16, D, generator=g), torch.randn(2, 5, D, generator=g), torch.randn(2, D, generator=g)


# ------------------------------------------------------------------------------------------------ saliency
def test_saliency_rows_are_a_softmax_over_concepts():
    g = gen()
    image_out, concept_out = torch.randn(2, 64, D, generator=g), torch.randn(2, 3, D, generator=g)
    s = concept_saliency(image_out, concept_out)
    assert s.shape == (2, 64, 3) and s.dtype == torch.float32
    assert torch.allclose(s.sum(-1), torch.ones(2, 64), atol=1e-6) and bool((s >= 0).all())
    expected = torch.softmax(image_out @ concept_out.transpose(1, 2), dim=-1)
    assert torch.allclose(s, expected, atol=1e-6)


def test_a_concept_equal_to_an_image_tokens_output_dominates_that_token():
    g = gen(2)
    image_out = torch.randn(1, 64, 256, generator=g)
    concept_out = torch.randn(1, 4, 256, generator=g)
    concept_out[0, 2] = image_out[0, 17]
    s = concept_saliency(image_out, concept_out)
    assert int(s[0, 17].argmax()) == 2 and float(s[0, 17, 2]) > 0.99


def test_saliency_ignores_what_all_concepts_share():
    """Softmax over concepts: adding the same vector's score to every concept changes nothing."""
    g = gen(3)
    image_out, concept_out = torch.randn(1, 8, D, generator=g), torch.randn(1, 3, D, generator=g)
    shared = torch.randn(1, 1, D, generator=g)
    shifted = concept_saliency(image_out, concept_out + shared)
    assert torch.allclose(shifted, concept_saliency(image_out, concept_out), atol=1e-5)
    assert torch.allclose(concept_saliency(image_out * 0, concept_out), torch.full((1, 8, 3), 1 / 3))


# ------------------------------------------------------------------------------------------------ attention
def test_concepts_attend_over_their_keys_and_the_image_keys_only():
    g = gen(4)
    q, k, v = (torch.randn(1, H, 3, 8, generator=g) for _ in range(3))
    ik, iv = torch.randn(1, H, 10, 8, generator=g), torch.randn(1, H, 10, 8, generator=g)
    out = concept_attention(q, k, v, ik, iv)
    assert out.shape == (1, 3, H * 8)
    logits = q @ torch.cat((k, ik), 2).transpose(-1, -2) / 8 ** 0.5
    expected = (logits.softmax(-1) @ torch.cat((v, iv), 2)).transpose(1, 2).flatten(2)
    assert torch.allclose(out, expected, atol=1e-5)


def test_heads_first_takes_both_token_major_layouts():
    t = torch.randn(2, 7, H * 8)
    assert torch.equal(heads_first(t, H), t.view(2, 7, H, 8).transpose(1, 2))
    assert torch.equal(heads_first(t.view(2, 7, H, 8), H), heads_first(t, H))


# ------------------------------------------------------------------------------------------------ the stream
@torch.no_grad()
def test_the_concept_stream_is_the_blocks_text_stream(block_inputs):
    """Concept tokens equal to the prompt's text tokens, attending over [their keys; image keys] (= the joint keys),
    come out as the block's text stream: same modulation, norm, qkv, QK-norm, projection, MLP and gates."""
    img, txt, vec = block_inputs
    block = ToyDoubleBlock()
    _, txt_out, k, v, attn = block(img, txt, vec)
    n = txt.shape[1]
    concepts, saliency = block_step(FluxStream, block, txt, vec, k[:, :, n:], v[:, :, n:], attn[:, n:])
    assert torch.allclose(concepts, txt_out, atol=1e-5)
    assert saliency.shape == (2, 16, n)


@torch.no_grad()
def test_the_stream_runs_in_the_models_half_precision(block_inputs):
    img, txt, vec = (t.to(torch.bfloat16) for t in block_inputs)
    block = ToyDoubleBlock().to(torch.bfloat16)
    _, txt_out, k, v, attn = block(img, txt, vec)
    concepts, saliency = block_step(FluxStream, block, txt, vec, k[:, :, 5:], v[:, :, 5:], attn[:, 5:])
    assert concepts.dtype == torch.bfloat16 and saliency.dtype == torch.float32
    assert torch.allclose(concepts.float(), txt_out.float(), atol=0.05 * float(txt_out.abs().max()))


@torch.no_grad()
def test_a_zeroed_text_stream_leaves_the_concepts_unchanged(block_inputs):
    img, txt, vec = block_inputs
    block = ToyDoubleBlock()
    block.txt_mod.lin.weight.zero_()
    block.txt_mod.lin.bias.zero_()  # every gate 0
    _, _, k, v, _ = block(img, txt, vec)
    concepts = torch.randn(2, 3, D, generator=gen(5))
    out, saliency = block_step(FluxStream, block, concepts, vec, k[:, :, 5:], v[:, :, 5:])
    assert torch.equal(out, concepts) and saliency is None


@torch.no_grad()
def test_the_image_never_sees_the_concepts(block_inputs):
    """The block's image output does not depend on the concept tokens: they only read the image keys."""
    img, txt, vec = block_inputs
    block = ToyDoubleBlock()
    img_out, _, k, v, attn = block(img, txt, vec)
    for seed in (6, 7):
        concepts = torch.randn(2, 3, D, generator=gen(seed))
        block_step(FluxStream, block, concepts, vec, k[:, :, 5:], v[:, :, 5:], attn[:, 5:])
        again, _, _, _, _ = block(img, txt, vec)
        assert torch.equal(again, img_out)


@torch.no_grad()
def test_the_saliency_of_a_block_follows_the_image_output(block_inputs):
    img, txt, vec = block_inputs
    block = ToyDoubleBlock()
    _, _, k, v, attn = block(img, txt, vec)
    concepts = torch.randn(2, 3, D, generator=gen(8))
    _, saliency = block_step(FluxStream, block, concepts, vec, k[:, :, 5:], v[:, :, 5:], attn[:, 5:])
    prepared = FluxStream.prepare(block, concepts, vec)
    out = concept_attention(prepared.q, prepared.k, prepared.v, k[:, :, 5:], v[:, :, 5:])
    assert torch.allclose(saliency, concept_saliency(attn[:, 5:], out))  # before the output projection


def test_mmdit_stream_uses_the_context_half_and_stops_at_a_pre_only_block():
    calls = []
    heads = 2

    class Context:
        pre_only = False
        attn = SimpleNamespace(num_heads=heads)

        def pre_attention(self, x, c):
            calls.append("pre")
            return (x * 1.0, x * 2.0, x.view(*x.shape[:2], heads, -1) * 3.0), ("residual", x)

        def post_attention(self, attn, tag, x):
            calls.append(tag)
            return x + attn

    block = SimpleNamespace(context_block=Context())
    concepts = torch.randn(1, 3, 8, generator=gen(9))
    prepared = MMDiTStream.prepare(block, concepts, torch.zeros(1, 8))
    assert prepared.q.shape == (1, heads, 3, 4) and torch.equal(prepared.v, heads_first(concepts * 3.0, heads))
    out = torch.ones(1, 3, 8)
    assert torch.equal(MMDiTStream.advance(block, concepts, out, prepared), concepts + 1)
    block.context_block.pre_only = True
    assert MMDiTStream.advance(block, concepts, out, prepared) is concepts
    assert calls == ["pre", "residual"]


# ------------------------------------------------------------------------------------------------ choices, record
def test_blocks_default_to_the_last_four_and_parse_ranges():
    assert default_blocks(19) == (15, 16, 17, 18) and default_blocks(1) == (0,)
    assert parse_blocks("auto", 19) == (15, 16, 17, 18) and parse_blocks("", 2) == (0, 1)
    assert parse_blocks("all", 3) == (0, 1, 2)
    assert parse_blocks("10-12, 3", 19) == (3, 10, 11, 12)
    with pytest.raises(ValueError, match="19 joint blocks"):
        parse_blocks("18-19", 19)
    with pytest.raises(ValueError, match="backwards"):
        parse_blocks("5-3", 19)
    with pytest.raises(ValueError, match="'auto', 'all'"):
        parse_blocks("last", 19)


def test_concepts_need_two_distinct_words():
    assert parse_concepts(" dog, sky ,, grass") == ["dog", "sky", "grass"]
    with pytest.raises(ValueError, match="at least two"):
        parse_concepts("dog")
    with pytest.raises(ValueError, match="named twice"):
        parse_concepts("dog, sky, dog")


def test_a_concept_record_reads_as_per_concept_maps_that_share_each_pixel():
    record = ConceptAttentionRecord(concepts=("dog", "beach", "sky"), blocks=(0,))
    record.latent_hw = (8, 8)  # 16 image tokens (patch 2)
    record.source_of(torch.zeros(4, 6))
    g = gen(10)
    for bin_ in (0, 9):
        for _ in range(2):  # two blocks
            record.add(0, bin_, concept_saliency(torch.randn(1, 16, D, generator=g), torch.randn(1, 3, D, generator=g)))
    maps = word_maps(record, 0, record.columns(["dog", "beach", "sky"]), normalize=False)
    assert maps.shape == (3, 1, 4, 4)
    assert torch.allclose(maps.sum(0), torch.ones(1, 4, 4), atol=1e-5)
    sky = word_maps(record, 0, record.columns(["sky"]), normalize=False)
    assert torch.allclose(sky[0], maps[2])
    with pytest.raises(ValueError, match="recorded concepts are: dog, beach, sky"):
        record.columns(["cat"])
    record.reset()
    assert record.concepts == ("dog", "beach", "sky") and not record.sums
