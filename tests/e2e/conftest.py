from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.server import ComfyServer  # noqa: E402


@pytest.fixture(scope="session")
def server(comfyui_dir, tmp_path_factory):
    """One real ComfyUI server (HTTP on a free loopback port) with the pack, for the session."""
    instance = ComfyServer(comfyui_dir, tmp_path_factory.mktemp("server-base")).start()
    yield instance
    instance.stop()
