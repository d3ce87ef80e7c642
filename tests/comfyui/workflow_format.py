"""Convert between API-format prompts and UI-format workflows with a server's /object_info.

``python -m tests.comfyui.workflow_format URL`` regenerates workflows/*.json (UI format, what the editor and
the template browser load) from workflows/api/*.json (what /prompt runs), so the two never drift;
test_workflow_format checks they agree.
"""
import json
import sys
import urllib.request
import uuid
from pathlib import Path

WORKFLOWS = Path(__file__).resolve().parent.parent.parent / "workflows"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _inputs(info):
    """[(name, spec)] in the order the editor shows them: required, then optional."""
    out = []
    for section in ("required", "optional"):
        order = info.get("input_order", {}).get(section) or list(info["input"].get(section, {}))
        out += [(name, info["input"][section][name]) for name in order]
    return out


def _is_widget(spec):
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _control_after_generate(spec):
    return len(spec) > 1 and isinstance(spec[1], dict) and bool(spec[1].get("control_after_generate"))


def api_to_ui(prompt, object_info):
    """A UI-format workflow (version 0.4) laying ``prompt``'s nodes out in columns by graph depth."""
    ids = sorted(prompt, key=int)
    depth = {}

    def node_depth(nid):
        if nid not in depth:
            parents = [v[0] for v in prompt[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((node_depth(p) for p in parents), default=-1)
        return depth[nid]

    links, nodes, rows = [], [], {}
    outputs = {nid: {} for nid in ids}
    for nid in ids:
        for name, _spec in _inputs(object_info[prompt[nid]["class_type"]]):
            value = prompt[nid]["inputs"].get(name)
            if isinstance(value, list):
                link_id = len(links) + 1
                src, slot = value
                src_type = object_info[prompt[src]["class_type"]]["output"][slot]
                links.append([link_id, int(src), slot, int(nid), None, src_type])
                outputs[src].setdefault(slot, []).append(link_id)
    link_by_target = {(lk[3], i): lk for i, lk in enumerate(links)}
    for order, nid in enumerate(sorted(ids, key=lambda n: (node_depth(n), int(n)))):
        node = prompt[nid]
        info = object_info[node["class_type"]]
        inputs, widgets = [], []
        for name, spec in _inputs(info):
            value = node["inputs"].get(name)
            if isinstance(value, list):
                lk = next(lk for (tgt, _), lk in link_by_target.items()
                          if tgt == int(nid) and lk[4] is None and lk[1] == int(value[0]) and lk[2] == value[1])
                lk[4] = len(inputs)
                inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str) else "COMBO", "link": lk[0]})
            elif _is_widget(spec):
                widgets.append(value if name in node["inputs"] else (spec[1] or {}).get("default"))
                if _control_after_generate(spec):
                    widgets.append("fixed")
        outs = [{"name": oname, "type": otype, "links": outputs[nid].get(slot, []), "slot_index": slot}
                for slot, (oname, otype) in enumerate(zip(info["output_name"], info["output"], strict=True))]
        col = node_depth(nid)
        multiline = sum(1 for name, spec in _inputs(info)
                        if _is_widget(spec) and not isinstance(node["inputs"].get(name), list)
                        and len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("multiline"))
        height = 40 + 22 * max(len(inputs), len(outs)) + 24 * len(widgets) + 110 * multiline
        y = rows.get(col, 40)
        rows[col] = y + height + 60  # next node in this column starts below this one
        entry = {"id": int(nid), "type": node["class_type"], "pos": [40 + 400 * col, y],
                 "size": [360, height], "flags": {}, "order": order, "mode": 0,
                 "inputs": inputs, "outputs": outs, "properties": {"Node name for S&R": node["class_type"]},
                 "widgets_values": widgets}
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name"):
            entry["title"] = title
        nodes.append(entry)
    return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, json.dumps(prompt, sort_keys=True))), "revision": 0,
            "last_node_id": max(int(n) for n in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(workflow, object_info):
    """The API prompt the editor would queue for ``workflow`` (active nodes only)."""
    links = {lk[0]: lk for lk in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) != 0:
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        for name, spec in _inputs(info):
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif _is_widget(spec) and values:
                inputs[name] = values.pop(0)
                if _control_after_generate(spec) and values:
                    values.pop(0)
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def main(url, names=()):
    """Write the UI twin of every API workflow (or only of ``names``, file stems)."""
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=30) as r:
        object_info = json.load(r)
    for api in sorted((WORKFLOWS / "api").glob("*.json")):
        if names and api.stem not in names:
            continue
        ui = api_to_ui(json.loads(api.read_text()), object_info)
        (WORKFLOWS / api.name).write_text(json.dumps(ui, indent=1) + "\n")
        print("wrote", WORKFLOWS / api.name)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8188", sys.argv[2:])
