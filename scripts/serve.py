#!/usr/bin/env python3
"""`make serve PORT=8188`: a headless ComfyUI with the pack (API, and the UI when the frontend is installed)."""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=8188)
    parser.add_argument("--listen", default="127.0.0.1")
    arguments, rest = parser.parse_known_args()
    comfyui_dir = Path(os.environ["LORA_LAB_COMFYUI_DIR"])
    command = [sys.executable, "main.py", "--listen", arguments.listen, "--port", str(arguments.port)]
    import torch

    if not torch.cuda.is_available():
        command.append("--cpu")
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        empty = comfyui_dir / "user" / "lora_lab_no_frontend"
        empty.mkdir(parents=True, exist_ok=True)
        print("comfyui-frontend-package is not installed: serving the API only "
              "(pip install comfyui-frontend-package for the graph editor)", file=sys.stderr)
        command += ["--front-end-root", str(empty)]
    os.chdir(comfyui_dir)
    os.execv(sys.executable, command + rest)


if __name__ == "__main__":
    sys.exit(main())
