"""Closed-form erasure on tiny diffusers SD3 and Flux transformers: the edit of the layers that read the text
encoder's output (``Family.text_entry`` / ``pooled_entry``), rows aligned position by position.

With fewer edit rows than the embedding is wide, the edit meets its constraints up to the ridge term: the edited
entry maps every row of the erased word's encoding to what the base maps the anchor's to, and the preserved words'
rows to their own. Everything after the entry then sees the anchor, so the whole model's output for the erased word
is the base model's output for the anchor.
"""
import copy

import pytest
import torch

from core import erase as E
from core.patching.diffusers_dit import dit_family

pytest.importorskip("diffusers")

from tests.dit_cases import TEXT, Case, make_case  # noqa: E402


@pytest.fixture(scope="module", params=["SD3", "Flux"])
def case(request):
    return make_case(request.param)


def encodings(case: Case, words) -> dict:
    """Random stand-ins for the text encoder: per word, token rows [TEXT, d] and a pooled vector [1, d_pooled]."""
    gen = torch.Generator().manual_seed(5)
    d = case.cond["encoder_hidden_states"].shape[-1]
    dp = case.cond["pooled_projections"].shape[-1]
    return {w: (torch.randn(TEXT, d, generator=gen), torch.randn(1, dp, generator=gen)) for w in words}


def output(model, case: Case, tokens: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    cond = dict(case.cond, encoder_hidden_states=tokens[None], pooled_projections=pooled)
    with torch.no_grad():
        return model(hidden_states=case.latents, timestep=torch.tensor([case.timestep]), return_dict=False, **cond,
                     **case.shared)[0]


def test_the_closed_form_edit_of_the_text_entry_maps_the_erased_word_to_the_anchor(case):
    fam = dit_family(case.model)
    enc = encodings(case, ["red", "", "blue", "green"])
    token_rows = E.build_rows(lambda w: (enc[w][0], 1), ["red"], "", ["blue", "green"], align="positional")
    pooled_rows = E.build_rows(lambda w: (enc[w][1], 1), ["red"], "", ["blue", "green"], align="positional")
    edited = copy.deepcopy(case.model)
    for name, rows in ((fam.text_entry[1], token_rows), (fam.pooled_entry[1], pooled_rows)):
        layer = edited.get_submodule(name)
        weights = [(name, layer.weight)]
        layers, truncation = E.lowrank_edit(weights, E.closed_form_operator(rows, lam=1e-6), rank=0)
        residual, change = E.edit_quality(weights, lambda n, layers=layers: layers[n].delta(), rows)
        assert truncation < 1e-6 and residual < 1e-4 and change < 1e-4  # its constraints: W'E = WA, W'P = WP
        with torch.no_grad():
            layer.weight += layers[name].delta()
    red = output(edited, case, *enc["red"])
    anchor = output(case.model, case, *enc[""])
    assert (output(case.model, case, *enc["red"]) - anchor).abs().max() > 1e-1  # the word matters before the edit
    assert torch.allclose(red, anchor, atol=1e-4 * float(anchor.abs().max()))
    for word in ("blue", "green"):
        base = output(case.model, case, *enc[word])
        assert torch.allclose(output(edited, case, *enc[word]), base, atol=1e-4 * float(base.abs().max()))


def test_positional_rows_need_encodings_padded_alike():
    with pytest.raises(ValueError, match="padded alike"):
        E.positional_rows(torch.zeros(4, 8), torch.zeros(5, 8))
