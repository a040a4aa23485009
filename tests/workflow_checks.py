"""Checks of UI-format workflows against node definitions (ComfyUI's /object_info shape).

Used by the unit tier (with definitions built from our NODE_CLASS_MAPPINGS plus the few core nodes the workflows
use) and by the engine tier (with the real server's /object_info).
"""

from __future__ import annotations

import json
import os

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN"}
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
WORKFLOWS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "workflows")


API_DIR = os.path.join(WORKFLOWS_DIR, "api")


def _load_all(folder: str) -> dict[str, dict]:
    return {n: json.load(open(os.path.join(folder, n), encoding="utf-8"))
            for n in sorted(os.listdir(folder)) if n.endswith(".json")}


def ui_workflows() -> dict[str, dict]:
    """workflows/<name>.json by file name (what ComfyUI's Templates browser lists)."""
    return _load_all(WORKFLOWS_DIR)


def api_workflows() -> dict[str, dict]:
    """workflows/api/<name>.json by file name (the same names as the UI files)."""
    return _load_all(API_DIR)


def object_info_from_classes(mappings: dict) -> dict:
    """/object_info-shaped definitions from V1 node classes."""
    info = {}
    for name, cls in mappings.items():
        spec = cls.INPUT_TYPES()
        info[name] = {"input": {g: {k: list(v) for k, v in spec.get(g, {}).items()} for g in ("required", "optional")},
                      "output": list(cls.RETURN_TYPES),
                      "output_name": list(getattr(cls, "RETURN_NAMES", cls.RETURN_TYPES))}
    return info


def _inputs(node_info: dict) -> list[tuple[str, list]]:
    out = []
    for group in ("required", "optional"):
        out += list((node_info["input"].get(group) or {}).items())
    return out


def _is_widget(entry: list) -> bool:
    typ = entry[0]
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES or typ == "COMBO"


def _extra_widget_values(name: str, entry: list) -> int:
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    n = 0
    if entry[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
        n += 1
    if opts.get("image_upload"):
        n += 1
    return n


def _check_value(name: str, entry: list, value) -> str | None:
    typ = entry[0]
    opts = entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {}
    if isinstance(typ, list) or typ == "COMBO":
        choices = typ if isinstance(typ, list) else opts.get("options", [])
        return None if value in choices else f"{name}={value!r} is not one of {choices[:8]}"
    if typ == "INT":
        if not isinstance(value, int) or isinstance(value, bool):
            return f"{name}={value!r} is not an int"
    elif typ == "FLOAT":
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return f"{name}={value!r} is not a number"
    elif typ == "BOOLEAN":
        return None if isinstance(value, bool) else f"{name}={value!r} is not a bool"
    elif typ == "STRING":
        return None if isinstance(value, str) else f"{name}={value!r} is not a string"
    if "min" in opts and value < opts["min"]:
        return f"{name}={value} is below min {opts['min']}"
    if "max" in opts and value > opts["max"]:
        return f"{name}={value} is above max {opts['max']}"
    return None


def widget_values_by_name(node: dict, node_info: dict) -> tuple[dict, list[str]]:
    """Map a UI node's positional widgets_values to input names (the frontend's order), with problems found."""
    values = list(node.get("widgets_values") or [])
    named, errors = {}, []
    for name, entry in _inputs(node_info):
        if not _is_widget(entry):
            continue
        if not values:
            errors.append(f"node {node['id']} ({node['type']}): no widget value for {name}")
            break
        named[name] = values.pop(0)
        err = _check_value(name, entry, named[name])
        if err:
            errors.append(f"node {node['id']} ({node['type']}): {err}")
        for _ in range(_extra_widget_values(name, entry)):
            extra = values.pop(0) if values else None
            if extra is None:
                errors.append(f"node {node['id']} ({node['type']}): missing the extra widget value after {name}")
            elif isinstance(extra, str) and entry[0] == "INT" and extra not in CONTROL_VALUES:
                errors.append(f"node {node['id']} ({node['type']}): {extra!r} is not a control-after-generate value")
    if values:
        errors.append(f"node {node['id']} ({node['type']}): {len(values)} widget values too many: {values}")
    return named, errors


def check_ui_workflow(ui: dict, object_info: dict) -> list[str]:
    """Every node type exists, links are consistent, widget values match INPUT_TYPES order and ranges."""
    errors = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        errors.append("duplicate node ids")
    if ui.get("last_node_id", 0) < max(nodes):
        errors.append("last_node_id is smaller than a node id")
    links = {l[0]: l for l in ui["links"]}
    if links and ui.get("last_link_id", 0) < max(links):
        errors.append("last_link_id is smaller than a link id")
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        info = object_info.get(n["type"])
        if info is None:
            errors.append(f"node {n['id']}: unknown node type {n['type']}")
            continue
        _, errs = widget_values_by_name(n, info)
        errors += errs
        link_inputs = [(k, v) for k, v in _inputs(info) if not _is_widget(v)]
        for slot, inp in enumerate(n.get("inputs", [])):
            if inp.get("link") is None:
                continue
            link = links.get(inp["link"])
            if link is None:
                errors.append(f"node {n['id']}: input {inp['name']} refers to missing link {inp['link']}")
                continue
            if link[3] != n["id"] or link[4] != slot:
                errors.append(f"link {link[0]} does not end at node {n['id']} slot {slot}")
        declared = {k: v[0] for k, v in link_inputs}
        for inp in n.get("inputs", []):
            if inp["name"] not in declared:
                errors.append(f"node {n['id']}: input {inp['name']} is not a link input of {n['type']}")
            elif declared[inp["name"]] != inp["type"]:
                errors.append(f"node {n['id']}: input {inp['name']} has type {inp['type']}, expected {declared[inp['name']]}")
        for inp_name, entry in _inputs(info):
            if n["type"] and not _is_widget(entry) and inp_name in (info["input"].get("required") or {}):
                if not any(i["name"] == inp_name and i.get("link") is not None for i in n.get("inputs", [])):
                    errors.append(f"node {n['id']} ({n['type']}): required input {inp_name} is not connected")
        for slot, out in enumerate(n.get("outputs", [])):
            if slot >= len(info["output"]) or info["output"][slot] != out["type"]:
                errors.append(f"node {n['id']}: output {slot} type {out['type']} does not match {info['output']}")
            for lid in out.get("links") or []:
                link = links.get(lid)
                if link is None or link[1] != n["id"] or link[2] != slot:
                    errors.append(f"node {n['id']}: output {slot} lists link {lid} that does not start there")
    for l in ui["links"]:
        lid, src, src_slot, dst, dst_slot, typ = l
        if src not in nodes or dst not in nodes:
            errors.append(f"link {lid} connects missing nodes")
            continue
        outs = nodes[src].get("outputs", [])
        if src_slot >= len(outs) or outs[src_slot]["type"] != typ:
            errors.append(f"link {lid}: type {typ} does not match the source output")
    return errors


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """What the frontend would POST for this UI workflow (graphToPrompt, without frontend-only nodes)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY or n.get("mode", 0) != 0:
            continue
        inputs, _ = widget_values_by_name(n, object_info[n["type"]])
        for inp in n.get("inputs", []):
            if inp.get("link") is not None:
                link = links[inp["link"]]
                inputs[inp["name"]] = [str(link[1]), link[2]]
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api
