"""Regenerate the README's "Node reference" from the nodes themselves (whose widgets come from the
settings dataclasses: training/settings.py), so the README cannot drift from the editor.

    python3 scripts/setup_env.py run -- scripts/update_readme_reference.py [--check]

--check exits 1 (printing the first differing line) when the README is not current; the unit test
tests/unit/test_readme_reference.py runs the same comparison.
"""
from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
README = REPO_ROOT / "README.md"
START = "## Node reference\n"
END = "## The file and other tools\n"
INTRO = """Every input of the four nodes, in widget order (the order is a public API: saved workflows store
widget values by position, so new inputs are only ever appended). The text is the tooltip the editor
shows on hover. A step is one optimizer update.
"""
ORDER = ("LoRALabDataset", "LoRALabLRSchedule", "LoRALabLearningRates", "LoRALabTrain")


def pack_nodes():
    """The pack's nodes package, imported without the root __init__ (which registers HTTP routes)."""
    if "lora_lab" not in sys.modules:
        package = types.ModuleType("lora_lab")
        package.__path__ = [str(REPO_ROOT)]
        sys.modules["lora_lab"] = package
    return importlib.import_module("lora_lab.nodes")


def _number(value, kind: str) -> str:
    return str(int(value)) if kind == "INT" else f"{value:g}"


def _row(name: str, spec: tuple, optional: bool) -> str:
    kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
    label = f"`{name}`" + (" (optional)" if optional else "")
    if isinstance(kind, (list, tuple)):
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


def main() -> int:
    text, generated = current_and_generated()
    if "--check" in sys.argv[1:]:
        if text == generated:
            return 0
        for number, (old, new) in enumerate(zip(text.splitlines(), generated.splitlines()), 1):
            if old != new:
                print(f"README.md:{number}: is\n  {old}\nshould be\n  {new}")
                break
        print("README's node reference is stale: run scripts/update_readme_reference.py")
        return 1
    README.write_text(generated, encoding="utf-8")
    print("README.md: node reference regenerated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
