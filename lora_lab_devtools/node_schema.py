"""Saved-workflow compatibility: the committed snapshot of every LoRA Lab node's inputs and outputs.

Saved UI workflows store widget values by position and links by output slot, so an existing input may
never be renamed, removed, reordered, retyped or given another default, and an output never changed;
new inputs go at the end (optional, with defaults) and new outputs after the existing ones.

tests/comfy/test_node_schema.py checks the running nodes against the snapshot;
scripts/update_schema_snapshot.py extends it (and refuses to drop, rename or reorder anything in it).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from .environment import REPO_ROOT, find_comfyui_dir
from .inprocess import boot

SNAPSHOT = REPO_ROOT / "tests" / "node_schema_snapshot.json"
# Widget options a saved value depends on. Tooltips and display hints may change freely.
RECORDED_OPTIONS = ("default", "min", "max")


def input_entry(section: str, name: str, spec: tuple) -> dict[str, Any]:
    kind = spec[0]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    entry: dict[str, Any] = {"name": name, "section": section}
    if kind == "COMBO" and "options" in options:   # the V3 schema's choice widget
        kind = options["options"]
    if isinstance(kind, (list, tuple)):
        entry["type"], entry["choices"] = "COMBO", list(kind)
    else:
        entry["type"] = kind
    entry.update({key: options[key] for key in RECORDED_OPTIONS if key in options})
    return entry


def node_schema(mappings: dict[str, Any]) -> dict[str, Any]:
    """{node id: {"inputs": [...], "outputs": [...]}} for the given NODE_CLASS_MAPPINGS."""
    schema = {}
    for node_id in sorted(mappings):
        node = mappings[node_id]
        types = node.INPUT_TYPES()
        inputs = [input_entry(section, name, spec) for section in ("required", "optional")
                  for name, spec in types.get(section, {}).items()]
        names = getattr(node, "RETURN_NAMES", None) or node.RETURN_TYPES
        outputs = [{"name": name, "type": kind} for kind, name in zip(node.RETURN_TYPES, names)]
        schema[node_id] = {"inputs": inputs, "outputs": outputs}
    return schema


def _entry_problems(node_id: str, what: str, position: int, old: dict, new: dict | None) -> list[str]:
    where = f"{node_id} {what} #{position + 1} '{old['name']}'"
    if new is None:
        return [f"{where} was removed (saved workflows fill inputs by position: never remove one)"]
    problems = []
    for key in sorted(set(old) - {"choices", "min", "max"}):
        if old.get(key) != new.get(key):
            problems.append(f"{where}: {key} changed from {old.get(key)!r} to {new.get(key)!r}"
                            + (" (renamed or reordered?)" if key == "name" else ""))
    missing = [choice for choice in old.get("choices", []) if choice not in new.get("choices", [])]
    if missing:
        problems.append(f"{where}: options {missing} were removed (saved workflows may use them)")
    if "min" in old and new.get("min", float("-inf")) > old["min"]:
        problems.append(f"{where}: min raised from {old['min']} to {new.get('min')} (saved values may fall outside)")
    if "max" in old and new.get("max", float("inf")) < old["max"]:
        problems.append(f"{where}: max lowered from {old['max']} to {new.get('max')} (saved values may fall outside)")
    return problems


def compatibility_problems(snapshot: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Every way `current` breaks a workflow saved against `snapshot` (empty: compatible)."""
    problems = []
    for node_id, old in snapshot.items():
        new = current.get(node_id)
        if new is None:
            problems.append(f"{node_id}: the node is gone (node ids are a public API)")
            continue
        for what in ("inputs", "outputs"):
            for position, entry in enumerate(old[what]):
                replacement = new[what][position] if position < len(new[what]) else None
                problems += _entry_problems(node_id, what[:-1], position, entry, replacement)
        added = new["inputs"][len(old["inputs"]):]
        required = [entry["name"] for entry in added if entry["section"] == "required"]
        if required:
            problems.append(f"{node_id}: new inputs {required} are required; add them as optional (with a default) "
                            "so saved workflows still validate")
    return problems


def pack_mappings() -> dict[str, Any]:
    """The pack's NODE_CLASS_MAPPINGS, loaded by a real ComfyUI booted in this process."""
    comfy = boot(find_comfyui_dir(), Path(tempfile.mkdtemp(prefix="lora_lab_schema_")))
    return comfy.pack.nodes.registry.NODE_CLASS_MAPPINGS

