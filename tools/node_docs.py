"""Writes docs/nodes.md, the reference of every node, from the node schemas themselves.

Run it with ComfyUI's Python (the schemas need comfy_api):

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/venv/bin/python tools/node_docs.py           # writes docs/nodes.md
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/venv/bin/python tools/node_docs.py --check   # fails when stale
    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy/venv/bin/python tools/node_docs.py --stdout  # prints it

tests/comfyui/test_node_docs.py fails when docs/nodes.md differs from what this script writes.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import tempfile
import textwrap
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "nodes.md"
PACKAGE = "comfyui_concepts"
COMMAND = "COMFYUI_PATH=<ComfyUI> <ComfyUI's python> tools/node_docs.py"
FOLDER_FILE = "models-loras-file.safetensors"  # stands for "a file in models/loras" in folder-listed options
FOLDER_OPTION = "(a file in models/loras)"
WIDTH = 116
CATEGORY_TITLES = {"learn": "Learn", "localize": "Localize", "see": "See", "extract": "Extract",
                   "compose": "Compose", "erase": "Erase"}


def load_nodes(comfyui_path: str) -> list:
    """The pack's NODES list, imported the way ComfyUI imports a custom node pack."""
    sys.path.insert(0, comfyui_path)
    from comfy.cli_args import args

    args.cpu = True  # reading schemas needs no GPU
    import folder_paths

    loras = tempfile.mkdtemp(prefix="node-docs-loras-")
    Path(loras, FOLDER_FILE).touch()  # folder listings come out as one known name, whatever is installed
    folder_paths.folder_names_and_paths["loras"] = ([loras], folder_paths.supported_pt_extensions)
    spec = importlib.util.spec_from_file_location(PACKAGE, REPO_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE] = module
    spec.loader.exec_module(module)
    from comfyui_concepts.nodes import NODES

    return NODES


def _paragraph(text: str) -> str:
    return textwrap.fill(" ".join(text.split()), WIDTH, break_long_words=False, break_on_hyphens=False)


def _cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _number(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return re.sub(r"e([+-])0*(\d)", lambda m: f"e{m[1].replace('+', '')}{m[2]}", f"{value:g}")
    if value == 0xFFFFFFFF:
        return "2^32 - 1"
    return str(value)


def _default(kind: str, options: dict) -> str:
    if "default" not in options:
        return ""
    value = options["default"]
    if kind == "STRING":
        if value == "":
            return "(empty)"
        text = value.replace("\n", " / ")
        return f"`{text}`" if len(text) <= 60 else f"`{text[:57]}...`"
    return f"`{_number(value)}`"


def _range(kind: str, spec) -> str:
    if isinstance(spec, list) or kind == "COMBO":  # a combo: its options
        options = spec if isinstance(spec, list) else spec[1].get("options", [])
        return ", ".join(FOLDER_OPTION if o == FOLDER_FILE else f"`{o}`" for o in options)
    options = spec[1] if len(spec) > 1 else {}
    if "min" not in options and "max" not in options:
        return "multiline" if options.get("multiline") else ""
    text = f"{_number(options.get('min', ''))} to {_number(options.get('max', ''))}"
    if "step" in options and kind == "FLOAT":
        text += f", step {_number(options['step'])}"
    return text


def node_section(info: dict) -> list[str]:
    out = [f"### {info['display_name']}", "",
           f"`{info['name']}` · category `{info['category']}`" + (" · output node" if info["output_node"] else ""),
           "", _paragraph(info["description"] or ""), ""]
    rows = []
    for group in ("required", "optional"):
        for name in info["input_order"].get(group, []):
            spec = info["input"][group][name]
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            rows.append(f"| `{name}` | {kind} | {'' if group == 'required' else 'yes'} | {_default(kind, options)} "
                        f"| {_range(kind, spec[0] if kind == 'COMBO' and isinstance(spec[0], list) else spec)} "
                        f"| {_cell(options.get('tooltip', ''))} |")
    if rows:
        out += ["Inputs:", "", "| input | type | optional | default | range / options | what it does |",
                "| --- | --- | --- | --- | --- | --- |", *rows, ""]
    outputs = list(zip(info["output_name"], info["output"], info["output_tooltips"], strict=True))
    if outputs:
        out += ["Outputs:", "", "| output | type | what it is |", "| --- | --- | --- |"]
        out += [f"| `{name}` | {kind} | {_cell(tip or '')} |" for name, kind, tip in outputs]
        out.append("")
    return out


def render(nodes) -> str:
    infos = [node.GET_NODE_INFO_V1() for node in nodes]
    families = list(dict.fromkeys(info["category"].split("/")[1] for info in infos))
    lines = ["# Node reference", "",
             _paragraph(f"Generated from the node schemas by `tools/node_docs.py`; do not edit by hand: `{COMMAND}` "
                        "rewrites it. Inputs and outputs are listed in the order the node shows them; an optional "
                        "input may be left unconnected, or out of an API prompt."), ""]
    for family in families:
        members = [info for info in infos if info["category"].split("/")[1] == family]
        lines += [f"## {CATEGORY_TITLES.get(family, family)}", ""]
        lines += [f"- [{info['display_name']}](#{_anchor(info['display_name'])})" for info in members]
        lines.append("")
        for info in members:
            lines += node_section(info)
    return "\n".join(lines).rstrip() + "\n"


def _anchor(title: str) -> str:
    """GitHub's heading anchor."""
    kept = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
    return kept.replace(" ", "-")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--check", action="store_true", help="exit 1 when docs/nodes.md is stale; write nothing")
    group.add_argument("--stdout", action="store_true", help="print the page instead of writing it")
    args = parser.parse_args(argv)
    comfyui_path = os.environ.get("COMFYUI_PATH")
    if not comfyui_path:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout and run this with its Python")
    text = render(load_nodes(comfyui_path))
    if args.stdout:
        sys.stdout.write(text)
        return 0
    if args.check:
        stale = not DOC.exists() or DOC.read_text(encoding="utf-8") != text
        if stale:
            print(f"{DOC} is stale: regenerate it with {COMMAND}", file=sys.stderr)
        return 1 if stale else 0
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text, encoding="utf-8")
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
