"""Compose in a real ComfyUI, the methods that act on keys, values and attention: Custom Diffusion (K/V
training, closed-form merge), FreeCustom (multi-reference self-attention), Multi-Concept T2I-Zero (correction,
cross-token NMS). Every workflow runs headless to an image; the identities that hold exactly are pinned bit for bit;
bad input gets a clear message."""
import re

import pytest

from . import harness
from .prompts import SAVE_LATENT, WORKFLOWS, node_id, stock_t2i_prompt, workflow_prompt

SD15, SDXL = harness.SD15_CKPT, harness.SDXL_CKPT
NAMES = ["custom_diffusion", "freecustom", "t2i_zero"]


def add_inputs(server):
    from .test_learn_localize import add_inputs as add

    add(server)


def with_latent(prompt, prefix):
    ks = node_id(prompt, "KSampler")
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [ks, 0], "filename_prefix": f"latents/{prefix}"}}
    return prompt


def latent(server, prompt, prefix):
    out = server.run(with_latent(prompt, prefix))
    return server.read_latent(harness.output_refs({"900": out["900"]}, "latents")[0])


def tag(name, ckpt):
    return f"{name}_{ckpt.split('_')[1]}"


def base_of(prompt, positive=None):
    """The same prompt with the sampler fed the checkpoint's own model (and ``positive`` when given)."""
    ks = prompt[node_id(prompt, "KSampler")]["inputs"]
    ks["model"] = [node_id(prompt, "CheckpointLoaderSimple"), 0]
    if positive is not None:
        ks["positive"] = positive
    return prompt


def test_the_workflows_exist_in_both_formats():
    for name in NAMES:
        assert (WORKFLOWS / "api" / f"{name}.json").is_file() and (WORKFLOWS / f"{name}.json").is_file(), name


@pytest.mark.parametrize("ckpt", [SD15, SDXL], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("name", NAMES)
def test_workflow_runs_to_an_image(comfy_server, name, ckpt):
    add_inputs(comfy_server)
    out = comfy_server.run(workflow_prompt(name, ckpt))
    saved = [r for r in harness.output_refs(out, "images") if r.get("type") == "output"]
    assert saved and comfy_server.image_bytes(saved[0])[:8] == b"\x89PNG\r\n\x1a\n", name


# ------------------------------------------------------------------------------------------ Custom Diffusion
def one_concept_prompt(save_name, strength=1.0):
    """The Custom Diffusion workflow with concept A saved to a file and merged alone."""
    p = workflow_prompt("custom_diffusion", SD15)
    train_a = "7"
    assert p[train_a]["inputs"]["token"] == "sks"
    p[train_a]["inputs"]["save_name"] = save_name
    merge = node_id(p, "ConceptsMergeCustomDiffusion")
    del p[merge]["inputs"]["concept_2"]
    p[merge]["inputs"]["strength"] = strength
    del p["8"], p["5"], p["6"]  # concept B's training is not needed
    return p


def test_merging_one_concept_is_that_concept_alone_as_loraloader_applies_it(comfy_server):
    """One concept: nothing to merge, the K/V updates apply as trained: the same latent as the stock
    LoraLoaderModelOnly on the saved file, at equal strength."""
    add_inputs(comfy_server)
    merged = latent(comfy_server, one_concept_prompt("tests/cd_one", 0.7), "cd_one")
    path = comfy_server.base_dir / "models" / "loras" / "tests" / "cd_one.safetensors"
    assert path.is_file()
    from core.residuals import load

    rs = load(str(path))
    assert rs.metadata["technique"] == "custom_diffusion" and rs.metadata["token"] == "sks"
    assert rs.layers and all(k.endswith((".attn2.to_k", ".attn2.to_v")) for k in rs.layers)
    assert all(layer.up.abs().max() > 0 for layer in rs.layers.values())  # trained away from the zero init
    stock = one_concept_prompt("tests/cd_unused")
    merge = node_id(stock, "ConceptsMergeCustomDiffusion")
    stock[merge] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": "tests/cd_one.safetensors", "strength_model": 0.7}}
    for k in [k for k, v in stock.items() if v["class_type"] == "ConceptsTrainCustomDiffusion"]:
        del stock[k]
    by_lora = latent(comfy_server, stock, "cd_one_lora")
    base = latent(comfy_server, base_of(one_concept_prompt("", 0.7)), "cd_one_base")
    assert merged.equal(by_lora)
    assert not merged.equal(base)


def test_merging_two_concepts_holds_the_constraints_and_strength_zero_is_the_base(comfy_server):
    add_inputs(comfy_server)
    p = workflow_prompt("custom_diffusion", SD15)
    merge = node_id(p, "ConceptsMergeCustomDiffusion")
    out = comfy_server.run(with_latent(p, "cd_two"))
    report = " ".join(out[merge]["text"])
    err = float(re.search(r"constraints hold to ([0-9.e+-]+)", report).group(1))
    assert "merged 2 concepts (sks, ohwx)" in report and err < 1e-6, report
    merged = comfy_server.read_latent(harness.output_refs({"900": out["900"]}, "latents")[0])
    zero = workflow_prompt("custom_diffusion", SD15, ConceptsMergeCustomDiffusion={"strength": 0.0})
    base = base_of(workflow_prompt("custom_diffusion", SD15))
    lat_zero, lat_base = latent(comfy_server, zero, "cd_zero"), latent(comfy_server, base, "cd_base")
    assert lat_zero.equal(lat_base)
    assert not merged.equal(lat_base) and merged.isfinite().all()


def test_two_concepts_with_the_same_token_are_refused(comfy_server):
    add_inputs(comfy_server)
    p = workflow_prompt("custom_diffusion", SD15, ConceptsTrainCustomDiffusion={"token": "sks"})
    assert "both use the token 'sks'" in comfy_server.run_expect_error(p)


def test_merge_refuses_another_family_and_non_kv_files(comfy_server):
    add_inputs(comfy_server)
    comfy_server.run(one_concept_prompt("tests/cd_family"))
    p = workflow_prompt("custom_diffusion", SDXL)
    merge = node_id(p, "ConceptsMergeCustomDiffusion")
    p["60"] = {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": "tests/cd_family.safetensors"}}
    p[merge]["inputs"]["concept_2"] = ["60", 0]
    err = comfy_server.run_expect_error(p)
    assert "Stable Diffusion 1.x" in err and "Stable Diffusion XL" in err and "concept 2" in err
    from .test_learn_localize import train

    name, _ = train(comfy_server, SD15, "tests/cd_proj_out")
    p = workflow_prompt("custom_diffusion", SD15)
    p["60"] = {"class_type": "ConceptsLoadResiduals", "inputs": {"residual_name": name}}
    p[node_id(p, "ConceptsMergeCustomDiffusion")]["inputs"]["concept_2"] = ["60", 0]
    assert "is not a cross-attention key/value projection" in comfy_server.run_expect_error(p)


# ------------------------------------------------------------------------------------------ FreeCustom
@pytest.mark.parametrize("ckpt", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_freecustom_with_weight_zero_or_empty_masks_is_the_base_exactly(comfy_server, ckpt):
    add_inputs(comfy_server)
    base = latent(comfy_server, base_of(workflow_prompt("freecustom", ckpt)), tag("fc_base", ckpt))
    zero = latent(comfy_server, workflow_prompt("freecustom", ckpt, ConceptsFreeCustom={"weight": 0.0}),
                  tag("fc_zero", ckpt))
    p = workflow_prompt("freecustom", ckpt)
    p["60"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    p[node_id(p, "ConceptsFreeCustom")]["inputs"].update(masks=["60", 0], reference_prompts="two objects")
    empty = latent(comfy_server, p, tag("fc_empty", ckpt))
    on = latent(comfy_server, workflow_prompt("freecustom", ckpt), tag("fc_on", ckpt))
    off_range = latent(comfy_server, workflow_prompt("freecustom", ckpt, ConceptsFreeCustom={
        "start_percent": 1.0, "end_percent": 1.0}), tag("fc_off", ckpt))
    assert zero.equal(base) and empty.equal(base) and off_range.equal(base)
    assert not on.equal(base) and on.isfinite().all()
    # per-reference weights: one reference at 0 is not both at 0
    one = latent(comfy_server, workflow_prompt("freecustom", ckpt, ConceptsFreeCustom={"weights": "3, 0"}),
                 tag("fc_one", ckpt))
    assert not one.equal(base) and not one.equal(on)


def test_freecustom_leaves_nothing_behind_and_chains_with_nms(comfy_server):
    add_inputs(comfy_server)
    stock = stock_t2i_prompt(SD15, seed=77, prefix="fc_before")
    before = comfy_server.read_latent(harness.output_refs(comfy_server.run(stock), "latents")[0])
    # FreeCustom, then T2I-Zero's NMS on the same model: both patches act in one run
    p = workflow_prompt("freecustom", SD15)
    p["10"]["inputs"]["text"] = "a photo of a cat and a dog"
    p["70"] = {"class_type": "ConceptsT2IZeroNMS", "inputs": {
        "model": ["7", 0], "positive": ["10", 0], "clip": ["1", 1], "text": "a photo of a cat and a dog",
        "concepts": "cat, dog", "start_percent": 0.0, "end_percent": 1.0, "smoothing": 0.5}}
    p[node_id(p, "KSampler")]["inputs"]["model"] = ["70", 0]
    both = latent(comfy_server, p, "fc_nms")
    fc_only = workflow_prompt("freecustom", SD15)
    fc_only["10"]["inputs"]["text"] = "a photo of a cat and a dog"
    assert not both.equal(latent(comfy_server, fc_only, "fc_only"))
    stock[SAVE_LATENT]["inputs"]["filename_prefix"] = "latents/fc_after"
    after = comfy_server.read_latent(harness.output_refs(comfy_server.run(stock), "latents")[0])
    assert after.equal(before)


def test_freecustom_bad_input(comfy_server):
    add_inputs(comfy_server)
    p = workflow_prompt("freecustom", SD15)
    fc = node_id(p, "ConceptsFreeCustom")
    p["60"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["2", 0]}}
    p["61"] = {"class_type": "ImageBatch", "inputs": {"image1": ["60", 0], "image2": ["2", 0]}}
    p[fc]["inputs"]["references"] = ["61", 0]
    assert "3 reference images for 2 masks" in comfy_server.run_expect_error(p)
    p = workflow_prompt("freecustom", SD15, ConceptsFreeCustom={"weights": "1, 2, 3"})
    assert "3 weights for 2 references" in comfy_server.run_expect_error(p)
    p = workflow_prompt("freecustom", SD15, ConceptsFreeCustom={"blocks": "nowhere"})
    assert "match no transformer block" in comfy_server.run_expect_error(p)
    # masks of another size than the references are resized, with a note in the log
    p = workflow_prompt("freecustom", SD15)
    p["60"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 48}}
    p[fc]["inputs"].update(masks=["60", 0], reference_prompts="two objects")
    comfy_server.run(p)
    assert "masks resized" in comfy_server.log_text()


# ------------------------------------------------------------------------------------------ T2I-Zero
@pytest.mark.parametrize("ckpt", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_t2i_zero_identities(comfy_server, ckpt):
    """Correction at strength 0 and NMS with one concept (or outside its step range) give the base exactly;
    each operation on its own changes the latent."""
    base = latent(comfy_server, base_of(workflow_prompt("t2i_zero", ckpt), positive=["10", 0]), tag("tz_base", ckpt))
    ident = workflow_prompt("t2i_zero", ckpt, ConceptsT2IZeroCorrection={"strength": 0.0},
                            ConceptsT2IZeroNMS={"concepts": "cat"})
    assert latent(comfy_server, ident, tag("tz_ident", ckpt)).equal(base)
    off = workflow_prompt("t2i_zero", ckpt, ConceptsT2IZeroCorrection={"strength": 0.0},
                          ConceptsT2IZeroNMS={"start_percent": 1.0, "end_percent": 1.0})
    assert latent(comfy_server, off, tag("tz_off", ckpt)).equal(base)
    nms_only = workflow_prompt("t2i_zero", ckpt, ConceptsT2IZeroCorrection={"strength": 0.0})
    correction_only = base_of(workflow_prompt("t2i_zero", ckpt), positive=["11", 0])
    both = workflow_prompt("t2i_zero", ckpt)
    lat = [latent(comfy_server, p, tag(name, ckpt)) for p, name in ((nms_only, "tz_nms"), (correction_only, "tz_corr"),
                                                                    (both, "tz_both"))]
    assert all(not x.equal(base) and x.isfinite().all() for x in lat)
    assert not lat[2].equal(lat[0]) and not lat[2].equal(lat[1])


@pytest.mark.parametrize("by_class, message", [
    ({"ConceptsT2IZeroCorrection": {"concepts": "cat, horse"}}, "the word 'horse' is not in the prompt"),
    ({"ConceptsT2IZeroNMS": {"concepts": "cat, horse"}}, "the word 'horse' is not in the prompt"),
    ({"ConceptsT2IZeroCorrection": {"text": "a photo of a cat and a dog on grass"}}, "was not encoded from the text"),
    ({"ConceptsT2IZeroCorrection": {"concepts": "cat, cat"}}, "share token positions"),
    ({"ConceptsT2IZeroNMS": {"concepts": " , "}}, "name the concepts"),
])
def test_t2i_zero_errors_say_what_to_fix(comfy_server, by_class, message):
    assert message in comfy_server.run_expect_error(workflow_prompt("t2i_zero", SD15, **by_class))


def test_nms_positive_from_elsewhere_is_explained(comfy_server):
    p = workflow_prompt("t2i_zero", SD15)
    p["70"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat and a dog on grass", "clip": ["1", 1]}}
    p[node_id(p, "KSampler")]["inputs"]["positive"] = ["70", 0]  # the sampler gets another prompt than NMS
    assert "not the one connected to this node" in comfy_server.run_expect_error(p)


def test_nms_chains_to_an_earlier_attn2_replace(tmp_path, comfy_checkpoints):
    """Another pack's attn2 replace set before NMS still computes the rows NMS leaves alone (the unconditional
    half), while NMS acts on the prompt's rows."""
    from pathlib import Path

    from .test_learn_localize import PROBE_PACK

    server = harness.ComfyServer(tmp_path / "probe", checkpoints=comfy_checkpoints.values())
    pack = server.base_dir / "custom_nodes" / "probe_attn2"
    pack.mkdir()
    (pack / "__init__.py").write_text(PROBE_PACK)
    calls = Path(str(pack / "__init__.py") + ".calls")
    with server.start():
        def prompt(concepts, tag):
            p = workflow_prompt("t2i_zero", SD15, ConceptsT2IZeroCorrection={"strength": 0.0},
                                ConceptsT2IZeroNMS={"concepts": concepts})
            nms = node_id(p, "ConceptsT2IZeroNMS")
            p["50"] = {"class_type": "TestProbeAttn2Replace", "inputs": {"model": p[nms]["inputs"]["model"]}}
            p[nms]["inputs"]["model"] = ["50", 0]
            return p, tag

        calls.unlink(missing_ok=True)
        probe_only = latent(server, *prompt("cat", "probe_only"))  # one concept: NMS is off, the probe alone
        assert calls.read_text().count("x") > 0
        calls.unlink()
        with_nms = latent(server, *prompt("cat, dog", "probe_nms"))
        assert calls.read_text().count("x") > 0  # the earlier patch still runs under NMS
        assert not with_nms.equal(probe_only)
