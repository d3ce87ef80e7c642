"""Learn and localize in a real ComfyUI: every workflow runs headless; the identities users rely on hold."""
import shutil
import textwrap
from pathlib import Path

import pytest

from . import harness
from .prompts import (
    SAVE_LATENT,
    WORKFLOWS,
    dit_family,
    insert_model_node,
    node_id,
    stock_t2i_prompt,
    workflow_prompt,
)

SD15, SDXL = harness.SD15_CKPT, harness.SDXL_CKPT
DIT_SUFFIXES = ("_sd35", "_flux")


def add_inputs(server):
    for png in (WORKFLOWS / "images").glob("*.png"):
        shutil.copy(png, server.base_dir / "input" / png.name)


def train(server, ckpt, save_name, **kw):
    add_inputs(server)
    server.run(workflow_prompt("learn_residuals", ckpt, save_name=save_name, **kw))
    path = server.base_dir / "models" / "loras" / f"{save_name}.safetensors"
    assert path.is_file()
    return f"{save_name}.safetensors", path


@pytest.fixture(scope="module")
def sd15_residual(comfy_server):
    return train(comfy_server, SD15, "tests/sd15_toy")


def latent_of(server, prompt):
    out = server.run(prompt)
    return server.read_latent(harness.output_refs(out, "latents")[0])


def with_save_latent(prompt, prefix):
    ks = node_id(prompt, "KSampler")
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": f"latents/{prefix}"}}
    return prompt


@pytest.mark.parametrize("ckpt", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_every_workflow_runs_to_an_image(comfy_server, ckpt):
    from core.residuals import load

    family = {SD15: "SD1", SDXL: "SDXL"}[ckpt]
    name, path = train(comfy_server, ckpt, f"tests/wf_{family}")
    meta = load(str(path)).metadata
    assert meta["base_family"] == family and meta["token"] == "sks" and meta["class_word"] == "toy"
    names = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json")
                   if not p.stem.endswith(DIT_SUFFIXES))  # the SD3.5 / Flux workflows: test_dit.py
    assert {"learn_residuals", "apply_residuals", "apply_residuals_lag"} <= set(names)
    for wf in names:
        if wf in ("learn_residuals", "apply_saved_concepts"):  # the latter: test_see, after a save
            continue
        if dit_family(wf):  # SD3.5 / Flux workflows: test_dit, on their own models
            continue
        out = comfy_server.run(workflow_prompt(wf, ckpt, residual_name=name))
        images = harness.output_refs(out, "images")
        assert images and comfy_server.image_bytes(images[0])[:8] == b"\x89PNG\r\n\x1a\n", wf


def test_stock_loraloader_gives_the_same_latent_as_apply_residuals(comfy_server, sd15_residual):
    name, _ = sd15_residual
    base = stock_t2i_prompt(SD15, seed=11, prefix="eq", positive="a photo of a sks toy")
    ours = insert_model_node(base, "20", "ConceptsApplyResiduals", {
        "residuals": ["21", 0], "strength": 0.7, "block_strengths": ""})
    ours["21"] = {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": name}}
    stock = insert_model_node(base, "20", "LoraLoaderModelOnly", {"lora_name": name, "strength_model": 0.7})
    for p, tag in ((ours, "ours"), (stock, "stock"), (base, "base")):
        p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/eq_{tag}"
    lat_ours, lat_stock, lat_base = (latent_of(comfy_server, p) for p in (ours, stock, base))
    assert lat_ours.equal(lat_stock)
    assert not lat_ours.equal(lat_base)  # the residual did something


PROBE_PACK = textwrap.dedent('''
    """Test-only pack: an attn2 replace on every block (another pack's patch), counting its calls."""
    import comfy.ldm.modules.attention as attention

    COUNT_FILE = __file__ + ".calls"


    class ProbeAttn2Replace:
        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"model": ("MODEL",)}}

        RETURN_TYPES = ("MODEL",)
        FUNCTION = "patch"
        CATEGORY = "testing"

        def patch(self, model):
            m = model.clone()

            def attn2(q, k, v, extra_options):
                with open(COUNT_FILE, "a") as f:
                    f.write("x")
                return attention.optimized_attention(q, k, v, extra_options["n_heads"])

            for block, ids in (("input", [1]), ("middle", [0]), ("output", [0, 1])):
                for i in ids:
                    m.set_model_attn2_replace(attn2, block, i)
            return (m,)


    NODE_CLASS_MAPPINGS = {"TestProbeAttn2Replace": ProbeAttn2Replace}
''')


def test_lag_composes_with_an_earlier_attn2_patch(tmp_path, comfy_checkpoints):
    server = harness.ComfyServer(tmp_path / "probe", checkpoints=comfy_checkpoints.values())
    pack = server.base_dir / "custom_nodes" / "probe_attn2"
    pack.mkdir()
    (pack / "__init__.py").write_text(PROBE_PACK)
    calls = Path(str(pack / "__init__.py") + ".calls")
    with server.start():
        name, _ = train(server, SD15, "tests/probe_toy")

        def lag_prompt(strength, tag):
            p = with_save_latent(workflow_prompt("apply_residuals_lag", SD15, residual_name=name,
                                                 ConceptsApplyResidualsLocalized={"strength": strength}), tag)
            lag = node_id(p, "ConceptsApplyResidualsLocalized")
            p["50"] = {"class_type": "TestProbeAttn2Replace", "inputs": {"model": p[lag]["inputs"]["model"]}}
            p[lag]["inputs"]["model"] = ["50", 0]
            return p

        probe_only = lag_prompt(0.0, "probe_only")
        calls.unlink(missing_ok=True)
        lat_probe_only = latent_of(server, probe_only)
        assert calls.read_text().count("x") > 0  # the earlier patch ran
        calls.unlink()
        lat_lag = latent_of(server, lag_prompt(1.0, "probe_lag"))
        assert calls.read_text().count("x") > 0  # ... and still runs under LAG
        assert not lat_lag.equal(lat_probe_only)  # while LAG's residual acts too
    assert "LocalizationError" not in server.log_text()


def test_lag_leaves_nothing_behind(comfy_server, sd15_residual, fresh_comfy_server):
    name, _ = sd15_residual
    lag = workflow_prompt("apply_residuals_lag", SD15, residual_name=name)
    comfy_server.run(lag)
    stock = stock_t2i_prompt(SD15, seed=4242, prefix="after_lag")
    after = comfy_server.run(stock)
    fresh = fresh_comfy_server.run(stock)
    img_after = comfy_server.image_bytes(harness.output_refs(after, "images")[0])
    img_fresh = fresh_comfy_server.image_bytes(harness.output_refs(fresh, "images")[0])
    assert img_after == img_fresh


def test_lag_strength_zero_is_the_base_model_exactly(comfy_server, sd15_residual):
    name, _ = sd15_residual
    lag = with_save_latent(workflow_prompt("apply_residuals_lag", SD15, residual_name=name,
                                           ConceptsApplyResidualsLocalized={"strength": 0.0}), "lag_zero")
    base = with_save_latent(workflow_prompt("apply_residuals_lag", SD15, residual_name=name), "lag_base")
    # the base: the same encoded prompt, but the sampler gets the checkpoint's own model
    base[node_id(base, "KSampler")]["inputs"]["model"] = [node_id(base, "CheckpointLoaderSimple"), 0]
    full = with_save_latent(workflow_prompt("apply_residuals_lag", SD15, residual_name=name), "lag_full")
    z, b, f = (latent_of(comfy_server, p) for p in (lag, base, full))
    assert z.equal(b)
    assert not f.equal(b)


# ------------------------------------------------------------------------------------------ bad input
def test_word_missing_from_the_prompt_is_explained(comfy_server, sd15_residual):
    name, _ = sd15_residual
    p = workflow_prompt("apply_residuals_lag", SD15, residual_name=name,
                        ConceptsApplyResidualsLocalized={"text": "a photo of a dog on the beach"})
    err = comfy_server.run_expect_error(p)
    assert "'sks' is not in the prompt" in err


def test_residual_for_another_family_names_both(comfy_server, sd15_residual):
    name, _ = sd15_residual
    err = comfy_server.run_expect_error(workflow_prompt("apply_residuals", SDXL, residual_name=name))
    assert "Stable Diffusion 1.x" in err and "Stable Diffusion XL" in err


def test_training_never_overwrites_an_existing_file(comfy_server, sd15_residual):
    _, path = sd15_residual
    before = path.read_bytes()
    # Save Residuals refuses after training; the training node's own save_name refuses before training starts
    for train_inputs in ({"seed": 99}, {"seed": 98, "save_name": "tests/sd15_toy"}):
        err = comfy_server.run_expect_error(workflow_prompt("learn_residuals", SD15, save_name="tests/sd15_toy",
                                                            ConceptsTrainResiduals=train_inputs))
        assert "already exists" in err and "overwrite" in err
        assert path.read_bytes() == before
    assert "ConceptsTrainResiduals" in err  # the second refusal came from the training node


@pytest.mark.parametrize("ckpt", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_captions_train_each_image_with_its_own_and_the_paper_caption_is_the_default(comfy_server, ckpt):
    import json

    import torch

    from core.residuals import load

    def trained(tag, **inputs):
        _, path = train(comfy_server, ckpt, f"tests/captions_{ckpt.split('_')[1]}_{tag}",
                        ConceptsTrainResiduals=dict(seed=5, **inputs))
        return load(str(path))

    default = trained("default")
    shared = trained("shared", captions="a photo of a sks toy")
    lines = ["a sks toy on grass", "a sks toy on sand", "a sks toy in snow", "a sks toy indoors"]
    per_image = trained("per_image", captions="\n".join(lines), flip=False)
    assert all(torch.equal(default.layers[k].up, shared.layers[k].up) for k in default.layers)
    assert not all(torch.equal(default.layers[k].up, per_image.layers[k].up) for k in default.layers)
    assert json.loads(per_image.metadata["captions"]) == lines and "captions" not in shared.metadata
    # two spellings that encode alike (the tokenizer lowercases): the per-caption path with gradients through each
    # caption's own model call must land where the one-prompt path does; without gradients it would stay at its start
    mixed = trained("mixed", captions="\n".join(["A photo of a sks toy", "a photo of a sks toy"] * 2))
    still = trained("still", learning_rate=1e-6)  # about where training starts

    def gap(a, b):
        return max((a.layers[k].up - b.layers[k].up).abs().max().item() for k in a.layers)

    assert gap(default, mixed) < 1e-4 * gap(default, still)  # measured: 7e-9 against 3e-3 on SD1.5
    for captions, message in (("a sks toy\na sks toy", "2 captions for 4 images"),
                              ("a toy on grass", "does not name 'sks'")):
        err = comfy_server.run_expect_error(workflow_prompt(
            "learn_residuals", ckpt, save_name="", ConceptsTrainResiduals={"captions": captions}))
        assert message in err


@pytest.mark.parametrize("mask_size,value,message", [(64, 0.0, "empty"), (32, 1.0, "one mask per image")])
def test_bad_masks_are_explained(comfy_server, mask_size, value, message):
    add_inputs(comfy_server)
    p = workflow_prompt("learn_residuals", SD15, save_name="")
    p["60"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": mask_size, "height": mask_size}}
    train_id = node_id(p, "ConceptsTrainResiduals")
    p["61"] = {"class_type": "ImageScale", "inputs": {"image": p[train_id]["inputs"]["images"], "width": 64,
                                                      "height": 64, "upscale_method": "bilinear", "crop": "disabled"}}
    p[train_id]["inputs"].update(images=["61", 0], masks=["60", 0])
    assert message in comfy_server.run_expect_error(p)


def test_readme_main_job_runs_against_the_server(comfy_server, tmp_path):
    """README command 1 with --server: the same job as API prompts."""
    import json
    import subprocess
    import sys

    repo = WORKFLOWS.parent
    out = tmp_path / "job"
    subprocess.run([sys.executable, "-m", "demo", "--server", comfy_server.url, "--ckpt", SD15, "--resolution", "64",
                    "--steps", "3", "--sample-steps", "2", "--views", "1", "--out", str(out)],
                   cwd=repo, check=True, timeout=600)
    report = json.loads((out / "report.json").read_text())
    for key in ("sample_global", "sample_lag"):
        assert Path(report[key][0]).read_bytes()[:4] == b"\x89PNG"
    assert (comfy_server.base_dir / report["residual_file"]).is_file()
    assert len({p.stat().st_mode for p in out.iterdir()}) == 1, "every output file gets the same permissions"


def custom_sampler_prompt(residual_name, strength, prefix, model_from_lag=True):
    """LAG through SamplerCustomAdvanced + CFGGuider instead of the stock KSampler."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": residual_name}},
        "3": {"class_type": "ConceptsApplyResidualsLocalized", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "residuals": ["2", 0], "text": "a photo of a sks toy on the beach",
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0, "mask_rule": "median"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "5": {"class_type": "CFGGuider", "inputs": {"model": ["3", 0] if model_from_lag else ["1", 0],
                                                    "positive": ["3", 1], "negative": ["4", 0], "cfg": 7.0}},
        "6": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "7": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 2,
                                                         "denoise": 1.0}},
        "8": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "9": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "10": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["8", 0], "guider": ["5", 0],
                                                                 "sampler": ["6", 0], "sigmas": ["7", 0],
                                                                 "latent_image": ["9", 0]}},
        "11": {"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": f"latents/{prefix}"}},
    }


def test_lag_works_with_sampler_custom_advanced(comfy_server, sd15_residual):
    name, _ = sd15_residual
    base = latent_of(comfy_server, custom_sampler_prompt(name, 1.0, "custom_base", model_from_lag=False))
    zero = latent_of(comfy_server, custom_sampler_prompt(name, 0.0, "custom_zero"))
    lag = latent_of(comfy_server, custom_sampler_prompt(name, 1.0, "custom_lag"))
    assert zero.equal(base)
    assert not lag.equal(base) and lag.isfinite().all()


def test_an_empty_step_range_is_the_base_model(comfy_server, sd15_residual):
    name, _ = sd15_residual
    off = with_save_latent(workflow_prompt("apply_residuals_lag", SD15, residual_name=name,
                                           ConceptsApplyResidualsLocalized={"start_percent": 1.0,
                                                                            "end_percent": 1.0}), "range_off")
    base = with_save_latent(workflow_prompt("apply_residuals_lag", SD15, residual_name=name), "range_base")
    base[node_id(base, "KSampler")]["inputs"]["model"] = [node_id(base, "CheckpointLoaderSimple"), 0]
    assert latent_of(comfy_server, off).equal(latent_of(comfy_server, base))


def test_a_positive_prompt_from_elsewhere_is_explained(comfy_server, sd15_residual):
    name, _ = sd15_residual
    p = workflow_prompt("apply_residuals_lag", SD15, residual_name=name)
    p["70"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}}
    p[node_id(p, "KSampler")]["inputs"]["positive"] = ["70", 0]
    err = comfy_server.run_expect_error(p)
    assert "Connect the node's 'positive' output" in err
