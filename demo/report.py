"""Writing the main job's outputs: PNGs, report.json (strict JSON) and report.md, all with one file mode."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from core.file_checks import plain_file_mode


def settle(path: Path) -> Path:
    """Give ``path`` the same mode as every other output file (some writers create files 0600)."""
    os.chmod(path, plain_file_mode())
    return path


def save_png(img: torch.Tensor | np.ndarray, path: Path) -> Path:
    """An image [H, W, 3] in [0, 1] as an 8-bit PNG."""
    from PIL import Image

    arr = img.clamp(0, 1).numpy() if isinstance(img, torch.Tensor) else np.clip(img, 0, 1)
    Image.fromarray((arr * 255).round().astype(np.uint8)).save(path)
    return settle(path)


def strict(value):
    """``value`` with every non-finite float replaced by None, so the JSON parses under strict readers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict(v) for v in value]
    return value


def _md_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    if value is None:
        return "n/a"
    return str(value)


def _table(records: list[dict]) -> list[str]:
    keys = list(records[0])
    out = ["| " + " | ".join(keys) + " |", "|---" * len(keys) + "|"]
    return out + ["| " + " | ".join(_md_value(r[k]) for k in keys) + " |" for r in records]


def markdown(report: dict) -> str:
    lines = ["# The main job: a concept learned as personalized residuals", ""]
    rows = report.get("rows")
    for key, value in report.items():
        if key != "rows" and not isinstance(value, (dict, list)):
            lines.append(f"- **{key}**: {_md_value(value)}")
    for key, value in report.items():
        if key != "rows" and isinstance(value, dict):
            lines.append(f"- **{key}**: " + ", ".join(f"{k} {_md_value(v)}" for k, v in value.items()))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            lines += ["", f"**{key}**", "", *_table(value)]
        elif isinstance(value, list):
            lines.append(f"- **{key}**: " + "; ".join(_md_value(v) for v in value))
    if rows:
        metrics = [k for k in next(iter(rows.values())) if k != "samples"]
        lines += ["", "| row | samples | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 2) + "|"]
        for name, row in rows.items():
            lines.append(f"| {name} | {row['samples']} | " + " | ".join(_md_value(row[m]) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict) -> dict:
    """report.json (strict JSON: no NaN) and report.md in ``out``; returns the strict report."""
    clean = strict(report)
    (out / "report.json").write_text(json.dumps(clean, indent=2, allow_nan=False) + "\n")
    (out / "report.md").write_text(markdown(clean))
    settle(out / "report.json")
    settle(out / "report.md")
    return clean
