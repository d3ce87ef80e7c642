"""Erase in a real ComfyUI: every erase workflow runs headless; zero strength/scale is the base model exactly; the
closed-form edit's file through the stock LoraLoader is the node's own edit; steering composes with a CFG patch."""
import pytest

from . import harness
from .prompts import SAVE_LATENT, insert_model_node, node_id, stock_t2i_prompt, workflow_prompt

SD15 = harness.SD15_CKPT
ERASE_WORKFLOWS = ["erase_closed_form", "erase_leace", "steer_away", "train_slider", "erase_esd"]


def latent_of(server, prompt):
    return server.read_latent(harness.output_refs(server.run(prompt), "latents")[0])


def with_save_latent(prompt, prefix):
    prompt["900"] = {"class_type": "SaveLatent", "inputs": {"samples": [node_id(prompt, "KSampler"), 0],
                                                            "filename_prefix": f"latents/{prefix}"}}
    return prompt


def steer(scale, **extra):
    return dict({"clip": ["1", 1], "concept": "red", "scale": scale, "mode": "negative", "threshold": 0.01,
                 "start_percent": 0.0, "end_percent": 1.0}, **extra)


@pytest.mark.parametrize("wf", ERASE_WORKFLOWS)
def test_erase_workflow_runs_to_an_image(comfy_server, wf):
    out = comfy_server.run(workflow_prompt(wf, SD15))
    images = harness.output_refs(out, "images")
    assert images and comfy_server.image_bytes(images[0])[:8] == b"\x89PNG\r\n\x1a\n", wf


def test_steering_at_zero_scale_is_the_base_model_and_composes_with_a_cfg_patch(comfy_server):
    base = stock_t2i_prompt(SD15, seed=5, prefix="steer_base", positive="a photo of a red car")
    rescaled = insert_model_node(base, "30", "RescaleCFG", {"multiplier": 0.7})
    zero = insert_model_node(rescaled, "31", "ConceptsSteerAway", steer(0.0))
    on = insert_model_node(rescaled, "31", "ConceptsSteerAway", steer(3.0))
    sld = insert_model_node(rescaled, "31", "ConceptsSteerAway", steer(1000.0, mode="sld"))
    for p, tag in ((rescaled, "rescaled"), (zero, "zero"), (on, "on"), (sld, "sld")):
        p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/steer_{tag}"
    lat_rescaled, lat_zero, lat_on, lat_sld = (latent_of(comfy_server, p) for p in (rescaled, zero, on, sld))
    assert lat_zero.equal(lat_rescaled)  # scale 0: exactly the model it patched
    assert not lat_on.equal(lat_rescaled) and not lat_sld.equal(lat_rescaled)  # ... and it acts on top of it


def test_closed_form_file_through_loraloader_is_the_nodes_edit(comfy_server):
    name = "tests/erase_red"
    ours = with_save_latent(workflow_prompt("erase_closed_form", SD15, ConceptsEraseClosedForm={
        "save_name": name, "overwrite": True, "strength": 0.8}), "cf_ours")
    edit = node_id(ours, "ConceptsEraseClosedForm")
    stock = with_save_latent(workflow_prompt("erase_closed_form", SD15), "cf_stock")
    stock[edit] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": ["1", 0], "lora_name": f"{name}.safetensors", "strength_model": 0.8}}
    base = with_save_latent(workflow_prompt("erase_closed_form", SD15), "cf_base")
    base[node_id(base, "KSampler")]["inputs"]["model"] = ["1", 0]
    del base[edit]
    lat_ours = latent_of(comfy_server, ours)
    assert lat_ours.equal(latent_of(comfy_server, stock))
    assert not lat_ours.equal(latent_of(comfy_server, base))


def test_slider_and_leace_at_zero_strength_or_before_the_start_are_the_base_model_exactly(comfy_server):
    slider0 = with_save_latent(workflow_prompt("train_slider", SD15, ConceptsApplySlider={"strength": 0.0}), "sl0")
    slider2 = with_save_latent(workflow_prompt("train_slider", SD15, ConceptsApplySlider={
        "strength": 20.0, "start_percent": 0.0}, ConceptsTrainSlider={"learning_rate": 0.05}), "sl2")
    base = with_save_latent(workflow_prompt("train_slider", SD15), "sl_base")
    base[node_id(base, "KSampler")]["inputs"]["model"] = ["1", 0]
    for kind in ("ConceptsApplySlider", "ConceptsTrainSlider"):
        del base[node_id(base, kind)]
    late = with_save_latent(workflow_prompt("train_slider", SD15, ConceptsApplySlider={
        "strength": 20.0, "start_percent": 1.0}, ConceptsTrainSlider={"learning_rate": 0.05}), "sl_late")
    lat_base = latent_of(comfy_server, base)
    assert latent_of(comfy_server, slider0).equal(lat_base)
    assert not latent_of(comfy_server, slider2).equal(lat_base)
    assert latent_of(comfy_server, late).equal(lat_base)  # before the start step the base model runs

    leace0 = with_save_latent(workflow_prompt("erase_leace", SD15, ConceptsEraseLeace={"strength": 0.0}), "le0")
    leace1 = with_save_latent(workflow_prompt("erase_leace", SD15), "le1")
    plain = with_save_latent(workflow_prompt("erase_leace", SD15), "le_base")
    ks = plain[node_id(plain, "KSampler")]["inputs"]
    ks["positive"] = plain[node_id(plain, "ConceptsEraseLeace")]["inputs"]["conditioning"]
    del plain[node_id(plain, "ConceptsEraseLeace")]
    lat_plain = latent_of(comfy_server, plain)
    assert latent_of(comfy_server, leace0).equal(lat_plain)
    assert not latent_of(comfy_server, leace1).equal(lat_plain)


def test_leace_centre_shrinkage_and_word_of_the_workflow_and_an_old_prompt_keeps_plain_leace(comfy_server):
    # the shipped workflow fits by the word "red", centred on the neutral prompts, with shrinkage 0.01; each input
    # changes the result; a prompt from before the inputs samples what plain LEACE (mean, 0, no word) samples,
    # exactly; a word missing from a concept prompt or given with per_position stops with a message
    old = with_save_latent(workflow_prompt("erase_leace", SD15), "le_old")
    for key in ("centre", "shrinkage", "concept_word"):
        del old[node_id(old, "ConceptsEraseLeace")]["inputs"][key]
    plain = with_save_latent(workflow_prompt("erase_leace", SD15, ConceptsEraseLeace={
        "centre": "mean", "shrinkage": 0.0, "concept_word": ""}), "le_mean")
    neutral = with_save_latent(workflow_prompt("erase_leace", SD15, ConceptsEraseLeace={
        "shrinkage": 0.0, "concept_word": ""}), "le_neutral")
    shrunk = with_save_latent(workflow_prompt("erase_leace", SD15, ConceptsEraseLeace={"concept_word": ""}),
                              "le_shrunk")
    shipped = with_save_latent(workflow_prompt("erase_leace", SD15), "le_shipped")  # by the word "red"
    lat_plain, lat_neutral, lat_shrunk = (latent_of(comfy_server, p) for p in (plain, neutral, shrunk))
    assert latent_of(comfy_server, old).equal(lat_plain)
    assert not lat_neutral.equal(lat_plain)
    assert not lat_shrunk.equal(lat_neutral)
    assert not latent_of(comfy_server, shipped).equal(lat_shrunk)
    missing = workflow_prompt("erase_leace", SD15, ConceptsEraseLeace={"concept_word": "crimson"})
    assert "is not in the concept prompt" in comfy_server.run_expect_error(missing)
    both = workflow_prompt("erase_leace", SD15, ConceptsEraseLeace={"per_position": True})
    assert "two ways to fit" in comfy_server.run_expect_error(both)


def test_esd_on_its_own_ddim_path_trains_on_other_states_than_the_default(comfy_server):
    # denoise_steps > 0 draws x_t on the frozen model's DDIM path (the ESD paper's sampling); same seed, other
    # training states, so another erasing residual; 0 (the default, also when an old prompt omits it) is unchanged
    default = with_save_latent(workflow_prompt("erase_esd", SD15), "esd_default")
    del default[node_id(default, "ConceptsTrainEsd")]["inputs"]["denoise_steps"]  # a prompt from before the input
    zero = with_save_latent(workflow_prompt("erase_esd", SD15, ConceptsTrainEsd={"denoise_steps": 0}), "esd_0")
    path = with_save_latent(workflow_prompt("erase_esd", SD15, ConceptsTrainEsd={"denoise_steps": 3}), "esd_3")
    lat_default = latent_of(comfy_server, default)
    assert latent_of(comfy_server, zero).equal(lat_default)
    assert not latent_of(comfy_server, path).equal(lat_default)


def test_esd_prompt_sets_and_kv_layers(comfy_server):
    # a prompt from before preserve / anchor / layers (one concept line) trains what the same inputs given empty
    # and proj_out train; the shipped workflow (several prompts, anchors, preserve, K/V layers: ESD-x) erases on
    # the K/V projections: strength 0 is the base model exactly, and its saved file through the stock
    # LoraLoaderModelOnly samples what Apply Slider (from step 0) samples, to rounding
    single = {"concept": "a photo of a red car", "steps": 4}
    old = with_save_latent(workflow_prompt("erase_esd", SD15, ConceptsTrainEsd=single), "esd_old")
    for key in ("preserve", "anchor", "layers"):
        del old[node_id(old, "ConceptsTrainEsd")]["inputs"][key]
    explicit = with_save_latent(workflow_prompt("erase_esd", SD15, ConceptsTrainEsd=dict(
        single, preserve="", anchor="", layers="proj_out")), "esd_explicit")
    assert latent_of(comfy_server, old).equal(latent_of(comfy_server, explicit))

    name = "tests/esd_x_red"
    kv = with_save_latent(workflow_prompt("erase_esd", SD15, ConceptsTrainEsd={
        "steps": 6, "learning_rate": 0.01, "save_name": name, "overwrite": True}), "esd_kv")
    kv_zero = with_save_latent(workflow_prompt("erase_esd", SD15, ConceptsTrainEsd={"steps": 6},
                                               ConceptsApplySlider={"strength": 0.0}), "esd_kv0")
    base = with_save_latent(workflow_prompt("erase_esd", SD15), "esd_base")
    base[node_id(base, "KSampler")]["inputs"]["model"] = ["1", 0]
    for kind in ("ConceptsApplySlider", "ConceptsTrainEsd"):
        del base[node_id(base, kind)]
    stock = with_save_latent(workflow_prompt("erase_esd", SD15), "esd_stock")
    del stock[node_id(stock, "ConceptsTrainEsd")]
    stock[node_id(stock, "ConceptsApplySlider")] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["1", 0], "lora_name": f"{name}.safetensors", "strength_model": 1.0}}
    lat_kv, lat_base = latent_of(comfy_server, kv), latent_of(comfy_server, base)
    assert not lat_kv.equal(lat_base)
    assert latent_of(comfy_server, kv_zero).equal(lat_base)
    lat_stock = latent_of(comfy_server, stock)
    assert (lat_stock - lat_kv).abs().max() < 1e-2 * lat_kv.abs().max()
    assert (lat_stock - lat_kv).abs().max() < 0.1 * (lat_kv - lat_base).abs().max()


def test_steering_from_a_neutral_prompt(comfy_server):
    # neutral given: the direction is concept - neutral (one more prediction); a neutral prompt equal to the
    # concept is refused; a prompt from before the input steers as with neutral empty
    base = stock_t2i_prompt(SD15, seed=5, prefix="steer_n_base", positive="a photo of a red car")
    old = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0))
    empty = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, neutral=""))
    neutral = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car", neutral="a car"))
    for p, tag in ((old, "old"), (empty, "empty"), (neutral, "neutral")):
        p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/steer_n_{tag}"
    lat_old = latent_of(comfy_server, old)
    assert latent_of(comfy_server, empty).equal(lat_old)
    assert not latent_of(comfy_server, neutral).equal(lat_old)
    same = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car", neutral="a red car"))
    assert "the neutral prompt is the concept itself" in comfy_server.run_expect_error(same)


def test_steering_leaves_a_prompt_asking_for_a_preserved_concept_alone(comfy_server):
    # preserve gates the steering per image and step: a prompt whose guidance is a preserved prompt's is not
    # steered at all (the unpatched latent, exactly); one nearest the concept is steered; an empty preserve is a
    # prompt from before the input; a concept that is also preserved is refused
    prompt = "a photo of a red car"
    base = stock_t2i_prompt(SD15, seed=5, prefix="steer_p_base", positive=prompt)
    old = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car"))
    empty = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car", preserve=""))
    kept = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car",
                                                                     preserve=f"a blue car\n{prompt}"))
    nearest = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept=prompt,
                                                                        preserve="a blue car\na green car"))
    for p, tag in ((old, "old"), (empty, "empty"), (kept, "kept"), (nearest, "nearest")):
        p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/steer_p_{tag}"
    lat_base, lat_old = latent_of(comfy_server, base), latent_of(comfy_server, old)
    assert latent_of(comfy_server, empty).equal(lat_old)
    assert latent_of(comfy_server, kept).equal(lat_base)
    assert not latent_of(comfy_server, nearest).equal(lat_base)
    clash = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car",
                                                                      preserve="a red car\na blue car"))
    assert "both the concept and a preserved prompt" in comfy_server.run_expect_error(clash)


def test_steering_gated_by_the_prompt_steers_only_a_prompt_nearer_the_concept(comfy_server):
    # preserve_by prompt decides once from the text: a prompt nearer a preserved prompt samples the unpatched
    # latent exactly, one with the concept's word is steered exactly as without the gate; a margin no prompt can
    # pass (2: the largest cosine difference) is the unpatched model, one every prompt passes is the ungated
    # steering; without a preserved prompt it is refused
    kept_lines = "a blue car\na green car"
    lats = {}
    for positive in ("a photo of a red car", "a photo of a blue car"):
        base = stock_t2i_prompt(SD15, seed=5, prefix="steer_t_base", positive=positive)
        runs = {"base": base,
                "ungated": insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car"))}
        for tag, margin in (("gated", 0.25), ("never", 2.0), ("always", -2.0)):
            runs[tag] = insert_model_node(base, "31", "ConceptsSteerAway", steer(
                3.0, concept="a red car", preserve=kept_lines, preserve_by="prompt", prompt_margin=margin))
        for tag, p in runs.items():
            p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/steer_t_{tag}"
            lats[positive.split()[-2], tag] = latent_of(comfy_server, p)
    for colour in ("red", "blue"):
        assert lats[colour, "never"].equal(lats[colour, "base"])
        assert lats[colour, "always"].equal(lats[colour, "ungated"])
        assert not lats[colour, "ungated"].equal(lats[colour, "base"])
    assert lats["red", "gated"].equal(lats["red", "ungated"])
    assert lats["blue", "gated"].equal(lats["blue", "base"])
    alone = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, concept="a red car", preserve_by="prompt"))
    assert "give at least one line in preserve" in comfy_server.run_expect_error(alone)


def test_sld_momentum(comfy_server):
    # SLD medium from 20% on: with its momentum (0.3, beta 0.4) the latent differs from without; momentum 0 is a
    # prompt from before the inputs, exactly; in negative mode momentum is ignored (with a warning)
    base = stock_t2i_prompt(SD15, seed=5, prefix="steer_m_base", positive="a photo of a red car")
    sld = dict(mode="sld", threshold=0.01, start_percent=0.2)
    old = insert_model_node(base, "31", "ConceptsSteerAway", steer(1000.0, **sld))
    zero = insert_model_node(base, "31", "ConceptsSteerAway", steer(1000.0, momentum=0.0, momentum_beta=0.4, **sld))
    on = insert_model_node(base, "31", "ConceptsSteerAway", steer(1000.0, momentum=0.3, momentum_beta=0.4, **sld))
    neg = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0))
    neg_m = insert_model_node(base, "31", "ConceptsSteerAway", steer(3.0, momentum=0.5, momentum_beta=0.7))
    for p, tag in ((old, "old"), (zero, "zero"), (on, "on"), (neg, "neg"), (neg_m, "neg_m")):
        p[SAVE_LATENT]["inputs"]["filename_prefix"] = f"latents/steer_m_{tag}"
    lat_old = latent_of(comfy_server, old)
    assert latent_of(comfy_server, zero).equal(lat_old)
    assert not latent_of(comfy_server, on).equal(lat_old)
    assert latent_of(comfy_server, neg_m).equal(latent_of(comfy_server, neg))


def test_bad_inputs_stop_with_clear_messages(comfy_server):
    two_words = workflow_prompt("train_slider", SD15, ConceptsTrainSlider={
        "positive": "an old man", "negative": "a young woman"})
    assert "more than one word" in comfy_server.run_expect_error(two_words)
    clash = workflow_prompt("erase_closed_form", SD15, ConceptsEraseClosedForm={"erase": "red", "preserve": "red"})
    assert "both erased and preserved" in comfy_server.run_expect_error(clash)
    base = stock_t2i_prompt(SD15, seed=1, prefix="steer_bad")
    late = insert_model_node(base, "31", "ConceptsSteerAway", steer(1.0, start_percent=0.8, end_percent=0.2))
    assert "is after end_percent" in comfy_server.run_expect_error(late)
