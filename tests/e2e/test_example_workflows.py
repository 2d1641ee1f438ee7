"""Every shipped example workflow fits the running server's node schemas, and runs."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from workflow_api import check_workflow, to_api_prompt  # noqa: E402

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
# Inputs whose value names a user's file (checked as strings only).
FREE_COMBOS = ("ckpt_name", "lora_name")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_fits_the_server_schema(path, object_info):
    workflow = json.loads(path.read_text())
    assert check_workflow(workflow, object_info, FREE_COMBOS) == []


def test_the_check_notices_a_removed_or_reordered_input(object_info):
    workflow = json.loads((EXAMPLES[0].parent / "compare_schedules.json").read_text())
    removed = copy.deepcopy(object_info)
    del removed["LoRALabLRSchedule"]["input"]["required"]["power"]
    assert any("widget values saved, the node has" in problem for problem in check_workflow(workflow, removed))
    reordered = copy.deepcopy(object_info)
    required = reordered["LoRALabLRSchedule"]["input"]["required"]
    reordered["LoRALabLRSchedule"]["input"]["required"] = dict(reversed(list(required.items())))
    reordered["LoRALabLRSchedule"].pop("input_order", None)
    assert any("does not fit" in problem for problem in check_workflow(workflow, reordered))


def test_compare_schedules_runs(server, object_info):
    workflow = json.loads((EXAMPLES[0].parent / "compare_schedules.json").read_text())
    prompt = to_api_prompt(workflow, object_info)
    entry = server.run(prompt, timeout=300)
    previews = [images for output in entry["outputs"].values() for images in output.get("images", [])]
    assert len(previews) == 5  # four schedule charts and the per-part chart
    for image in previews:
        assert server.output_file(image).exists()
