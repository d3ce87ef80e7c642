"""A corpus of broken files, derived from a valid small file of each kind the pack reads.

Each valid file is written with the pack's own save function (LoRA files: with safetensors, in kohya's keys, as
community trainers write them); each broken file changes one thing. ``build_corpus(root)`` writes them all and
returns ``Broken`` records: the file, the loader kind that must refuse it and the words its error must contain.
"""
from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core import extract as X
from core import lora_files as L
from core import residuals as R
from core.layouts import TransformerSite
from core.sliders import slider_metadata
from core.training import TrainConfig

# file kind -> the loader users reach it through
LOADERS: dict[str, Callable] = {
    "residuals": R.load,
    "slider": R.load,
    "esd": R.load,
    "uce_erase": R.load,
    "custom_diffusion": R.load,
    "concepts": X.load_concepts,
    "lora": L.load_lora_file,
}
SITES = [TransformerSite("input_blocks.1.1", 32, False, 1), TransformerSite("middle_block.1", 64, False, 1)]
KV = ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", "input_blocks.1.1.transformer_blocks.0.attn2.to_v")


@dataclass(frozen=True)
class Broken:
    kind: str  # a key of LOADERS
    case: str  # what was broken
    path: Path
    words: tuple[str, ...]  # what the error message must say, besides the file's path

    @property
    def id(self) -> str:
        return f"{self.kind}-{self.case}"


# ------------------------------------------------------------------------------------------ valid files
def _kv_layers(rank: int, seed: int) -> dict[str, R.LowRank]:
    gen = torch.Generator().manual_seed(seed)
    return {name: R.LowRank(torch.randn(rank, 16, generator=gen), torch.randn(32, rank, generator=gen), float(rank),
                            conv=False) for name in KV}


def write_valid(kind: str, path: Path) -> Path:
    """A small valid file of ``kind`` at ``path``, written as the pack (or a LoRA trainer) writes it."""
    if kind == "residuals":
        rs = R.init_residuals(SITES, seed=0, metadata={"base_family": "SD1", "technique": "personalized_residuals",
                                                       "token": "sks", "class_word": "dog"})
        R.save(rs, str(path))
    elif kind in ("slider", "esd"):
        meta = slider_metadata("SD1", [("a person", "a smiling person", "a frowning person")], 1.0,
                               TrainConfig(steps=3), "concept_slider" if kind == "slider" else "esd")
        R.save(R.init_residuals(SITES, fixed_rank=4, seed=1, metadata=meta), str(path))
    elif kind == "uce_erase":
        meta = {"technique": "uce_realera", "base_family": "SD1", "erase": "cat", "anchor": "animal"}
        R.save(R.ResidualSet(_kv_layers(3, 2), meta), str(path))
    elif kind == "custom_diffusion":
        meta = {"technique": "custom_diffusion", "base_family": "SD1", "token": "sks", "class_word": "dog",
                "rank": "4", "targets": "attn2.to_k, attn2.to_v"}
        R.save(R.ResidualSet(_kv_layers(4, 3), meta), str(path))
    elif kind == "concepts":
        rs = R.init_residuals(SITES[:1], seed=4, metadata={"base_family": "SD1"})
        gen = torch.Generator().manual_seed(5)
        cs = X.ConceptSet(["sks", "ohwx"], [torch.randn(1, 32, generator=gen), torch.randn(2, 32, generator=gen)],
                          None, rs, ["dog", ""], [], "SD1", ["a dog", "a hat"])
        X.save_concepts(cs, str(path))
    elif kind == "lora":
        gen = torch.Generator().manual_seed(6)
        sd = {}
        for stem, width_in, width_out in (("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768, 320),
                                          ("down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_v", 768, 320),
                                          ("mid_block_attentions_0_proj_out", 1280, 1280)):
            shape = (1, 1) if "proj" in stem else ()
            sd[f"lora_unet_{stem}.lora_down.weight"] = torch.randn(4, width_in, *shape, generator=gen).half()
            sd[f"lora_unet_{stem}.lora_up.weight"] = torch.randn(width_out, 4, *shape, generator=gen).half()
            sd[f"lora_unet_{stem}.alpha"] = torch.tensor(2.0)
        save_file(sd, str(path), metadata={"ss_network_dim": "4", "base_family": "SD1"})
    else:
        raise ValueError(f"unknown file kind {kind!r}")
    return path


# ------------------------------------------------------------------------------------------ derivations
def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def _rewrite(src: Path, dst: Path, tensors=None, meta=None) -> None:
    """``dst``: ``src`` with ``tensors(sd)`` / ``meta(metadata)`` applied (each edits its dict in place)."""
    sd, md = _read(src)
    if tensors:
        tensors(sd)
    if meta:
        meta(md)
    save_file(sd, str(dst), metadata=md)


def _first(sd: dict[str, torch.Tensor], suffix: str) -> str:
    return sorted(k for k in sd if k.endswith(suffix))[0]


def _poison(value: float):
    def edit(sd):
        key = _first(sd, "lora_up.weight")
        t = sd[key].clone()
        t.view(-1)[0] = value
        sd[key] = t
    return edit


def _rank_mismatch(sd):
    key = _first(sd, "lora_up.weight")
    sd[key] = sd[key][:, :-1].contiguous()


def _alpha_vector(sd):
    key = _first(sd, ".alpha")
    sd[key] = torch.stack([sd[key], sd[key]])


def _drop_up(sd):
    del sd[_first(sd, "lora_up.weight")]


def _corpus_cases(kind: str) -> dict[str, tuple[Callable[[Path, Path], None], tuple[str, ...]]]:
    """{case: (derive(valid, broken), words)} for ``kind``."""
    def bytes_of(make: Callable[[bytes], bytes]):
        return lambda src, dst: dst.write_bytes(make(src.read_bytes()))

    def rewrite(tensors=None, meta=None):
        return lambda src, dst: _rewrite(src, dst, tensors, meta)

    def header_cut(data: bytes) -> bytes:
        n = int.from_bytes(data[:8], "little")
        return data[:8 + n // 2]

    gen = torch.Generator().manual_seed(7)
    cases = {
        "random_bytes": (bytes_of(lambda d: torch.randint(0, 256, (512,), generator=gen,
                                                          dtype=torch.uint8).numpy().tobytes()),
                         ("not a safetensors file",)),
        "png": (bytes_of(lambda d: b"\x89PNG\r\n\x1a\n" + bytes(200)), ("not a safetensors file",)),
        "empty": (bytes_of(lambda d: b""), ("empty",)),
        "truncated": (bytes_of(lambda d: d[:-7]), ("truncated",)),
        "truncated_header": (bytes_of(header_cut), ("truncated",)),
        "nan": (rewrite(_poison(math.nan)), ("NaN", "lora_up.weight")),
        "inf": (rewrite(_poison(math.inf)), ("Inf", "lora_up.weight")),
        "rank_mismatch": (rewrite(_rank_mismatch), ("ranks do not match",)),
        "alpha_not_scalar": (rewrite(_alpha_vector), ("alpha", "one number")),
    }
    if kind != "lora":  # LoRA files: read_lora reports a lone factor (LoraFileError) as before
        cases["missing_up"] = (rewrite(_drop_up), ("no matching lora_up",))
    if kind in ("residuals", "slider", "esd", "uce_erase", "custom_diffusion"):
        cases["newer_format"] = (rewrite(meta=lambda m: m.update({"concepts.format_version": "9"})),
                                 ("format version '9'", "update"))
    if kind == "residuals":
        cases["layout_contradicts"] = (rewrite(meta=lambda m: m.update(layout=json.dumps(
            {"input_blocks.1.1.proj_out": 48, "middle_block.1.proj_out": 64}))), ("contradictory", "layout", "48"))
        cases["layout_not_json"] = (rewrite(meta=lambda m: m.update(layout="{input_blocks")), ("layout", "JSON"))
        cases["only_handles"] = (_concept_handles_only, ("concept handles", "Load Concepts"))
    if kind in ("slider", "esd"):
        cases["rank_rule_contradicts"] = (rewrite(meta=lambda m: m.update(rank_rule="fixed:8")),
                                          ("contradictory", "rank_rule", "fixed:8"))
    if kind == "custom_diffusion":
        cases["rank_contradicts"] = (rewrite(meta=lambda m: m.update(rank="2")), ("contradictory", "'rank' says 2"))
    if kind == "concepts":
        cases["no_tokens"] = (rewrite(meta=lambda m: m.pop("tokens")), ("no 'tokens'", "metadata"))
        cases["tokens_not_json"] = (rewrite(meta=lambda m: m.update(tokens="sks, ohwx")), ("tokens", "JSON"))
        cases["tokens_contradict_handles"] = (rewrite(meta=lambda m: m.update(tokens='["sks"]')),
                                              ("contradictory", "1 token(s)", "2 handle(s)"))
        cases["not_a_concept_set"] = (rewrite(meta=lambda m: m.update(technique="personalized_residuals")),
                                      ("not a concept set", "personalized_residuals", "Load Residuals"))
    if kind == "lora":
        cases["family_contradicts"] = (rewrite(meta=lambda m: m.update(base_family="SDXL")),
                                       ("contradictory", "SDXL", "SD1"))
    return cases


def _concept_handles_only(src: Path, dst: Path) -> None:
    """A Save Concepts file with no residuals: what Load Residuals must send to Load Concepts."""
    X.save_concepts(X.ConceptSet(["sks"], [torch.ones(1, 8)], family="SD1"), str(dst))


def corpus_ids(kinds=tuple(LOADERS)) -> list[str]:
    """The ids (``<kind>-<case>``) ``build_corpus`` gives its records, without writing anything."""
    return [f"{kind}-{case}" for kind in kinds for case in _corpus_cases(kind)]


def build_corpus(root: Path, kinds=tuple(LOADERS)) -> list[Broken]:
    """Write a valid file of each kind to ``root/valid`` and every broken variant to ``root/<kind>``."""
    out = []
    (root / "valid").mkdir(parents=True, exist_ok=True)
    for kind in kinds:
        valid = write_valid(kind, root / "valid" / f"{kind}.safetensors")
        (root / kind).mkdir(exist_ok=True)
        for case, (derive, words) in _corpus_cases(kind).items():
            dst = root / kind / f"{case}.safetensors"
            derive(valid, dst)
            out.append(Broken(kind, case, dst, words))
    return out
