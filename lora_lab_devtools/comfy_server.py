"""A real headless ComfyUI server (subprocess) with the pack, spoken to over HTTP."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .environment import REPO_ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare_base_dir(base_dir: Path) -> None:
    for name in ("models/checkpoints", "models/loras", "input", "output", "temp", "custom_nodes", "user", "frontend"):
        (base_dir / name).mkdir(parents=True, exist_ok=True)
    link = base_dir / "custom_nodes" / "lora_lab"
    if link.is_symlink() and link.resolve() != REPO_ROOT:
        link.unlink()  # a base folder reused by another checkout
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)


class BaseDirectoryFolders:
    """models/, input/, output/ of a ComfyUI started with --base-directory (server or in-process)."""

    base_dir: Path

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    @property
    def models_dir(self) -> Path:
        return self.base_dir / "models"

    @property
    def input_dir(self) -> Path:
        return self.base_dir / "input"


def widget_defaults(input_types: dict) -> dict:
    """Every required widget of a node (its INPUT_TYPES()) at its default value; sockets left out."""
    inputs = {}
    for name, spec in input_types["required"].items():
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            inputs[name] = options.get("default", kind[0])
        elif kind == "COMBO":  # V3 nodes list their choices under "options"
            inputs[name] = options.get("default", (options.get("options") or [""])[0])
        elif kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
            inputs[name] = options.get("default", {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}[kind])
    return inputs


class ComfyServer(BaseDirectoryFolders):
    def __init__(self, comfyui_dir: Path, base_dir: Path, front_end_root: Path | None = None,
                 python: str | None = None, extra_args: list[str] | None = None, with_frontend: bool = False,
                 cpu: bool = True, extra_custom_nodes: list[Path] | None = None) -> None:
        """with_frontend: serve the installed comfyui-frontend-package (browser tests); otherwise an
        empty front-end root (API only, no frontend package needed). cpu=False: ComfyUI's default
        device handling (the GPU, and on NVIDIA with ComfyUI 0.3x of 2026 dynamic VRAM)."""
        self.comfyui_dir = Path(comfyui_dir)
        self.base_dir = Path(base_dir)
        prepare_base_dir(self.base_dir)
        for package in extra_custom_nodes or []:   # test-only node packages (tests/support)
            link = self.base_dir / "custom_nodes" / Path(package).name
            if not link.exists():
                link.symlink_to(Path(package).resolve(), target_is_directory=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base_dir / "server.log"
        self.front_end_root = front_end_root
        self.python = python or sys.executable
        self.extra_args = extra_args or []
        self.with_frontend = with_frontend
        self.cpu = cpu
        self.process: subprocess.Popen | None = None
        self.client_id = str(uuid.uuid4())

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        command = [self.python, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port",
                   str(self.port), "--base-directory", str(self.base_dir), "--disable-api-nodes", *self.extra_args]
        if not self.with_frontend:
            command += ["--front-end-root", str(self.front_end_root or self.base_dir / "frontend")]
        environment = dict(os.environ)   # torch's own thread count (every core) unless the caller set one
        self.log_file = open(self.log_path, "wb")
        self.process = subprocess.Popen(command, cwd=self.comfyui_dir, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, env=environment)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.process.returncode}:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if getattr(self, "log_file", None):
            self.log_file.close()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def get(self, path: str):
        status, payload = self.request("GET", path)
        if status != 200:
            raise RuntimeError(f"GET {path} -> {status}: {payload[:500]!r}")
        return json.loads(payload) if payload else None

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        status, payload = self.request("POST", path, body)
        return status, (json.loads(payload) if payload else {})

    def queue(self, prompt: dict) -> str:
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status != 200:
            raise AssertionError(f"POST /prompt refused ({status}): {json.dumps(answer, indent=1)[:3000]}")
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        """Wait until the prompt is in /history; returns its entry (outputs, status)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if history and prompt_id in history:
                entry = history[prompt_id]
                if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                    return entry
            if self.process.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()}")
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} not done within {timeout}s:\n{self.log()[-3000:]}")

    def run(self, prompt: dict, timeout: float = 600.0) -> dict:
        entry = self.wait(self.queue(prompt), timeout)
        status = entry.get("status", {})
        if status.get("status_str") != "success":
            raise AssertionError(f"prompt failed: {json.dumps(status.get('messages'), indent=1)[:4000]}")
        return entry

    def output_file(self, image: dict) -> Path:
        """Path of an image listed in /history outputs ({"filename", "subfolder", "type"})."""
        folder = {"output": "output", "temp": "temp", "input": "input"}[image.get("type", "output")]
        return self.base_dir / folder / image.get("subfolder", "") / image["filename"]
