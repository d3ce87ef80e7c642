"""Community LoRA files as forward-time low-rank residuals keyed by ComfyUI (ldm) UNet module paths.

Reads the UNet part of a LoRA state dict in the formats ComfyUI's own loader accepts for SD1.x/SD2.x/SDXL
(``comfy/lora.py``: ``model_lora_keys_unet``; ``comfy/utils.py``: ``unet_to_diffusers``), written anew here:

- kohya / sd-scripts: ``lora_unet_<path with underscores>.lora_down.weight / .lora_up.weight / .alpha``, the path
  being a diffusers module name (SD1.x files) or an ldm one (SDXL files); ``lycoris_<...>`` (SimpleTuner) alike;
- generic: ``diffusion_model.<ldm path>.lora_down.weight`` (the pack's own residual files, ComfyUI's trainer);
- diffusers / PEFT: ``unet.<diffusers path>.lora_A.weight / .lora_B.weight`` (also ``.lora.down/.up``,
  ``_lora.down/.up``, ``.lora_linear_layer.down/.up``, ``.processor.`` names, ``to_out`` for ``to_out.0``);
- LyCORIS LoCon on k x k convs: ``lora_down`` [r, in, k, k] + ``lora_up`` [out, r, 1, 1], optionally
  ``lora_mid`` [r, r, k, k] (CP/Tucker), which is folded into the down factor exactly (the down conv is 1x1).

Text-encoder keys (``lora_te*``, ``text_encoder*``) are reported as skipped; LoHa/LoKr/DoRA/full-diff keys are not
low-rank residuals and are an error naming them (merge such files with LoraLoader instead).

The scale of each layer is ``alpha / rank`` (alpha absent: 1, as ComfyUI). Factors are returned as
``core.residuals.LowRank`` (2-D ``down`` [r, in], ``up`` [out, r]; ``conv`` marks a conv target). A conv target with
a k x k kernel (k > 1) becomes ``ConvLowRank``: ``down`` flattened to [r, in*k*k] (so ``delta()`` and
``residuals.merged_weight`` work unchanged) plus its ``kernel``; ``lora_forward`` runs it as a k x k conv (with the
base layer's stride and padding) followed by a 1x1 conv.

Usage (the gating code; ``unet`` is ComfyUI's ``model.model.diffusion_model``, ``m`` a hooked layer, ``x`` its input)::

    spec = spec_from_unet_config(model.model.model_config.unet_config, family)  # or SPECS[family]
    lf = read_lora(state_dict, family=family, spec=spec)  # LoraFamilyError for a file of another family
    check_shapes(lf.layers, {n[:-7]: tuple(p.shape) for n, p in unet.named_parameters() if n.endswith(".weight")},
                 family)
    y = m(x) + strength * gate * lora_forward(lf.layers[path], x, stride=m.stride, padding=m.padding)  # Conv2d
    y = m(x) + strength * gate * lora_forward(lf.layers[path], x)                                      # Linear

``lora_forward`` equals ``residuals.residual_forward`` for linear and 1x1-conv layers; only it runs ``ConvLowRank``
(``residual_forward`` and ``ResidualSet.detached`` know nothing of kernels).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .file_checks import EDITED, broken, check_factors, check_finite, read_checked
from .layouts import family_label
from .residuals import LowRank, residual_forward

log = logging.getLogger(__name__)

KIND = "LoRA file"
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_", "text_encoder.", "text_encoder_2.",
                         "text_encoders.", "te1.", "te2.", "lora_te.")
CONTEXT_DIMS = {768: "SD1", 1024: "SD2", 2048: "SDXL"}

# (down suffix, up suffix) pairs ComfyUI's LoRA adapter accepts; the first is kohya's.
_FACTOR_SUFFIXES = (
    (".lora_down.weight", ".lora_up.weight"),
    (".lora_A.weight", ".lora_B.weight"),
    (".lora_A.default.weight", ".lora_B.default.weight"),
    (".lora.down.weight", ".lora.up.weight"),
    ("_lora.down.weight", "_lora.up.weight"),
    (".lora_linear_layer.down.weight", ".lora_linear_layer.up.weight"),
)
_AUX_SUFFIXES = {".alpha": "alpha", ".lora_mid.weight": "mid"}
_UNSUPPORTED = {
    ".hada_w1_a": "LoHa", ".hada_w1_b": "LoHa", ".hada_w2_a": "LoHa", ".hada_w2_b": "LoHa", ".hada_t1": "LoHa",
    ".hada_t2": "LoHa", ".lokr_w1": "LoKr", ".lokr_w2": "LoKr", ".lokr_w1_a": "LoKr", ".lokr_w1_b": "LoKr",
    ".lokr_w2_a": "LoKr", ".lokr_w2_b": "LoKr", ".lokr_t2": "LoKr", ".dora_scale": "DoRA", ".diff": "full diff",
    ".diff_b": "bias diff", ".w_norm": "norm diff", ".b_norm": "norm diff", ".set_weight": "set weight",
    ".reshape_weight": "reshape",
}


class LoraFileError(ValueError):
    """A LoRA file this loader cannot turn into forward-time residuals."""


class LoraFamilyError(LoraFileError):
    """A LoRA made for another model family than the model at hand."""


@dataclass
class ConvLowRank(LowRank):
    """LyCORIS LoCon on a k x k conv: Delta W = (alpha/rank) up @ down with down [r, in*kh*kw] (flattened kernel)."""

    kernel: tuple[int, int] = (1, 1)

    def down_kernel(self) -> torch.Tensor:
        """The down factor as a conv weight [r, in, kh, kw]."""
        return self.down.reshape(self.rank, -1, *self.kernel)


@dataclass(frozen=True)
class UNetSpec:
    """The block structure a LoRA's names are resolved against, in the terms of ComfyUI's ``unet_config``."""

    family: str
    num_res_blocks: tuple[int, ...]  # res blocks per level on the down path (the up path has one more per level)
    depth: tuple[int, ...]  # transformer depth of each down res block in order, 0 = no attention (transformer_depth)
    depth_output: tuple[int, ...]  # the same for the up res blocks, listed as ComfyUI does: output block j uses [-1-j]
    depth_middle: int  # >= 0: res, transformer of this depth, res; -1: one res block; < -1: no middle block
    linear_proj: bool  # proj_in/proj_out are Linear (SD2/SDXL) rather than 1x1 convs (SD1)
    adm: bool = False  # label_emb (SDXL's add_embedding) exists

    @property
    def levels(self) -> int:
        return len(self.num_res_blocks)


SPECS = {
    "SD1": UNetSpec("SD1", (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0), (1,) * 9 + (0,) * 3, 1, linear_proj=False),
    "SD2": UNetSpec("SD2", (2, 2, 2, 2), (1, 1, 1, 1, 1, 1, 0, 0), (1,) * 9 + (0,) * 3, 1, linear_proj=True),
    "SDXL": UNetSpec("SDXL", (2, 2, 2), (0, 0, 2, 2, 10, 10), (0, 0, 0, 2, 2, 2, 10, 10, 10), 10, linear_proj=True,
                     adm=True),
}


def spec_from_unet_config(cfg: dict, family: str) -> UNetSpec:
    """A ``UNetSpec`` from ComfyUI's ``model.model_config.unet_config`` dict (keys read, nothing imported); use it
    for any UNet that is not a stock SD1/SD2/SDXL layout (e.g. the pack's tiny test checkpoints)."""
    levels = len(cfg["channel_mult"])
    res = cfg["num_res_blocks"]
    res = tuple(res) if isinstance(res, (list, tuple)) else (res,) * levels
    depth = tuple(cfg.get("transformer_depth") or (0,) * sum(res))
    depth_output = tuple(cfg.get("transformer_depth_output") or (0,) * (sum(res) + levels))
    if len(depth) != sum(res) or len(depth_output) != sum(res) + levels:
        raise LoraFileError(f"unsupported UNet config: {len(depth)} down / {len(depth_output)} up transformer depths "
                            f"for {sum(res)} down res blocks")
    middle = cfg.get("transformer_depth_middle")
    return UNetSpec(family, res, depth, depth_output, depth[-1] if middle is None else int(middle),
                    linear_proj=bool(cfg.get("use_linear_in_transformer", False)),
                    adm=cfg.get("adm_in_channels") is not None)


def spec_from_diffusers_config(cfg, family: str) -> UNetSpec:
    """A ``UNetSpec`` from a diffusers ``UNet2DConditionModel.config`` (the standalone core's backend)."""
    types = list(cfg["down_block_types"])
    levels = len(types)

    def per_level(value):
        return list(value) if isinstance(value, (list, tuple)) else [value] * levels

    res = per_level(cfg["layers_per_block"])
    layers = per_level(cfg.get("transformer_layers_per_block", 1) or 1)
    up_layers = cfg.get("reverse_transformer_layers_per_block") or list(reversed(layers))
    up_types = list(cfg["up_block_types"])
    depth = tuple(layers[x] if "CrossAttn" in types[x] else 0 for x in range(levels) for _ in range(res[x]))
    up = [int(up_layers[x] if not isinstance(up_layers[x], (list, tuple)) else up_layers[x][0])
          if "CrossAttn" in up_types[x] else 0 for x in range(levels)]
    per_output = [up[x] for x in range(levels) for _ in range(res[levels - 1 - x] + 1)]
    mid_type = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    middle = layers[-1] if mid_type == "UNetMidBlock2DCrossAttn" else (-1 if mid_type else -2)
    return UNetSpec(family, tuple(res), depth, tuple(reversed(per_output)), int(middle),
                    linear_proj=bool(cfg.get("use_linear_projection", False)),
                    adm=cfg.get("addition_embed_type") is not None)


# ------------------------------------------------------------------------------------------ name maps
_ATTN_LAYERS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")
_RESNET_LAYERS = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                  "conv_shortcut": "skip_connection"}
_RESNET_KINDS = {"in_layers.2": "conv3", "emb_layers.1": "linear", "out_layers.3": "conv3", "skip_connection": "conv1"}


def _attention(diff: str, ldm: str, depth: int, spec: UNetSpec, out: dict, kinds: dict) -> None:
    proj = "linear" if spec.linear_proj else "conv1"
    for name in ("proj_in", "proj_out"):
        out[f"{diff}.{name}"] = f"{ldm}.{name}"
        kinds[f"{ldm}.{name}"] = proj
    for t in range(depth):
        for name in _ATTN_LAYERS:
            out[f"{diff}.transformer_blocks.{t}.{name}"] = f"{ldm}.transformer_blocks.{t}.{name}"
            kinds[f"{ldm}.transformer_blocks.{t}.{name}"] = "linear"


def _resnet(diff: str, ldm: str, out: dict, kinds: dict) -> None:
    for d, m in _RESNET_LAYERS.items():
        out[f"{diff}.{d}"] = f"{ldm}.{m}"
        kinds[f"{ldm}.{m}"] = _RESNET_KINDS[m]


def unet_module_map(spec: UNetSpec) -> tuple[dict[str, str], dict[str, str]]:
    """({diffusers module name: ldm module path}, {ldm module path: kind}) for every layer a LoRA can target.

    kind is ``linear``, ``conv1`` (1x1 conv) or ``conv3`` (3x3 conv). Down level x starts at input block
    1 + sum_{l<x}(R_l + 1) and ends with its downsampler; up level x (diffusers order, deepest first) holds R + 1
    output blocks, its upsampler after the last one at index 2 if that block has attention, else 1; the middle
    block is res (0), transformer (1), res (2) (ComfyUI's layout). ``conv_shortcut`` is listed for every res block
    (it exists only where the channel count changes; a file that targets a missing one fails ``check_shapes``).
    """
    out: dict[str, str] = {}
    kinds: dict[str, str] = {}
    basic = {"conv_in": ("input_blocks.0.0", "conv3"), "conv_out": ("out.2", "conv3"),
             "time_embedding.linear_1": ("time_embed.0", "linear"),
             "time_embedding.linear_2": ("time_embed.2", "linear")}
    if spec.adm:
        basic.update({"add_embedding.linear_1": ("label_emb.0.0", "linear"),
                      "add_embedding.linear_2": ("label_emb.0.2", "linear")})
    for d, (m, kind) in basic.items():
        out[d], kinds[m] = m, kind
    block = 0  # down res block counter, indexes spec.depth
    for x, n_res in enumerate(spec.num_res_blocks):
        n = 1 + sum(r + 1 for r in spec.num_res_blocks[:x])
        for i in range(n_res):
            _resnet(f"down_blocks.{x}.resnets.{i}", f"input_blocks.{n + i}.0", out, kinds)
            if spec.depth[block]:
                _attention(f"down_blocks.{x}.attentions.{i}", f"input_blocks.{n + i}.1", spec.depth[block], spec,
                           out, kinds)
            block += 1
        if x < spec.levels - 1:
            out[f"down_blocks.{x}.downsamplers.0.conv"] = f"input_blocks.{n + n_res}.0.op"
            kinds[f"input_blocks.{n + n_res}.0.op"] = "conv3"
    if spec.depth_middle >= -1:
        _resnet("mid_block.resnets.0", "middle_block.0", out, kinds)
    if spec.depth_middle >= 0:
        _attention("mid_block.attentions.0", "middle_block.1", spec.depth_middle, spec, out, kinds)
        _resnet("mid_block.resnets.1", "middle_block.2", out, kinds)
    j = 0  # output block counter
    for x, n_res in enumerate(r + 1 for r in reversed(spec.num_res_blocks)):
        for i in range(n_res):
            depth = spec.depth_output[-1 - j]
            _resnet(f"up_blocks.{x}.resnets.{i}", f"output_blocks.{j}.0", out, kinds)
            if depth:
                _attention(f"up_blocks.{x}.attentions.{i}", f"output_blocks.{j}.1", depth, spec, out, kinds)
            if i == n_res - 1 and x < spec.levels - 1:
                up = f"output_blocks.{j}.{2 if depth else 1}.conv"
                out[f"up_blocks.{x}.upsamplers.0.conv"] = up
                kinds[up] = "conv3"
            j += 1
    return out, kinds


def underscore_names(spec: UNetSpec) -> dict[str, str]:
    """{kohya name without prefix: ldm path}: both the diffusers and the ldm spelling, dots turned to underscores."""
    to_ldm, kinds = unet_module_map(spec)
    names = {d.replace(".", "_"): m for d, m in to_ldm.items()}
    names.update({m.replace(".", "_"): m for m in kinds})
    return names


# ------------------------------------------------------------------------------------------ parsing
@dataclass
class LoraFile:
    """The UNet residuals of one LoRA file: ``layers`` {ldm module path: LowRank}, plus what was left out."""

    layers: dict[str, LowRank]
    family: str
    detected_family: str | None
    formats: tuple[str, ...]
    skipped_text_encoder: list[str] = field(default_factory=list)


def _split_key(key: str) -> tuple[str, str] | None:
    """(stem, role) for a LoRA tensor key, role in down/up/alpha/mid or an unsupported kind; None if unknown."""
    for i, (down, up) in enumerate(_FACTOR_SUFFIXES):
        if key.endswith(down):
            return key[:-len(down)], f"down:{i}"
        if key.endswith(up):
            return key[:-len(up)], f"up:{i}"
    for suffix, role in _AUX_SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    for suffix, kind in _UNSUPPORTED.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], "unsupported:" + kind
    return None


def detect_family(sd: dict[str, torch.Tensor]) -> str | None:
    """SD1/SD2/SDXL from a LoRA's tensors: the context width of attn2.to_k/to_v's down factor (768/1024/2048), else
    key names (SDXL's second text encoder, 10-deep transformers; SD1's 1x1-conv proj_in), else None."""
    for key, t in sd.items():
        parts = _split_key(key)
        stem = parts[0].replace(".processor", "") if parts else ""
        if parts and parts[1].startswith("down:") and re.search(r"attn2[._]to_[kv]$", stem):
            width = int(t.shape[1])
            return CONTEXT_DIMS.get(width, f"custom-ctx{width}")
    keys = list(sd)
    if any(k.startswith(("lora_te2_", "text_encoder_2.")) for k in keys) or any(
            re.search(r"transformer_blocks[._][1-9]", k) for k in keys):
        return "SDXL"
    for key, t in sd.items():
        parts = _split_key(key)
        if parts and parts[1].startswith("down:") and re.search(r"proj_(in|out)$", parts[0]):
            return "SD1" if t.dim() == 4 else None  # 2-D: SD2 or SDXL, not decidable from this key alone
    return None


def _resolve(stem: str, spec: UNetSpec, under: dict[str, str], to_ldm: dict[str, str],
             kinds: dict[str, str]) -> tuple[str, str] | None:
    """(ldm path, format) for a key stem, or None when no UNet layer has that name."""
    for prefix, fmt in (("lora_unet_", "kohya"), ("lycoris_", "lycoris")):
        if stem.startswith(prefix):
            path = under.get(stem[len(prefix):])
            return (path, fmt) if path else None
    if stem.startswith("diffusion_model."):
        path = stem[len("diffusion_model."):]
        return (path, "generic") if path in kinds else None
    name = stem
    for prefix in ("unet.base_model.model.", "base_model.model.unet.", "base_model.model.", "unet."):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    name = name.replace(".processor.", ".")
    if name.endswith(".to_out"):
        name += ".0"
    if name in to_ldm:
        return to_ldm[name], "diffusers"
    return None


def _factors(stem: str, parts: dict[str, torch.Tensor], kind: str) -> LowRank:
    down_key = next(k for k in parts if k.startswith("down:"))
    up_key = "up:" + down_key[len("down:"):]
    if up_key not in parts:
        suffix = _FACTOR_SUFFIXES[int(down_key[len("down:"):])][0]
        raise LoraFileError(f"LoRA key '{stem}{suffix}' has no matching up factor")
    down, up = parts[down_key].float(), parts[up_key].float()
    alpha = float(parts["alpha"].item()) if "alpha" in parts else float(down.shape[0])
    if "mid" in parts:  # CP/Tucker LoCon: down 1x1, mid k x k  ->  one k x k down conv, exactly
        down = torch.einsum("rjhw,ji->rihw", parts["mid"].float(), down.flatten(1))
    if kind == "linear":
        if down.dim() == 4 and down.shape[2:] != (1, 1):
            raise LoraFileError(f"'{stem}' targets a linear layer but has a {tuple(down.shape[2:])} conv kernel")
        return LowRank(down.flatten(1), up.flatten(1), alpha, conv=False)
    if down.dim() == 4 and down.shape[2:] != (1, 1):
        if kind != "conv3" or (up.dim() == 4 and up.shape[2:] != (1, 1)):
            raise LoraFileError(f"'{stem}': unsupported conv factors {tuple(down.shape)} / {tuple(up.shape)}")
        kernel = (int(down.shape[2]), int(down.shape[3]))
        return ConvLowRank(down.flatten(1), up.flatten(1), alpha, conv=True, kernel=kernel)
    if kind == "conv3":
        raise LoraFileError(f"'{stem}' targets a 3x3 conv with 1x1 factors; only LoCon k x k down factors are "
                            "supported")
    return LowRank(down.flatten(1), up.flatten(1), alpha, conv=True)


def _group_keys(sd: dict[str, torch.Tensor], loader: str):
    """(factors per key stem {stem: {role: tensor}}, text-encoder keys skipped, keys of no known kind) of a LoRA
    state dict; adapters that are not plain low-rank factors are an error naming them and the stock ``loader``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    skipped, unknown, unsupported = [], [], {}
    for key, tensor in sd.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            skipped.append(key)
            continue
        parts = _split_key(key)
        if parts is None:
            unknown.append(key)
            continue
        stem, role = parts
        if role.startswith("unsupported:"):
            unsupported.setdefault(role.split(":", 1)[1], []).append(key)
            continue
        groups.setdefault(stem, {})[role] = tensor
    if unsupported:
        kinds_txt = "; ".join(f"{k}: {', '.join(v[:3])}" for k, v in unsupported.items())
        raise LoraFileError("this file holds adapters that are not plain low-rank (LoRA/LoCon) residuals "
                            f"({kinds_txt}); apply it globally with {loader} instead")
    return groups, skipped, unknown


def read_lora(sd: dict[str, torch.Tensor], family: str | None = None, spec: UNetSpec | None = None) -> LoraFile:
    """The UNet layers of a LoRA state dict as {ldm path: LowRank}; ``family`` is the model's (error if the file's
    differs); ``spec`` overrides the family's block structure (``spec_from_unet_config``)."""
    detected = detect_family(sd)
    family = family or (spec.family if spec else None)
    dit = detect_dit_family(sd)
    if dit is not None:
        raise LoraFamilyError(f"this LoRA is for {family_label(dit)} ({dit}) but the model is "
                              f"{family_label(family or detected or 'a UNet')}; load a LoRA made for this model family")
    if family and detected and detected != family:
        raise LoraFamilyError(
            f"this LoRA is for {family_label(detected)} ({detected}) but the model is {family_label(family)} "
            f"({family}); load a LoRA made for this model family")
    use = family or detected
    if spec is None:
        if use not in SPECS:
            raise LoraFamilyError("cannot tell which model family this LoRA is for "
                                  f"({use or 'no cross-attention key'}); known families: {', '.join(SPECS)}")
        spec = SPECS[use]
    to_ldm, kinds = unet_module_map(spec)
    under = underscore_names(spec)
    groups, skipped, unknown = _group_keys(sd, "LoraLoader")
    layers, formats = {}, set()
    for stem, parts in groups.items():
        if not any(r.startswith("down:") for r in parts):
            if any(r.startswith("up:") for r in parts):
                raise LoraFileError(f"LoRA key '{stem}' has an up factor but no down factor")
            unknown.extend(f"{stem}.{r}" for r in parts)
            continue
        hit = _resolve(stem, spec, under, to_ldm, kinds)
        if hit is None:
            unknown.append(stem)
            continue
        path, fmt = hit
        if path in layers:
            raise LoraFileError(f"two keys in this file target the same layer '{path}' (one is '{stem}')")
        layers[path] = _factors(stem, parts, kinds[path])
        formats.add(fmt)
    if unknown:
        raise LoraFileError(f"{len(unknown)} key(s) match no {family_label(spec.family)} UNet layer, e.g. "
                            + ", ".join(sorted(unknown)[:4]) + "; is this a LoRA for another model?")
    if not layers:
        raise LoraFileError("this file has no UNet LoRA layers" + (" (only text-encoder keys)" if skipped else ""))
    if skipped:
        log.info("LoRA: %d text-encoder keys skipped (residuals act on the UNet only)", len(skipped))
    return LoraFile(layers, spec.family, detected, tuple(sorted(formats)), skipped)


DIT_KEY_PATTERNS = (  # key fragments that only a DiT LoRA has, in every format ComfyUI reads (ldm, kohya, diffusers)
    (r"double_blocks|single_blocks|single_transformer_blocks", "Flux"),
    (r"joint_blocks|context_block|transformer_blocks[._]\d+[._]attn[._]add_[qkv]_proj", "SD3"),
)


def detect_dit_family(sd: dict[str, torch.Tensor]) -> str | None:
    """Flux or SD3 when the file's keys name that family's blocks, else None (a UNet LoRA or an unknown one)."""
    for pattern, fam in DIT_KEY_PATTERNS:
        if any(re.search(pattern, key) for key in sd):
            return fam
    return None


def read_keyed_lora(sd: dict[str, torch.Tensor], key_map: dict, widths: dict[str, int], family: str) -> LoraFile:
    """A DiT LoRA's layers as {ComfyUI module path: LowRank}, through the key map ComfyUI's own loader uses.

    ``key_map`` is ``comfy.lora.model_lora_keys_unet(model, {})``: {key stem: weight name} or {key stem: (weight
    name, (dim, offset, size))} for a slice of a fused layer (diffusers' to_q / to_k / to_v onto Flux's ``qkv``), or
    (weight name, None, function) where the weight's rows are reordered (applied to the up factor's rows), so
    every format the stock LoraLoaderModelOnly reads for the model reads here. ``widths`` gives each layer's output
    width: a slice's up factor is placed at its rows, and several slices of one layer become one LowRank of their
    summed ranks (each part's alpha / rank folded into its up factor).
    """
    detected = detect_dit_family(sd) or detect_family(sd)
    if detected in (*SPECS, "Flux", "SD3") and detected != {"Chroma": "Flux"}.get(family, family):
        raise LoraFamilyError(
            f"this LoRA is for {family_label(detected)} ({detected}) but the model is {family_label(family)} "
            f"({family}); load a LoRA made for this model family")
    groups, skipped, unknown = _group_keys(sd, "LoraLoaderModelOnly")
    pieces: dict[str, list[tuple[LowRank, int]]] = {}
    for stem, parts in groups.items():
        if not any(r.startswith("down:") for r in parts):
            if any(r.startswith("up:") for r in parts):
                raise LoraFileError(f"LoRA key '{stem}' has an up factor but no down factor")
            unknown.extend(f"{stem}.{r}" for r in parts)
            continue
        target = key_map.get(stem)
        if target is None:
            unknown.append(stem)
            continue
        if isinstance(target, str):
            target = (target,)
        weight, piece, function = (tuple(target) + (None, None))[:3]
        dim, offset = (0, 0) if piece is None else piece[:2]
        path = weight.removeprefix("diffusion_model.").removesuffix(".weight")
        if dim != 0:
            raise LoraFileError(f"'{stem}' patches a slice along input columns of '{path}'; apply this LoRA with "
                                "LoraLoaderModelOnly instead")
        factors = _factors(stem, parts, "linear")
        if function is not None:  # a reordering of the weight's rows (SD3's last context modulation): on the up rows
            factors = LowRank(factors.down, function(factors.up), factors.alpha, factors.conv)
        pieces.setdefault(path, []).append((factors, offset))
    if unknown:
        raise LoraFileError(f"{len(unknown)} key(s) match no {family_label(family)} layer, e.g. "
                            + ", ".join(sorted(unknown)[:4]) + "; is this a LoRA for another model?")
    if not pieces:
        raise LoraFileError("this file has no diffusion-model LoRA layers"
                            + (" (only text-encoder keys)" if skipped else ""))
    layers = {}
    for path, parts in pieces.items():
        width = widths.get(path)
        if width is None:
            raise LoraFamilyError(f"the LoRA targets '{path}', which this {family_label(family)} model does not "
                                  "have: it was made for another model layout")
        if len(parts) == 1 and parts[0][1] == 0 and parts[0][0].up.shape[0] == width:
            layers[path] = parts[0][0]
            continue
        ups = []
        for lay, offset in parts:
            up = lay.up.new_zeros(width, lay.rank)
            if offset + lay.up.shape[0] > width:
                raise LoraFamilyError(f"'{path}' has {width} output rows but the LoRA writes rows {offset} to "
                                      f"{offset + lay.up.shape[0]}: it was made for another model layout")
            up[offset:offset + lay.up.shape[0]] = lay.up * lay.scale
            ups.append(up)
        down = torch.cat([lay.down for lay, _ in parts])
        layers[path] = LowRank(down, torch.cat(ups, 1), float(down.shape[0]), conv=False)
    if skipped:
        log.info("LoRA: %d text-encoder keys skipped (regions act on the diffusion model only)", len(skipped))
    formats = ("comfyui key map",)
    return LoraFile(layers, family, detected, formats, skipped)


def load_lora_file(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A .safetensors LoRA file's tensors (exactly as stored) and metadata, checked: ``BrokenFileError`` naming the
    file when it is unreadable or truncated, holds NaN/Inf, has factors whose ranks do not match, or states a model
    family in its metadata that its tensors contradict."""
    sd, meta = read_checked(path, KIND)
    check_lora_tensors(sd, path, finite=False)
    stated, detected = meta.get("base_family", ""), detect_family(sd)
    if stated in SPECS and detected in SPECS and stated != detected:
        raise broken(path, KIND, f"has contradictory metadata: 'base_family' says {stated} but its tensors are "
                                 f"shaped for {family_label(detected)} ({detected})", EDITED)
    return sd, meta


def check_lora_tensors(sd: dict[str, torch.Tensor], path: str, finite: bool = True) -> None:
    """Check a LoRA state dict read some other way (e.g. a .pt file): finite values, factor ranks that match."""
    if finite:
        check_finite(sd, path, KIND)
    check_factors(sd, path, KIND, _split_key)


def check_shapes(layers: dict[str, LowRank], weight_shapes: dict[str, tuple[int, ...]], family: str = "") -> None:
    """Raise LoraFamilyError when a layer is missing from the model or its factors do not fit the weight's shape."""
    what = f"this {family_label(family)} model" if family else "the model"
    for path, layer in layers.items():
        shape = weight_shapes.get(path)
        if shape is None:
            raise LoraFamilyError(f"the LoRA targets '{path}', which {what} does not have: it was made for another "
                                  "model layout")
        expect_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        if layer.up.shape[0] != shape[0] or layer.down.shape[1] != expect_in:
            raise LoraFamilyError(
                f"'{path}' is {tuple(shape)} in {what} but the LoRA's factors give {layer.up.shape[0]} x "
                f"{layer.down.shape[1]}: the LoRA was made for another model family")


def lora_forward(layer: LowRank, x: torch.Tensor, stride=1, padding=0) -> torch.Tensor:
    """Delta W x for a layer's input; k x k LoCon factors run as a conv with the base layer's ``stride``/``padding``."""
    if not isinstance(layer, ConvLowRank) or layer.kernel == (1, 1):
        if layer.conv and (stride not in (1, (1, 1))):
            x = x[..., ::_pair(stride)[0], ::_pair(stride)[1]]  # a strided 1x1 conv samples every stride-th pixel
        return residual_forward(layer, x)
    down = layer.down_kernel().to(x.dtype)
    up = (layer.up.to(x.dtype) * layer.scale)[:, :, None, None]
    return F.conv2d(F.conv2d(x, down, stride=stride, padding=padding), up)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))
