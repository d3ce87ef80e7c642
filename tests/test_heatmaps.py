"""Per-word heatmaps: recording is read-only, bounded in memory, and the aggregation says where a word lands."""
import pytest
import torch

from core.heatmaps import AttentionRecord, AttentionRecorder, RecordError, overlay, peak, word_maps
from core.patching.diffusers import concept_positions, encode_text, sample, token_ids, unet_sites

PROMPT = "a photo of a red dog on the beach"


@pytest.fixture
def call(tokenizer, text_encoder):
    ctx = encode_text(tokenizer, text_encoder, ["", PROMPT])
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    return x, torch.tensor([400, 400]), ctx


@torch.no_grad()
def test_recording_does_not_change_the_output(unet, call):
    x, t, ctx = call
    base = unet(x, t, encoder_hidden_states=ctx).sample
    record = AttentionRecord()
    record.latent_hw = (8, 8)
    with AttentionRecorder(unet_sites(unet), record) as rec:
        rec.rows = {record.source_of(ctx[1]): (1,)}
        out = unet(x, t, encoder_hidden_states=ctx).sample
    assert torch.equal(out, base)
    assert record.sums, "the recorder saw no cross-attention"


@torch.no_grad()
def test_words_of_one_layer_share_at_most_one_unit_of_attention_per_pixel(sd1_unet, call, tokenizer):
    x, t, ctx = call
    record = AttentionRecord()
    record.latent_hw = (8, 8)
    sites = unet_sites(sd1_unet)[:1]  # one layer
    with AttentionRecorder(sites, record) as rec:
        rec.rows = {record.source_of(ctx[1]): (1,)}
        sd1_unet(x, t, encoder_hidden_states=ctx)
    ids = token_ids(tokenizer, PROMPT)
    n_prompt = ids.index(tokenizer.eos_token_id) + 1
    prompt_words = [[i] for i in range(1, n_prompt - 1)]  # the words, without start and end tokens
    maps = word_maps(record, 0, prompt_words, normalize=False)
    total = maps.sum(dim=0)
    assert float(total.max()) <= 1.0 + 1e-5
    every_token = word_maps(record, 0, [list(range(len(ids)))], normalize=False)
    assert torch.allclose(every_token, torch.ones_like(every_token), atol=1e-5)  # softmax rows sum to 1


def synthetic_record(peaks: dict[int, tuple[int, int]], width: int = 8, tokens: int = 5, rows: int = 1):
    """A record whose token 2 peaks at ``peaks[bin]`` (y, x) on a width x width map; other tokens uniform."""
    record = AttentionRecord()
    record.latent_hw = (width, width)
    for b, (y, x) in peaks.items():
        probs = torch.full((rows, width * width, tokens), 1.0 / tokens)
        probs[:, :, 2] = 0.01
        probs[:, y * width + x, 2] = 0.9
        record.add(0, b, probs)
    return record


def test_a_known_peak_is_found_where_it_was_put():
    record = synthetic_record({0: (2, 5)})
    maps = word_maps(record, 0, [[2]])
    assert peak(maps[0, 0]) == (2, 5)
    assert float(maps.max()) == pytest.approx(1.0)  # normalised per word
    up = word_maps(record, 0, [[2]], size=(32, 32))
    y, x = peak(up[0, 0])
    assert (y // 4, x // 4) == (2, 5)


def test_the_step_range_picks_the_steps_recorded_there():
    record = synthetic_record({0: (1, 1), 9: (6, 6)})  # first tenth of the run vs last tenth
    assert peak(word_maps(record, 0, [[2]], start=0.0, end=0.1)[0, 0]) == (1, 1)
    assert peak(word_maps(record, 0, [[2]], start=0.9, end=1.0)[0, 0]) == (6, 6)
    with pytest.raises(RecordError, match="widen the range"):
        word_maps(synthetic_record({0: (1, 1)}), 0, [[2]], start=0.5, end=0.6)


def test_resolution_choice_and_its_errors():
    record = synthetic_record({0: (2, 5)})
    assert record.widths() == [8]
    with pytest.raises(RecordError, match=r"available widths: \[8\]"):
        word_maps(record, 0, [[2]], widths=[16])
    with pytest.raises(RecordError, match="nothing was recorded"):
        word_maps(AttentionRecord(), 0, [[2]])


@torch.no_grad()
def test_memory_is_bounded_by_bins_not_steps(sd1_unet, tokenizer, text_encoder):
    from diffusers import DDIMScheduler

    cond = encode_text(tokenizer, text_encoder, [PROMPT])
    uncond = encode_text(tokenizer, text_encoder, [""])
    record = AttentionRecord(bins=4)
    widths = 2  # the tiny UNet's two levels
    with AttentionRecorder(unet_sites(sd1_unet), record) as rec:
        for steps in (3, 12):
            sample(sd1_unet, DDIMScheduler(), cond, uncond, (1, 4, 8, 8), steps=steps, recorder=rec)
            assert len(record.sums) <= record.bins * widths
            assert sum(record.counts.values()) == steps * len(unet_sites(sd1_unet))
    idx = concept_positions(tokenizer, PROMPT, ["dog"])
    maps = word_maps(record, 0, [idx])
    assert maps.shape == (1, 1, 8, 8) and float(maps.max()) == pytest.approx(1.0)


def test_overlay_is_word_major_and_keeps_the_image_where_alpha_is_zero():
    images = torch.rand(2, 4, 4, 3)
    maps = torch.rand(3, 2, 4, 4)
    out = overlay(images, maps, alpha=0.0)
    assert out.shape == (6, 4, 4, 3)
    assert torch.allclose(out[2], images[0]) and torch.allclose(out[5], images[1])  # word 1: rows 2, 3
