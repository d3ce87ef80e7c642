"""Steering during sampling (negative guidance, Safe Latent Diffusion): the identities of the correction."""
import pytest
import torch

from core.steering import (
    MODES,
    SLD_PRESETS,
    preserve_gate,
    prompt_gate,
    sld_gamma,
    sld_momentum,
    steer_denoised,
    steering_correction,
    word_summary,
)


def preds(seed=0, shape=(2, 4, 8, 8)):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(4)]  # cond, uncond, concept, x


@pytest.mark.parametrize("mode", MODES)
def test_zero_scale_is_the_unsteered_result_exactly(mode):
    cond, uncond, concept, x = preds()
    assert torch.equal(steering_correction(cond, uncond, concept, 0.0, 7.0, mode), torch.zeros_like(cond))
    sigma = torch.tensor([3.0, 0.5])
    denoised = uncond + 7.0 * (cond - uncond)
    assert torch.equal(steer_denoised(denoised, x, sigma, cond, uncond, concept, 0.0, 7.0, mode), denoised)


def test_negative_guidance_on_the_prompt_itself_cancels_the_guidance():
    """eps_u + s (eps_c - eps_u) - s (eps_s - eps_u) with eps_s = eps_c is eps_u."""
    cond, uncond, _, _ = preds(1)
    guided = uncond + 5.0 * (cond - uncond) + steering_correction(cond, uncond, cond, 5.0, mode="negative")
    assert torch.allclose(guided, uncond, atol=1e-5)


def test_sld_acts_only_where_the_prompt_leans_to_the_concept_and_is_bounded():
    cond, uncond, concept, _ = preds(2)
    corr = steering_correction(cond, uncond, concept, 1e4, cfg_scale=7.0, mode="sld", threshold=0.0)
    assert torch.equal(corr[cond - concept >= 0], torch.zeros_like(corr[cond - concept >= 0]))
    assert (corr.abs() <= 7.0 * (concept - uncond).abs() + 1e-6).all()  # mu <= 1
    lean = cond - concept < 0
    assert torch.allclose(corr[lean], (-7.0 * (concept - uncond))[lean])  # huge scale: mu saturates at 1


def test_denoised_space_steering_equals_noise_space_steering():
    """ComfyUI's x0 = x - sigma * eps: steering the denoised result is steering epsilon."""
    cond_e, uncond_e, concept_e, x = preds(3)
    sigma = torch.tensor([2.0, 0.7])
    s = sigma.view(-1, 1, 1, 1)
    den = [x - s * e for e in (cond_e, uncond_e, concept_e)]
    cfg = 6.0
    denoised = den[1] + cfg * (den[0] - den[1])
    for mode in MODES:
        out = steer_denoised(denoised, x, sigma, *den, scale=0.8, cfg_scale=cfg, mode=mode, threshold=0.01)
        eps = uncond_e + cfg * (cond_e - uncond_e) + steering_correction(cond_e, uncond_e, concept_e, 0.8, cfg,
                                                                         mode, 0.01)
        assert torch.allclose((x - out) / s, eps, atol=1e-4), mode


def test_unknown_mode_is_named():
    cond, uncond, concept, _ = preds()
    with pytest.raises(ValueError, match="negative"):
        steering_correction(cond, uncond, concept, 1.0, mode="sideways")


def test_a_neutral_prediction_replaces_the_unconditional_one_in_the_direction():
    gen = torch.Generator().manual_seed(3)
    cond, uncond, concept, neutral = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(4))
    for mode in MODES:
        same = steering_correction(cond, uncond, concept, 2.0, 5.0, mode, 0.01, neutral=uncond)
        assert torch.equal(same, steering_correction(cond, uncond, concept, 2.0, 5.0, mode, 0.01))
    assert torch.allclose(steering_correction(cond, uncond, concept, 2.0, neutral=neutral), -2.0 * (concept - neutral))
    # a concept prompt that adds nothing to its neutral prompt steers nowhere
    for mode in MODES:
        assert torch.equal(steering_correction(cond, uncond, concept, 2.0, 5.0, mode, 0.01, neutral=concept),
                           torch.zeros_like(cond))


def test_sld_momentum_builds_up_to_gamma_over_one_minus_its_scale():
    """g_t = gamma + s_m nu_t, nu_{t+1} = beta nu_t + (1 - beta) g_t: no momentum is gamma itself; with a constant
    gamma the fixed point is g = gamma / (1 - s_m)."""
    gamma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    velocity = None
    for _ in range(5):
        g, velocity = sld_momentum(gamma, velocity, 0.0, 0.4)
        assert torch.equal(g, gamma)
    velocity = None
    for _ in range(200):
        g, velocity = sld_momentum(gamma, velocity, 0.5, 0.7)
    assert torch.allclose(g, gamma / (1 - 0.5), atol=1e-5)


def test_sld_presets_are_the_papers():
    assert SLD_PRESETS["medium"] == (10, 1000.0, 0.01, 0.3, 0.4)
    assert SLD_PRESETS["weak"][1] == 20.0 and SLD_PRESETS["max"][2] == 1.0


class _Model:
    extra_conds = None


def _post_cfg_args(x, sigma, cond, uncond, cfg=5.0):
    s = sigma.view(-1, 1, 1, 1)
    return {"denoised": uncond + cfg * (cond - uncond), "sigma": sigma, "uncond_denoised": uncond,
            "cond_denoised": cond, "cond_scale": cfg, "input": x, "model": _Model(), "model_options": {},
            "_s": s}


def test_post_cfg_momentum_accumulates_in_the_warm_up_applies_after_and_resets_on_a_new_run():
    from core.patching.comfy_erase import steering_post_cfg

    gen = torch.Generator().manual_seed(11)
    x = torch.randn(1, 4, 8, 8, generator=gen)
    cond, uncond, concept = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(3))
    calls = []

    def calc_cond_batch(model, conds, x_, sigma, opts):
        calls.append(float(sigma))
        return [concept]
    sigmas = [torch.tensor([v]) for v in (10.0, 5.0, 2.0, 1.0)]
    start = 6.0  # the first call is the warm-up
    plain = steering_post_cfg("c", 1000.0, "sld", 0.01, (start, 0.0), calc_cond_batch, lambda *a: a[1])
    with_m = steering_post_cfg("c", 1000.0, "sld", 0.01, (start, 0.0), calc_cond_batch, lambda *a: a[1],
                               momentum=(0.5, 0.7))

    def run(post):
        return [post(_post_cfg_args(x, s, cond, uncond)) for s in sigmas]
    out_plain, out_m = run(plain), run(with_m)
    assert calls[:3] == [5.0, 2.0, 1.0]  # without momentum no prediction in the warm-up ...
    assert calls[3:] == [10.0, 5.0, 2.0, 1.0]  # ... with it, one per call from the first
    assert torch.equal(out_m[0], _post_cfg_args(x, sigmas[0], cond, uncond)["denoised"])  # nothing applied yet

    velocity = None
    expected = []
    for s in sigmas:  # the recurrence by hand, in epsilon
        sx = s.view(-1, 1, 1, 1)
        e = [(x - d) / sx for d in (cond, uncond, concept)]
        g, velocity = sld_momentum(sld_gamma(e[0], e[1], e[2], 1000.0, 0.01), velocity, 0.5, 0.7)
        expected.append(_post_cfg_args(x, s, cond, uncond)["denoised"] + sx * 5.0 * g)
    for got, want in zip(out_m[1:], expected[1:], strict=True):
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(out_m[1], out_plain[1])  # the warm-up's momentum is there at the first applied step
    again = run(with_m)  # a second run starts from nu = 0 again
    for a, b in zip(again, out_m, strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def _unit(*values):
    v = torch.zeros(1, 4, 2, 2)
    v.view(-1)[: len(values)] = torch.tensor(values)
    return v


def test_preserve_gate_opens_only_where_the_prediction_is_nearer_the_concept_than_every_kept_prompt():
    """Sample 0 predicts (near) the concept, sample 1 (near) a preserved prompt: the correction is the ungated one
    for sample 0 and exactly zero for sample 1; with nothing to preserve it is never gated."""
    gen = torch.Generator().manual_seed(5)
    uncond, concept, kept = (torch.randn(2, 4, 2, 2, generator=gen) for _ in range(3))
    noise = 0.05 * torch.randn(2, 4, 2, 2, generator=gen)
    cond = torch.stack([concept[0], kept[1]]) + noise
    for mode in MODES:
        plain = steering_correction(cond, uncond, concept, 3.0, 5.0, mode, 0.01)
        gated = steering_correction(cond, uncond, concept, 3.0, 5.0, mode, 0.01, preserve=[kept])
        assert torch.equal(gated[0], plain[0]), mode
        assert torch.equal(gated[1], torch.zeros_like(gated[1])), mode
        assert torch.equal(steering_correction(cond, uncond, concept, 3.0, 5.0, mode, 0.01, preserve=()), plain)
    assert preserve_gate(cond, concept, [kept]).flatten().tolist() == [1.0, 0.0]


def test_preserve_gate_compares_directions_from_the_candidates_mean_with_a_cosine_margin():
    """Concept (1, 0) and kept (-1, 0) have the mean 0; a prediction (0.1, sqrt(0.99)) has cosine 0.1 to the
    concept and -0.1 to the kept prompt: open for margins below 0.2, shut above. What every candidate shares is
    not compared: adding it to all of them (and the prediction) changes nothing."""
    concept, kept, cond = _unit(1, 0), _unit(-1, 0), _unit(0.1, 0.99 ** 0.5)
    shared = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(2)) * 10
    for offset in (0.0, shared):
        assert preserve_gate(cond + offset, concept + offset, [kept + offset], margin=0.19).item() == 1.0
        assert preserve_gate(cond + offset, concept + offset, [kept + offset], margin=0.21).item() == 0.0
    # every preserved prompt must be farther: the prediction itself kept shuts the gate
    assert preserve_gate(cond, concept, [kept, cond]).item() == 0.0


def test_post_cfg_with_preserved_prompts_predicts_them_and_a_shut_gate_is_the_unsteered_result_exactly():
    from core.patching.comfy_erase import steering_post_cfg

    gen = torch.Generator().manual_seed(12)
    x, cond, uncond, concept, neutral = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(5))
    seen = []

    def calc_cond_batch(model, conds, x_, sigma, opts):
        seen.append(list(conds))
        # "other": on the far side of the concept from the prompt, so the prompt is nearer the concept
        return [{"c": concept, "n": neutral, "kept": cond, "other": 2 * concept - cond}[c] for c in conds]
    sigma = torch.tensor([2.0])
    args = _post_cfg_args(x, sigma, cond, uncond)
    # the prompt itself preserved: it is nearest to itself, so nothing is steered
    for mode, momentum in (("negative", (0.0, 0.0)), ("sld", (0.0, 0.0)), ("sld", (0.5, 0.7))):
        post = steering_post_cfg("c", 3.0, mode, 0.01, (10.0, 0.0), calc_cond_batch, lambda *a: a[1], "n",
                                 momentum, preserve_conds=["kept"])
        assert torch.equal(post(dict(args)), args["denoised"]), mode
    assert seen[0] == ["c", "n", "kept"]
    post = steering_post_cfg("c", 3.0, "negative", 0.0, (10.0, 0.0), calc_cond_batch, lambda *a: a[1], "n",
                             preserve_conds=["other"])
    plain = steering_post_cfg("c", 3.0, "negative", 0.0, (10.0, 0.0), calc_cond_batch, lambda *a: a[1], "n")
    assert torch.equal(post(dict(args)), plain(dict(args)))
    assert not torch.allclose(plain(dict(args)), args["denoised"])


def test_prompt_gate_opens_for_a_prompt_with_a_row_nearer_the_concept_by_the_margin():
    """Concept summary (1, 0, 0) and kept (-1, 0, 0): centre 0. A prompt whose rows are (0, 1, 0) (unrelated) and
    (0.3, sqrt(0.91), 0) (cosine 0.3 to the concept, -0.3 to the kept) opens for margins below 0.6, shuts above;
    a prompt with only the unrelated row never opens; a shared offset on every text changes nothing."""
    concept, kept = torch.tensor([1.0, 0, 0]), torch.tensor([[-1.0, 0, 0]])
    leaning = torch.tensor([[[0.0, 1, 0], [0.3, 0.91 ** 0.5, 0]]])
    unrelated = torch.tensor([[[0.0, 1, 0], [0.0, 0, 1]]])
    prompts = torch.cat([leaning, unrelated])
    offset = torch.tensor([5.0, -2.0, 7.0])
    for shift in (torch.zeros(3), offset):
        assert prompt_gate(prompts + shift, concept + shift, kept + shift, 0.59).tolist() == [True, False]
        assert prompt_gate(prompts + shift, concept + shift, kept + shift, 0.61).tolist() == [False, False]
    # the prompt's row is the kept text itself: never nearer the concept
    assert not prompt_gate(kept[None], concept, kept, -0.5).item()
    with pytest.raises(ValueError, match="at least one preserved"):
        prompt_gate(prompts, concept, kept[:0])


def test_word_summary_is_the_mean_of_the_word_rows_without_the_start_token():
    rows = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(word_summary(rows, 2), rows[1:3].mean(0))
    with pytest.raises(ValueError, match="no word"):
        word_summary(rows, 0)


def test_post_cfg_gated_by_the_prompt_predicts_nothing_for_a_prompt_that_does_not_ask_for_the_concept():
    """A closed prompt gate: the unsteered result exactly and no extra prediction; an open one: exactly the
    ungated steering. Each chunk's start row is left out; with no text conditioning to read, it steers."""
    from core.patching.comfy_erase import asks_for_concept, steering_post_cfg

    gen = torch.Generator().manual_seed(13)
    x, cond, uncond, concept = (torch.randn(1, 4, 8, 8, generator=gen) for _ in range(4))
    calls = []

    def calc_cond_batch(model, conds, x_, sigma, opts):
        calls.append(list(conds))
        return [concept for _ in conds]
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([[-1.0, 0, 0]])
    asks = [{"cross_attn": torch.stack([-red, red])[None]}]
    others = [{"cross_attn": torch.stack([red * 9, -red])[None]}]  # its start row is the concept's: not counted
    sigma = torch.tensor([2.0])
    gated = steering_post_cfg("c", 3.0, "negative", 0.0, (10.0, 0.0), calc_cond_batch, lambda *a: a[1],
                              prompt_summaries=(red, blue, 0.25))
    plain = steering_post_cfg("c", 3.0, "negative", 0.0, (10.0, 0.0), calc_cond_batch, lambda *a: a[1])
    args = _post_cfg_args(x, sigma, cond, uncond)
    assert torch.equal(gated(dict(args, cond=others)), args["denoised"])
    assert calls == []
    assert torch.equal(gated(dict(args, cond=asks)), plain(dict(args, cond=asks)))
    assert not torch.allclose(plain(dict(args)), args["denoised"])
    assert asks_for_concept([{"model_conds": {}}], red, blue, 0.25)
    # the row at 77 starts the second chunk (a start token); the one at 78 is a word
    long = torch.zeros(1, 154, 3)
    long[0, 77] = red
    assert not asks_for_concept([{"cross_attn": long}], red, blue, 0.25)
    long[0, 78] = red
    assert asks_for_concept([{"cross_attn": long}], red, blue, 0.25)
