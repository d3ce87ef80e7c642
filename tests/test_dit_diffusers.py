"""The diffusers DiT backend on tiny random SD3 and Flux transformers (docs/model-families.md section 6).

Flux here has two single blocks, not one: the text rows a single block writes reach the image only through the
next block's attention (the model drops them after the last one), so with one single block "LAG leaves the text
rows at base" would not be visible in the output.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from core import residuals as R
from core.families import family
from core.heatmaps import AttentionRecord, AttentionRecorder, word_maps
from core.hooks.gate import LowRankGate
from core.hooks.plan import cfg_plan
from core.patching.diffusers_dit import DiTTap, cfg_call, dit_family

diffusers = pytest.importorskip("diffusers")

from tests.dit_cases import CONCEPT, FLUX_CFG, LATENT, TEXT, Case, make_case  # noqa: E402


@pytest.fixture(scope="module", params=["SD3", "Flux"])
def case(request):
    return make_case(request.param)


def run(case: Case, gate: LowRankGate | None = None, cfg: bool = True) -> torch.Tensor:
    """The model's output for one call: the CFG batch [uncond, cond] (the uncond row borrows the cond row's
    gate) or the conditional row alone."""
    if cfg:
        return torch.cat(cfg_call(case.model, case.latents, case.timestep, case.cond, case.uncond, gate, CONCEPT,
                                  **case.shared))
    if gate is not None:
        gate.plan = cfg_plan(1, [0], CONCEPT)
    with torch.no_grad():
        return case.model(hidden_states=case.latents, timestep=torch.tensor([case.timestep]), return_dict=False,
                          **case.cond, **case.shared)[0]


def residuals(case: Case, scale: float = 0.5) -> R.ResidualSet:
    return R.init_residuals([s for s, _ in case.sites], fixed_rank=2, seed=3, init_scale=scale,
                            metadata={"base_family": dit_family(case.model).key})


class ImageRowResidual:
    """The global residual written out by hand, restricted to image rows: ``y + s * x Delta W^T`` on image-only
    sites, and on joint sites (Flux single blocks, rows [txt | img]) on the image rows alone."""

    def __init__(self, case: Case, rs: R.ResidualSet, strength: float):
        self.case, self.rs, self.strength = case, rs, strength
        self.handles = []

    def __enter__(self):
        text = self.case.cond["encoder_hidden_states"].shape[1]
        for site, block in self.case.sites:
            delta = self.rs.layers[site.target].delta()
            start = text if site.tokens == "joint" else 0

            def hook(module, inputs, output, delta=delta, start=start):
                out = output.clone()
                out[:, start:] = output[:, start:] + self.strength * F.linear(inputs[0][:, start:], delta)
                return out
            self.handles.append(block.get_submodule(site.module_layer).register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------------ the tap
def test_dit_family_names_the_supported_classes_when_refusing():
    with pytest.raises(ValueError, match="SD3Transformer2DModel.*FluxTransformer2DModel"):
        dit_family(torch.nn.Linear(2, 2))


def test_the_tap_computes_exactly_what_the_stock_processors_compute(case):
    """Bit for bit (torch.equal), with and without a listener; every site reports once per call with the
    processor's layout (SD3 [img | txt], Flux [txt | img], Flux's single blocks included); the stock processors
    are back afterwards."""
    base = run(case)
    stock = [block.attn.processor for _, block in case.sites]
    events = []
    with DiTTap(case.model) as tap:
        assert torch.equal(run(case), base)
        tap.listen(events.append)
        assert torch.equal(run(case), base)
    assert [block.attn.processor for _, block in case.sites] == stock
    n, batch = case.image_tokens, 2
    assert [ev.site for ev in events] == list(range(len(case.sites)))
    image_first = dit_family(case.model).key == "SD3"
    for ev in events:
        assert ev.head_major and ev.q.shape[0] == batch and ev.q.shape[2] == n + TEXT
        assert ev.image == ((0, n) if image_first else (TEXT, n))
        assert ev.text == ((n, TEXT) if image_first else (0, TEXT))


# ------------------------------------------------------------------------------------------ the gate
@pytest.mark.parametrize("localized", [False, True], ids=["global", "LAG"])
def test_a_zero_residual_is_the_base_model(case, localized):
    rs = residuals(case)
    for layer in rs.layers.values():
        layer.up.zero_()
    base = run(case)
    with DiTTap(case.model) as tap, LowRankGate(case.sites, rs, localized=localized, tap=tap) as gate:
        assert torch.equal(run(case, gate), base)


@pytest.mark.parametrize("cfg", [False, True], ids=["cond", "cfg"])
def test_an_all_ones_attention_gate_is_the_global_residual_on_image_tokens(case, cfg):
    """gate = 1 everywhere: y + s * 1 * Delta W x on every image row, for the cond row and the uncond row that
    borrows its gate. SD3's sites are image rows only, so that is the global residual (to float32 rounding,
    1e-6 relative and absolute: the gate's addcmul rounds y + s * d once where the sum rounds twice; measured
    <= 5e-7 on outputs of magnitude ~1). Flux's single blocks also carry text rows, which LAG leaves at
    base: there it is the global residual restricted to image rows, and differs from the unrestricted one."""
    rs, strength = residuals(case), 0.8
    base = run(case, cfg=cfg)
    with DiTTap(case.model) as tap, LowRankGate(case.sites, rs, strength, localized=True, tap=tap,
                                                mask_fn=torch.ones_like) as gate:
        ones = run(case, gate, cfg)
    with LowRankGate(case.sites, rs, strength) as gate:
        glob = run(case, gate, cfg)
    with ImageRowResidual(case, rs, strength):
        image_rows = run(case, cfg=cfg)
    assert (glob - base).abs().max() > 1e-2  # the residual changes the output: the identities below can fail
    assert torch.allclose(ones, image_rows, rtol=1e-6, atol=1e-6)
    if dit_family(case.model).key == "SD3":
        assert torch.allclose(ones, glob, rtol=1e-6, atol=1e-6)
    else:
        assert (ones - glob).abs().max() > 1e-4  # single block 0's text rows reach the image through block 1


@pytest.mark.parametrize("cfg", [False, True], ids=["cond", "cfg"])
def test_an_all_zeros_attention_gate_is_the_base_model(case, cfg):
    rs = residuals(case)
    base = run(case, cfg=cfg)
    with DiTTap(case.model) as tap, LowRankGate(case.sites, rs, localized=True, tap=tap,
                                                mask_fn=torch.zeros_like) as gate:
        assert torch.equal(run(case, gate, cfg), base)


def test_the_median_rule_turns_on_half_of_each_sites_image_tokens(case):
    """maps > median(maps): N // 2 of the N image tokens per concept row (distinct values); the uncond row
    borrows the cond row's mask."""
    rs = residuals(case)
    with DiTTap(case.model) as tap, LowRankGate(case.sites, rs, localized=True, tap=tap) as gate:
        run(case, gate)
        masks = gate.last_masks
    n = case.image_tokens
    assert set(masks) == {s.path for s, _ in case.sites}
    for mask in masks.values():
        assert mask.shape == (2, n)
        assert mask[1].sum() == n // 2
        assert torch.equal(mask[0], mask[1])


def test_a_residual_on_some_blocks_is_gated_by_those_blocks_maps(case):
    """A set trained on a subset of blocks (Train Personalized Residuals' target_blocks) with the tap shared by
    every block: each gated block uses its own block's map, the one a full set with zeros on the other blocks (the
    same hidden states) computes there, not the first block's."""
    rs = residuals(case)
    last = case.sites[-1][0]
    part = R.ResidualSet({last.target: rs.layers[last.target]}, dict(rs.metadata))
    for target, layer in rs.layers.items():  # the full set: the same residual, zero on the other blocks
        if target != last.target:
            layer.up.zero_()
    with DiTTap(case.model) as tap, LowRankGate(case.sites, rs, localized=True, tap=tap) as gate:
        run(case, gate)
        full = gate.last_masks
    with DiTTap(case.model) as tap, LowRankGate(case.sites, part, localized=True, tap=tap) as gate:
        run(case, gate)
        only = gate.last_masks
    assert set(only) == {last.path}
    assert torch.equal(only[last.path], full[last.path])


# ------------------------------------------------------------------------------------------ heatmaps
def test_recorded_maps_of_one_layer_are_probabilities_over_the_prompt(case):
    """The recorder's DiT maps are softmax over the text keys alone: per image token non-negative and summing to
    1 over the prompt's tokens, so disjoint words' maps sum to at most 1. The layer is the last site (on Flux a
    single block, whose text length comes from the tap's pre-hook)."""
    record = AttentionRecord(bins=1)
    record.latent_hw = (LATENT, LATENT)
    with DiTTap(case.model, case.sites[-1:]) as tap, AttentionRecorder(tap, record) as recorder:
        recorder.rows = {0: (1,)}  # the cond row of the CFG batch
        run(case)
    (key, probs), = record.sums.items()
    assert record.counts[key] == 1 and probs.shape == (1, case.image_tokens, TEXT)
    assert probs.min() >= 0
    assert torch.allclose(probs.sum(-1), torch.ones(1, case.image_tokens), atol=1e-5)
    words = word_maps(record, 0, [[1, 2], [3], [5, 6, 7]], normalize=False)
    assert words.min() >= 0 and words.sum(0).max() <= 1 + 1e-5


# ------------------------------------------------------------------------------------------ files
def test_a_dit_residual_file_round_trips_under_comfyui_keys(case, tmp_path):
    """save -> load is bit-identical; keys are diffusion_model.<ComfyUI path>.lora_down/up.weight and .alpha
    (what ComfyUI's LoraLoader reads for these models), Flux's non-square linear2 included; the loaded file is
    accepted for the model it was made for."""
    rs = residuals(case)
    path = R.save(rs, str(tmp_path / "dit.safetensors"))
    back = R.load(path)
    R.check_compatible(back, dit_family(case.model).key, [s for s, _ in case.sites])
    assert back.layers.keys() == rs.layers.keys() and back.metadata == rs.metadata
    for target, layer in rs.layers.items():
        got = back.layers[target]
        assert torch.equal(got.down, layer.down) and torch.equal(got.up, layer.up)
        assert got.alpha == layer.alpha and not got.conv
    with safe_open(path, "pt") as f:
        keys = set(f.keys())
    targets = [s.target for s, _ in case.sites]
    assert keys == {f"diffusion_model.{t}.{k}" for t in targets for k in ("lora_down.weight", "lora_up.weight",
                                                                          "alpha")}
    if dit_family(case.model).key == "SD3":
        assert targets == ["joint_blocks.0.x_block.attn.proj", "joint_blocks.1.x_block.attn.proj"]
    else:
        assert targets == ["double_blocks.0.img_attn.proj", "single_blocks.0.linear2", "single_blocks.1.linear2"]
        linear2 = back.layers["single_blocks.0.linear2"]
        width = FLUX_CFG["attention_head_dim"] * FLUX_CFG["num_attention_heads"]
        assert linear2.down.shape == (2, 5 * width) and linear2.up.shape == (width, 2)  # attn + 4x MLP -> width


def test_another_familys_residual_file_is_refused_on_a_dit_naming_both_families(case):
    """An SD1 file, and the other DiT's file, on this DiT's sites."""
    fam = dit_family(case.model)
    sites = [s for s, _ in case.sites]
    sd1 = R.ResidualSet({"input_blocks.1.1.proj_out": R.LowRank(torch.ones(2, 8), torch.ones(8, 2), 2.0, True)},
                        {"base_family": "SD1"})
    other = residuals(make_case("Flux" if fam.key == "SD3" else "SD3"))
    for rs, label in ((sd1, "Stable Diffusion 1.x"), (other, family(other.family).label)):
        with pytest.raises(R.ResidualFileError) as err:
            R.check_compatible(rs, fam.key, sites)
        assert label in str(err.value) and fam.label in str(err.value)
