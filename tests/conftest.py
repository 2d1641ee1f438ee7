"""Shared test set-up.

The pack's root folder is a ComfyUI custom-node package whose ``__init__.py`` needs ComfyUI. Unit
tests import the ComfyUI-agnostic library as ``lora_lab.training...``: ``lora_lab`` is registered
as a package rooted at the checkout *without* running its ``__init__.py``. The import path (the
checkout for ``lora_lab_devtools``, tests/ for ``support``) is set by pyproject.toml's pythonpath.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from lora_lab_devtools.environment import REPO_ROOT, find_comfyui_dir, register_lora_lab_package

register_lora_lab_package()


@pytest.fixture(scope="session")
def comfyui_dir() -> Path:
    return find_comfyui_dir()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
