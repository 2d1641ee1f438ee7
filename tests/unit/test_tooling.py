"""Contracts other tools rely on: `make -s python` / `make -s comfyui-dir`, and the pack metadata."""
from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


def comfyui_versions() -> list[str]:
    """Every ComfyUI the tooling knows; one whose source is not on this machine is skipped."""
    printed = subprocess.run(["python3", "scripts/setup_env.py", "available"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.splitlines()
    return [pytest.param(line.split()[0], marks=() if line.endswith(" ok") else pytest.mark.skip(reason=line))
            for line in printed]


@pytest.mark.parametrize("version", comfyui_versions())
@pytest.mark.parametrize("target", ["python", "comfyui-dir"])
def test_make_prints_exactly_one_line(target, version):
    """`LORA_LAB_COMFYUI=<version> make -s python|comfyui-dir`: one line, that ComfyUI's own environment."""
    environment = {key: value for key, value in os.environ.items() if key not in ("COMFYUI_DIR", "COMFYUI_PYTHON")}
    environment["LORA_LAB_COMFYUI"] = version
    completed = subprocess.run(["make", "-s", target], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
                               env=environment)
    assert completed.returncode == 0, completed.stderr[-2000:]
    lines = completed.stdout.splitlines()
    assert len(lines) == 1, completed.stdout
    path = Path(lines[0])
    assert path.exists()
    if target == "python":
        reported = subprocess.run([str(path), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True,
                                  check=True).stdout.strip()
        assert Path(reported).name == ("venv" if version == "0.3.75" else f"venv-{version}")
    if target == "comfyui-dir":
        assert (path / "main.py").exists() and (path / "comfy").is_dir()
        assert f'"{version}"' in (path / "comfyui_version.py").read_text()
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
    assert {"peft", "safetensors", "matplotlib"} <= set(names)
    comfy = project["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "LoRA Lab" and (REPO_ROOT / comfy["Icon"]).exists()


def test_a_missing_fixture_is_built_once_by_processes_that_want_it_at_once(tmp_path):
    """`make test` runs test processes side by side: two that want the same missing fixture wait for one
    build (lora_lab_devtools.environment.generated_once), a different fixture is not held up."""
    script = tmp_path / "build.py"
    script.write_text(
        "import sys, time\n"
        "from pathlib import Path\n"
        "from lora_lab_devtools.environment import generated_once\n"
        "@generated_once\n"
        "def ensure(name):\n"
        "    target = Path(sys.argv[1]) / name\n"
        "    if target.is_file():\n"
        "        return target\n"
        "    with open(Path(sys.argv[1]) / 'builds.log', 'a') as log:\n"
        "        log.write(name + '\\n')\n"
        "    time.sleep(1.0)\n"
        "    target.write_text('built')\n"
        "    return target\n"
        "print(ensure(sys.argv[2]).read_text())\n")
    environment = {**os.environ, "LORA_LAB_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO_ROOT)}
    processes = [subprocess.Popen(["python3", str(script), str(tmp_path), name], env=environment, text=True,
                                  stdout=subprocess.PIPE) for name in ("a", "a", "a", "b")]
    assert [process.communicate(timeout=60)[0].strip() for process in processes] == ["built"] * 4
    assert sorted((tmp_path / "builds.log").read_text().split()) == ["a", "b"]


def test_make_test_cuts_the_in_process_tier_into_balanced_shards_of_whole_files():
    """scripts/run_tests.py: every file in exactly one shard, each shard in collection order, the heaviest
    shard within the largest file of the lightest; the server tiers are never sharded."""
    import importlib.util
    import sys

    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        spec = importlib.util.spec_from_file_location("run_tests", REPO_ROOT / "scripts" / "run_tests.py")
        run_tests = sys.modules["run_tests"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(run_tests)
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
        sys.modules.pop("run_tests", None)
    files = run_tests.in_process_files()
    assert files and not any(file.startswith(("tests/e2e/", "tests/browser/")) for file in files)
    assert files.index("tests/comfy/test_train.py") < files.index("tests/unit/test_dataset.py")
    seconds = {file: float(10 + 37 * index % 200) for index, file in enumerate(files)}
    groups = run_tests.shards(files, seconds)
    assert sorted(file for group, _ in groups for file in group) == sorted(files)
    assert all(group == sorted(group) for group, _ in groups)
    totals = [total for _, total in groups]
    assert len(groups) == -(-sum(seconds.values()) // run_tests.SHARD_SECONDS)
    assert max(totals) - min(totals) <= max(seconds.values())
    planned = run_tests.runs_for("0.33.0", [], subset=False)
    assert [run.arguments for run in planned[:2]] == [["tests/e2e"], ["tests/browser"]]
    assert all(run.tier == "in-process tier" for run in planned[2:])
