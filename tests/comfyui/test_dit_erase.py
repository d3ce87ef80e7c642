"""Erasers on SD3 and Flux in a real ComfyUI, in-process (a subprocess in ComfyUI's own Python).

Erase Concept (closed form), on SD3:

The tiny SD3 checkpoint carries CLIP-L and CLIP-G (random weights), so encodes are quick. With a small ridge the
edit of the layers that read the text encoder's output (token entry and pooled entry) meets its constraints, and
what follows them sees the anchor: the erased word samples the anchor's latent, a preserved word its own; the saved
file through the stock loader gives the node's latent.

Erase Concept (ESD fine-tune) on SD3 trains (2 steps) on the blocks' residual sites and Apply Slider applies it: at
strength 0 the base model exactly, at 1 a changed latent; ESD-x (cross-attention K/V) is refused there.

Steering and LEACE, whose math does not depend on the family: Steer Away at scale 0 is the base model exactly and
at scale 1 changes the latent, on SD3 through the node and on Flux (at cfg 1, as Flux is sampled) through its core
function with random conditioning (no T5 encode); LEACE on SD3's conditioning changes the rows and at strength 0
returns them unchanged (the tiny SD3 has no T5, so only CLIP's rows are fitted here).
"""

import pytest

from . import harness
from .make_checkpoints import SD3_NAME

pytestmark = pytest.mark.dit

SCRIPT = """
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
"""


def test_closed_form_erase_on_sd3_maps_the_word_to_the_anchor(dit_checkpoints, tmp_path):
    res = harness.run_in_process(SCRIPT, path=str(dit_checkpoints[SD3_NAME]), out_dir=str(tmp_path))
    assert res["family"] == "SD3"
    assert res["base_red_vs_anchor"] > 1e-2  # the word changes the latent before the edit
    assert res["erased_red_vs_anchor"] <= 1e-3 * max(1.0, res["scale"]), res
    assert res["blue_change"] <= 1e-3 * max(1.0, res["scale"]), res
    assert res["stock_equal"] and res["plain_after_equal"]


STEER_SCRIPT = """
    import comfy.lora, comfy.sample, comfy.sd, comfy.utils
    from comfyui_concepts.core.patching.comfy import model_family
    import comfy.sampler_helpers, comfy.samplers
    from comfyui_concepts.core.patching.comfy_erase import add_steering, steering_post_cfg
    from comfyui_concepts.nodes.erase.leace import EraseFromConditioning
    from comfyui_concepts.nodes.erase.sliders import ApplySlider, TrainEsdEraser
    from comfyui_concepts.nodes.erase.steering import SteerAwayFromConcept

    family, path = {family!r}, {path!r}
    if family == "flux":
        model = comfy.sd.load_diffusion_model(path)
        clip = None
    else:
        model, clip, *_ = comfy.sd.load_checkpoint_guess_config(path, output_vae=False, output_clip=True)
    latent = torch.zeros(1, 16, 16, 16)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(0)

    def random_cond():
        context = torch.randn(1, 256, 4096, generator=gen) * 0.5
        return [[context, {{"pooled_output": torch.randn(1, 768, generator=gen) * 0.5}}]]

    if clip is None:
        positive, negative, concept, cfg = random_cond(), random_cond(), random_cond(), 1.0
    else:
        positive = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of a red car"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        cfg = 4.5

    def sample(m, pos=positive):
        return comfy.sample.sample(m, noise, 3, cfg, "euler", "simple", pos, negative, latent, seed=0,
                                   disable_pbar=True)

    def steered(scale):
        if clip is not None:
            return SteerAwayFromConcept.execute(model, clip, "red", scale, "sld", 0.0, 0.0, 1.0).args[0]
        post = steering_post_cfg(comfy.sampler_helpers.convert_cond(concept), scale, "sld", 0.0, (float("inf"), 0.0),
                                 comfy.samplers.calc_cond_batch, comfy.samplers.encode_model_conds)
        return add_steering(model, post, active=scale != 0.0)

    base = sample(model)
    res = {{"scale0_equal": torch.equal(sample(steered(0.0)), base),
            "scale1_change": (sample(steered(1.0)) - base).abs().max().item(),
            "plain_after_equal": None}}
    if clip is not None:
        def leace(strength):
            return EraseFromConditioning.execute(positive, clip, "a red car\\na red apple\\na red house",
                                                 "a blue car\\na green apple\\na white house", strength, False,
                                                 "neutral", 0.01, "").args[0]
        erased, kept = leace(1.0), leace(0.0)
        res["leace_rows"] = list(erased[0][0].shape)
        res["leace_change"] = (erased[0][0] - positive[0][0]).abs().max().item()
        res["leace0_equal"] = torch.equal(kept[0][0], positive[0][0])
        res["leace_latent_change"] = (sample(model, erased) - base).abs().max().item()
    if clip is not None:
        esd = TrainEsdEraser.execute(model, clip, "a red car", 1.0, 2, 1e-3, 1, 4, 128, 0, "", False).args[0]
        res["esd_layers"] = sorted(esd.layers)[:2]
        res["esd0_equal"] = torch.equal(sample(ApplySlider.execute(model, esd, 0.0, 0.0).args[0]), base)
        res["esd1_change"] = (sample(ApplySlider.execute(model, esd, 1.0, 0.0).args[0]) - base).abs().max().item()
        try:
            TrainEsdEraser.execute(model, clip, "a red car", 1.0, 1, 1e-3, 1, 4, 128, 0, "", False,
                                    layers="cross_attention_kv")
            res["esd_x_error"] = ""
        except ValueError as e:
            res["esd_x_error"] = str(e)
    res["plain_after_equal"] = torch.equal(sample(model), base)
    print("RESULT " + json.dumps(res))
"""


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_steering_leace_and_esd_run_on_dits(dit_checkpoints, family):
    from .make_checkpoints import FLUX_NAME

    path = dit_checkpoints[SD3_NAME if family == "sd3" else FLUX_NAME]
    res = harness.run_in_process(STEER_SCRIPT, family=family, path=str(path))
    assert res["scale0_equal"] and res["plain_after_equal"], res
    assert res["scale1_change"] > 1e-3, res  # steering acts (on Flux at cfg 1 too)
    if family == "sd3":
        assert res["leace_rows"][1] >= 77  # the test checkpoint has no T5: CLIP's 77 rows
        assert res["leace_change"] > 1e-3 and res["leace0_equal"] and res["leace_latent_change"] > 1e-4, res
        assert res["esd_layers"] == ["joint_blocks.0.x_block.attn.proj", "joint_blocks.1.x_block.attn.proj"], res
        assert res["esd0_equal"] and res["esd1_change"] > 1e-4, res
        assert "SD3 and Flux do not have" in res["esd_x_error"], res
