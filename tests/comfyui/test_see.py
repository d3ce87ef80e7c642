"""See and extract in a real ComfyUI: heatmaps from stock samplers, extraction workflows, their errors."""
import pytest

from . import harness
from .prompts import (
    CKPT,
    EMPTY_LATENT,
    NEGATIVE,
    POSITIVE,
    SAVE_LATENT,
    VAE_DECODE,
    insert_model_node,
    node_id,
    stock_t2i_prompt,
    workflow_prompt,
)

SD15, SDXL = harness.SD15_CKPT, harness.SDXL_CKPT
PROMPT = "a photo of a dog on the beach"


def heatmap_node(record, images, words="dog, beach", text=PROMPT, **kw):
    return {"class_type": "ConceptsAttentionHeatmaps", "inputs": dict({
        "record": record, "images": images, "clip": [CKPT, 1], "text": text, "words": words,
        "resolutions": "all", "start_percent": 0.0, "end_percent": 1.0, "overlay_alpha": 0.5}, **kw)}


def recorded_prompt(seed=3, batch=1, **heat_kw):
    p = stock_t2i_prompt(SD15, seed=seed, positive=PROMPT, prefix="see")
    p[EMPTY_LATENT]["inputs"]["batch_size"] = batch
    p = insert_model_node(p, "20", "ConceptsRecordAttention", {})
    p["21"] = heatmap_node(["20", 1], [VAE_DECODE, 0], **heat_kw)
    p["22"] = {"class_type": "SaveImage", "inputs": {"images": ["21", 1], "filename_prefix": "see_overlay"}}
    return p


@pytest.mark.parametrize("ckpt", [SD15, SDXL], ids=["sd15", "sdxl"])
def test_heatmap_workflow_runs_to_overlays(comfy_server, ckpt):
    out = comfy_server.run(workflow_prompt("attention_heatmaps", ckpt))
    overlays = harness.output_refs({k: v for k, v in out.items() if k == "9"}, "images")
    assert len(overlays) == 2  # "dog, beach" on one image
    assert comfy_server.image_bytes(overlays[0])[:8] == b"\x89PNG\r\n\x1a\n"


def test_recording_leaves_the_sampled_latent_unchanged(comfy_server):
    base = stock_t2i_prompt(SD15, seed=5, positive=PROMPT, prefix="rec_base")
    rec = recorded_prompt(seed=5)
    rec[SAVE_LATENT]["inputs"]["filename_prefix"] = "latents/rec_on"
    lat = []
    for p in (base, rec):
        out = comfy_server.run(p)
        lat.append(comfy_server.read_latent(harness.output_refs(out, "latents")[0]))
    assert lat[0].equal(lat[1])


def test_batch_of_two_gives_word_major_overlays(comfy_server):
    out = comfy_server.run(recorded_prompt(batch=2, words="dog, beach, photo"))
    assert len(harness.output_refs({"22": out["22"]}, "images")) == 6


def test_heatmaps_with_sampler_custom_advanced(comfy_server):
    p = {
        CKPT: {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "20": {"class_type": "ConceptsRecordAttention", "inputs": {"model": [CKPT, 0]}},
        POSITIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": [CKPT, 1]}},
        NEGATIVE: {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": [CKPT, 1]}},
        "30": {"class_type": "CFGGuider", "inputs": {"model": ["20", 0], "positive": [POSITIVE, 0],
                                                     "negative": [NEGATIVE, 0], "cfg": 5.0}},
        "31": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "dpmpp_2m"}},
        "32": {"class_type": "BasicScheduler", "inputs": {"model": ["20", 0], "scheduler": "karras", "steps": 3,
                                                          "denoise": 1.0}},
        "33": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        EMPTY_LATENT: {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "34": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["33", 0], "guider": ["30", 0],
                                                                 "sampler": ["31", 0], "sigmas": ["32", 0],
                                                                 "latent_image": [EMPTY_LATENT, 0]}},
        VAE_DECODE: {"class_type": "VAEDecode", "inputs": {"samples": ["34", 0], "vae": [CKPT, 2]}},
        "21": heatmap_node(["20", 1], [VAE_DECODE, 0], words="beach", start_percent=0.5),
        "22": {"class_type": "SaveImage", "inputs": {"images": ["21", 1], "filename_prefix": "see_sca"}},
    }
    out = comfy_server.run(p)
    assert len(harness.output_refs({"22": out["22"]}, "images")) == 1


@pytest.mark.parametrize("change, message", [
    ({"words": "dog, cat"}, "'cat' is not in the prompt; its words are: a, photo, of, a, dog, on, the, beach"),
    ({"text": "a photo of a dog in the snow", "words": "dog"}, "not a positive prompt of the recorded run"),
    ({"resolutions": "5"}, "available widths"),
    ({"words": " , "}, "name at least one word"),
])
def test_heatmap_errors_say_what_to_fix(comfy_server, change, message):
    p = recorded_prompt(**change)
    assert message in comfy_server.run_expect_error(p)


def run_extraction(server, name, ckpt=SD15, **by_class):
    from .test_learn_localize import add_inputs

    add_inputs(server)
    return server.run(workflow_prompt(name, ckpt, **by_class))


@pytest.mark.parametrize("name", ["extract_concepts_unsupervised", "extract_concepts_supervised"])
def test_extraction_workflows_run_to_an_image(comfy_server, name):
    out = run_extraction(comfy_server, name)
    images = harness.output_refs(out, "images")
    assert images and comfy_server.image_bytes(images[-1])[:8] == b"\x89PNG\r\n\x1a\n"


def test_extracted_concepts_sample_alone_and_together_on_sdxl_too(comfy_server):
    for text in ("a photo of sks", "a photo of ohwx", "a photo of sks and ohwx"):
        run_extraction(comfy_server, "extract_concepts_supervised", SDXL,
                       ConceptsApplyConcepts={"text": text, "localized": text.endswith("ohwx")})


def test_handles_only_and_zero_strength(comfy_server):
    run_extraction(comfy_server, "extract_concepts_supervised",
                   ConceptsLearnConcepts={"joint_steps": 0}, ConceptsApplyConcepts={"strength": 0.0})


def test_handles_start_from_the_given_phrases_and_the_file_says_which(comfy_server):
    """The supervised workflow's start phrases reach the saved file: one chosen phrase per concept, from the list;
    a prompt without the input searches nothing (as before the input existed)."""
    import json

    from safetensors import safe_open

    from .test_learn_localize import add_inputs

    add_inputs(comfy_server)
    p = workflow_prompt("extract_concepts_supervised", SD15)
    phrases = [x.strip() for x in p[node_id(p, "ConceptsLearnConcepts")]["inputs"]["start_phrases"].split(",")]
    assert len(phrases) >= 2

    def saved_metadata(prompt):
        comfy_server.run(prompt)
        name = prompt[node_id(prompt, "ConceptsSaveConcepts")]["inputs"]["save_name"]
        with safe_open(str(comfy_server.base_dir / "models" / "loras" / f"{name}.safetensors"), framework="pt") as f:
            return f.metadata()

    meta = saved_metadata(p)
    chosen = json.loads(meta["start_phrases"])
    assert len(chosen) == 2 and set(chosen) <= set(phrases) and meta["sentence"] == "a photo of {}"
    assert "handles start from: sks <- " in comfy_server.log_text()
    old = workflow_prompt("extract_concepts_supervised", SD15)  # an API prompt saved before the inputs existed
    for name in ("start_phrases", "sentence"):
        old[node_id(old, "ConceptsLearnConcepts")]["inputs"].pop(name, None)
    assert json.loads(saved_metadata(old)["start_phrases"]) == []
    table = workflow_prompt("extract_concepts_supervised", SD15)
    table[node_id(table, "ConceptsLearnConcepts")]["inputs"]["sentence"] = "{} on a wooden table"
    assert saved_metadata(table)["sentence"] == "{} on a wooden table"


@pytest.mark.parametrize("by_class, message", [
    ({"ConceptsApplyConcepts": {"text": "a photo of a dog"}}, "names none of the concepts; write one of: sks, ohwx"),
    ({"ConceptsLearnConcepts": {"words": "sks"}}, "1 words for 2 concepts"),
    ({"ConceptsLearnConcepts": {"class_words": "dog"}}, "1 class words for 2 concepts"),
    ({"ConceptsLearnConcepts": {"sentence": "a photo on a table"}}, "needs exactly one {} where the concepts' words"),
])
def test_extraction_errors_say_what_to_fix(comfy_server, by_class, message):
    from .test_learn_localize import add_inputs

    add_inputs(comfy_server)
    err = comfy_server.run_expect_error(workflow_prompt("extract_concepts_supervised", SD15, **by_class))
    assert message in err


def test_asking_for_too_many_concepts_is_an_error(comfy_server):
    from .test_learn_localize import add_inputs

    add_inputs(comfy_server)
    p = workflow_prompt("extract_concepts_unsupervised", SD15, ConceptsExtractMasks={"concepts": 4})
    p["23"] = {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16, "batch_size": 1, "color": 0}}
    p[node_id(p, "ConceptsExtractMasks")]["inputs"]["image"] = ["23", 0]  # a 2x2 latent: 4 positions
    assert "asked for 4 concepts but the image gives only 4 attention positions" in comfy_server.run_expect_error(p)


def test_an_empty_user_mask_is_an_error(comfy_server):
    from .test_learn_localize import add_inputs

    add_inputs(comfy_server)
    p = workflow_prompt("extract_concepts_supervised", SD15)
    p["23"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    learn = [k for k, v in p.items() if v["class_type"] == "ConceptsLearnConcepts"][0]
    p[learn]["inputs"]["masks"] = ["23", 0]
    p[learn]["inputs"]["words"] = "sks"
    assert "are empty" in comfy_server.run_expect_error(p)


def test_saved_concepts_load_back_to_the_same_latent(comfy_server):
    """extract_concepts_supervised saves the concepts; apply_saved_concepts samples them: same latent as direct."""
    from .test_learn_localize import add_inputs

    add_inputs(comfy_server)
    p = workflow_prompt("extract_concepts_supervised", SD15, ConceptsApplyConcepts={"text": "a photo of ohwx"})
    save = node_id(p, "ConceptsSaveConcepts")
    name = p[save]["inputs"]["save_name"]
    p["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id(p, "KSampler"), 0],
                                                      "filename_prefix": "latents/pair_direct"}}
    direct = comfy_server.read_latent(harness.output_refs(comfy_server.run(p), "latents")[0])
    path = comfy_server.base_dir / "models" / "loras" / f"{name}.safetensors"
    before = path.read_bytes()
    q = workflow_prompt("apply_saved_concepts", SD15, concepts_name=f"{name}.safetensors",
                        ConceptsApplyConcepts={"text": "a photo of ohwx"})
    q["91"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id(q, "KSampler"), 0],
                                                      "filename_prefix": "latents/pair_loaded"}}
    loaded = comfy_server.read_latent(harness.output_refs(comfy_server.run(q), "latents")[0])
    assert loaded.equal(direct)
    p[save]["inputs"]["save_name"] = name
    p[node_id(p, "ConceptsLearnConcepts")]["inputs"]["seed"] = 5  # new training, same file name
    assert "already exists" in comfy_server.run_expect_error(p)
    assert path.read_bytes() == before  # the saved file is untouched
