"""Checked reading of the safetensors files the pack loads: one error, naming the file, for any broken file.

``read_checked`` opens a file and checks what every loader relies on: the file exists, is a safetensors file, is
complete (its header's tensor data fits in the file), and every floating-point tensor is finite. ``check_factors``
checks low-rank factor pairs: the up factor's rank matches the down factor's, a mid factor fits between them, and
an alpha is one number. Loaders add their own metadata checks and raise ``broken`` for what they find.

Every failure is a ``BrokenFileError`` whose message reads ``The <kind> '<path>' <what is wrong>; <what to do>``.
"""
from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable

import torch

RESAVE = "save or copy the file again, or pick another"
EDITED = "the file was edited or damaged: save it again"


class BrokenFileError(ValueError):
    """A file that cannot be read as the kind of file a loader expects; the message names the file."""

    def __init__(self, path: str, kind: str, problem: str, remedy: str):
        self.path, self.kind, self.problem = path, kind, problem
        super().__init__(f"The {kind} '{path}' {problem}; {remedy}")


def broken(path: str, kind: str, problem: str, remedy: str = RESAVE) -> BrokenFileError:
    """The error for a file of ``kind`` (e.g. 'residual file') at ``path`` with ``problem`` (a predicate)."""
    return BrokenFileError(path, kind, problem, remedy)


def _header(path: str, kind: str) -> dict:
    """The parsed JSON header, after checking the file is a complete safetensors file."""
    if not os.path.isfile(path):
        raise broken(path, kind, "does not exist", "check the name and the models/loras folder")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        start = f.read(min(max(n, 0), 1 << 27))
    not_safetensors = ("is not a safetensors file (it does not start with a safetensors header)",
                       "convert it to .safetensors or pick another file")
    if size == 0:
        raise broken(path, kind, "is empty (0 bytes)", RESAVE)
    if not start.startswith(b"{"):
        raise broken(path, kind, *not_safetensors)
    if len(start) < n:
        raise broken(path, kind, f"is truncated: its header alone is {n} bytes but the file holds {size}", RESAVE)
    try:
        header = json.loads(start.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise broken(path, kind, "has a damaged safetensors header (not valid JSON)", RESAVE) from None
    if not isinstance(header, dict):
        raise broken(path, kind, *not_safetensors)
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, IndexError, TypeError, ValueError):
        raise broken(path, kind, "has a damaged safetensors header (a tensor without valid data offsets)",
                     RESAVE) from None
    need, have = max(ends, default=0), size - 8 - n
    if need > have:
        raise broken(path, kind, f"is truncated: its header lists {need} bytes of tensor data but the file holds "
                                 f"{have}", "it was cut off while saving, copying or downloading: " + RESAVE)
    return header


def read_checked(path: str, kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file, after the checks above; tensors exactly as safetensors reads them.

    ``kind`` names the file in errors, e.g. 'residual file', 'concept file', 'LoRA file'."""
    from safetensors import SafetensorError, safe_open

    _header(path, kind)
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise broken(path, kind, f"is damaged and cannot be read ({e})", RESAVE) from None
    check_finite(sd, path, kind)
    return sd, meta


def check_finite(sd: dict[str, torch.Tensor], path: str, kind: str) -> None:
    """Raise when a floating-point tensor holds NaN or Inf, naming the first such key (one pass per tensor)."""
    for key, t in sd.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            t = t.float()  # float8 and other storage types: compare in float32
        if bool(torch.isfinite(t).all()):
            continue
        what = "NaN" if bool(torch.isnan(t).any()) else "Inf"
        raise broken(path, kind, f"holds {what} values in '{key}'",
                     "the training that wrote it diverged or the file is damaged: train or save it again")


def generic_role(key: str) -> tuple[str, str] | None:
    """(stem, role) for the pack's own keys: ``<stem>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``."""
    for suffix, role in ((".lora_down.weight", "down:0"), (".lora_up.weight", "up:0"), (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[:-len(suffix)], role
    return None


def check_factors(sd: dict[str, torch.Tensor], path: str, kind: str,
                  split: Callable[[str], tuple[str, str] | None] = generic_role) -> None:
    """Raise when a layer's low-rank factors cannot multiply: up [out, r, ..] x (mid [r, r', ..]) x down [r', in, ..].

    ``split`` maps a key to (stem, role), role ``down:<i>`` / ``up:<i>`` / ``alpha`` / ``mid`` (others ignored)."""
    groups: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        parts = split(key)
        if parts is not None:
            groups.setdefault(parts[0], {})[parts[1]] = (key, t)
    for roles in groups.values():
        if "alpha" in roles and roles["alpha"][1].numel() != 1:
            key, t = roles["alpha"]
            raise broken(path, kind, f"has an alpha '{key}' of shape {tuple(t.shape)} where one number belongs",
                         RESAVE)
        for role, (down_key, down) in roles.items():
            if not role.startswith("down:") or "up:" + role[5:] not in roles:
                continue
            up_key, up = roles["up:" + role[5:]]
            if down.dim() < 2 or up.dim() < 2:
                bad, t = (down_key, down) if down.dim() < 2 else (up_key, up)
                raise broken(path, kind, f"has a factor '{bad}' of shape {tuple(t.shape)}, not a matrix", RESAVE)
            if down.shape[0] == 0:
                raise broken(path, kind, f"has rank 0 in '{down_key}'", RESAVE)
            inner = down.shape[0]
            if "mid" in roles:
                mid_key, mid = roles["mid"]
                if mid.dim() < 2 or mid.shape[1] != inner:
                    raise broken(path, kind, f"has factors whose ranks do not match: '{mid_key}' is "
                                             f"{tuple(mid.shape)} but '{down_key}' has rank {inner}", RESAVE)
                inner = mid.shape[0]
            if up.shape[1] != inner:
                raise broken(path, kind, f"has factors whose ranks do not match: '{up_key}' has rank {up.shape[1]} "
                                         f"but '{down_key}' has rank {inner}", RESAVE)


def metadata_json(meta: dict[str, str], key: str, path: str, kind: str, required: bool = True, default=None):
    """The JSON value of metadata ``key``; missing (when ``required``) or not valid JSON is an error."""
    if key not in meta:
        if required:
            raise broken(path, kind, f"has no '{key}' entry in its metadata",
                         "the file was not written by this pack or was edited: save it again")
        return default
    try:
        return json.loads(meta[key])
    except json.JSONDecodeError:
        raise broken(path, kind, f"has a metadata entry '{key}' that is not valid JSON ({meta[key][:60]!r})",
                     EDITED) from None


def plain_file_mode() -> int:
    """The mode ``open`` gives a new file under the current umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_atomic(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> str:
    """Write a safetensors file under a temporary name, then rename it over ``path``: a crash never leaves a
    half-written file under the real name. The file gets ``plain_file_mode`` (safetensors itself creates files
    readable by their owner only, which hides them from a server running as another user)."""
    from safetensors.torch import save_file

    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.chmod(tmp, plain_file_mode())
    os.replace(tmp, path)
    return path
