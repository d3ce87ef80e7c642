"""Every file the pack reads is checked at load: a broken file raises one error that names it and says what is wrong;
a valid file loads exactly as it was saved."""
import pytest
import torch
from safetensors import safe_open

from core import extract as X
from core import lora_files as L
from core import residuals as R
from core.file_checks import BrokenFileError
from tests.broken_files import LOADERS, build_corpus, corpus_ids, write_valid


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return {b.id: b for b in build_corpus(tmp_path_factory.mktemp("broken-files"))}


@pytest.mark.parametrize("case", corpus_ids())
def test_a_broken_file_raises_one_error_naming_the_file_and_the_problem(corpus, case):
    broken = corpus[case]
    with pytest.raises(BrokenFileError) as info:
        LOADERS[broken.kind](str(broken.path))
    message = str(info.value)
    assert str(broken.path) in message
    for word in broken.words:
        assert word in message, f"{word!r} not in: {message}"
    assert "; " in message  # what is wrong; what to do
    assert info.value.path == str(broken.path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_missing_file_is_named(kind, tmp_path):
    path = tmp_path / "gone.safetensors"
    with pytest.raises(BrokenFileError, match="does not exist") as info:
        LOADERS[kind](str(path))
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kind", ["residuals", "slider", "esd", "uce_erase", "custom_diffusion"])
def test_a_valid_residual_file_loads_bit_identical(kind, tmp_path):
    path = write_valid(kind, tmp_path / f"{kind}.safetensors")
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    rs = R.load(str(path))
    again = R.to_state_dict(rs)
    assert again.keys() == stored.keys()
    for key, t in stored.items():
        assert again[key].dtype == t.dtype and torch.equal(again[key], t), key
    meta.pop("concepts.format_version")
    assert rs.metadata == meta


def test_a_valid_concept_file_loads_bit_identical(tmp_path):
    path = write_valid("concepts", tmp_path / "c.safetensors")
    cs = X.load_concepts(str(path))
    X.save_concepts(cs, str(tmp_path / "again.safetensors"))
    with safe_open(str(path), framework="pt") as a, \
            safe_open(str(tmp_path / "again.safetensors"), framework="pt") as b:
        assert set(a.keys()) == set(b.keys()) and a.metadata() == b.metadata()
        assert all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
    assert cs.tokens == ["sks", "ohwx"] and cs.class_words == ["dog", ""] and cs.start_phrases == ["a dog", "a hat"]


def test_a_valid_lora_file_reads_as_stored_and_maps_onto_sd1(tmp_path):
    path = write_valid("lora", tmp_path / "l.safetensors")
    sd, meta = L.load_lora_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        assert all(sd[k].dtype == f.get_tensor(k).dtype and torch.equal(sd[k], f.get_tensor(k)) for k in f.keys())
    assert meta["base_family"] == "SD1"
    lf = L.read_lora(sd, family="SD1")
    assert set(lf.layers) == {"input_blocks.1.1.transformer_blocks.0.attn2.to_k",
                              "input_blocks.1.1.transformer_blocks.0.attn2.to_v", "middle_block.1.proj_out"}


def test_a_pack_residual_file_reads_as_a_lora_file_too(tmp_path):
    """Concept Region accepts the pack's own files by name: they pass the LoRA checks."""
    path = write_valid("residuals", tmp_path / "r.safetensors")
    sd, meta = L.load_lora_file(str(path))
    assert meta["base_family"] == "SD1" and any(k.endswith("lora_down.weight") for k in sd)


def test_a_pt_lora_state_dict_gets_the_same_value_and_rank_checks(tmp_path):
    sd = {"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": torch.ones(4, 8),
          "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight": torch.ones(8, 3)}
    with pytest.raises(BrokenFileError, match=r"'x\.pt' has factors whose ranks do not match"):
        L.check_lora_tensors(sd, "x.pt")
    sd["lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"] = torch.full((8, 4), float("nan"))
    with pytest.raises(BrokenFileError, match=r"'x\.pt' holds NaN"):
        L.check_lora_tensors(sd, "x.pt")


def test_family_errors_are_unchanged_for_a_sound_file_of_another_family(tmp_path):
    """The file checks come first; a sound file still meets the loaders' own family errors."""
    path = write_valid("lora", tmp_path / "l.safetensors")
    sd, _ = L.load_lora_file(str(path))
    with pytest.raises(L.LoraFamilyError, match="Stable Diffusion"):
        L.read_lora(sd, family="SDXL")
