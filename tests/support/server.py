"""The real-server driver lives in scripts/comfy_server.py (the demo uses it too)."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from comfy_server import ComfyServer, free_port, prepare_base_dir  # noqa: E402,F401
