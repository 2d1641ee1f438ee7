"""The README's node reference is generated from the nodes (scripts/update_readme_reference.py): it
must be current, and the generator must really read the nodes."""
from __future__ import annotations

from lora_lab.training.trainer import TrainSettings
from lora_lab_devtools.readme_reference import current_and_generated, reference


def test_readme_node_reference_is_current():
    text, generated = current_and_generated()
    assert text == generated, "README's node reference is stale: run scripts/update_readme_reference.py"


def test_reference_rows_come_from_the_settings_fields():
    text = reference()
    steps = TrainSettings.__dataclass_fields__["steps"].metadata["setting"]
    assert f"| `steps` | INT 1..1000000 | 1000 | {steps.help} |" in text
    for name in TrainSettings.__dataclass_fields__:
        assert f"| `{name}`" in text, name
