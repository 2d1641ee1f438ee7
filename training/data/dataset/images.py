"""Image decoding helpers: cheap probing of files, RGB conversion, EXIF orientation, resize and crop."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .options import BadImageError

EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 degrees, so width and height swap.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# A JPEG ends with the EOI marker; a truncated one does not (scan data never contains FF D9).
JPEG_END_MARKER = b"\xff\xd9"
JPEG_TAIL_BYTES = 4096
# Every resize (the training crops and the preview tiles) uses the same filter.
RESAMPLE = Image.Resampling.LANCZOS


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB 8-bit: transparency composited on white, 16-bit scaled (not clipped), palette expanded."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and values.max(initial=0) <= 255:
            scaled = values  # 8-bit data stored as 32-bit
        else:
            scaled = values / 257.0  # 0..65535 -> 0..255
        gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        scale = 255.0 if values.max(initial=0) <= 1.0 else 1.0
        return Image.fromarray(np.clip(np.rint(values * scale), 0, 255).astype(np.uint8)).convert("RGB")
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode != "RGB":
        return image.convert("RGB")
    return image


def _exif_orientation(image: Image.Image) -> int:
    """EXIF orientation from the header only (``getexif()`` would decode a whole PNG)."""
    exif_bytes = image.info.get("exif")
    if not exif_bytes:
        return 1
    try:
        exif = Image.Exif()
        exif.load(exif_bytes)
        orientation = int(exif.get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # malformed EXIF: PIL's exif_transpose would ignore it too
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, checking the file without decoding the pixels.

    Reads the header, runs PIL's ``verify()`` (chunk CRCs for PNG) and, for the formats whose
    ``verify()`` checks nothing, a cheap structural test: a JPEG must end with its EOI marker, an
    uncompressed BMP must hold all its rows. Raises :class:`BadImageError`.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
            orientation = _exif_orientation(image)
            image_format = image.format
            scan_start = image.fp.tell() if image.fp is not None else 0
            tile = list(getattr(image, "tile", []) or [])
            image.verify()
        if image_format == "JPEG":
            _check_jpeg_end(path, scan_start)
        elif image_format in ("BMP", "DIB"):
            _check_bmp_complete(path, tile, height)
    except BadImageError:
        raise
    except Image.DecompressionBombError as error:
        raise BadImageError(path, f"too large ({error})") from error
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError) as error:
        reason = "not a readable image" if isinstance(error, Image.UnidentifiedImageError) \
            else f"corrupt or truncated ({error})"
        raise BadImageError(path, reason) from error
    if width <= 0 or height <= 0:
        raise BadImageError(path, f"has an empty size {width}x{height}")
    if orientation in TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height


def _check_jpeg_end(path: Path, scan_start: int) -> None:
    size = path.stat().st_size
    start = max(scan_start, size - JPEG_TAIL_BYTES)
    with open(path, "rb") as handle:
        handle.seek(start)
        tail = handle.read()
    if JPEG_END_MARKER not in tail:
        raise BadImageError(path, "truncated JPEG (no end-of-image marker)")


def _check_bmp_complete(path: Path, tile: list, height: int) -> None:
    if len(tile) == 1 and tile[0][0] == "raw":
        offset = tile[0][2]
        arguments = tile[0][3]
        stride = arguments[1] if isinstance(arguments, tuple) and len(arguments) > 1 else 0
        if stride and path.stat().st_size < offset + stride * height:
            raise BadImageError(path, "truncated BMP (fewer rows than its header declares)")
        if stride:
            return
    # Compressed or unusual BMPs: decode (rare, and BMPs are cheap to decode).
    with Image.open(path) as image:
        image.load()


def open_rgb(path: str | Path) -> Image.Image:
    """The image as RGB with its EXIF orientation applied."""
    with Image.open(path) as image:
        image.load()
        transposed = ImageOps.exif_transpose(image) or image
        return to_rgb(transposed)


def resize_and_crop(image: Image.Image, resized_size: tuple[int, int], bucket: tuple[int, int],
                    offset: tuple[int, int]) -> Image.Image:
    if image.size != tuple(resized_size):
        image = image.resize(tuple(resized_size), RESAMPLE)
    left, top = offset
    return image.crop((left, top, left + bucket[0], top + bucket[1]))
