"""The UI workflows in ComfyUI's real web editor (headless Chromium): no missing nodes, and the editor queues
exactly the API twin. Needs Debian's chromium and playwright-core (npm) in $PW_DIR (default ~/.cache/pw)."""
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from . import harness
from .prompts import WORKFLOWS

HERE = Path(__file__).resolve().parent


def playwright_dir():
    pw = Path(os.environ.get("PW_DIR", harness.cache_dir().parent / "pw"))
    return pw if (pw / "node_modules" / "playwright-core").is_dir() else None


@pytest.mark.skipif(shutil.which("node") is None or not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists(),
                    reason="needs node and chromium (apt-get install chromium) for the editor check")
def test_editor_loads_every_workflow_and_queues_its_api_twin(comfy_server, tmp_path):
    pw = playwright_dir()
    if pw is None:
        pytest.skip("needs playwright-core: npm install playwright-core in $PW_DIR (default ~/.cache/pw)")
    files = sorted(WORKFLOWS.glob("*.json"))
    proc = subprocess.run(["node", str(HERE / "editor_check.mjs"), comfy_server.url, str(tmp_path)] +
                          [str(f) for f in files], env=dict(os.environ, PW_DIR=str(pw)), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for f in files:
        res = results[f.stem]
        assert res["unknown"] == [] and res["withErrors"] == [], f"{f.name}: the editor flags {res}"
        assert not any("missing" in d or "warning" in d for d in res["dialogs"]), f"{f.name}: {res['dialogs']}"
        twin = json.loads((WORKFLOWS / "api" / f.name).read_text())
        got = {k: (v["class_type"], v["inputs"]) for k, v in res["output"].items()}
        assert got == {k: (v["class_type"], v["inputs"]) for k, v in twin.items()}, f.name
        assert (tmp_path / f"{f.stem}.png").stat().st_size > 10_000
