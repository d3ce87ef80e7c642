"""The UI-format workflows (editor, template browser) and their API twins (headless /prompt) agree."""
import json

import pytest

from .prompts import WORKFLOWS
from .workflow_format import ui_to_api

UI_FILES = sorted(WORKFLOWS.glob("*.json"))


def test_every_ui_workflow_has_an_api_twin_and_vice_versa():
    assert {p.name for p in UI_FILES} == {p.name for p in (WORKFLOWS / "api").glob("*.json")}


@pytest.mark.parametrize("ui_file", UI_FILES, ids=[p.stem for p in UI_FILES])
def test_ui_workflow_queues_the_same_prompt_as_its_api_twin(comfy_server, ui_file):
    object_info = comfy_server.object_info()
    twin = json.loads((WORKFLOWS / "api" / ui_file.name).read_text())
    got = ui_to_api(json.loads(ui_file.read_text()), object_info)
    assert {k: (v["class_type"], v["inputs"]) for k, v in got.items()} == \
        {k: (v["class_type"], v["inputs"]) for k, v in twin.items()}


def test_template_browser_lists_the_workflows(comfy_server):
    templates = comfy_server.get_json("/workflow_templates")
    assert sorted(templates.get("comfyui-concepts", [])) == sorted(p.stem for p in UI_FILES)


def test_every_node_has_tooltips_and_the_pack_prefix(comfy_server):
    info = comfy_server.object_info()
    ours = {k: v for k, v in info.items() if v.get("python_module", "").endswith("comfyui-concepts")}
    assert {"ConceptsTrainResiduals", "ConceptsLoadResiduals", "ConceptsSaveResiduals", "ConceptsApplyResiduals",
            "ConceptsApplyResidualsLocalized", "ConceptsRecordAttention", "ConceptsAttentionHeatmaps"} <= set(ours)
    assert all(name.startswith("Concepts") for name in ours)
    for name, node in ours.items():
        assert node["description"], name
        for section in ("required", "optional"):
            for inp, spec in node["input"].get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"
