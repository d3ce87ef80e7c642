"""Concept sliders and ESD on a tiny diffusers UNet: the trained residual follows the guided target; strength 0
is the base model exactly; prompt pairs that differ in more than one word are refused."""
import pytest
import torch

from core import residuals as R
from core import sliders as S
from core import training
from core.hooks.gate import LowRankGate
from core.hooks.plan import BatchPlan
from core.patching.diffusers import encode_text, unet_sites

AC = training.scaled_linear_alphas_cumprod()


def make_predict(unet, gate, contexts):
    def predict(x_t, t, prompt, residual):
        gate.plan = BatchPlan(active=residual)
        ctx = contexts[prompt].expand(x_t.shape[0], -1, -1)
        return unet(x_t, t, encoder_hidden_states=ctx).sample
    return predict


def train(unet, contexts, eta, steps=30, seed=0):
    rs = R.init_residuals([s for s, _ in unet_sites(unet)], fixed_rank=4, seed=seed, init_scale=0.0)
    cfg = training.TrainConfig(steps=steps, batch_size=2, learning_rate=3e-3, seed=seed)
    with LowRankGate(unet_sites(unet), rs) as gate:
        losses = S.train_guided(rs.parameters(), make_predict(unet, gate, contexts), (4, 8, 8), AC, eta,
                                config=cfg)
    return rs.detached(), losses


@torch.no_grad()
def target_gap(unet, contexts, rs, eta, strength=1.0):
    """|eps'(neutral) - guided target| / |eps(neutral) - guided target| on fixed held-out x_t."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(4, 4, 8, 8, generator=gen)
    t = torch.tensor([100, 300, 600, 900])
    eps = {k: unet(x, t, encoder_hidden_states=v.expand(4, -1, -1)).sample for k, v in contexts.items()}
    target = S.guided_target(eps["neutral"], eps["plus"], eps["minus"], eta)
    with LowRankGate(unet_sites(unet), rs, strength=strength):
        tuned = unet(x, t, encoder_hidden_states=contexts["neutral"].expand(4, -1, -1)).sample
    return ((tuned - target).norm() / (eps["neutral"] - target).norm()).item()


@pytest.fixture(scope="module")
def slider_contexts(tokenizer, text_encoder):
    prompts = {"neutral": "a photo of a dog", "plus": "a photo of a red dog", "minus": "a photo of a blue dog"}
    return {k: encode_text(tokenizer, text_encoder, [v]) for k, v in prompts.items()}


def test_slider_learns_the_guided_direction_and_strength_zero_is_base(sd1_unet, slider_contexts):
    rs, losses = train(sd1_unet, slider_contexts, eta=2.0)
    assert target_gap(sd1_unet, slider_contexts, rs, 2.0) < 0.8
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([400])
    ctx = slider_contexts["neutral"]
    with torch.no_grad():
        base = sd1_unet(x, t, encoder_hidden_states=ctx).sample
        with LowRankGate(unet_sites(sd1_unet), rs, strength=0.0):
            assert torch.equal(sd1_unet(x, t, encoder_hidden_states=ctx).sample, base)
        with LowRankGate(unet_sites(sd1_unet), rs, strength=1.0):
            plus = sd1_unet(x, t, encoder_hidden_states=ctx).sample
        with LowRankGate(unet_sites(sd1_unet), rs, strength=-1.0):
            minus = sd1_unet(x, t, encoder_hidden_states=ctx).sample
    cosine = torch.nn.functional.cosine_similarity((plus - base).flatten(), (minus - base).flatten(), 0)
    assert cosine < -0.9  # a negative strength turns the attribute the other way
    assert train(sd1_unet, slider_contexts, eta=2.0, steps=4)[1] == losses[:4]  # deterministic per seed


def test_esd_residual_follows_the_negatively_guided_target(sd1_unet, tokenizer, text_encoder):
    (triple,) = S.esd_sets(["a photo of a red dog"])
    assert triple == ("a photo of a red dog", "", "a photo of a red dog")
    contexts = {k: encode_text(tokenizer, text_encoder, [v]) for k, v in zip(S.PROMPTS, triple, strict=True)}
    rs, _ = train(sd1_unet, contexts, eta=1.0)
    assert target_gap(sd1_unet, contexts, rs, 1.0) < 0.8


def test_slider_prompt_pairs():
    assert S.slider_words("a photo of an old person", "a photo of an young person") == ("old", "young")
    assert S.slider_words("a smiling person", "a person") == ("smiling", "")
    assert S.neutral_prompt("a photo of an Old person", "a photo of an young person") == "a photo of an person"
    with pytest.raises(S.SliderPromptError, match="more than one word.*'an old' vs 'a young'"):
        S.slider_words("an old person", "a young person")
    with pytest.raises(S.SliderPromptError, match="more than one word"):
        S.slider_words("an old man", "an young woman")
    with pytest.raises(S.SliderPromptError, match="the same"):
        S.slider_words("an Old man", "an old  man")
    with pytest.raises(ValueError, match="concept to erase"):
        S.esd_sets(["  "])


def test_ddim_trajectory_point_follows_the_deterministic_path_of_a_fixed_x0():
    # a model whose x0 estimate is always c: from x_T, DDIM keeps the x_T noise direction, so the point at t is
    # sqrt(a_t) c + sqrt(1 - a_t) (x_T - sqrt(a_T) c) / sqrt(1 - a_T), whatever the steps in between
    c = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    last = AC.shape[0] - 1

    def predict(x, t, prompt, residual):
        assert prompt == "neutral" and not residual
        return c

    for path in ([last, 600], [last, 900, 600], [last, 950, 700, 600]):
        x = S.ddim_trajectory_point(predict, x_T, torch.tensor(path), AC, "x0")
        eps = (x_T - AC[last].sqrt() * c) / (1 - AC[last]).sqrt()
        assert torch.allclose(x, AC[600].sqrt() * c + (1 - AC[600]).sqrt() * eps, atol=1e-5)
    assert torch.equal(S.ddim_trajectory_point(predict, x_T, torch.tensor([last]), AC, "x0"), x_T)


def test_training_on_the_trajectory_trains_at_its_states(sd1_unet, slider_contexts):
    seen = []
    rs = R.init_residuals([s for s, _ in unet_sites(sd1_unet)], fixed_rank=2, seed=0, init_scale=0.0)
    cfg = training.TrainConfig(steps=3, batch_size=2, learning_rate=3e-3, seed=0)
    with LowRankGate(unet_sites(sd1_unet), rs) as gate:
        inner = make_predict(sd1_unet, gate, slider_contexts)

        def predict(x_t, t, prompt, residual):
            if residual:
                seen.append(int(t[0]))
            return inner(x_t, t, prompt, residual)
        losses = S.train_guided(rs.parameters(), predict, (4, 8, 8), AC, 2.0, config=cfg, denoise_steps=5)
    path = torch.linspace(AC.shape[0] - 1, 0, 6).round().long().tolist()
    assert len(losses) == 3 and all(t in path[:5] for t in seen)  # trained only at the path's timesteps


def test_a_preserved_prompt_alone_leaves_the_residual_at_zero(sd1_unet, slider_contexts):
    # the target of a preserved prompt p, eps(p) + eta (eps(p) - eps(p)), is the frozen prediction itself: from the
    # zero-initialised residual the loss and every gradient are exactly zero, so training never moves it
    rs = R.init_residuals([s for s, _ in unet_sites(sd1_unet)], fixed_rank=2, seed=0, init_scale=0.0)
    cfg = training.TrainConfig(steps=3, batch_size=2, learning_rate=3e-3, seed=0)
    with LowRankGate(unet_sites(sd1_unet), rs) as gate:
        losses = S.train_guided(rs.parameters(), make_predict(sd1_unet, gate, slider_contexts), (4, 8, 8), AC, 2.0,
                                config=cfg, sets=[("neutral", "neutral", "neutral")])
    assert losses == [0.0, 0.0, 0.0]
    assert all(torch.count_nonzero(layer.up) == 0 for layer in rs.layers.values())


def test_draw_triple_picks_the_given_sets_and_preserves_half_the_steps():
    sets = [("a", "", "a"), ("b", "", "b")]
    gen = torch.Generator().manual_seed(0)
    drawn = [S.draw_triple(gen, sets, ["p", "q"]) for _ in range(400)]
    assert set(drawn) == {*sets, ("p", "p", "p"), ("q", "q", "q")}
    assert 0.4 < sum(t[0] in "pq" for t in drawn) / len(drawn) < 0.6
    untouched = torch.Generator().manual_seed(0)
    assert S.draw_triple(untouched, sets[:1], []) == sets[0]
    assert torch.equal(untouched.get_state(), torch.Generator().manual_seed(0).get_state())  # one set: no draw


def test_esd_and_slider_prompt_sets():
    assert S.esd_sets(["a red car", "", "a red car", "a red bus"]) == [("a red car", "", "a red car"),
                                                                      ("a red bus", "", "a red bus")]
    assert S.esd_sets(["a red car", "a red bus"], ["a car", "a bus"])[1] == ("a red bus", "a bus", "a red bus")
    assert S.esd_sets(["a red car", "a red bus"], ["a vehicle"])[1] == ("a red bus", "a vehicle", "a red bus")
    with pytest.raises(ValueError, match="one per concept prompt"):
        S.esd_sets(["a red car", "a red bus", "red"], ["a car", "a bus"])
    pairs = S.slider_sets(["an old man", "an old cat"], ["an young man", "an young cat"])
    assert pairs == [("an man", "an old man", "an young man"), ("an cat", "an old cat", "an young cat")]
    with pytest.raises(S.SliderPromptError, match="as many positive"):
        S.slider_sets(["an old man"], ["an young man", "an young cat"])
    with pytest.raises(S.SliderPromptError, match="pair 2: .*more than one word"):
        S.slider_sets(["an old man", "an old cat"], ["an young man", "a young dog"])
    assert S.sets_prompts([("a", "", "a"), ("b", "", "b")], ["c", "a"]) == ["a", "", "b", "c"]
    meta = S.slider_metadata("sd1", [("a", "", "a"), ("b", "", "b")], 1.0, training.TrainConfig(), "esd", ["c"])
    assert (meta["prompt_neutral"], meta["prompt_plus"]) == ("a", "") and "prompt_preserve" in meta
