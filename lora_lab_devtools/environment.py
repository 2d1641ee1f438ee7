"""Where things are: the checkout, the cache, the ComfyUI the set-up provisioned.

scripts/setup_env.py keeps its own copy of the cache rule: it runs on the bare system Python
before anything is installed and imports nothing of the checkout.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import subprocess
import sys
import types
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup_env.py"


def cache_dir() -> Path:
    """``$LORA_LAB_CACHE`` (default ``~/.cache/lora_lab``): the managed venvs, ComfyUIs and fixtures."""
    return Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora_lab")).expanduser()


def fixtures_dir() -> Path:
    """Where generated fixtures (checkpoints, sample data) are cached; never committed."""
    return cache_dir() / "fixtures"


def generated_once(build):
    """For a function that returns a cached fixture, generating it when missing: `make test` runs test
    processes side by side, and two that want the same missing fixture would both build it (minutes of
    CPU for the big ones). The call holds an exclusive lock named after the function and its arguments,
    so the second waits and then finds the file. (No lock where the platform has no fcntl.)"""
    @functools.wraps(build)
    def locked(*args, **kwargs):
        try:
            import fcntl
        except ImportError:
            return build(*args, **kwargs)
        described = [getattr(value, "__qualname__", None) or repr(value) for value in (*args, *sorted(kwargs.items()))]
        key = hashlib.sha256(repr((build.__module__, build.__qualname__, described)).encode()).hexdigest()[:16]
        locks = fixtures_dir() / ".locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{build.__name__}-{key}.lock", "w") as handle, contextlib.ExitStack() as stack:
            fcntl.flock(handle, fcntl.LOCK_EX)
            stack.callback(fcntl.flock, handle, fcntl.LOCK_UN)
            return build(*args, **kwargs)
    return locked


def find_comfyui_dir() -> Path:
    """The ComfyUI folder `make setup` provisioned (or the user's COMFYUI_DIR)."""
    configured = os.environ.get("LORA_LAB_COMFYUI_DIR")
    if configured:
        return Path(configured)
    printed = subprocess.run(["python3", str(SETUP_SCRIPT), "print", "comfyui-dir"], check=True,
                             capture_output=True, text=True)
    return Path(printed.stdout.strip())


def register_lora_lab_package() -> None:
    """Make the pack's ComfyUI-agnostic library importable as ``lora_lab.training...``.

    The checkout's root is a ComfyUI custom-node package whose ``__init__.py`` needs ComfyUI: the
    package ``lora_lab`` is registered rooted at the checkout *without* running that file.
    """
    if "lora_lab" in sys.modules:
        return
    package = types.ModuleType("lora_lab")
    package.__path__ = [str(REPO_ROOT)]
    package.__file__ = str(REPO_ROOT / "__init__.py")
    sys.modules["lora_lab"] = package
