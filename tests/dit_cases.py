"""Tiny random diffusers DiTs (SD3, Flux) and one call's inputs, shared by the DiT test files."""
from dataclasses import dataclass

import torch

from core.patching.diffusers_dit import dit_sites

SD3_CFG = dict(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
               num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16,
               pos_embed_max_size=96, dual_attention_layers=(0,), qk_norm="rms_norm")
FLUX_CFG = dict(patch_size=1, in_channels=64, out_channels=None, num_layers=1, num_single_layers=2,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16,
                guidance_embeds=True, axes_dims_rope=(4, 6, 6))
LATENT = 16  # latent side: 8x8 = 64 image tokens in both families
TEXT = 8  # prompt tokens
CONCEPT = (1, 2)  # the concept's prompt positions


@dataclass
class Case:
    """A tiny transformer and one call's inputs: per-row conditioning for the prompt and the empty prompt."""

    model: torch.nn.Module
    latents: torch.Tensor  # [1, ...] as the model takes them
    timestep: float
    cond: dict
    uncond: dict
    shared: dict

    @property
    def sites(self):
        return dit_sites(self.model)

    @property
    def image_tokens(self) -> int:
        return (LATENT // 2) ** 2


def make_case(name: str) -> Case:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)

    def conditioning():
        return {"encoder_hidden_states": torch.randn(1, TEXT, 32, generator=gen),
                "pooled_projections": torch.randn(1, 16, generator=gen)}

    import diffusers

    if name == "SD3":
        model = diffusers.SD3Transformer2DModel(**SD3_CFG).eval()
        latents = torch.randn(1, 16, LATENT, LATENT, generator=gen)
        return Case(model, latents, 500.0, conditioning(), conditioning(), {})
    model = diffusers.FluxTransformer2DModel(**FLUX_CFG).eval()
    side = LATENT // 2
    latents = torch.randn(1, side * side, 64, generator=gen)  # a 2x2-packed 16x16 latent
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float()
    guidance = {"guidance": torch.tensor([3.5])}
    return Case(model, latents, 0.5, conditioning() | guidance, conditioning() | guidance,
                {"img_ids": img_ids, "txt_ids": torch.zeros(TEXT, 3)})
