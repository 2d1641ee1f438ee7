"""Shared test set-up.

The pack's root folder is a ComfyUI custom-node package whose ``__init__.py`` needs ComfyUI. Unit
tests import the ComfyUI-agnostic library as ``lora_lab.training...``: we register ``lora_lab`` as
a package rooted at the checkout *without* running its ``__init__.py``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent

if "lora_lab" not in sys.modules:
    package = types.ModuleType("lora_lab")
    package.__path__ = [str(REPO_ROOT)]
    package.__file__ = str(REPO_ROOT / "__init__.py")
    sys.modules["lora_lab"] = package


def find_comfyui_dir() -> Path:
    """The ComfyUI folder `make setup` provisioned (or the user's COMFYUI_DIR)."""
    configured = os.environ.get("LORA_LAB_COMFYUI_DIR")
    if configured:
        return Path(configured)
    printed = subprocess.run(["python3", str(REPO_ROOT / "scripts" / "setup_env.py"),
                              "print", "comfyui-dir"], check=True, capture_output=True, text=True)
    return Path(printed.stdout.strip())


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    return find_comfyui_dir()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
