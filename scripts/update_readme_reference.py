"""Regenerate the README's "Node reference" from the nodes (lora_lab_devtools/readme_reference.py).

    python3 scripts/setup_env.py run -- scripts/update_readme_reference.py [--check]

--check exits 1 (printing the first differing line) when the README is not current; the unit test
tests/unit/test_readme_reference.py runs the same comparison.
"""
from __future__ import annotations

import sys

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.readme_reference import README, current_and_generated


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
