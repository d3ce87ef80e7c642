"""Model families as data: where each block's residual attaches, how its attention is read, what its files say.

A new family is one ``Family`` entry here, not new hooks: the gate (``core.hooks.gate``) hooks the layers
``find_sites`` names, and the tap for its attention is the UNet's ``attn2`` hooks or, for joint-attention DiTs,
ComfyUI's ``optimized_attention_override`` / our diffusers processors, which need only the token layout below.
Why these sites and their parameter counts: docs/model-families.md.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from ..layouts import FAMILY_NAMES, TransformerSite, diffusers_to_ldm_namer, is_spatial_transformer

RowKind = Literal["image", "text", "joint", "vector"]


@dataclass(frozen=True)
class BlockSites:
    """One kind of DiT block and the layer of each that carries the residual, in ComfyUI and diffusers names."""

    blocks: str  # ComfyUI module list, e.g. "joint_blocks"
    layer: str  # the residual's layer inside a block (ComfyUI names; the file's keys)
    tokens: Literal["image", "joint"]  # what the layer's output rows are
    diffusers_blocks: str
    diffusers_layer: str


@dataclass(frozen=True)
class Family:
    """What the pack needs to know about a model family."""

    key: str  # stored in files as ``base_family``
    architecture: Literal["unet", "dit"]
    comfy_configs: tuple[str, ...]  # ComfyUI ``supported_models`` class names (and bases) of the family
    blocks: tuple[BlockSites, ...] = ()  # DiTs: block kinds in the order the model runs them
    text_encoders: tuple[str, ...] = ("clip_l",)
    patch: int = 1  # DiTs: latent pixels per image token along each side
    # ComfyUI block patches ("dit", kind) and their module lists whose blocks add into their inputs in place, which
    # autograd refuses once those inputs were saved for backward: training runs them through ``training_blocks``
    inplace_blocks: tuple[tuple[str, str], ...] = ()
    comfy_text_first: bool = True  # ComfyUI's joint sequence is [text | image]
    diffusers_text_first: bool = True  # diffusers' joint sequence order (SD3's processor puts image first)
    # DiTs: what each layer's output rows are, as (regular expression over module paths, kind), first match wins,
    # ComfyUI names then diffusers names; unmatched layers are "vector" (modulation, embedders: no positions)
    rows: tuple[tuple[str, RowKind], ...] = ()
    diffusers_rows: tuple[tuple[str, RowKind], ...] = ()
    # DiTs: the layers that read the text encoder's output (closed-form erasure edits these): the token features'
    # entry and the pooled vector's entry, ComfyUI names then diffusers names
    text_entry: tuple[str, str] = ("", "")
    pooled_entry: tuple[str, str] = ("", "")

    @property
    def label(self) -> str:
        return FAMILY_NAMES.get(self.key, self.key)

    def image_tokens(self, latent_hw: tuple[int, int]) -> int:
        """Image tokens of a latent (DiTs pad the latent to whole patches)."""
        h, w = latent_hw
        return -(-h // self.patch) * -(-w // self.patch)


_MMDIT = (BlockSites("joint_blocks", "x_block.attn.proj", "image", "transformer_blocks", "attn.to_out.0"),)
_FLUX = (BlockSites("double_blocks", "img_attn.proj", "image", "transformer_blocks", "attn.to_out.0"),
         BlockSites("single_blocks", "linear2", "joint", "single_transformer_blocks", "proj_out"))

_FLUX_INPLACE = (("double_block", "double_blocks"), ("single_block", "single_blocks"))

# Which rows each layer writes. Image rows can be gated per image token; text rows belong to the prompt; joint rows
# are [text | image] (Flux's single blocks); vector layers (modulation, time and pooled-text embedders) have none.
_MMDIT_ROWS = ((r"joint_blocks\.\d+\.x_block\.(attn2?\.(qkv|proj)|mlp\.fc[12])", "image"),
               (r"joint_blocks\.\d+\.context_block\.(attn\.(qkv|proj)|mlp\.fc[12])", "text"),
               (r"x_embedder\.proj|final_layer\.linear", "image"), (r"context_embedder", "text"))
_FLUX_ROWS = ((r"double_blocks\.\d+\.img_(attn\.(qkv|proj)|mlp\.[02])", "image"),
              (r"double_blocks\.\d+\.txt_(attn\.(qkv|proj)|mlp\.[02])", "text"),
              (r"single_blocks\.\d+\.linear[12]", "joint"),
              (r"img_in|final_layer\.linear", "image"), (r"txt_in", "text"))
_DIFFUSERS_DIT_ROWS = (
    (r"transformer_blocks\.\d+\.(attn2?\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))", "image"),
    (r"transformer_blocks\.\d+\.(attn\.(add_q_proj|add_k_proj|add_v_proj|to_add_out)|ff_context\.net\.(0\.proj|2))",
     "text"),
    (r"single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)", "joint"),
    (r"x_embedder|pos_embed\.proj|proj_out", "image"), (r"context_embedder", "text"))

FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family("SD1", "unet", ("SD15",)),
    Family("SD2", "unet", ("SD20",), text_encoders=("clip_h",)),
    Family("SDXL", "unet", ("SDXL",), text_encoders=("clip_l", "clip_g")),
    Family("SD3", "dit", ("SD3",), _MMDIT, ("clip_l", "clip_g", "t5xxl"), patch=2, diffusers_text_first=False,
           rows=_MMDIT_ROWS, diffusers_rows=_DIFFUSERS_DIT_ROWS, text_entry=("context_embedder", "context_embedder"),
           pooled_entry=("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1")),
    Family("Flux", "dit", ("Flux",), _FLUX, ("t5xxl",), patch=2, inplace_blocks=_FLUX_INPLACE, rows=_FLUX_ROWS,
           diffusers_rows=_DIFFUSERS_DIT_ROWS, text_entry=("txt_in", "context_embedder"),
           pooled_entry=("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")),
    Family("Chroma", "dit", ("Chroma",), _FLUX, ("t5xxl",), patch=2, inplace_blocks=_FLUX_INPLACE, rows=_FLUX_ROWS,
           text_entry=("txt_in", "")),
)}


class UnknownFamilyError(ValueError):
    """A model the pack has no family entry for."""


def family(key: str) -> Family:
    """The family stored under ``key`` (as files and ``model_family`` name it)."""
    if key not in FAMILIES:
        raise UnknownFamilyError(f"no model family '{key}'; known: {', '.join(FAMILIES)}")
    return FAMILIES[key]


def comfy_family_key(config_class: type) -> str:
    """The family key of a ComfyUI model config class (subclasses such as SSD1B or FluxSchnell count as their
    base); the class name itself for families the pack does not know."""
    for cls in config_class.__mro__:
        for fam in FAMILIES.values():
            if cls.__name__ in fam.comfy_configs:
                return fam.key
    return config_class.__name__


def _linear_site(path: str, block_sites: BlockSites, layer: nn.Module, module_layer: str = "") -> TransformerSite:
    out_w, in_w = int(layer.weight.shape[0]), int(layer.weight.shape[1])
    return TransformerSite(path=path, width=out_w, linear=True, depth=1, layer=block_sites.layer,
                           in_width=0 if in_w == out_w else in_w, tokens=block_sites.tokens, module_layer=module_layer)


def find_sites(model: nn.Module, fam: Family | None = None, diffusers: bool = False) -> list[tuple[TransformerSite,
                                                                                                    nn.Module]]:
    """Every residual site of ``model`` in forward order: ``[(site, module holding the layer)]``.

    UNets: every spatial transformer (its ``proj_out``), ldm paths (diffusers UNets are renamed). DiTs: one layer
    per block of each kind in ``fam.blocks``; ``diffusers`` selects diffusers' module names.
    """
    if fam is None or fam.architecture == "unet":
        namer = None
        if diffusers:
            namer = diffusers_to_ldm_namer(model.config.layers_per_block)
        from ..layouts import find_sites as unet_sites
        return unet_sites(model, namer)
    sites = []
    for bs in fam.blocks:
        blocks = getattr(model, bs.diffusers_blocks if diffusers else bs.blocks, None)
        if blocks is None:
            continue
        inner = bs.diffusers_layer if diffusers else ""
        for i, block in enumerate(blocks):
            layer = block.get_submodule(inner or bs.layer)
            sites.append((_linear_site(f"{bs.blocks}.{i}", bs, layer, inner), block))
    return sites


def row_kind(fam: Family, path: str, diffusers: bool = False) -> RowKind:
    """What the output rows of the DiT layer at ``path`` are: image tokens, text tokens, [text | image] or none
    (a vector layer: modulation, embedders)."""
    for pattern, kind in fam.diffusers_rows if diffusers else fam.rows:
        if re.fullmatch(pattern, path):
            return kind
    return "vector"


def is_unet(model: nn.Module) -> bool:
    return any(is_spatial_transformer(m) for m in model.modules())
