"""The README's node reference is generated from the nodes (scripts/update_readme_reference.py): it
must be current, and the generator must really read the nodes."""
from __future__ import annotations

import importlib.util

from lora_lab.training.trainer import TrainSettings


def generator(repo_root):
    spec = importlib.util.spec_from_file_location("update_readme_reference",
                                                  repo_root / "scripts" / "update_readme_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_node_reference_is_current(repo_root):
    text, generated = generator(repo_root).current_and_generated()
    assert text == generated, "README's node reference is stale: run scripts/update_readme_reference.py"


def test_reference_rows_come_from_the_settings_fields(repo_root):
    reference = generator(repo_root).reference()
    steps = TrainSettings.__dataclass_fields__["steps"].metadata["setting"]
    assert f"| `steps` | INT 1..1000000 | 1000 | {steps.help} |" in reference
    for name in TrainSettings.__dataclass_fields__:
        assert f"| `{name}`" in reference, name
