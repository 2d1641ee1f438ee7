"""The trained parts of a model, and how every chart shows them: one table for the Python charts
(matplotlib, white background) and the editor's canvas charts (web/js, dark background).

web/js/parts.js is generated from this table (`javascript_module`; scripts/update_generated_files.py
writes it, tests/unit/test_generated_files.py checks it is current), so a colour or a label is
changed in one place.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PartStyle:
    label: str           # in summaries and the Python charts' legends
    short_label: str     # in the editor's small canvas legends
    color: str           # on a white background (saved charts)
    color_on_dark: str   # on the editor's dark canvas
    dashed: bool         # drawn dashed (SDXL's TE2 often equals TE, which it inherits: both stay visible)


PARTS: dict[str, PartStyle] = {
    "unet": PartStyle("UNet", "UNet", "#1f77b4", "#4e9eff", False),
    "text_encoder": PartStyle("TE", "TE", "#d62728", "#ff6b6b", False),
    "text_encoder_2": PartStyle("TE2 (SDXL)", "TE2", "#2ca02c", "#5fd068", True),
}
PART_LABELS = {part: style.label for part, style in PARTS.items()}


def javascript_module() -> str:
    """web/js/parts.js: the table for the editor's charts."""
    table = json.dumps({part: asdict(style) for part, style in PARTS.items()}, indent=2)
    return ("// Generated from training/charts/parts.py by scripts/update_generated_files.py: edit that table, not this file.\n"
            f"export const PARTS = {table};\n"
            "export const PART_COLORS = Object.fromEntries(Object.entries(PARTS).map(([part, style]) => "
            "[part, style.color_on_dark]));\n"
            "export const PART_LABELS = Object.fromEntries(Object.entries(PARTS).map(([part, style]) => "
            "[part, style.short_label]));\n")
