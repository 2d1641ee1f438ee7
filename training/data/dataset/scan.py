"""The folder walk behind both the scan and the change check (IS_CHANGED), the folder checks the node
shows, and the content hash both fingerprints use."""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .options import DatasetError

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")   # images
# Video clips, read through PyAV (video.py); a one-frame GIF is a still image.
CLIP_EXTENSIONS = (".mp4", ".webm", ".mov", ".gif")
# kohya's folder convention: "<repeats>_<name>", e.g. "10_sks dog".
REPEATS_FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class ScannedFile:
    # The folder listing's entry (its path is under the walked folder, absolute when that folder is).
    # Kept rather than a Path: the change check hashes thousands of files, and the entry's stat() is
    # cached (free on Windows, where the listing holds it).
    entry: os.DirEntry
    repeats: int       # from the nearest "N_name" folder, else the repeats option
    group: str         # ss_tag_frequency key: that folder's name, else the scanned folder's name

    @property
    def path(self) -> Path:
        return Path(self.entry.path)


def _repeats_of(folder_name: str) -> int | None:
    match = REPEATS_FOLDER_PATTERN.match(folder_name)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def walk_folder(root: Path, default_repeats: int = 1) -> Iterator[ScannedFile]:
    """Every file the dataset can see under ``root``: a folder's files in name order, then its sub-folders.

    The one walk behind the scan (:func:`list_image_files`) and the change check
    (:func:`folder_fingerprint`), so that the node re-runs exactly when a file the scan sees changes.
    Hidden files and folders (name starting with ".") are left out; linked folders are followed once
    (a link cycle does not loop). Raises DatasetError when a folder cannot be read.
    """
    visited: set[str] = set()

    def walk(folder: Path, repeats: int, group: str) -> Iterator[ScannedFile]:
        real = os.path.realpath(folder)
        if real in visited:
            return
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as error:
            raise DatasetError(f"folder {str(folder)!r} cannot be read: {error}") from error
        subfolders = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                subfolders.append(entry)
            else:
                yield ScannedFile(entry, repeats, group)
        for entry in subfolders:
            folder_repeats = _repeats_of(entry.name)
            if folder_repeats is None:
                yield from walk(Path(entry.path), repeats, group)
            else:
                yield from walk(Path(entry.path), folder_repeats, entry.name)

    yield from walk(root, _repeats_of(root.name) or default_repeats, root.name or str(root))


def is_clip_name(name: str) -> bool:
    """The file name has a video clip extension (any case)."""
    return name.lower().endswith(CLIP_EXTENSIONS)


def list_image_files(root: Path, default_repeats: int, clips: bool = False) -> tuple[list[ScannedFile], int]:
    """Supported image files under ``root`` (recursive, in :func:`walk_folder` order), with the clips too
    when ``clips`` (a training folder; a control folder holds images only), and the count of other files."""
    accepted = SUPPORTED_EXTENSIONS + CLIP_EXTENSIONS if clips else SUPPORTED_EXTENSIONS
    found: list[ScannedFile] = []
    other_files = 0
    for scanned in walk_folder(root, default_repeats):
        if scanned.entry.name.lower().endswith(accepted):
            found.append(scanned)
        else:
            other_files += 1
    return found, other_files


def json_digest(payload: object) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys): the same content always gives the same key."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def accepted_extensions_text() -> str:
    """The extensions a training folder's files may have, images first, for errors and tooltips."""
    return f"{', '.join(SUPPORTED_EXTENSIONS)} images; {', '.join(CLIP_EXTENSIONS)} clips"


def require_folder(path: Path, typed: str | None = None, name: str = "folder") -> Path:
    """`path` when it is an existing folder; else DatasetError naming the input (`name`), what the user
    typed and the fix."""
    shown = repr(str(path)) if typed is None or typed == str(path) else f"{typed!r} (looked at {str(path)!r})"
    # A training folder may hold clips; a control folder holds images only.
    what, extensions = (("images or clips", accepted_extensions_text()) if name == "folder"
                        else ("images", ", ".join(SUPPORTED_EXTENSIONS)))
    if not path.exists():
        raise DatasetError(f"{name} {shown} does not exist: give a folder of {what} "
                           f"({extensions}), absolute or relative to ComfyUI's input folder")
    if not path.is_dir():
        raise DatasetError(f"{name} {shown} is a file, not a folder: give the folder that "
                           f"holds the {what} ({extensions})")
    return path


def folder_fingerprint(folder: str | Path) -> str:
    """Hash of the relative path, size and modification time of every file the scan sees under ``folder``.

    Cheap (stat only): ComfyUI's IS_CHANGED uses it so that the node re-runs when any file the scan
    sees (image, clip, caption or other) is added, removed or modified, and only then; hidden files (a
    ``.DS_Store`` the file browser writes) are left out by the scan, so they do not retrain. A missing
    or unreadable folder gives a fixed text instead of a hash; the scan reports the error when the
    node runs.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        return "missing:" + str(root)
    rows: list[tuple[str, int, int]] = []
    try:
        for scanned in walk_folder(root):
            try:
                stat = scanned.entry.stat()
            except OSError:  # a broken link: nothing to hash (the scan reports it if it is an image)
                continue
            rows.append((os.path.relpath(scanned.entry.path, root), stat.st_size, stat.st_mtime_ns))
    except DatasetError as error:
        return "unreadable:" + str(error)
    rows.sort()
    return json_digest({"root": str(root.resolve()), "files": rows})
