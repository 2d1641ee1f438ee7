from __future__ import annotations

import pytest

from lora_lab_devtools.comfy_server import ComfyServer


@pytest.fixture(scope="session")
def server(comfyui_dir, tmp_path_factory):
    """One real ComfyUI server (HTTP on a free loopback port) with the pack, for the session."""
    instance = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("server-base")).start()
    yield instance
    instance.stop()
