"""Saved workflows keep working: every LoRA Lab node still fits tests/node_schema_snapshot.json
(inputs by position: name, required/optional, type, default, combo options; outputs by slot).
Additions at the end are fine; extend the snapshot with scripts/update_schema_snapshot.py."""
from __future__ import annotations

import copy
import json

import pytest

from lora_lab_devtools.node_schema import SNAPSHOT, compatibility_problems, node_schema


# Every test here runs on every ComfyUI of make test (pyproject.toml: compat).
pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def current(comfy):
    return node_schema(comfy.pack.nodes.registry.NODE_CLASS_MAPPINGS)


@pytest.fixture(scope="module")
def snapshot():
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))


def test_every_node_fits_the_committed_snapshot(current, snapshot):
    assert set(snapshot) == {"LoRALabDataset", "LoRALabLRSchedule", "LoRALabLearningRates", "LoRALabTrain",
                             "LoRALabLRFinder"}
    assert compatibility_problems(snapshot, current) == []


def test_the_snapshot_lists_every_node_and_input(current, snapshot):
    missing_nodes = set(current) - set(snapshot)
    assert not missing_nodes, f"run scripts/update_schema_snapshot.py to add {missing_nodes}"
    for node_id, schema in snapshot.items():
        unrecorded = [entry["name"] for entry in current[node_id]["inputs"][len(schema["inputs"]):]]
        assert not unrecorded, f"{node_id}: run scripts/update_schema_snapshot.py to record {unrecorded}"


def breakages(snapshot):
    """Each way of breaking saved workflows, applied to a copy of the snapshot."""
    def edit(change):
        schema = copy.deepcopy(snapshot)
        change(schema["LoRALabTrain"])
        return schema

    inputs = lambda node: node["inputs"]  # noqa: E731
    return {
        "renamed": (edit(lambda node: inputs(node)[6].update(name="step_count")), "name changed"),
        "removed": (edit(lambda node: inputs(node).pop(7)), "name changed"),
        "removed last": (edit(lambda node: inputs(node).pop()), "was removed"),
        "reordered": (edit(lambda node: inputs(node).insert(6, inputs(node).pop(7))), "name changed"),
        "retyped": (edit(lambda node: inputs(node)[9].update(type="FLOAT")), "type changed"),
        "new default": (edit(lambda node: inputs(node)[6].update(default=500)), "default changed"),
        "option dropped": (edit(lambda node: inputs(node)[11]["choices"].remove("attention")), "were removed"),
        "range narrowed": (edit(lambda node: inputs(node)[6].update(max=10)), "max lowered"),
        "made required": (edit(lambda node: inputs(node)[-1].update(section="required")), "section changed"),
        "appended required": (edit(lambda node: inputs(node).append(
            {"name": "extra", "section": "required", "type": "INT", "default": 0})), "are required"),
        "output changed": (edit(lambda node: node["outputs"][2].update(type="INT")), "type changed"),
        "node gone": ({key: value for key, value in snapshot.items() if key != "LoRALabTrain"}, "node is gone"),
    }


@pytest.mark.parametrize("case", ["renamed", "removed", "removed last", "reordered", "retyped", "new default",
                                  "option dropped", "range narrowed", "made required", "appended required",
                                  "output changed", "node gone"])
def test_the_check_catches_each_breaking_change(snapshot, case):
    """The committed snapshot against nodes changed in one breaking way: the check names the change."""
    changed, fragment = breakages(snapshot)[case]
    problems = compatibility_problems(snapshot, changed)
    assert any(fragment in problem for problem in problems), problems


def test_appending_optional_inputs_options_and_outputs_is_allowed(snapshot):
    extended = copy.deepcopy(snapshot)
    node = extended["LoRALabTrain"]
    node["inputs"].append({"name": "new_widget", "section": "optional", "type": "INT", "default": 0})
    node["inputs"][11]["choices"].append("conv_only")
    node["inputs"][6]["max"] = 10_000_000
    node["outputs"].append({"name": "extra", "type": "STRING"})
    extended["LoRALabNewNode"] = {"inputs": [], "outputs": []}
    assert compatibility_problems(snapshot, extended) == []
