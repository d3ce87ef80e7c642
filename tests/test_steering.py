"""Steering during sampling (negative guidance, Safe Latent Diffusion): the identities of the correction."""
import pytest
import torch

from core.steering import MODES, steer_denoised, steering_correction


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
