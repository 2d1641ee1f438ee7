#!/usr/bin/env python3
"""Generate a small sample LoRA dataset: images with an obvious learnable pattern, with captions.

    make_sample_dataset.py [FOLDER]    # prints the folder

Never committed: generated on demand into ``$LORA_LAB_CACHE/fixtures/`` (default
``~/.cache/lora_lab/fixtures/``); an existing complete folder is reused. What the images show and
why: lora_lab_devtools/sample_dataset.py.
"""
from __future__ import annotations

import sys

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.sample_dataset import ensure_sample_dataset


def main(argv: list[str]) -> int:
    sys.stdout.write(f"{ensure_sample_dataset(argv[0] if argv else None)}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
