"""Low-rank residual sets (Ham et al. 2024): Delta W = up @ down on each transformer's proj_out.

Files are safetensors with generic ``diffusion_model.<path>.lora_up.weight / lora_down.weight / alpha``
keys, which ComfyUI's stock LoraLoader reads, plus string metadata describing the concept.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .file_checks import EDITED, broken, check_factors, generic_role, metadata_json, read_checked, save_atomic
from .layouts import TransformerSite, family_label

KEY_PREFIX = "diffusion_model."
_BLOCK_ALIASES = {"input": "input_blocks", "middle": "middle_block", "output": "output_blocks"}
FORMAT_VERSION = "1"
DEFAULT_RANK_RATIO = 0.05  # the paper: r_i = 0.05 * m_i
KIND = "residual file"


class ResidualFileError(ValueError):
    """A residual file that cannot be used with the model at hand."""


@dataclass
class LowRank:
    """One layer's residual: Delta W = (alpha / rank) * up @ down, stored 2-D; ``conv`` marks a 1x1 conv target."""

    down: torch.Tensor  # [rank, in]
    up: torch.Tensor  # [out, rank]
    alpha: float
    conv: bool

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """Delta W as a 2-D [out, in] matrix."""
        return (self.up @ self.down) * self.scale


@dataclass
class ResidualSet:
    """Residuals keyed by the ldm path of their target layer (e.g. ``input_blocks.1.1.proj_out``)."""

    layers: dict[str, LowRank]
    metadata: dict[str, str] = field(default_factory=dict)

    def parameters(self) -> list[torch.Tensor]:
        return [t for layer in self.layers.values() for t in (layer.down, layer.up)]

    def parameter_count(self) -> int:
        return sum(t.numel() for t in self.parameters())

    def detached(self) -> ResidualSet:
        layers = {k: LowRank(v.down.detach().clone(), v.up.detach().clone(), v.alpha, v.conv)
                  for k, v in self.layers.items()}
        return ResidualSet(layers, dict(self.metadata))

    @property
    def family(self) -> str:
        return self.metadata.get("base_family", "unknown")


def rank_for(width: int, ratio: float = DEFAULT_RANK_RATIO, fixed_rank: int = 0) -> int:
    """Rank of one layer's residual: ``fixed_rank`` if set, else round(ratio * width), at least 1."""
    if fixed_rank > 0:
        return min(fixed_rank, width)
    return max(1, min(width, round(ratio * width)))


def select_sites(sites: list[TransformerSite], blocks: str = "") -> list[TransformerSite]:
    """The sites whose path starts with one of the comma-separated block names (``input``, ``middle``, ``output``
    or ldm paths such as ``output_blocks.9``); all sites when ``blocks`` is empty."""
    names = [n.strip() for n in blocks.replace(";", ",").split(",") if n.strip()]
    if not names:
        return list(sites)
    prefixes = []
    for name in names:
        head, dot, rest = name.partition(".")
        prefixes.append(_BLOCK_ALIASES.get(head, head) + dot + rest)
    chosen = [s for s in sites if any(s.path == p or s.path.startswith(p + ".") for p in prefixes)]
    if not chosen:
        raise ValueError(f"target blocks '{blocks}' match no transformer block; blocks are: "
                         + ", ".join(s.path for s in sites))
    return chosen


def init_residuals(sites: list[TransformerSite], ratio: float = DEFAULT_RANK_RATIO, fixed_rank: int = 0,
                   seed: int = 0, init_scale: float = 1e-2, dtype=torch.float32, device="cpu",
                   metadata: dict | None = None) -> ResidualSet:
    """Random residuals for every site (narrow them with ``select_sites``); both factors random as in the paper.

    down ~ N(0, 1/width) keeps down(x) at the input's scale; up ~ N(0, init_scale^2 / rank) makes the
    initial Delta W x about ``init_scale`` of x, so training starts near the base model.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    layers = {}
    for site in sites:
        r = rank_for(site.width, ratio, fixed_rank)
        down = torch.randn(r, site.inputs, generator=gen) / math.sqrt(site.inputs)
        up = torch.randn(site.width, r, generator=gen) * (init_scale / math.sqrt(r))
        layers[site.target] = LowRank(down.to(device, dtype), up.to(device, dtype), float(r), conv=not site.linear)
    rule = f"fixed:{fixed_rank}" if fixed_rank > 0 else f"ratio:{ratio:g}"
    meta = {"rank_rule": rule, "layout": layout_signature(sites)}
    meta.update(metadata or {})
    return ResidualSet(layers, {k: str(v) for k, v in meta.items()})


def layout_signature(sites: list[TransformerSite]) -> str:
    """JSON {target path: input width} that a loaded file is checked against."""
    return json.dumps({s.target: s.inputs for s in sites}, sort_keys=True)


def residual_forward(layer: LowRank, x: torch.Tensor) -> torch.Tensor:
    """Delta W x for the layer's input: [B, C, H, W] for a 1x1 conv target, [..., C] for a linear one."""
    down = layer.down.to(x.dtype)
    up = layer.up.to(x.dtype) * layer.scale
    if layer.conv:
        return F.conv2d(F.conv2d(x, down[:, :, None, None]), up[:, :, None, None])
    return F.linear(F.linear(x, down), up)


def merged_weight(weight: torch.Tensor, layer: LowRank, strength: float = 1.0) -> torch.Tensor:
    """W + strength * Delta W, shaped like ``weight`` (a new tensor; the input is left untouched)."""
    delta = layer.delta().to(weight.dtype).reshape(weight.shape)
    return weight + strength * delta


# ------------------------------------------------------------------------------------------ file I/O
def to_state_dict(rs: ResidualSet) -> dict[str, torch.Tensor]:
    """Generic LoRA keys: 1x1 conv targets get 4-D factors, linear targets 2-D, as kohya-style loaders expect."""
    sd = {}
    for path, layer in rs.layers.items():
        down, up = layer.down.detach().contiguous(), layer.up.detach().contiguous()
        if layer.conv:
            down, up = down[:, :, None, None], up[:, :, None, None]
        sd[f"{KEY_PREFIX}{path}.lora_down.weight"] = down
        sd[f"{KEY_PREFIX}{path}.lora_up.weight"] = up
        sd[f"{KEY_PREFIX}{path}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return sd


def from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> ResidualSet:
    layers = {}
    suffix = ".lora_down.weight"
    for key in sd:
        if not (key.startswith(KEY_PREFIX) and key.endswith(suffix)):
            continue
        path = key[len(KEY_PREFIX):-len(suffix)]
        down, up = sd[key], sd.get(f"{KEY_PREFIX}{path}.lora_up.weight")
        if up is None:
            raise ResidualFileError(f"residual file has {key} but no matching lora_up weight")
        alpha_t = sd.get(f"{KEY_PREFIX}{path}.alpha")
        alpha = float(alpha_t.item()) if alpha_t is not None else float(down.shape[0])
        conv = down.dim() == 4
        layers[path] = LowRank(down.flatten(1), up.flatten(1), alpha, conv)
    if not layers:
        raise ResidualFileError("no 'diffusion_model.*.lora_down.weight' keys: this is not a residual file this "
                                "pack saved")
    return ResidualSet(layers, dict(metadata or {}))


def save(rs: ResidualSet, path: str, overwrite: bool = False, dtype: torch.dtype | None = None) -> str:
    """Write ``rs`` to ``path``; refuses to replace an existing file unless ``overwrite``. Returns the path."""
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} already exists; choose another name or enable 'overwrite'")
    sd = to_state_dict(rs)
    if dtype is not None:
        sd = {k: (v.to(dtype) if k.endswith(".weight") else v) for k, v in sd.items()}
    meta = {"concepts.format_version": FORMAT_VERSION}
    meta.update({k: str(v) for k, v in rs.metadata.items()})
    return save_atomic(sd, path, meta)


def load(path: str) -> ResidualSet:
    """The residual set ``save`` wrote (personalized residuals, sliders, ESD, UCE and Custom Diffusion files alike).

    A file that is unreadable, truncated, holds NaN/Inf, has factors that do not multiply or metadata that
    contradicts its tensors raises ``BrokenFileError`` naming the file; model-compatibility checks stay with
    ``check_compatible``."""
    sd, meta = read_checked(path, KIND)
    version = meta.pop("concepts.format_version", None)
    if version not in (None, FORMAT_VERSION):
        raise broken(path, KIND, f"has format version '{version}', which this version of comfyui-concepts does not "
                                 "know", "update comfyui-concepts")
    check_factors(sd, path, KIND)
    check_residual_keys(sd, meta, path, KIND)
    rs = from_state_dict(sd, meta)
    check_rank_metadata(rs, path, KIND)
    return rs


def check_residual_keys(sd: dict[str, torch.Tensor], meta: dict[str, str], path: str, kind: str) -> None:
    """Raise ``BrokenFileError`` unless every layer has both factors under the generic keys and there is one."""
    roles = [generic_role(k) for k in sd if k.startswith(KEY_PREFIX)]
    downs = {stem for stem, role in filter(None, roles) if role == "down:0"}
    ups = {stem for stem, role in filter(None, roles) if role == "up:0"}
    for stem in sorted(downs ^ ups):
        have, lack = ("lora_down", "lora_up") if stem in downs else ("lora_up", "lora_down")
        raise broken(path, kind, f"has '{stem}.{have}.weight' but no matching {lack} weight (incomplete factors)")
    if downs:
        return
    if meta.get("technique") == "concept-set":
        raise broken(path, kind, "holds concept handles without residuals (its metadata says technique "
                                 "'concept-set')", "load it with Load Concepts")
    raise broken(path, kind, "has no 'diffusion_model.*.lora_down.weight' keys" + _key_format(sd) + ": it is not "
                             "a file this pack saved", "apply it with LoraLoader / LoraLoaderModelOnly (ComfyUI reads "
                             "that format), or pick a file this pack saved")


_KEY_FORMATS = (("lora_unet_", "kohya's 'lora_unet_…'"), ("transformer.", "diffusers/PEFT 'transformer.…'"),
                ("lora_transformer_", "OneTrainer's 'lora_transformer_…'"), ("base_model.model.", "PEFT's "
                "'base_model.model.…'"), ("lycoris_", "LyCORIS 'lycoris_…'"), ("unet.", "diffusers' 'unet.…'"))


def _key_format(sd: dict) -> str:
    """', its keys are in <format> form' for a LoRA key format the pack recognises, else ''."""
    key = next(iter(sd), "")
    for prefix, name in _KEY_FORMATS:
        if key.startswith(prefix):
            return f" (its keys are in {name} form, e.g. '{key}')"
    return f" (e.g. '{key}')" if key else ""


def check_rank_metadata(rs: ResidualSet, path: str, kind: str) -> None:
    """Raise ``BrokenFileError`` when the metadata's ``rank``, ``rank_rule`` (fixed) or ``layout`` contradict the
    factors: the rank a layer was made with is ``max(1, min(rank, in, out))``; ``layout`` maps path -> width."""
    name = "rank" if "rank" in rs.metadata else "rank_rule"
    fixed = rs.metadata.get(name, "").removeprefix("fixed:" if name == "rank_rule" else "")
    if fixed.strip().isdigit():
        for p, layer in rs.layers.items():
            expect = max(1, min(int(fixed), layer.down.shape[1], layer.up.shape[0]))
            if layer.rank != expect:
                raise broken(path, kind, f"has contradictory metadata: '{name}' says {rs.metadata[name]} but "
                                         f"'{p}' has rank {layer.rank}", EDITED)
    if "layout" not in rs.metadata:
        return
    layout = metadata_json(rs.metadata, "layout", path, kind)
    if not isinstance(layout, dict):
        raise broken(path, kind, "has a 'layout' metadata entry that is not a {path: width} map",
                     EDITED)
    for p, layer in rs.layers.items():
        if p in layout and layout[p] != layer.down.shape[1]:
            raise broken(path, kind, f"has contradictory metadata: 'layout' says '{p}' is {layout[p]} channels wide "
                                     f"but its factors are {layer.down.shape[1]}", EDITED)


def check_compatible(rs: ResidualSet, family: str, sites: list[TransformerSite]) -> None:
    """Raise ResidualFileError, naming both families, when ``rs`` was made for another model."""
    file_family = rs.metadata.get("base_family")
    if file_family and file_family != family:
        raise ResidualFileError(
            f"this residual file was trained for {family_label(file_family)} ({file_family}) but the model is "
            f"{family_label(family)} ({family}); load a checkpoint of the file's family or train residuals "
            "for this model")
    by_target = {s.target: s for s in sites}
    layers = {s.layer for s in sites} | {"proj_out"}
    linear = {s.target: s.linear for s in sites}
    for path, layer in rs.layers.items():
        if not any(path.endswith("." + name) for name in layers):
            raise ResidualFileError(
                f"'{path}' is not a transformer block's output projection: this is an ordinary LoRA, not a "
                "personalized-residual file; load it with LoraLoader")
        if path not in by_target:
            raise ResidualFileError(
                f"the residual file targets '{path}', which this {family_label(family)} model does not have: "
                "the file was made for a model with another block layout")
        site = by_target[path]
        if layer.down.shape[1] != site.inputs or layer.up.shape[0] != site.width:
            raise ResidualFileError(
                f"'{path}' is {site.inputs}->{site.width} channels in this model but {layer.down.shape[1]}->"
                f"{layer.up.shape[0]} in the file: the file was made for a model with another layout")
        if layer.conv == linear[path]:
            kinds = ("a 1x1 conv", "a linear layer")
            raise ResidualFileError(
                f"'{path}' is {kinds[linear[path]]} in this model but {kinds[not layer.conv]} in the file: "
                "the file was made for a model with another layout")



def parse_block_strengths(text: str, paths) -> dict[str, float]:
    """Per-layer multipliers from ``"input=1, middle=0.5, output_blocks.9=0"``.

    Each name is a block-path prefix (``input``/``middle``/``output`` are short for the ldm names); the longest
    matching prefix wins; layers no entry names keep 1.0. A name that matches no layer is an error.
    """
    rules = []
    for part in filter(None, (p.strip() for p in text.replace(";", ",").replace("\n", ",").split(","))):
        if "=" not in part:
            raise ValueError(f"block strength '{part}' needs the form name=value, e.g. 'middle=0.5'")
        name, value = (s.strip() for s in part.split("=", 1))
        head, _, rest = name.partition(".")
        name = _BLOCK_ALIASES.get(head, head) + (f".{rest}" if rest else "")
        try:
            rules.append((name, float(value)))
        except ValueError:
            raise ValueError(f"block strength '{part}': '{value}' is not a number") from None
    out = {}
    for name, value in rules:
        hits = [p for p in paths if p == name or p.startswith(name + ".") or p.startswith(name + "_")]
        if not hits:
            raise ValueError(f"block strength '{name}' matches no residual layer; layers are: "
                             + ", ".join(sorted({p.rsplit('.', 1)[0] for p in paths})))
        for p in hits:
            prev = out.get(p)
            if prev is None or len(name) >= prev[0]:
                out[p] = (len(name), value)
    return {p: v for p, (_, v) in out.items()}
