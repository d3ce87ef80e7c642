"""Where the residual targets live in each UNet family, in ComfyUI (ldm) names and diffusers names.

Every residual file is keyed by ldm paths (``input_blocks.1.1.proj_out``), the names ComfyUI's stock
LoRA loader maps, so one file serves both backends.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

# Families a residual file can be made for; names are what users see in errors.
FAMILY_NAMES = {"SD1": "Stable Diffusion 1.x", "SD2": "Stable Diffusion 2.x", "SDXL": "Stable Diffusion XL",
                "SD3": "Stable Diffusion 3 / 3.5 (MMDiT)", "Flux": "Flux.1", "Chroma": "Chroma"}


@dataclass(frozen=True)
class TransformerSite:
    """One block's residual site: a UNet's spatial transformer (its ``proj_out``) or a DiT block's projection.

    ``path`` is the block's module path in ComfyUI (ldm) names, ``layer`` the residual's layer inside it; the
    residual's target is ``path.layer``. ``tokens`` says what the layer's output rows are: ``image`` (image
    tokens or a feature map only) or ``joint`` (text then image tokens, as in Flux's single-stream blocks).
    """

    path: str  # e.g. "input_blocks.1.1", "joint_blocks.3", "single_blocks.0"
    width: int  # output width of the residual's layer (its rank is 5% of this)
    linear: bool  # the layer is nn.Linear (SD2/SDXL/DiTs) rather than a 1x1 conv (SD1)
    depth: int  # attention calls feeding the site per model call (UNet transformer depth; 1 on DiTs)
    layer: str = "proj_out"
    in_width: int = 0  # input width when it differs from ``width`` (Flux's linear2: 15360 -> 3072)
    tokens: str = "image"
    module_layer: str = ""  # the layer's name inside the block module when the backend names it otherwise

    @property
    def target(self) -> str:
        """The residual's target layer, e.g. ``input_blocks.1.1.proj_out``."""
        return f"{self.path}.{self.layer}"

    @property
    def inputs(self) -> int:
        return self.in_width or self.width


def is_spatial_transformer(module: nn.Module) -> bool:
    """Duck-typed test for ComfyUI's SpatialTransformer and diffusers' Transformer2DModel."""
    return hasattr(module, "proj_out") and hasattr(module, "transformer_blocks")


def _layer_width(layer: nn.Module) -> int:
    weight = layer.weight
    return int(weight.shape[0])


def find_sites(unet: nn.Module, to_ldm=None) -> list[tuple[TransformerSite, nn.Module]]:
    """All spatial transformers of a UNet, in forward order, with their ldm paths.

    ``to_ldm`` maps a module name of ``unet`` to its ldm path (identity for ComfyUI's UNetModel).
    """
    sites = []
    for name, module in unet.named_modules():
        if not name or not is_spatial_transformer(module):
            continue
        path = to_ldm(name) if to_ldm else name
        site = TransformerSite(
            path=path,
            width=_layer_width(module.proj_out),
            linear=isinstance(module.proj_out, nn.Linear),
            depth=len(module.transformer_blocks),
        )
        sites.append((site, module))
    return sites


def diffusers_to_ldm_namer(layers_per_block):
    """A function mapping diffusers UNet2DConditionModel attention names to ldm paths.

    down_blocks.i.attentions.j -> input_blocks.(1 + sum_{k<i}(L_k+1) + j).1,
    mid_block.attentions.0 -> middle_block.1, up_blocks.i.attentions.j -> output_blocks.(sum_{k<i}(L'_k+1) + j).1
    where up blocks hold one more layer than the mirrored down block.
    """

    def per_block(values, n):
        return list(values) if isinstance(values, (list, tuple)) else [values] * n

    def namer(name: str) -> str:
        m = re.fullmatch(r"down_blocks\.(\d+)\.attentions\.(\d+)", name)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            layers = per_block(layers_per_block, i + 1)
            return f"input_blocks.{1 + sum(n + 1 for n in layers[:i]) + j}.1"
        if re.fullmatch(r"mid_block\.attentions\.0", name):
            return "middle_block.1"
        m = re.fullmatch(r"up_blocks\.(\d+)\.attentions\.(\d+)", name)
        if m:
            i, j = int(m.group(1)), int(m.group(2))
            down = per_block(layers_per_block, i + 1)
            layers = list(reversed(down)) if isinstance(layers_per_block, (list, tuple)) else down
            return f"output_blocks.{sum(n + 1 for n in layers[:i]) + j}.1"
        raise ValueError(f"not a UNet attention module name: {name!r}")

    return namer


def family_from_config(cross_attention_dim: int, linear_proj: bool) -> str:
    """Guess a UNet's family from its text-context width and projection kind."""
    if cross_attention_dim == 768 and not linear_proj:
        return "SD1"
    if cross_attention_dim == 1024 and linear_proj:
        return "SD2"
    if cross_attention_dim == 2048 and linear_proj:
        return "SDXL"
    return f"custom-ctx{cross_attention_dim}"


def family_label(family: str) -> str:
    return FAMILY_NAMES.get(family, family)
