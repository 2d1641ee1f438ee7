"""Contracts other tools rely on: `make -s python` / `make -s comfyui-dir`, and the pack metadata."""
from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", ["python", "comfyui-dir"])
def test_make_prints_exactly_one_line(target):
    completed = subprocess.run(["make", "-s", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, completed.stdout
    path = Path(lines[0])
    assert path.exists()
    if target == "comfyui-dir":
        assert (path / "main.py").exists() and (path / "comfy").is_dir()
        linked = [entry for entry in (path / "custom_nodes").iterdir() if entry.resolve() == REPO_ROOT]
        assert linked, "the pack is not linked into the ComfyUI custom_nodes"


def test_runtime_requirements_never_include_torch():
    names = []
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0].lower())
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    declared = [re.split(r"[<>=!~\[ ;]", item, maxsplit=1)[0].lower() for item in project["project"]["dependencies"]]
    assert sorted(names) == sorted(declared)  # requirements.txt mirrors pyproject
    assert not {"torch", "torchvision", "torchaudio"} & set(names)
    assert {"diffusers", "peft", "safetensors", "matplotlib"} <= set(names)
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "LoRA Lab" and (REPO_ROOT / comfy["Icon"]).exists()
