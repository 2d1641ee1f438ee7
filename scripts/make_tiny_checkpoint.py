#!/usr/bin/env python3
"""Generate a tiny, random-weight checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD1.5.

    make_tiny_checkpoint.py [--vega | --full-sd15] [PATH]    # prints the checkpoint's path

Never committed: generated on demand and cached in ``$LORA_LAB_CACHE/fixtures/`` (default
``~/.cache/lora_lab/fixtures/``); an existing file is reused. --vega: the Segmind-Vega-shaped
SDXL-family one; --full-sd15: random weights at the real SD1.5 size (the GPU benchmark). Needs
ComfyUI (set ``LORA_LAB_COMFYUI_DIR`` or let scripts/setup_env.py find it). The generator is
lora_lab_devtools/tiny_checkpoint.py.
"""
from __future__ import annotations

import sys

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.tiny_checkpoint import ensure_full_sd15, ensure_tiny_sd15, ensure_vega_sdxl


def main(argv: list[str]) -> int:
    """make_tiny_checkpoint.py [--vega | --full-sd15] [PATH]"""
    makers = {"--vega": ensure_vega_sdxl, "--full-sd15": ensure_full_sd15}
    chosen = [makers[argument] for argument in argv if argument in makers]
    rest = [argument for argument in argv if argument not in makers]
    path = (chosen[0] if chosen else ensure_tiny_sd15)(rest[0] if rest else None)
    sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
