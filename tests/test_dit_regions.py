"""Regions on tiny diffusers SD3 and Flux transformers (``core.regions.dit_region_gates``).

The LoRAs here touch every linear layer (image stream, text stream, Flux's [text | image] single blocks,
modulation and embedders), as community DiT LoRAs do.
"""
import contextlib
import copy

import pytest
import torch
from torch import nn

from core.families import row_kind
from core.hooks.gate import LowRankGate
from core.patching.diffusers_dit import DiTTap, cfg_call, dit_family
from core.regions import Region, RegionError, dit_region_gates
from core.residuals import LowRank, init_residuals

pytest.importorskip("diffusers")

from tests.dit_cases import CONCEPT, LATENT, Case, make_case  # noqa: E402

GRID = (LATENT // 2, LATENT // 2)  # image tokens: rows x columns


@pytest.fixture(scope="module", params=["SD3", "Flux"])
def case(request):
    return make_case(request.param)


def linears(case: Case) -> dict[str, nn.Linear]:
    return {name: m for name, m in case.model.named_modules() if isinstance(m, nn.Linear)}


def random_lora(case: Case, seed: int, rank: int = 2, scale: float = 0.3) -> dict[str, LowRank]:
    gen = torch.Generator().manual_seed(seed)
    return {name: LowRank(torch.randn(rank, m.in_features, generator=gen) * scale,
                          torch.randn(m.out_features, rank, generator=gen) * scale, float(rank), False)
            for name, m in linears(case).items()}


def run(case: Case, gates=()) -> torch.Tensor:
    """The CFG batch's output [uncond, cond] with the gates installed (mask gates need no plan)."""
    with contextlib.ExitStack() as stack:
        for gate in gates:
            stack.enter_context(gate)
        return torch.cat(cfg_call(case.model, case.latents, case.timestep, case.cond, case.uncond, None,
                                  **case.shared))


def gates_for(case: Case, regions, text_layers="skip", rule="argmax", tap=None):
    return dit_region_gates(case.sites, dict(case.model.named_modules()), regions, dit_family(case.model), GRID,
                            text_layers, rule, tap=tap, diffusers=True)


def half(left: bool) -> torch.Tensor:
    """A 64x64 mask of the left or right half of the image."""
    m = torch.zeros(64, 64)
    m[:, :32] = 1.0
    return m if left else 1.0 - m


def merged(case: Case, layers: dict[str, LowRank], strength: float) -> nn.Module:
    """A copy of the model with W + strength * Delta W in every layer: what the stock LoRA loader gives."""
    model = copy.deepcopy(case.model)
    with torch.no_grad():
        for name, layer in layers.items():
            model.get_submodule(name).weight += strength * layer.delta()
    return model


def test_a_full_mask_region_is_the_lora_applied_globally(case):
    """Every layer gated by a mask of ones, text-stream and vector layers applied everywhere: the model with the
    LoRA merged into its weights, to float32 rounding (W x + s Delta W x against (W + s Delta W) x)."""
    layers, strength = random_lora(case, 1), 0.7
    base = run(case)
    out = run(case, gates_for(case, [Region(layers, strength, mask=torch.ones(64, 64))], "everywhere"))
    stock = Case(merged(case, layers, strength), case.latents, case.timestep, case.cond, case.uncond, case.shared)
    reference = run(stock)
    assert (reference - base).abs().max() > 1e-1  # the LoRA changes the output: the identity below can fail
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * float(reference.abs().max()))  # seen: 1.7e-6


def test_an_empty_mask_region_is_the_base_model_exactly(case):
    base = run(case)
    gates = gates_for(case, [Region(random_lora(case, 1), 1.0, mask=torch.zeros(64, 64))])
    assert torch.equal(run(case, gates), base)


def first_gated_output(case: Case, gates, names: list[str]) -> tuple[str, torch.Tensor]:
    """(name, output) of the first of ``names`` to run in one CFG call with ``gates`` installed (hooks registered
    after the gates' see their result)."""
    seen: list = []
    with contextlib.ExitStack() as stack:
        for gate in gates:
            stack.enter_context(gate)
        for n in names:
            handle = case.model.get_submodule(n).register_forward_hook(
                lambda m, i, o, n=n: seen.append((n, o.detach().clone())))
            stack.callback(handle.remove)
        cfg_call(case.model, case.latents, case.timestep, case.cond, case.uncond, None, **case.shared)
    return seen[0]


def test_disjoint_regions_change_only_their_own_image_tokens_at_the_first_gated_layer(case):
    """Left half: LoRA A; right half: LoRA B. At the first layer the regions gate, each image token is the base
    model's outside both regions and exactly the one-region run's inside its region; text rows keep the base."""
    fam = dit_family(case.model)
    a, b = random_lora(case, 1), random_lora(case, 2)
    names = [n for n in a if row_kind(fam, n, diffusers=True) in ("image", "joint")]
    region_a, region_b = Region(a, 1.0, mask=half(True), name="A"), Region(b, 1.0, mask=half(False), name="B")
    name, base = first_gated_output(case, [], names)
    out = {label: first_gated_output(case, gates_for(case, regions), names)
           for label, regions in (("a", [region_a]), ("b", [region_b]), ("ab", [region_a, region_b]))}
    assert {n for n, _ in out.values()} == {name}
    out = {label: o for label, (_, o) in out.items()}
    text = base.shape[1] - GRID[0] * GRID[1] if row_kind(fam, name, diffusers=True) == "joint" else 0
    columns = torch.arange(GRID[0] * GRID[1]) % GRID[1]
    no_text = torch.zeros(text, dtype=torch.bool)
    left = torch.cat([no_text, columns < GRID[1] // 2])
    right = torch.cat([no_text, columns >= GRID[1] // 2])
    assert not torch.equal(out["a"], base) and not torch.equal(out["b"], base)
    assert torch.equal(out["a"][:, ~left], base[:, ~left])
    assert torch.equal(out["b"][:, ~right], base[:, ~right])
    assert torch.equal(out["ab"][:, left], out["a"][:, left])
    assert torch.equal(out["ab"][:, right], out["b"][:, right])
    assert torch.equal(out["ab"][:, :text], base[:, :text])


def test_a_word_region_of_learned_residuals_is_lag(case):
    """A region gated by its words is LAG's gate on the same residual: the same output, bit for bit."""
    rs = init_residuals([s for s, _ in case.sites], fixed_rank=2, seed=3, init_scale=0.5)
    with DiTTap(case.model) as tap:
        with LowRankGate(case.sites, rs, 0.8, localized=True, tap=tap) as gate:
            lag = torch.cat(cfg_call(case.model, case.latents, case.timestep, case.cond, case.uncond, gate, CONCEPT,
                                     **case.shared))
        (region,) = gates_for(case, [Region(rs.layers, 0.8, tokens=list(CONCEPT))], tap=tap)
        with region:
            out = torch.cat(cfg_call(case.model, case.latents, case.timestep, case.cond, case.uncond, region,
                                     CONCEPT, **case.shared))
    assert torch.equal(out, lag)


def test_regions_that_cannot_be_gated_say_what_to_do(case):
    fam = dit_family(case.model)
    lora = random_lora(case, 1)
    with DiTTap(case.model) as tap, pytest.raises(RegionError, match="give this region a mask"):
        gates_for(case, [Region(lora, 1.0, tokens=list(CONCEPT), name="A")], tap=tap)
    text_only = {n: lay for n, lay in lora.items() if row_kind(fam, n, diffusers=True) in ("text", "vector")}
    with pytest.raises(RegionError, match="no layer on image tokens.*'everywhere'"):
        gates_for(case, [Region(text_only, 1.0, mask=half(True), name="T")])
    with pytest.raises(RegionError, match="unknown text_layers"):
        gates_for(case, [Region(lora, 1.0, mask=half(True))], text_layers="inside")
