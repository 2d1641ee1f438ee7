from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.inprocess import boot  # noqa: E402


@pytest.fixture(scope="session")
def comfy(comfyui_dir, tmp_path_factory):
    """A real ComfyUI 0.3.75 running in this process with the pack loaded (see support/inprocess.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return boot(comfyui_dir, tmp_path_factory.mktemp("comfy-base"))
