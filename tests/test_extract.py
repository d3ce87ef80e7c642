"""Extraction: self-attention clustering finds the regions, handles go where they belong, training is masked."""
import pytest
import torch

from core.extract import (
    ExtractConfig,
    ExtractionError,
    attention_alignment_loss,
    check_masks,
    cluster_concepts,
    concept_tokens,
    insert_handles,
    kmeans,
    masked_union_loss,
    self_attention_grid,
    subsets,
)
from core.patching.diffusers import concept_context, extract_concepts, self_attention_masks


def block_attention(labels: torch.Tensor) -> torch.Tensor:
    """Self-attention [G, G] in which every position attends uniformly to the positions of its own region."""
    same = (labels[:, None] == labels[None]).float()
    return same / same.sum(1, keepdim=True)


def scene_labels(h=12, w=12):
    """Background 0 with two squares: 1 on the left, 2 on the right."""
    lab = torch.zeros(h, w, dtype=torch.long)
    lab[3:8, 1:5] = 1
    lab[4:9, 7:11] = 2
    return lab


def test_kmeans_splits_two_attention_blocks_exactly():
    lab = torch.zeros(8, 8, dtype=torch.long)
    lab[:, 4:] = 1
    labels = kmeans(block_attention(lab.flatten()).sqrt(), 2, seed=0)
    assert torch.equal(labels.reshape(8, 8) == labels[0], lab == 0)


@pytest.mark.parametrize("concepts", [2, 0], ids=["given", "automatic"])
def test_clustering_returns_the_objects_left_to_right_without_the_background(concepts):
    lab = scene_labels()
    masks = cluster_concepts(block_attention(lab.flatten()), (12, 12), concepts=concepts)
    assert masks.shape == (2, 12, 12)
    assert torch.equal(masks[0].bool(), lab == 1) and torch.equal(masks[1].bool(), lab == 2)


def test_asking_more_concepts_than_the_image_has_is_an_error():
    with pytest.raises(ExtractionError, match="gives only 2 distinct regions"):
        cluster_concepts(block_attention(scene_labels().flatten()), (12, 12), concepts=4)


def test_grid_uses_the_finest_layers_and_keeps_rows_distributions_and_block_structure():
    lab = torch.zeros(8, 8, dtype=torch.long)
    lab[:, 4:] = 1
    fine = block_attention(lab.flatten())[None]  # 8x8 layer
    coarse = torch.rand(1, 16, 16).softmax(-1)  # a 4x4 layer: ignored, whatever it holds
    grid, hw = self_attention_grid({64: fine, 16: coarse}, {64: 1, 16: 1}, (8, 8))
    assert hw == (8, 8)  # the latent caps the 2x query upsampling
    assert torch.allclose(grid, self_attention_grid({64: fine}, {64: 1}, (8, 8))[0])
    assert torch.allclose(grid.sum(-1), torch.ones(1, 64), atol=1e-5)
    left = lab.flatten() == 0
    assert float(grid[0][left][:, ~left].sum(1).max()) < 0.2  # left queries stay (mostly) on the left


def test_grid_upsamples_queries_bilinearly_between_attention_cells():
    lab = torch.zeros(4, 4, dtype=torch.long)
    lab[:, 2:] = 1
    p = block_attention(lab.flatten())[None]  # a 4x4 layer in an 8x8 latent
    grid, hw = self_attention_grid({16: p, 1: torch.ones(1, 1, 1)}, {16: 2, 1: 1}, (8, 8))
    assert hw == (8, 8) and grid.shape == (1, 64, 16)
    assert torch.allclose(grid.sum(-1), torch.ones(1, 64), atol=1e-5)
    rows = grid[0].reshape(8, 8, 16)
    right_keys = (lab.flatten() == 1)
    share = rows[..., right_keys].sum(-1)  # [8, 8] share of each query's attention on the right block
    assert torch.allclose(share[:, :3], p[0][0, right_keys].sum().expand(8, 3))  # deep inside: as the cell
    assert bool((share[:, 3] < share[:, 4]).all())  # the edge: a blend, rising left to right
    assert float(share[0, 3]) > float(share[0, 2]) and float(share[0, 4]) < float(share[0, 5])


def test_masked_union_loss_ignores_pixels_outside_the_mask_exactly():
    pred, target = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    masks = torch.zeros(2, 2, 8, 8)
    masks[:, 0, :, :3] = 1
    masks[:, 1, :, 6:] = 1
    base = masked_union_loss(pred, target, masks, (0, 1))
    changed = pred.clone()
    changed[..., 3:6] += 100.0  # between the two masks
    assert masked_union_loss(changed, target, masks, (0, 1)) == base
    changed[..., 7] += 1.0  # inside concept 1's mask: counts for the union, not for concept 0 alone
    assert masked_union_loss(changed, target, masks, (0, 1)) != base
    assert masked_union_loss(changed, target, masks, (0,)) == masked_union_loss(pred, target, masks, (0,))


def test_handles_replace_only_their_rows_and_receive_gradients():
    ctx = torch.randn(1, 10, 6)
    h = torch.randn(1, 6, requires_grad=True)
    out = insert_handles(ctx, [[3, 7]], [h])
    assert torch.equal(out[0, 3], h[0].detach()) and torch.equal(out[0, 7], h[0].detach())
    keep = [i for i in range(10) if i not in (3, 7)]
    assert torch.equal(out[0, keep], ctx[0, keep])
    out.sum().backward()
    assert torch.equal(h.grad, torch.full((1, 6), 2.0))


def test_attention_alignment_loss_is_zero_for_a_map_shaped_like_its_mask():
    mask = torch.zeros(1, 1, 16)
    mask[..., 4:9] = 1
    assert float(attention_alignment_loss(0.3 * mask, mask)) == 0.0
    assert float(attention_alignment_loss(torch.ones(1, 1, 16) * 0.3, mask)) > 0.0


def test_bad_masks_and_words_say_what_to_fix():
    with pytest.raises(ExtractionError, match="masks are"):
        check_masks(torch.ones(2, 8, 8), (16, 16))
    empty = torch.ones(2, 8, 8)
    empty[1] = 0
    with pytest.raises(ExtractionError, match=r"mask\(s\) \[1\] are empty"):
        check_masks(empty, (8, 8))
    with pytest.raises(ExtractionError, match="one name per mask"):
        check_masks(torch.ones(2, 8, 8), (8, 8), concepts=3)
    with pytest.raises(ExtractionError, match="one word per concept"):
        concept_tokens("sks", 2)
    assert concept_tokens("", 2) == ["sks", "ohwx"]
    assert subsets(2) == [(0,), (1,), (0, 1)]


@pytest.fixture
def two_object_image():
    img = torch.full((1, 32, 32, 3), 0.5)
    img[0, 8:20, 2:12] = torch.tensor([1.0, 0.0, 0.0])
    img[0, 10:22, 18:30] = torch.tensor([0.0, 0.0, 1.0])
    masks = torch.zeros(2, 32, 32)
    masks[0, 8:20, 2:12] = 1
    masks[1, 10:22, 18:30] = 1
    return img, masks


def test_extraction_trains_handles_and_residuals_deterministically(sd1_unet, vae, tokenizer, text_encoder,
                                                                   two_object_image):
    img, masks = two_object_image
    cfg = ExtractConfig(handle_steps=3, joint_steps=2, batch_size=2, attention_weight=0.1, seed=1)
    runs = [extract_concepts(sd1_unet, vae, tokenizer, text_encoder, img, masks, ["sks", "toy"], resolution=32,
                             views=2, flip=False, config=cfg) for _ in range(2)]
    a, b = runs
    assert len(a.losses) == 5 and all(torch.isfinite(torch.tensor(a.losses)))
    assert a.losses == b.losses and all(torch.equal(x, y) for x, y in zip(a.handles, b.handles, strict=True))
    initial = concept_context(tokenizer, text_encoder, type(a)(a.tokens, [torch.zeros_like(h) for h in a.handles]),
                              "a photo of sks")[0]
    ctx, pos = concept_context(tokenizer, text_encoder, a, "a photo of sks")
    assert pos and not torch.equal(ctx[0, pos], initial[0, pos])
    assert a.residuals is not None and any(float(layer.up.abs().sum()) > 0 for layer in a.residuals.layers.values())
    with pytest.raises(ValueError, match="names none of the concepts"):
        concept_context(tokenizer, text_encoder, a, "a photo of a dog")


def test_self_attention_masks_have_the_image_size(sd1_unet, vae, tokenizer, text_encoder, two_object_image):
    img, _ = two_object_image
    masks = self_attention_masks(sd1_unet, vae, tokenizer, text_encoder, img, concepts=1, seed=0)
    assert masks.shape == (1, 32, 32) and set(masks.unique().tolist()) <= {0.0, 1.0}


def test_a_saved_concept_set_loads_bit_identical_and_is_never_overwritten(tmp_path):
    from core import residuals as R
    from core.extract import ConceptSet, load_concepts, save_concepts
    from core.layouts import TransformerSite

    sites = [TransformerSite("input_blocks.1.1", 32, False, 1)]
    rs = R.init_residuals(sites, seed=0, metadata={"base_family": "SD1"})
    cs = ConceptSet(["sks", "ohwx"], [torch.randn(1, 32), torch.randn(2, 32)], None, rs, ["dog", ""], [], "SD1")
    path = str(tmp_path / "set.safetensors")
    save_concepts(cs, path)
    back = load_concepts(path)
    assert back.tokens == cs.tokens and back.class_words == cs.class_words and back.family == "SD1"
    assert all(torch.equal(a, b) for a, b in zip(back.handles, cs.handles, strict=True))
    key = next(iter(rs.layers))
    layer, again = rs.layers[key], back.residuals.layers[key]
    assert torch.equal(layer.down, again.down) and torch.equal(layer.up, again.up)
    before = open(path, "rb").read()
    with pytest.raises(FileExistsError, match="overwrite"):
        save_concepts(cs, path)
    assert open(path, "rb").read() == before
    with pytest.raises(ValueError, match="not a concept set"):
        R.save(rs, str(tmp_path / "plain.safetensors"))
        load_concepts(str(tmp_path / "plain.safetensors"))


def test_skipping_layers_the_grid_never_uses_changes_no_mask(sd1_unet, vae, tokenizer, text_encoder,
                                                            two_object_image):
    import torch.nn.functional as F

    from core.extract import record_self_attention
    from core.patching.diffusers import encode_images, unet_sites

    img, _ = two_object_image
    big = F.interpolate(img.permute(0, 3, 1, 2), size=(128, 128), mode="nearest").permute(0, 2, 3, 1)
    latent = encode_images(vae, big)  # 64 wide: the tiny UNet's attention runs at 64 and at 32
    args = (sd1_unet, vae, tokenizer, text_encoder, big)
    skipped = self_attention_masks(*args, concepts=2, seed=0, noise_draws=2)
    recorded = self_attention_masks(*args, concepts=2, seed=0, noise_draws=2, record_all_layers=True)
    assert torch.equal(skipped, recorded)

    def run_draw(draw):
        sd1_unet(latent, torch.tensor([300]), encoder_hidden_states=torch.zeros(1, 77, 32))

    hw = tuple(latent.shape[-2:])
    all_sums, all_counts = record_self_attention(unet_sites(sd1_unet), hw, run_draw, 2, max_width=None)
    assert set(all_sums) == {64 * 64, 32 * 32}
    sums, counts = record_self_attention(unet_sites(sd1_unet), hw, run_draw, 2)
    assert set(sums) == {32 * 32} and counts == {32 * 32: all_counts[32 * 32]}  # 64-wide maps never computed
    assert torch.equal(sums[32 * 32], all_sums[32 * 32])
    # no layer narrow enough (max_width 8): every layer is recorded instead (draw 0 once more), as without a limit
    sums, counts = record_self_attention(unet_sites(sd1_unet), hw, run_draw, 2, max_width=8)
    assert counts == all_counts and all(torch.equal(sums[n], all_sums[n]) for n in all_sums)


# ----------------------------------------------------------------------------- handle search
def object_predictor(latents: torch.Tensor, mask: torch.Tensor, position: int):
    """A 'model' whose x0 guess is the latents scaled by the first value of the row at ``position``: the row
    with value 1 explains the image exactly (eps loss 0), others by |value - 1|. Outside ``mask`` it is wrong
    whatever the row, which the masked search must ignore."""
    ac = torch.linspace(0.99, 0.01, 1000)

    def predict(x_t, t, ctx):
        a = ac[t].view(-1, 1, 1, 1)
        x0 = latents * ctx[:, position, 0].view(-1, 1, 1, 1)
        x0 = torch.where(mask.bool().expand_as(x0), x0, x0 + 5.0)
        return (x_t - a.sqrt() * x0) / (1 - a).sqrt()
    return predict, ac


def test_the_handle_search_picks_the_row_that_explains_the_masked_object():
    from core.extract import handle_search_losses, start_handles

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 1, 8, 8)
    mask[..., 2:6, 1:5] = 1
    predict, ac = object_predictor(latents, mask, position=4)
    rows = torch.zeros(4, 16)
    rows[:, 0] = torch.tensor([0.5, 2.0, 1.0, 0.8])
    context = torch.randn(1, 10, 16)
    losses = handle_search_losses(predict, latents, mask, context, [4], rows, ac)
    assert int(losses.argmin()) == 2 and float(losses[2]) < 1e-8
    assert losses.argsort().tolist() == [2, 3, 0, 1]  # order of |value - 1| (the loss grows with the x0 error)
    assert torch.equal(losses, handle_search_losses(predict, latents, mask, context, [4], rows, ac))
    handle = torch.full((2, 16), 7.0)  # a word of two sub-tokens: both rows start from the chosen candidate
    assert start_handles([handle], rows, [losses]) == [2]
    assert torch.equal(handle, rows[2].expand(2, -1))


def test_the_handle_search_says_when_the_model_gives_nans():
    from core.extract import handle_search_losses
    from core.training import TrainingDivergedError

    latents = torch.randn(1, 4, 8, 8)
    mask = torch.ones(1, 1, 8, 8)
    with pytest.raises(TrainingDivergedError, match="not finite"):
        handle_search_losses(lambda x, t, c: x * float("nan"), latents, mask, torch.zeros(1, 6, 8), [2],
                             torch.zeros(2, 8), torch.linspace(0.99, 0.01, 1000))


def test_extraction_starts_each_handle_from_its_best_candidate(sd1_unet, vae, tokenizer, text_encoder,
                                                                two_object_image, tmp_path):
    from core.extract import candidate_phrases, load_concepts, save_concepts
    from core.patching.diffusers import candidate_rows

    img, masks = two_object_image
    phrases = candidate_phrases(" a red square, a blue circle ,, a dog ")
    assert phrases == ["a red square", "a blue circle", "a dog"]
    cfg = ExtractConfig(handle_steps=0, joint_steps=0, seed=1)  # no training: the handles are the start
    cs = extract_concepts(sd1_unet, vae, tokenizer, text_encoder, img, masks, ["sks", "toy"], resolution=32,
                          views=2, flip=False, config=cfg, start_phrases=phrases)
    rows = candidate_rows(tokenizer, text_encoder, phrases)
    assert len(cs.start_phrases) == 2 and all(p in phrases for p in cs.start_phrases)
    for handle, chosen in zip(cs.handles, cs.start_phrases, strict=True):
        assert torch.equal(handle, rows[phrases.index(chosen)].expand_as(handle))
    plain = extract_concepts(sd1_unet, vae, tokenizer, text_encoder, img, masks, ["sks", "toy"], resolution=32,
                             views=2, flip=False, config=cfg)
    assert plain.start_phrases == [] and not torch.equal(plain.handles[0], cs.handles[0])
    path = str(tmp_path / "started.safetensors")
    save_concepts(cs, path)
    assert load_concepts(path).start_phrases == cs.start_phrases


def test_a_concept_set_saved_before_start_phrases_and_sentences_existed_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from core.extract import ConceptSet, load_concepts, save_concepts

    path, old = str(tmp_path / "new.safetensors"), str(tmp_path / "old.safetensors")
    save_concepts(ConceptSet(["sks"], [torch.randn(1, 8)], start_phrases=["a red circle"]), path)
    with safe_open(path, framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k not in ("start_phrases", "sentence")}
        save_file({k: f.get_tensor(k) for k in f.keys()}, old, metadata=meta)
    assert load_concepts(path).start_phrases == ["a red circle"]
    back = load_concepts(old)
    assert back.start_phrases == [] and back.tokens == ["sks"] and back.sentence == "a photo of {}"


def test_the_sentence_places_the_concepts_words_and_a_bad_one_says_what_to_fix():
    from core.extract import DEFAULT_SENTENCE, check_sentence, subset_prompt

    assert check_sentence("") == DEFAULT_SENTENCE == "a photo of {}"
    assert check_sentence(" {} on a wooden table ") == "{} on a wooden table"
    for bad in ("a photo of sks", "{} and {}"):
        with pytest.raises(ExtractionError, match="exactly one"):
            check_sentence(bad)
    assert subset_prompt(["sks", "ohwx"], (0, 1), "{} on a wooden table") == "sks and ohwx on a wooden table"
    assert subset_prompt(["sks", "ohwx"], (1,)) == "a photo of ohwx"  # Break-A-Scene's, as before


def test_a_candidate_row_is_its_phrase_s_word_even_when_the_sentence_repeats_it(tokenizer, text_encoder):
    from core.patching.diffusers import candidate_rows, concept_positions, encode_text

    rows = candidate_rows(tokenizer, text_encoder, ["a red circle"], "{} next to a circle")
    full = encode_text(tokenizer, text_encoder, ["a red circle next to a circle"]).float()[0]
    first = concept_positions(tokenizer, "a red circle", ["circle"])  # the word's sub-tokens, first occurrence
    both = concept_positions(tokenizer, "a red circle next to a circle", ["circle"])
    assert len(both) == 2 * len(first)
    assert torch.equal(rows[0], full[max(first)]) and not torch.equal(rows[0], full[max(both)])


def test_concepts_are_learned_in_the_given_sentence_and_the_file_keeps_it(sd1_unet, vae, tokenizer, text_encoder,
                                                                         two_object_image, tmp_path):
    from core.extract import load_concepts, save_concepts
    from core.patching.diffusers import concept_positions, encode_text

    img, masks = two_object_image
    cfg = ExtractConfig(handle_steps=0, joint_steps=0, seed=1)  # no training: each handle is its word's row
    cs = extract_concepts(sd1_unet, vae, tokenizer, text_encoder, img, masks, ["sks", "toy"], resolution=32,
                          views=2, flip=False, config=cfg, sentence="{} on a wooden table")
    prompt = "sks on a wooden table"
    row = encode_text(tokenizer, text_encoder, [prompt]).float()[0, concept_positions(tokenizer, prompt, ["sks"])]
    assert torch.equal(cs.handles[0], row) and cs.sentence == "{} on a wooden table"
    plain = extract_concepts(sd1_unet, vae, tokenizer, text_encoder, img, masks, ["sks", "toy"], resolution=32,
                             views=2, flip=False, config=cfg)
    assert plain.sentence == "a photo of {}" and not torch.equal(plain.handles[0], cs.handles[0])
    path = str(tmp_path / "table.safetensors")
    save_concepts(cs, path)
    assert load_concepts(path).sentence == "{} on a wooden table"
    with pytest.raises(ExtractionError, match="exactly one"):
        extract_concepts(sd1_unet, vae, tokenizer, text_encoder, img, masks, ["sks", "toy"], resolution=32,
                         views=2, flip=False, config=cfg, sentence="on a wooden table")
