"""SD3.5 (MMDiT) and Flux.1 in a real ComfyUI: every DiT workflow runs headless to an image, on tiny random models.

The files (make_checkpoints.DIT_NAMES) are built once by the ``dit_checkpoints`` fixture: SD3.5 is one checkpoint
(CheckpointLoaderSimple), Flux a diffusion model + CLIP-L + T5-XXL + VAE (UNETLoader, DualCLIPLoader, VAELoader).
Each family gets a server of its own, one after the other (Flux with T5 needs ~13 GB).  Sizes: 128 px, 2 sampling
steps, 2 training steps.

A Flux prompt encode costs ~50 s on one thread (the full T5-XXL over 256 tokens), so every positive prompt here is the
same text: the servers run with ``--cache-lru``, which keeps CLIPTextEncode's result from one prompt to the next, and
the stock check, Apply Residuals and the heatmaps' sampler share one encode.  The pack's own nodes (training, LAG,
heatmaps) encode inside themselves, one encode each.
"""

import pytest

from .prompts import node_id, workflow_prompt

pytestmark = pytest.mark.dit

SIZE, STEPS, TRAIN_STEPS = 128, 2, 2
PROMPT = "a photo of a sks toy on the beach"  # the one positive prompt of every run (see the module docstring)
HEATMAP_WORDS = "toy, beach"
# the residual file's base_family per workflow family: the config class names, as docs/model-families.md §3.3 proposes
BASE_FAMILY = {"sd35": "SD3", "flux": "Flux"}


def dit_prompt(workflow, family, **kwargs):
    """workflows/api/<workflow>_<family>.json on the tiny files, small, with PROMPT as its positive prompt."""
    p = workflow_prompt(f"{workflow}_{family}", None, size=SIZE, steps=STEPS, train_steps=TRAIN_STEPS, **kwargs)
    source = p[node_id(p, "KSampler")]["inputs"]["positive"][0] if "KSampler" in _classes(p) else None
    if source is not None and p[source]["class_type"] == "FluxGuidance":
        source = p[source]["inputs"]["conditioning"][0]
    if source is not None and p[source]["class_type"] == "CLIPTextEncode":
        p[source]["inputs"]["text"] = PROMPT
    for node in p.values():
        if node["class_type"] == "ConceptsAttentionHeatmaps":
            node["inputs"].update(text=PROMPT, words=HEATMAP_WORDS)
    return p


def _classes(prompt):
    return {node["class_type"] for node in prompt.values()}


def saved_images(server, prompt, outputs):
    """The PNG bytes of every SaveImage node's first image in a run's outputs, keyed by node id."""
    got = {}
    for nid, node in prompt.items():
        if node["class_type"] == "SaveImage":
            refs = outputs.get(nid, {}).get("images", [])
            assert refs, f"SaveImage {nid} ({node['_meta']['title']}) wrote nothing"
            got[nid] = server.image_bytes(refs[0])
    assert got and all(png[:8] == b"\x89PNG\r\n\x1a\n" for png in got.values())
    return got


def test_the_workflow_without_the_packs_nodes_runs(dit_server):
    """Apply Residuals' workflow with the pack's two nodes taken out: the files load, the text encoders encode, the
    sampler and the VAE run. When this passes and a test below fails, the failure is the pack's."""
    family, server = dit_server
    p = dit_prompt("apply_residuals", family)
    apply_id, load_id = node_id(p, "ConceptsApplyResiduals"), node_id(p, "ConceptsLoadResiduals")
    p[node_id(p, "KSampler")]["inputs"]["model"] = p[apply_id]["inputs"]["model"]
    del p[apply_id], p[load_id]
    saved_images(server, p, server.run(p))


@pytest.fixture(scope="module")
def dit_residual(dit_server):
    """(file name under models/loras, path) of residuals trained by the family's learn workflow (2 steps)."""
    family, server = dit_server
    save_name = f"tests/sks_toy_{family}"
    p = dit_prompt("learn_residuals", family, save_name=save_name)
    out = server.run(p)
    assert out.get(node_id(p, "PreviewImage"), {}).get("images"), "no loss curve"
    path = server.base_dir / "models" / "loras" / f"{save_name}.safetensors"
    assert path.is_file()
    return f"{save_name}.safetensors", path


def test_learn_residuals_saves_a_residual_file_for_the_family(dit_server, dit_residual):
    from core.residuals import load

    family, _ = dit_server
    meta = load(str(dit_residual[1])).metadata
    assert meta["base_family"] == BASE_FAMILY[family]
    assert meta["token"] == "sks" and meta["class_word"] == "toy"


@pytest.mark.parametrize("workflow", ["apply_residuals", "apply_residuals_lag"])
def test_apply_workflow_runs_to_an_image(dit_server, dit_residual, workflow):
    family, server = dit_server
    p = dit_prompt(workflow, family, residual_name=dit_residual[0])
    saved_images(server, p, server.run(p))


def test_attention_heatmaps_runs_to_overlays(dit_server):
    family, server = dit_server
    p = dit_prompt("attention_heatmaps", family)
    out = server.run(p)
    assert len(saved_images(server, p, out)) == 2  # the overlays and the sampled image
    heatmaps = out.get(node_id(p, "ConceptsAttentionHeatmaps"), {}).get("images", [])
    assert len(heatmaps) == len(HEATMAP_WORDS.split(","))  # the node's preview: one overlay per word


def test_concept_attention_workflow_runs_to_one_overlay_per_concept(dit_server):
    family, server = dit_server
    p = dit_prompt("concept_attention", family)
    record = p[node_id(p, "ConceptsRecordConceptAttention")]["inputs"]
    p[node_id(p, "ConceptsAttentionHeatmaps")]["inputs"]["words"] = ""  # every recorded concept
    out = server.run(p)
    assert len(saved_images(server, p, out)) == 2
    heatmaps = out.get(node_id(p, "ConceptsAttentionHeatmaps"), {}).get("images", [])
    assert len(heatmaps) == len(record["concepts"].split(","))


def write_region_loras(server, family, checkpoint) -> list[str]:
    """Two random LoRAs on the model's image-stream layers in the server's models/loras: one in kohya keys, one in
    ComfyUI's ``diffusion_model.`` keys (names as the loader lists them)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.families import family as family_of
    from core.families import row_kind

    fam = family_of(BASE_FAMILY[family])
    prefix = "model.diffusion_model." if family == "sd35" else ""
    with safe_open(str(checkpoint), "pt") as f:
        shapes = {k[len(prefix):-len(".weight")]: f.get_slice(k).get_shape() for k in f.keys()
                  if k.startswith(prefix) and k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2
                  and row_kind(fam, k[len(prefix):-len(".weight")]) in ("image", "joint")}
    assert shapes, "no image-stream layers found in the test checkpoint"
    names = []
    for i, style in enumerate(("kohya", "comfyui")):
        g = torch.Generator().manual_seed(i)
        sd = {}
        for path, (out, inp) in shapes.items():
            stem = "lora_unet_" + path.replace(".", "_") if style == "kohya" else "diffusion_model." + path
            sd[f"{stem}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.05
            sd[f"{stem}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.05
            sd[f"{stem}.alpha"] = torch.tensor(4.0)
        name = f"tests/region_{family}_{style}.safetensors"
        path = server.base_dir / "models" / "loras" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path))
        names.append(name)
    return names


def test_compose_regions_with_two_loras_runs_to_an_image(dit_server, dit_checkpoints):
    """Two LoRA files (kohya and ComfyUI keys), one per half of the image, in one pass; the prompt is PROMPT, whose
    encode the server has cached."""
    from .make_checkpoints import FLUX_NAME, SD3_NAME

    family, server = dit_server
    checkpoint = dit_checkpoints[SD3_NAME if family == "sd35" else FLUX_NAME]
    loras = write_region_loras(server, family, checkpoint)
    p = dit_prompt("compose_regions", family, ConceptsApplyRegions={"text": PROMPT})
    regions = sorted(k for k, v in p.items() if v["class_type"] == "ConceptsRegion")
    for nid, name in zip(regions, loras, strict=True):
        p[nid]["inputs"]["lora_name"] = name
    saved_images(server, p, server.run(p))


def test_erase_closed_form_runs_to_an_image(dit_server):
    """The closed-form erase workflow; only the erased word and the anchor are encoded (no preserved words: each
    Flux encode costs ~50 s here)."""
    family, server = dit_server
    p = dit_prompt("erase_closed_form", family, ConceptsEraseClosedForm={"preserve": ""})
    out = server.run(p)
    saved_images(server, p, out)
    report = " ".join(str(t) for t in out.get(node_id(p, "ConceptsEraseClosedForm"), {}).get("text", []))
    assert "erased 'red'" in report and "token entry" in report, report
