from __future__ import annotations

import os

import pytest

from lora_lab_devtools.inprocess import boot


@pytest.fixture(scope="session")
def comfy(comfyui_dir, tmp_path_factory):
    """A real ComfyUI 0.3.75 running in this process with the pack loaded (lora_lab_devtools/inprocess.py)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return boot(comfyui_dir, tmp_path_factory.mktemp("comfy-base"))
