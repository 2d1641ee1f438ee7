"""Generated files (scripts/update_generated_files.py) must be current, and the generators must
really read their sources: the README's node reference (the nodes) and web/js/parts.js (the parts
table)."""
from __future__ import annotations

import json

from lora_lab.training.charts.parts import PARTS
from lora_lab.training.run.train_settings import TrainSettings
from lora_lab_devtools.generated_files import generated_files, reference


def test_generated_files_are_current():
    for path, (text, generated) in generated_files().items():
        assert text == generated, f"{path.name} is stale: run scripts/update_generated_files.py"


def test_reference_rows_come_from_the_settings_fields():
    text = reference()
    steps = TrainSettings.__dataclass_fields__["steps"].metadata["setting"]
    assert f"| `steps` | INT 1..1000000 | 1000 | {steps.help} |" in text
    for name in TrainSettings.__dataclass_fields__:
        assert f"| `{name}`" in text, name


def test_parts_js_holds_the_parts_table():
    (_, generated), = [pair for path, pair in generated_files().items() if path.name == "parts.js"]
    table = json.loads(generated[generated.index("{"):generated.index("};") + 1])
    assert set(table) == set(PARTS)
    for part, style in PARTS.items():
        assert table[part]["color_on_dark"] == style.color_on_dark and table[part]["short_label"] == style.short_label
