"""The toy world's fast checks: the scene generator, the judge on true renders, the committed base model."""
import os

import numpy as np
import pytest
import torch

from bench.toyworld import judge as J
from bench.toyworld import model as M
from bench.toyworld import scenes as S

WEIGHTS = os.path.join(M.HERE, "weights")


def sums():
    with open(os.path.join(WEIGHTS, "SHA256SUMS")) as f:
        return {name: digest for digest, name in (line.split() for line in f if line.strip())}


def test_scenes_are_deterministic_and_captioned():
    for seed in range(20):
        a, b = S.make_scene(seed), S.make_scene(seed)
        assert a == b
        ra, rb = S.render(a), S.render(b)
        assert np.array_equal(ra.image, rb.image)
        assert ra.image.shape == (S.SIZE, S.SIZE, 3) and 0 <= ra.image.min() and ra.image.max() <= 1
        assert all(m.sum() > 10 for m in ra.masks)  # every object visible
        cap = a.caption()
        assert cap.endswith(f"on a {a.background} background")
        if len(a.objects) == 1:
            assert S.POSITION_PHRASE[a.objects[0].position] in cap
        else:
            assert a.objects[0].x < a.objects[1].x  # the first named object is the left one
            assert not (ra.masks[0] & ra.masks[1]).any()


def test_positions_follow_the_words():
    for i, place in enumerate(S.POSITIONS * 10):
        sc = S.make_scene(1000 + i, n_objects=1, position=place)
        assert sc.objects[0].position == place
        xs = np.nonzero(S.render(sc).masks[0])[1]
        assert {"left": xs.mean() < 13, "middle": 13 <= xs.mean() <= 19, "right": xs.mean() > 19}[place]


def test_colour_synonyms_and_held_out_concepts():
    words = {w for s in range(400) for w in S.make_scene(s).caption().split()}
    for _, (a, b) in S.COLOURS.values():
        assert a in words and b in words
    for w in (*S.NEW_SHAPES, *S.NEW_TEXTURES):
        assert w not in words  # the base distribution never shows the new concepts
    from bench.toyworld.train_base import training_scene_stream

    stream = training_scene_stream(0)
    for _ in range(300):
        sc = next(stream)
        assert not S.is_held_out_prompt(sc.caption())
        assert all(o.shape in S.BASE_SHAPES and o.texture in S.BASE_TEXTURES for o in sc.objects)


def test_colourless_captions_keep_the_scene_and_drop_only_the_colour():
    """The colourless variant's captions: an object without its colour word ("a striped shape"); the scene of a seed
    is the same at any ``colourless_p``, and at 0 the caption is the old one."""
    colour_words = {w for _, ws in S.COLOURS.values() for w in ws}
    bare_seen = 0
    for seed in range(200):
        plain, bare = S.make_scene(seed, class_word_p=0.1), S.make_scene(seed, class_word_p=0.1, colourless_p=0.5)
        assert plain.objects == bare.objects and plain.background == bare.background
        assert S.make_scene(seed, class_word_p=0.1, colourless_p=0.0).caption() == plain.caption()
        for o, dropped, phrase in zip(bare.objects, bare.colourless, bare.caption().split(" and "), strict=False):
            named = [w for w in phrase.split() if w in colour_words]
            if dropped:
                assert named == []
            else:
                assert len(named) == 1 and named[0] in S.COLOURS[o.colour][1]
            bare_seen += dropped
    assert 100 < bare_seen < 200  # about half of ~300 objects


def test_tokenizer_one_token_per_word():
    tok = M.build_tokenizer()
    for w in S.VOCABULARY:
        assert len(tok(w, add_special_tokens=False).input_ids) == 1, w


def test_judge_reads_true_renders():
    from bench.toyworld.train_judge import held_out_scenes

    judge = J.load(os.path.join(WEIGHTS, "judge.safetensors"))
    scs = held_out_scenes(48)
    renders = [S.render(s) for s in scs]
    readings = J.read(judge, torch.from_numpy(np.stack([r.image for r in renders])))
    ok = [J.all_ok(J.attribute_checks(rd, sc)) for rd, sc in zip(readings, scs, strict=True)]
    assert np.mean(ok) >= 47 / 48
    for rd, r in zip(readings, renders, strict=True):
        if len(rd.objects) == len(r.masks):
            assert all(J.iou(o.mask, m) > 0.8 for o, m in zip(rd.objects, r.masks, strict=True))


@pytest.mark.parametrize("name", ["base.safetensors", "base_colourless.safetensors", "judge.safetensors"])
def test_committed_weights_checksum(name):
    assert M.sha256(os.path.join(WEIGHTS, name)) == sums()[name]


def test_base_model_loads_and_samples_with_lag():
    from core import residuals as R
    from core.hooks.gate import LowRankGate
    from core.patching.diffusers import concept_positions, unet_sites

    torch.manual_seed(0)
    unet, te, tok = M.load(os.path.join(WEIGHTS, "base.safetensors"))
    prompts = ["a red circle on the left on a gray background",
               "a blue square and a green triangle on a sand background"]
    imgs = M.generate(unet, te, tok, prompts, seed=0, steps=4)
    assert imgs.shape == (2, S.SIZE, S.SIZE, 3) and torch.isfinite(imgs).all()
    sites = unet_sites(unet)
    rs = R.init_residuals([s for s, _ in sites], init_scale=1.0, seed=0)
    prompt = "a sks shape on the left on a gray background"
    idx = concept_positions(tok, prompt, ["sks", "shape"])
    with LowRankGate(sites, rs, localized=True) as gate:
        lag = M.generate(unet, te, tok, [prompt], seed=0, steps=4, gate=gate, token_idx=idx)
    assert torch.isfinite(lag).all() and gate.last_masks
    for m in gate.last_masks.values():
        assert 0.3 < float(m.float().mean()) < 0.7  # median split of the V* attention


def test_core_sampler_with_the_toy_scheduler_is_exact_for_an_exact_v_model():
    """core.patching.diffusers.sample + DDIM (v-prediction, trailing) returns x0 when the model's v is exact."""
    from types import SimpleNamespace

    from core.patching.diffusers import sample

    x0 = torch.rand(2, 3, S.SIZE, S.SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ac = M.build_scheduler().alphas_cumprod

    class Oracle(torch.nn.Module):
        device, dtype = torch.device("cpu"), torch.float32

        def forward(self, x, t, encoder_hidden_states=None):
            a = ac[int(t)]
            eps = (x - a.sqrt() * x0.repeat(2, 1, 1, 1)) / (1 - a).sqrt()
            return SimpleNamespace(sample=a.sqrt() * eps - (1 - a).sqrt() * x0.repeat(2, 1, 1, 1))

    ctx = torch.zeros(1, 4, 8)
    out = sample(Oracle(), M.build_scheduler(), ctx, ctx, tuple(x0.shape), steps=10, guidance=2.0)
    assert (out - x0).abs().max() < 1e-4


def test_latent_shims_are_exact_and_weights_carry_their_config(tmp_path):
    from core.patching.diffusers import decode_latents, encode_images

    imgs = torch.rand(3, S.SIZE, S.SIZE, 3, generator=torch.Generator().manual_seed(0))
    z = encode_images(M.ShuffleVAE(), imgs)
    assert z.shape == (3, 12, S.SIZE // 2, S.SIZE // 2)
    assert torch.allclose(decode_latents(M.ShuffleVAE(), z), imgs, atol=1e-6)
    assert torch.equal(M.from_latents(z), M.from_latents(M.unshuffle(imgs.permute(0, 3, 1, 2) * 2 - 1)))
    assert torch.allclose(decode_latents(M.PixelVAE(), encode_images(M.PixelVAE(), imgs)), imgs, atol=1e-6)
    unet = M.build_unet(0, M.SHUFFLE_UNET_CONFIG)
    assert isinstance(M.vae_for(unet), M.ShuffleVAE)
    path = str(tmp_path / "shuffle.safetensors")
    M.save(unet, M.build_text_encoder(len(M.build_tokenizer())), path)
    u2, te, tok = M.load(path)
    assert u2.config.in_channels == 12 and u2.config.sample_size == S.SIZE // 2
    imgs = M.generate(u2, te, tok, ["a red circle on the left on a gray background"], seed=0, steps=2)
    assert imgs.shape == (1, S.SIZE, S.SIZE, 3) and torch.isfinite(imgs).all()


def test_erase_bench_steering_leaves_a_prompt_it_preserves_alone():
    """measure_erase's sampler with steering gated by a preserve list: a prompt that is itself preserved samples
    as the unsteered sampler does; the same steering without the list changes it."""
    from bench.toyworld import measure_erase as ME
    from core.patching.diffusers import encode_text

    unet, te, tok = M.load(os.path.join(WEIGHTS, "base.safetensors"))
    prompt = "a red circle in the middle on a gray background"
    base = ME.generate(unet, te, tok, [prompt], seed=3)
    steer = (encode_text(tok, te, ["a red shape"]), 2.0, "negative", 0.0, encode_text(tok, te, ["a blue shape"]))
    kept = encode_text(tok, te, [prompt, "a green shape"])
    assert torch.allclose(ME.generate(unet, te, tok, [prompt], seed=3, steer=(*steer, kept)), base, atol=1e-5)
    assert not torch.allclose(ME.generate(unet, te, tok, [prompt], seed=3, steer=steer), base, atol=1e-2)


def test_erase_bench_steering_gated_by_the_prompt_steers_red_and_its_synonym_only():
    """The prompt gate on the toy's text encoder (the bench row's texts and margin): a "crimson" prompt is steered
    as without the gate, a purple one (red is part of purple) is sampled exactly as unsteered."""
    from bench.toyworld import measure_erase as ME
    from core.patching.diffusers import encode_text

    unet, te, tok = M.load(os.path.join(WEIGHTS, "base.safetensors"))
    prompts = ["a crimson circle in the middle on a gray background", "a purple circle in the middle on a gray "
               "background"]
    base = ME.generate(unet, te, tok, prompts, seed=3)
    summaries = ME.text_summaries(tok, te, ["a red shape", *(f"a {c} shape" for c in ME.PRESERVE)])
    steer = (encode_text(tok, te, ["a red shape"]), 2.0, "negative", 0.0, encode_text(tok, te, ["a blue shape"]))
    ungated = ME.generate(unet, te, tok, prompts, seed=3, steer=steer)
    gated = ME.generate(unet, te, tok, prompts, seed=3, steer=(*steer, None, (summaries[0], summaries[1:], 0.25)))
    assert torch.equal(gated[0], ungated[0]) and not torch.allclose(ungated[0], base[0], atol=1e-2)
    assert torch.allclose(gated[1], base[1], atol=1e-5)  # the batch holds more prompts: float rounding only


def test_toy_dit_trains_one_step_and_samples_on_the_dit_backend(tmp_path):
    """The toy DiT (an SD3 transformer): one training step through ``train_base --arch dit`` (with its checkpoint
    evaluation), the saved file loads, ``generate_dit`` samples, and the pack's DiT backend sees one site per block."""
    from bench.toyworld import model_dit as D
    from bench.toyworld import train_base
    from core.patching.diffusers_dit import DiTTap, dit_family, dit_sites

    dit = D.build_dit(0)
    assert dit_family(dit).key == "SD3"
    sites = dit_sites(dit)
    assert len(sites) == D.DIT_CONFIG["num_layers"] and [b for _, b in sites] == list(dit.transformer_blocks)
    out = str(tmp_path / "dit.safetensors")
    threads = torch.get_num_threads()
    try:
        train_base.main(["--arch", "dit", "--steps", "1", "--batch", "2", "--n-single", "1", "--n-two", "1",
                         "--sample-steps", "2", "--out", out])
    finally:
        torch.set_num_threads(threads)  # main sets its --threads
    net, te, tok = D.load_dit(out)
    assert not torch.equal(net.proj_out.weight, dit.proj_out.weight)  # the step moved the zero-initialised output
    prompt = ["a red circle on the left on a gray background"]
    img = D.generate_dit(net, te, tok, prompt, seed=0, steps=2)
    assert img.shape == (1, S.SIZE, S.SIZE, 3) and torch.isfinite(img).all()
    assert 0 <= float(img.min()) and float(img.max()) <= 1
    events = []
    with DiTTap(net) as tap:  # the backend's processors compute what the stock ones do and see 256 + 32 tokens
        tap.listen(events.append)
        assert torch.equal(D.generate_dit(net, te, tok, prompt, seed=0, steps=2), img)
    assert len(events) == 2 * len(sites) and events[0].image == (0, 256) and events[0].text == (256, M.MAX_LENGTH)
