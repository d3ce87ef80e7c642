"""docs/nodes.md is what tools/node_docs.py writes from the node schemas."""
import os
import subprocess

from . import harness

DOC = harness.REPO_ROOT / "docs" / "nodes.md"
SCRIPT = harness.REPO_ROOT / "tools" / "node_docs.py"


def test_node_reference_is_current():
    env = dict(os.environ, COMFYUI_PATH=str(harness.comfyui_path()),
               OMP_NUM_THREADS=os.environ.get("COMFYUI_OMP_NUM_THREADS", "1"))
    r = subprocess.run([harness.comfyui_python(), str(SCRIPT), "--stdout"], capture_output=True, text=True, env=env,
                       timeout=300, check=False)
    assert r.returncode == 0, f"tools/node_docs.py failed:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    written = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    assert r.stdout == written, (
        "docs/nodes.md is stale: the node schemas changed. Regenerate it with "
        f"`COMFYUI_PATH={harness.comfyui_path()} {harness.comfyui_python()} tools/node_docs.py`")
