"""Tiny random diffusers models built offline in well under a second: tests, benchmarks and the default demo."""
from __future__ import annotations

import json
import os
import tempfile

import torch

DEMO_WORDS = ["a", "photo", "of", "sks", "dog", "cat", "toy", "mug", "on", "the", "beach", "in", "snow",
              "red", "blue", "green", "and", "with", "hat", "table", "grass", "city", "forest", "painting"]


def tiny_tokenizer(words=DEMO_WORDS, max_length: int = 77):
    """A CLIP BPE tokenizer whose vocabulary is the ASCII letters plus whole-word merges for ``words``."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}

    def add(tok):
        vocab.setdefault(tok, len(vocab))

    for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-":
        add(c)
        add(c + "</w>")
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for nxt in parts[1:]:
            merges.append(f"{cur} {nxt}")
            cur = cur + nxt
            add(cur)
    add("<|startoftext|>")
    add("<|endoftext|>")
    folder = tempfile.mkdtemp(prefix="concepts-tok-")
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"),
                         pad_token="<|endoftext|>", model_max_length=max_length)


def tiny_text_encoder(vocab_size: int, dim: int = 32, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=2 * dim, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab_size - 2,
                         eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)
    return CLIPTextModel(cfg).eval()


def tiny_unet(kind: str = "sd1", context_dim: int = 32, seed: int = 0, sample_size: int = 8):
    """Two-level UNet2DConditionModel; ``sd1``: 1x1-conv projections, ``sdxl``: linear projections, depth 2."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    sdxl = kind == "sdxl"
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=context_dim, attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        use_linear_projection=sdxl, transformer_layers_per_block=2 if sdxl else 1,
    ).eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, layers_per_block=1).eval()


def sd15_unet_on_meta():
    """The real SD1.5 UNet layout, without memory: parameters live on the meta device."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)


def sdxl_unet_on_meta():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=[5, 10, 20], layers_per_block=2,
            block_out_channels=(320, 640, 1280), use_linear_projection=True, transformer_layers_per_block=[1, 2, 10],
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", projection_class_embeddings_input_dim=2816, addition_time_embed_dim=256)


def concept_renders(n: int = 4, size: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` renders [n, size, size, 3] in [0, 1] of a made-up concept: a red-and-white striped square,
    at a random place on a plain background of random grey. Deterministic for a seed."""
    gen = torch.Generator().manual_seed(seed)
    side = size // 2
    imgs = torch.empty(n, size, size, 3)
    stripes = (torch.arange(side)[:, None] % 8 < 4).float().expand(side, side)
    concept = torch.stack([0.85 + 0.1 * stripes, 0.1 + 0.8 * stripes, 0.1 + 0.8 * stripes], -1)
    for i in range(n):
        imgs[i] = 0.3 + 0.4 * torch.rand((), generator=gen)
        y, x = (int(v) for v in torch.randint(0, size - side + 1, (2,), generator=gen))
        imgs[i, y:y + side, x:x + side] = concept
    return imgs
