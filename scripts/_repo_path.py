"""Puts the checkout's root on ``sys.path``, so the command-line tools here can import the developer
library ``lora_lab_devtools`` (pytest gets the same from ``pythonpath`` in pyproject.toml).

Every script that needs the library starts its imports with ``import _repo_path``: Python puts a
script's own folder (scripts/) first on ``sys.path``, so this module is found from any working
directory. This is the scripts' one ``sys.path`` change. The root goes last, so nothing in it
(nodes/, training/, ...) shadows an installed module or ComfyUI's own (ComfyUI has a ``nodes``).
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if REPO_ROOT not in sys.path:
    sys.path.append(REPO_ROOT)
