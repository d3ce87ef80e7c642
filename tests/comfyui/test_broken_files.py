"""Broken files through the real nodes: Load Residuals, Load Concepts and a LoRA region each stop the prompt with one
error that names the file and what is wrong with it."""
import pytest

from tests.broken_files import build_corpus

from .prompts import workflow_prompt

SD15 = "tiny_sd15_random.safetensors"
FOLDER = "tests/broken"

# node that picks the file: (workflow, its input naming the file, the corpus cases it meets)
THROUGH = {
    "ConceptsLoadResiduals": ("apply_residuals", "residual_name", [
        "residuals-random_bytes", "residuals-truncated", "residuals-nan", "residuals-rank_mismatch",
        "residuals-only_handles", "slider-rank_rule_contradicts", "esd-alpha_not_scalar", "uce_erase-inf",
        "custom_diffusion-rank_contradicts"]),
    "ConceptsLoadConcepts": ("apply_saved_concepts", "concepts_name", [
        "concepts-png", "concepts-truncated_header", "concepts-nan", "concepts-no_tokens",
        "concepts-tokens_contradict_handles", "concepts-not_a_concept_set"]),
    "ConceptsRegion": ("compose_regions", "lora_name", [
        "lora-random_bytes", "lora-truncated", "lora-inf", "lora-rank_mismatch", "lora-family_contradicts"]),
}
CASES = [(node, case) for node, (_, _, cases) in THROUGH.items() for case in cases]


@pytest.fixture(scope="module")
def broken_names(comfy_server):
    """{case id: (name as the node lists it, Broken)} for the corpus, written into the server's models/loras."""
    corpus = build_corpus(comfy_server.base_dir / "models" / "loras" / FOLDER)
    return {b.id: (f"{FOLDER}/{b.kind}/{b.path.name}", b) for b in corpus}


def prompt_for(node: str, name: str) -> dict:
    workflow, _, _ = THROUGH[node]
    if node == "ConceptsLoadResiduals":
        return workflow_prompt(workflow, SD15, residual_name=name)
    if node == "ConceptsLoadConcepts":
        return workflow_prompt(workflow, SD15, concepts_name=name)
    p = workflow_prompt(workflow, SD15)
    lora_region = next(k for k, v in p.items() if v["class_type"] == node and v["inputs"]["lora_name"] != "none")
    for k in [k for k, v in p.items() if v["class_type"] in ("ConceptsLoadResiduals", node) and k != lora_region]:
        del p[k]  # only the LoRA region is left: its file is the one read
    p[lora_region]["inputs"].pop("regions", None)
    p[lora_region]["inputs"]["lora_name"] = name
    return p


@pytest.mark.parametrize("node,case", CASES, ids=[c for _, c in CASES])
def test_a_broken_file_stops_the_prompt_naming_the_file_and_the_problem(comfy_server, broken_names, node, case):
    name, broken = broken_names[case]
    error = comfy_server.run_expect_error(prompt_for(node, name))
    reader = "ConceptsApplyRegions" if node == "ConceptsRegion" else node  # a region's file is read when applied
    assert f"({reader}): " in error and "BrokenFileError: The " in error, error
    assert name in error, error
    for word in broken.words:
        assert word in error, f"{word!r} not in: {error}"
