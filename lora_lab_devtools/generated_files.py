"""Files generated from the one source of what they show, so they cannot drift from it:

- README.md's "Node reference", from the nodes (whose widgets come from the settings dataclasses:
  training/settings.py);
- web/js/parts.js, the editor charts' part colours and labels, from training/charts/parts.py.

Command line: scripts/update_generated_files.py; check: tests/unit/test_generated_files.py."""
from __future__ import annotations

import importlib
import sys

from .environment import REPO_ROOT, find_comfyui_dir, register_lora_lab_package

README = REPO_ROOT / "README.md"
PARTS_JS = REPO_ROOT / "web" / "js" / "parts.js"
START = "## Node reference\n"
END = "## The file and other tools\n"
INTRO = """Every input of the five nodes, in widget order (the order is a public API: saved workflows store
widget values by position, so new inputs are only ever appended). The text is the tooltip the editor
shows on hover. A step is one optimizer update.
"""
ORDER = ("LoRALabDataset", "LoRALabLRSchedule", "LoRALabLearningRates", "LoRALabTrain", "LoRALabLRFinder")


def pack_nodes():
    """The pack's nodes package, imported without the root __init__ (which registers HTTP routes). The
    nodes declare their schema with ComfyUI's public ``comfy_api`` (importable without starting ComfyUI):
    its folder goes on the path when no ComfyUI is loaded."""
    register_lora_lab_package()
    try:
        importlib.import_module("comfy_api.latest")
    except ImportError:
        sys.path.insert(0, str(find_comfyui_dir()))
    return importlib.import_module("lora_lab.nodes.registry")


def _number(value, kind: str) -> str:
    return str(int(value)) if kind == "INT" else f"{value:g}"


# Choice inputs whose choices are the user's files (the list depends on the machine)
FILE_CHOICES = {"initial_lora": "`[None]` or a file in models/loras"}


def _row(name: str, spec: tuple, optional: bool) -> str:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    label = f"`{name}`" + (" (optional)" if optional else "")
    if kind == "COMBO":   # the V3 schema's choice widget: its choices in options
        kind = options["options"]
    if name in FILE_CHOICES:
        shown_type, default = "choice: " + FILE_CHOICES[name], f"`{options['default']}`"
    elif isinstance(kind, (list, tuple)):
        shown_type = "choice: " + ", ".join(f"`{choice}`" for choice in kind)
        default = f"`{options['default']}`"
    elif kind in ("INT", "FLOAT"):
        shown_type = f"{kind} {_number(options['min'], kind)}..{_number(options['max'], kind)}"
        default = _number(options["default"], kind)
    elif kind == "BOOLEAN":
        shown_type, default = kind, "true" if options["default"] else "false"
    elif kind == "STRING":
        shown_type = kind
        default = f"`{options['default']}`" if options.get("default") else '""'
    else:
        shown_type, default = kind, "(socket)"
    return f"| {label} | {shown_type} | {default} | {options.get('tooltip', '')} |"


def reference() -> str:
    nodes = pack_nodes()
    parts = [START, "\n", INTRO]
    for node_id in ORDER:
        node = nodes.NODE_CLASS_MAPPINGS[node_id]
        inputs = node.INPUT_TYPES()
        parts += [f"\n### {nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]} (`{node_id}`)\n\n", node.DESCRIPTION, "\n\n",
                  "| input | type | default | meaning |\n|---|---|---|---|\n"]
        for section in ("required", "optional"):
            for name, spec in inputs.get(section, {}).items():
                parts.append(_row(name, spec, section == "optional") + "\n")
    parts.append("\n")
    return "".join(parts)


def current_and_generated() -> tuple[str, str]:
    text = README.read_text(encoding="utf-8")
    start, end = text.index(START), text.index(END)
    return text, text[:start] + reference() + text[end:]


def generated_files() -> dict:
    """{path: (current text, generated text)} for every generated file."""
    register_lora_lab_package()
    from lora_lab.training.charts.parts import javascript_module

    text, generated = current_and_generated()
    current_js = PARTS_JS.read_text(encoding="utf-8") if PARTS_JS.is_file() else ""
    return {README: (text, generated), PARTS_JS: (current_js, javascript_module())}
