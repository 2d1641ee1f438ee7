"""Regenerate the files generated from one source (lora_lab_devtools/generated_files.py): README.md's
node reference and web/js/parts.js.

    python3 scripts/setup_env.py run -- scripts/update_generated_files.py [--check]

--check exits 1 (printing the first differing line) when a file is not current; the unit test
tests/unit/test_generated_files.py runs the same comparison.
"""
from __future__ import annotations

import sys

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.generated_files import generated_files


def main() -> int:
    stale = 0
    for path, (text, generated) in generated_files().items():
        if text == generated:
            continue
        if "--check" in sys.argv[1:]:
            stale += 1
            for number, (old, new) in enumerate(zip(text.splitlines() + [""], generated.splitlines() + [""]), 1):
                if old != new:
                    print(f"{path.name}:{number}: is\n  {old}\nshould be\n  {new}")
                    break
        else:
            path.write_text(generated, encoding="utf-8")
            print(f"{path}: regenerated")
    if stale:
        print("stale generated files: run scripts/update_generated_files.py")
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
