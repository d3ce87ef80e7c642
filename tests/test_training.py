import json

import pytest
import torch

from core import training
from core.hooks.gate import LowRankGate
from core.patching.diffusers import encode_images, encode_text, train_residuals, unet_sites
from core.tokens import TokenNotFoundError


def fixed_eval_loss(unet, vae, tokenizer, text_encoder, images, rs=None):
    """Noise-prediction loss at fixed timesteps and noise: comparable before and after training."""
    gen = torch.Generator().manual_seed(123)
    x0 = encode_images(vae, images)
    ctx = encode_text(tokenizer, text_encoder, ["a photo of a sks toy"]).expand(len(x0), -1, -1)
    ac = training.scaled_linear_alphas_cumprod()
    total = 0.0
    with torch.no_grad():
        for t_val in (100, 300, 500, 700):
            noise = torch.randn(x0.shape, generator=gen)
            a = ac[t_val]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            t = torch.full((len(x0),), t_val)
            if rs is None:
                pred = unet(x_t, t, encoder_hidden_states=ctx).sample
            else:
                with LowRankGate(unet_sites(unet), rs):
                    pred = unet(x_t, t, encoder_hidden_states=ctx).sample
            total += torch.mean((pred - noise) ** 2).item()
    return total / 4


def test_training_lowers_the_loss_and_is_deterministic(sd1_unet, vae, tokenizer, text_encoder, concept_images):
    cfg = training.TrainConfig(steps=40, batch_size=4, learning_rate=1e-2, seed=3)
    kwargs = dict(class_word="toy", token="sks", resolution=32, views=2, config=cfg)
    rs, losses = train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images, **kwargs)
    before = fixed_eval_loss(sd1_unet, vae, tokenizer, text_encoder, concept_images)
    after = fixed_eval_loss(sd1_unet, vae, tokenizer, text_encoder, concept_images, rs)
    assert after < 0.9 * before, (before, after)
    assert len(losses) == 40 and rs.metadata["class_word"] == "toy" and rs.metadata["steps"] == "40"
    rs2, losses2 = train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images, **kwargs)
    assert losses == losses2
    assert all(torch.equal(rs.layers[k].up, rs2.layers[k].up) for k in rs.layers)
    assert all(not p.requires_grad for p in sd1_unet.parameters())  # the base stays frozen


def test_masked_loss_ignores_pixels_outside_the_mask_exactly():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, 2:5, 1:6] = 1
    changed = pred.clone()
    changed[:, :, 6:, :] += 100.0  # outside the mask
    assert training.diffusion_loss(pred, target, mask) == training.diffusion_loss(changed, target, mask)
    inside = ((pred - target) ** 2)[:, :, 2:5, 1:6].mean()
    assert torch.allclose(training.diffusion_loss(pred, target, mask), inside)


def test_prediction_conversions_round_trip():
    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    a = torch.tensor([0.9, 0.5, 0.05])
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * eps
    v = training.convert_prediction(eps, "eps", "v", x_t, a)
    assert torch.allclose(training.convert_prediction(v, "v", "eps", x_t, a), eps, atol=1e-5)
    assert torch.allclose(training.convert_prediction(x0, "x0", "eps", x_t, a), eps, atol=1e-4)


def test_nan_loss_stops_with_advice(sd1_unet, vae, tokenizer, text_encoder, concept_images):
    bad = concept_images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(training.TrainingDivergedError, match="learning rate"):
        train_residuals(sd1_unet, vae, tokenizer, text_encoder, bad, "toy", resolution=32, views=1,
                        config=training.TrainConfig(steps=3, batch_size=4))


def test_bad_inputs_get_clear_messages(sd1_unet, vae, tokenizer, text_encoder, concept_images):
    cfg = training.TrainConfig(steps=1)
    with pytest.raises(ValueError, match="empty"):
        train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images[:0], "toy", config=cfg)
    with pytest.raises(ValueError, match="one mask per image"):
        train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images, "toy",
                        masks=torch.ones(4, 16, 16), config=cfg)
    with pytest.raises(ValueError, match="empty"):
        train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images, "toy", resolution=32,
                        masks=torch.zeros(4, 32, 32), config=cfg)


def test_views_keep_masks_aligned_with_images(concept_images):
    masks = (concept_images[..., 0] > 0.8).float()
    imgs, ms = training.make_views(concept_images, masks, 24, 3, seed=0)
    assert imgs.shape == (12, 24, 24, 3) and ms.shape == (12, 24, 24)
    red = (imgs[..., 0] > 0.7).float()
    assert ((red - (ms > 0.5).float()).abs().mean() < 0.1)


def test_word_missing_from_prompt_is_named():
    from core.tokens import word_positions
    with pytest.raises(TokenNotFoundError, match="'cat'.*not in the prompt"):
        word_positions([1, 2, 3], {"cat": [9]}, "a dog")


def test_a_word_t5_splits_differently_in_the_prompt_is_named_with_what_to_do():
    from core.tokens import word_positions
    # "sks" alone is two T5 pieces; glued to a comma in the prompt it is tokenized into other pieces.
    with pytest.raises(TokenNotFoundError, match="T5 splits the word 'sks' into pieces.*put spaces around it"):
        word_positions([5, 61, 62, 9], {"sks": [71, 72]}, "a sks, toy", tokenizer="t5xxl")
    assert word_positions([5, 71, 72, 9], {"sks": [71, 72]}, "a sks toy", tokenizer="t5xxl") == [1, 2]


def test_views_without_flips_keep_left_and_right(concept_images):
    imgs, _ = training.make_views(concept_images, None, 32, 6, seed=0, flip=False)
    red_cols = [(im[..., 0] > 0.7).float().mean(0).argmax().item() for im in imgs]
    left_of_centre = [(concept_images[i, :, :, 0] > 0.7).float().mean(0).argmax().item() < 16 for i in range(4)]
    assert all((c < 16) == left_of_centre[i // 6] for i, c in enumerate(red_cols))


def test_captions_pick_each_image_prompt_and_name_what_is_wrong():
    assert training.image_prompts("sks", "toy", None, 3) == ["a photo of a sks toy"]
    assert training.image_prompts("sks", "toy", ["", "  "], 3) == ["a photo of a sks toy"]  # blank lines: default
    assert training.image_prompts("sks", "toy", ["a sks toy on a beach"], 2) == ["a sks toy on a beach"] * 2
    snow = "a sks teddy bear, in snow"
    assert training.image_prompts("sks", "teddy bear", [snow], 1) == [snow]
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        training.image_prompts("sks", "toy", ["a sks toy", "a sks toy"], 3)
    with pytest.raises(ValueError, match="does not name 'toy'"):
        training.image_prompts("sks", "toy", ["a sks toys on a beach"], 1)  # 'toys' is not the word 'toy'


def test_each_view_trains_with_its_own_image_caption(monkeypatch, sd1_unet, vae, tokenizer, text_encoder,
                                                     concept_images):
    seen = {}

    def fake_train(params, predict, latents, contexts, *args, **kwargs):
        seen["latents"], seen["contexts"] = latents, contexts
        return [0.0]

    monkeypatch.setattr(training, "train", fake_train)
    captions = [f"a sks toy number {i}" for i in range(len(concept_images))]
    rs, _ = train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images, "toy", resolution=32, views=3,
                            config=training.TrainConfig(steps=1), captions=captions)
    expected = encode_text(tokenizer, text_encoder, captions)
    assert seen["contexts"].shape[0] == seen["latents"].shape[0] == 3 * len(captions)
    for v in range(seen["contexts"].shape[0]):  # views of image i come together: view v belongs to image v // 3
        assert torch.equal(seen["contexts"][v], expected[v // 3])
    assert json.loads(rs.metadata["captions"]) == captions


def test_one_shared_caption_trains_exactly_like_the_paper_prompt(sd1_unet, vae, tokenizer, text_encoder,
                                                                 concept_images):
    cfg = training.TrainConfig(steps=4, batch_size=2, learning_rate=1e-2, seed=1)
    kwargs = dict(class_word="toy", token="sks", resolution=32, views=1, config=cfg)
    rs, losses = train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images, **kwargs)
    rs2, losses2 = train_residuals(sd1_unet, vae, tokenizer, text_encoder, concept_images,
                                   captions=["a photo of a sks toy"], **kwargs)
    assert losses == pytest.approx(losses2, rel=1e-6, abs=0)
    assert all(torch.allclose(rs.layers[k].up, rs2.layers[k].up, atol=1e-7) for k in rs.layers)
    assert "captions" not in rs.metadata and "captions" not in rs2.metadata


def test_v_and_x0_objectives_weigh_a_noise_error_by_one_over_alpha_bar_and_more():
    """An eps error d is a v error d / sqrt(a) and an x0 error -d * sqrt((1 - a) / a): the v- and x0-losses give the
    noisy steps (small a), where shapes and colours are decided, more weight than the eps-loss does."""
    gen = torch.Generator().manual_seed(0)
    x0, noise, delta = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3))
    a = torch.tensor([0.9, 0.01])
    x_t = a.sqrt().view(-1, 1, 1, 1) * x0 + (1 - a).sqrt().view(-1, 1, 1, 1) * noise
    pred_eps = noise + delta
    assert torch.equal(training.objective_target(noise, x0, x_t, a, "eps"), noise)
    assert torch.equal(training.objective_target(noise, x0, x_t, a, "x0"), x0)
    for objective, factor in (("v", 1 / a.sqrt()), ("x0", -((1 - a) / a).sqrt())):
        err = (training.convert_prediction(pred_eps, "eps", objective, x_t, a)
               - training.objective_target(noise, x0, x_t, a, objective))
        torch.testing.assert_close(err, delta * factor.view(-1, 1, 1, 1), rtol=1e-4, atol=1e-4)
