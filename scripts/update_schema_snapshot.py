"""Saved-workflow compatibility: the committed snapshot of every LoRA Lab node's inputs and outputs.

Saved UI workflows store widget values by position and links by output slot, so an existing input may
never be renamed, removed, reordered, retyped or given another default, and an output never changed;
new inputs go at the end (optional, with defaults) and new outputs after the existing ones.

    python scripts/update_schema_snapshot.py           # extend tests/node_schema_snapshot.json
    python scripts/update_schema_snapshot.py --check   # only report problems

It refuses to write a snapshot that drops, renames or reorders anything already in it.
(Run with ComfyUI's Python: `make python` prints it.) The checker is lora_lab_devtools/node_schema.py.
"""
from __future__ import annotations

import argparse
import json

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.node_schema import SNAPSHOT, compatibility_problems, node_schema, pack_mappings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report problems, write nothing")
    arguments = parser.parse_args()
    current = node_schema(pack_mappings())
    snapshot = json.loads(SNAPSHOT.read_text(encoding="utf-8")) if SNAPSHOT.is_file() else {}
    problems = compatibility_problems(snapshot, current)
    for problem in problems:
        print(f"incompatible: {problem}")
    if problems:
        print("The snapshot was not changed: fix the node (append new inputs at the end) instead.")
        return 1
    if arguments.check:
        print("compatible with the snapshot")
        return 0
    SNAPSHOT.write_text(json.dumps(current, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {SNAPSHOT} ({len(current)} nodes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
