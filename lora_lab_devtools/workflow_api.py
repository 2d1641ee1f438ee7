"""Saved (UI-format) workflows against a running server's /object_info: check and convert.

The graph editor saves each node's widget values as a positional list (`widgets_values`), in
the order of the node's widget inputs (required, then optional), with one extra value after any
input that has a "control after generate" widget (seeds). That is why node inputs are a public
API: this module is what notices when a schema change would break saved workflows.
"""
from __future__ import annotations

import copy

from .environment import REPO_ROOT

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_NAMES = ("seed", "noise_seed")  # the editor adds a control widget to these by name


def is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def has_control_widget(name: str, spec: list) -> bool:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in options:
        return bool(options["control_after_generate"])
    return name in CONTROL_NAMES and spec[0] == "INT"


def widget_inputs(info: dict) -> list[tuple[str, list]]:
    """(name, spec) of every widget input of a node, in saved-workflow order."""
    result = []
    for section in ("required", "optional"):
        for name, spec in info["input"].get(section, {}).items():
            if is_widget(spec):
                result.append((name, spec))
    order = info.get("input_order")
    if order:  # newer servers state the order explicitly
        ranked = {name: index for index, name in enumerate(order.get("required", []) + order.get("optional", []))}
        result.sort(key=lambda item: ranked.get(item[0], len(ranked)))
    return result


def widget_value_map(node: dict, info: dict) -> dict:
    """{input name: saved value} for a UI node, honouring control-widget slots."""
    values = list(node.get("widgets_values") or [])
    mapped, position = {}, 0
    for name, spec in widget_inputs(info):
        if position < len(values):
            mapped[name] = values[position]
        position += 1
        if has_control_widget(name, spec):
            position += 1
    return mapped


def expected_widget_count(info: dict) -> int:
    return sum(1 + has_control_widget(name, spec) for name, spec in widget_inputs(info))


def value_matches(value, spec: list) -> bool:
    kind = spec[0]
    if isinstance(kind, list):
        return value in kind
    if kind == "COMBO":
        options = spec[1].get("options", []) if len(spec) > 1 else []
        return value in options
    if kind == "INT":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "FLOAT":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "STRING":
        return isinstance(value, str)
    if kind == "BOOLEAN":
        return isinstance(value, bool)
    return True


def check_workflow(workflow: dict, object_info: dict, free_combos: tuple[str, ...] = ()) -> list[str]:
    """Problems that would break this saved workflow on this server ([] when none).

    free_combos: inputs whose combo value depends on the user's files (checkpoint names), checked
    for type (string) only.
    """
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    for node in workflow["nodes"]:
        label = f"node {node['id']} ({node['type']})"
        info = object_info.get(node["type"])
        if info is None:
            problems.append(f"{label}: no such node type on the server")
            continue
        saved = node.get("widgets_values") or []
        if isinstance(saved, dict):
            problems.append(f"{label}: widgets_values is an object, expected a list")
            continue
        expected = expected_widget_count(info)
        if len(saved) != expected:
            problems.append(f"{label}: {len(saved)} widget values saved, the node has {expected}")
            continue
        for name, value in widget_value_map(node, info).items():
            spec = dict(widget_inputs(info))[name]
            if name in free_combos and (isinstance(spec[0], list) or spec[0] == "COMBO"):
                if not isinstance(value, str):
                    problems.append(f"{label}: {name} = {value!r} is not a file name")
            elif not value_matches(value, spec):
                problems.append(f"{label}: {name} = {value!r} does not fit {spec[0] if not isinstance(spec[0], list) else 'its choices'}")
        input_types = {name: spec[0] for section in ("required", "optional")
                       for name, spec in info["input"].get(section, {}).items()}
        for slot in node.get("inputs", []):
            if slot["name"] not in input_types:
                problems.append(f"{label}: input {slot['name']!r} does not exist")
    for link in workflow.get("links", []):
        link_id, origin_id, origin_slot, target_id, target_slot, link_type = link[:6]
        origin, target = nodes.get(origin_id), nodes.get(target_id)
        if origin is None or target is None:
            problems.append(f"link {link_id}: dangling")
            continue
        origin_info = object_info.get(origin["type"])
        target_info = object_info.get(target["type"])
        if origin_info is None or target_info is None:
            continue
        outputs = origin_info["output"]
        if origin_slot >= len(outputs):
            problems.append(f"link {link_id}: {origin['type']} has no output {origin_slot}")
            continue
        target_name = target["inputs"][target_slot]["name"]
        target_types = {name: spec[0] for section in ("required", "optional")
                        for name, spec in target_info["input"].get(section, {}).items()}
        wanted = target_types.get(target_name)
        if outputs[origin_slot] != link_type or (wanted != link_type and wanted != "*"):
            problems.append(f"link {link_id}: {origin['type']} output {outputs[origin_slot]} -> "
                            f"{target['type']}.{target_name} ({wanted}), saved as {link_type}")
    return problems


def to_api_prompt(workflow: dict, object_info: dict, overrides: dict | None = None) -> dict:
    """API-format prompt for POST /prompt. overrides: {node title or type: {input: value}}."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted or bypassed
            continue
        info = object_info[node["type"]]
        inputs = widget_value_map(node, info)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                link = links[slot["link"]]
                inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                   "_meta": {"title": node.get("title") or info.get("display_name", node["type"])}}
    for key, values in (overrides or {}).items():
        targets = [entry for entry in prompt.values() if key in (entry["class_type"], entry["_meta"]["title"])]
        if not targets:
            raise KeyError(f"override {key!r}: no node with that type or title in the workflow")
        for entry in targets:
            for name, value in values.items():
                if name not in entry["inputs"]:
                    raise KeyError(f"override {key}.{name}: the node has no such input")
                entry["inputs"][name] = value
    return copy.deepcopy(prompt)


# The example workflow `make demo` runs.
DEMO_WORKFLOW = REPO_ROOT / "example_workflows" / "sd15_train_lora.json"
# The one declared list of inputs that `make demo` and the tests change in the example workflows
# (sd15_train_lora.json, sdxl_train_lora.json); every other value runs as the user would start.
# Keys: what is overridden -> the (node type, input) pairs that carry it. "resolution" is the size
# the graph works at: training size, smallest bucket side (resolution must not be below it) and
# the sampled image size.
DEMO_OVERRIDES: dict[str, tuple[tuple[str, str], ...]] = {
    "checkpoint": (("CheckpointLoaderSimple", "ckpt_name"),),
    "dataset_folder": (("LoRALabDataset", "folder"),),
    "resolution": (("LoRALabDataset", "resolution"), ("LoRALabDataset", "min_bucket_resolution"),
                   ("EmptyLatentImage", "width"), ("EmptyLatentImage", "height")),
    "precision": (("LoRALabTrain", "precision"),),
    "steps": (("LoRALabTrain", "steps"),),
    # KSampler's steps: the sample after training proves the returned MODEL/CLIP carry the LoRA, which 3
    # steps do as well as the saved 25 (on the CPU the SDXL example spent 35 s of its 100 s sampling).
    "sampler_steps": (("KSampler", "steps"),),
}
# What the tiny demo and the tests use with the tiny generated checkpoint on a CPU.
TINY_RUN = {"resolution": 64, "precision": "fp32"}


def declared_overrides(**values) -> dict[str, dict]:
    """{node type: {input: value}} for to_api_prompt (or the editor's widgets) from DEMO_OVERRIDES keys;
    None values are left as saved."""
    unknown = sorted(set(values) - set(DEMO_OVERRIDES))
    if unknown:
        raise KeyError(f"not a declared override: {', '.join(unknown)} (declared: {', '.join(DEMO_OVERRIDES)})")
    result: dict[str, dict] = {}
    for key, value in values.items():
        if value is None:
            continue
        for node_type, input_name in DEMO_OVERRIDES[key]:
            result.setdefault(node_type, {})[input_name] = value
    return result
