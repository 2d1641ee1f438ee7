"""Generated image/caption fixtures (PIL) for dataset tests, and a tree hash to prove nothing changed."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image

EXIF_ORIENTATION_TAG = 0x0112


def gradient_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """An RGB image whose left half is darker than its right half (so flips and crops are visible)."""
    width, height = size
    generator = np.random.default_rng(seed)
    columns = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
    base = np.broadcast_to(columns, (height, width, 3)).copy()
    base += generator.integers(0, 8, size=(height, width, 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")


def write_image(path: Path, size: tuple[int, int], seed: int = 0, image_format: str | None = None,
                orientation: int | None = None, caption: str | None = None,
                caption_extension: str = ".txt") -> Path:
    """Write a generated image (and optionally its side-car caption); returns the image path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = gradient_image(size, seed)
    save_arguments: dict = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[EXIF_ORIENTATION_TAG] = orientation
        save_arguments["exif"] = exif.tobytes()
    image.save(path, format=image_format, **save_arguments)
    if caption is not None:
        path.with_name(path.stem + caption_extension).write_text(caption, encoding="utf-8")
    return path


def hash_tree(root: Path) -> dict[str, tuple[str, int]]:
    """{relative path: (sha256 of the content, mtime_ns)} for every file and folder under root."""
    result: dict[str, tuple[str, int]] = {}
    for folder, folder_names, file_names in os.walk(root):
        for name in folder_names:
            full = Path(folder, name)
            result[str(full.relative_to(root)) + "/"] = ("dir", full.stat().st_mtime_ns)
        for name in file_names:
            full = Path(folder, name)
            digest = hashlib.sha256(full.read_bytes()).hexdigest()
            result[str(full.relative_to(root))] = (digest, full.stat().st_mtime_ns)
    return result
