"""Erase Concept (closed form) on SD3 in a real ComfyUI, in-process (a subprocess in ComfyUI's own Python).

The tiny SD3 checkpoint carries CLIP-L and CLIP-G (random weights), so encodes are quick. With a small ridge the
edit of the layers that read the text encoder's output (token entry and pooled entry) meets its constraints, and
what follows them sees the anchor: the erased word samples the anchor's latent, a preserved word its own; the saved
file through the stock loader gives the node's latent.
"""
import json
import subprocess
import textwrap

import pytest

from . import harness
from .make_checkpoints import SD3_NAME

pytestmark = pytest.mark.dit

SCRIPT = textwrap.dedent("""
    import importlib.util, json, sys
    from pathlib import Path
    sys.argv = sys.argv[:1] + ["--cpu"]
    sys.path.insert(0, {comfy!r})
    import torch
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.cli_args  # noqa: F401
    import nodes  # noqa: F401  (sets up folder_paths)
    import folder_paths
    spec = importlib.util.spec_from_file_location("comfyui_concepts", Path({repo!r}) / "__init__.py",
                                                  submodule_search_locations=[{repo!r}])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["comfyui_concepts"] = pack
    spec.loader.exec_module(pack)
    import comfy.lora, comfy.sample, comfy.sd, comfy.utils
    from comfyui_concepts.core.patching.comfy import model_family
    from comfyui_concepts.nodes.erase.closed_form import EraseConceptClosedForm

    path, out_dir = {path!r}, {out_dir!r}
    folder_paths.add_model_folder_path("loras", out_dir, is_default=True)  # saves go here
    model, clip, *_ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))

    def sample(m, text):
        cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return comfy.sample.sample(m, noise, 2, 4.5, "euler", "simple", cond, empty, latent, seed=0,
                                   disable_pbar=True)

    out = EraseConceptClosedForm.execute(model, clip, "red", "", "blue, green", 0, 0.0, -1, 1e-4, 1.0, 1.0, 0, 0,
                                         "tests/erase_red_sd3", False)
    edited = out.args[0]
    res = {{"family": model_family(model), "report": str(out.ui)[:600]}}
    base_red, base_anchor = sample(model, "red"), sample(model, "")
    res["scale"] = base_anchor.abs().max().item()
    res["base_red_vs_anchor"] = (base_red - base_anchor).abs().max().item()
    res["erased_red_vs_anchor"] = (sample(edited, "red") - base_anchor).abs().max().item()
    res["blue_change"] = (sample(edited, "blue") - sample(model, "blue")).abs().max().item()
    file = out_dir + "/tests/erase_red_sd3.safetensors"
    stock = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(file), 1.0, 0)[0]
    res["stock_equal"] = torch.equal(sample(stock, "red"), sample(edited, "red"))
    res["plain_after_equal"] = torch.equal(sample(model, "red"), base_red)
    print("RESULT " + json.dumps(res))
""")


def test_closed_form_erase_on_sd3_maps_the_word_to_the_anchor(dit_checkpoints, tmp_path):
    script = SCRIPT.format(comfy=str(harness.comfyui_path()), repo=str(harness.REPO_ROOT),
                           path=str(dit_checkpoints[SD3_NAME]), out_dir=str(tmp_path))
    proc = subprocess.run([harness.comfyui_python(), "-c", script], capture_output=True, text=True, timeout=900,
                          cwd=str(harness.comfyui_path()))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    res = json.loads(lines[-1][len("RESULT "):])
    assert res["family"] == "SD3"
    assert res["base_red_vs_anchor"] > 1e-2  # the word changes the latent before the edit
    assert res["erased_red_vs_anchor"] <= 1e-3 * max(1.0, res["scale"]), res
    assert res["blue_change"] <= 1e-3 * max(1.0, res["scale"]), res
    assert res["stock_equal"] and res["plain_after_equal"]
