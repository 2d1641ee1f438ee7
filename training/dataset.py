"""Image + caption datasets for LoRA training: kohya folder scan, captions, repeats, buckets, crops.

ComfyUI-agnostic (PIL, numpy, torch only). The node in ``nodes/dataset_node.py`` builds a
:class:`LoraDataset` with :func:`build_folder_dataset` or :func:`build_image_dataset`; the trainer
consumes it through the small API documented on :class:`LoraDataset`.

What the trainer can rely on
----------------------------
* ``dataset.samples[i]`` is one image (a :class:`DatasetSample`) with its bucket (the (width, height)
  fed to the model), the size it is resized to before cropping, and the centre-crop offset. SDXL's
  size conditioning uses ``original_size``, ``crop_offset`` (or the offset returned by
  ``load_image`` for random crops) and ``bucket`` as the target size.
* ``dataset.epoch_indices(rng)`` lists every sample index ``repeats`` times, shuffled; group them by
  ``dataset.samples[i].bucket`` (``dataset.buckets()``) to form batches of one shape.
* ``dataset.load_image(i, rng)`` returns the RGB PIL image at bucket size. ``rng=None`` is the
  deterministic view (centre crop, no flip), the one to encode when caching latents, which is
  allowed only when ``dataset.caching_possible`` (crop is not random). With an rng the random crop
  offset is drawn first (``crop == "random"``), then the flip (``flip``: ``rng.random() < 0.5``).
  ``dataset.augmentation(i, rng)`` makes the same draws without loading pixels and
  ``dataset.render(i, offset, flipped)`` draws the image, so a latent cache can be checked first.
* ``dataset.caption_for_step(i, rng)`` applies the caption rules for one step (see
  :func:`caption_for_step`); when ``dataset.static_captions`` it never draws from ``rng`` and always
  returns ``dataset.base_caption(i)``, so text-encoder outputs can be cached.
* All per-step randomness comes from the rng the trainer passes in; the dataset has no seed.

Kohya conventions followed (sd-scripts ``library/train_util.py`` and ``library/model_util.py``)
-----------------------------------------------------------------------------------------------
* A folder named ``N_name`` (N an integer) repeats its images N times, recursively; the nearest such
  folder (the scanned folder itself included) wins; other images use the ``repeats`` option.
* Bucket resolutions: ``make_bucket_resolutions`` (area about resolution^2, sides multiples of the
  step, within min/max); an image goes to the bucket of nearest aspect ratio, is resized so that it
  covers the bucket, and is cropped. ``bucket_no_upscale`` follows ``BucketManager.select_bucket``.
* ``ss_tag_frequency`` is ``{folder name: {tag (lower case): count}}``, one count per image.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageOps

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lora_lab")

SUPPORTED_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CROP_MODES = ("center", "random")
# kohya's folder convention: "<repeats>_<name>", e.g. "10_sks dog".
REPEATS_FOLDER_PATTERN = re.compile(r"^(\d+)_(.+)$")
IN_MEMORY_SOURCE = "images input"
# Key of the in-memory images in ss_tag_frequency (kohya uses the folder name).
IN_MEMORY_TAG_GROUP = "images"
EXIF_ORIENTATION_TAG = 0x0112
# Orientations 5..8 rotate by 90 degrees, so width and height swap.
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
# A JPEG ends with the EOI marker; a truncated one does not (scan data never contains FF D9).
JPEG_END_MARKER = b"\xff\xd9"
JPEG_TAIL_BYTES = 4096

_RESAMPLE = Image.Resampling.LANCZOS


class DatasetError(ValueError):
    """Bad dataset input (folder, files, options); the message names the input, value and fix."""


class BadImageError(DatasetError):
    """One image file cannot be used (corrupt, truncated, unreadable, too small)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image {self.path!r} cannot be used: {reason}. Fix or remove the file, "
                         f"or enable skip_bad_images to leave it out")


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetOptions:
    """Everything the node's widgets decide; validated on construction."""

    resolution: int = 512                 # target side in pixels: bucket area is about resolution^2
    repeats: int = 1                      # repeats of images outside an "N_name" folder
    caption_extension: str = ".txt"       # side-car caption file suffix ("txt" is accepted too)
    trigger_word: str = ""                # put first in every caption ("" = none)
    shuffle_captions: bool = False        # shuffle comma-separated tags every step
    keep_tokens: int = 0                  # leading tags (trigger included) that shuffling keeps in place
    caption_dropout: float = 0.0          # probability (0..1) that a step's caption is ""
    flip: bool = False                    # random horizontal flip per step (p = 0.5)
    bucketing: bool = True                # aspect-ratio buckets; False = square resize + crop
    min_bucket_resolution: int = 256      # smallest bucket side in pixels
    max_bucket_resolution: int = 1024     # largest bucket side in pixels
    bucket_step: int = 64                 # bucket sides are multiples of this (pixels)
    bucket_no_upscale: bool = False       # small images get a bucket that fits them without upscaling
    crop: str = "center"                  # "center" | "random" (a new random crop every time)
    skip_bad_images: bool = False         # leave corrupt files out (listed in the summary) instead of failing

    def __post_init__(self) -> None:
        def positive_int(name: str, value: int, minimum: int) -> None:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")

        positive_int("resolution", self.resolution, 64)
        positive_int("repeats", self.repeats, 1)
        positive_int("keep_tokens", self.keep_tokens, 0)
        positive_int("bucket_step", self.bucket_step, 8)
        positive_int("min_bucket_resolution", self.min_bucket_resolution, self.bucket_step)
        positive_int("max_bucket_resolution", self.max_bucket_resolution, self.bucket_step)
        if self.bucket_step % 8:
            raise DatasetError(f"bucket_step must be a multiple of 8 (the VAE downscales by 8), got "
                               f"{self.bucket_step}: use {max(8, self.bucket_step // 8 * 8)}")
        if not self.bucketing and self.resolution % 8:
            raise DatasetError(f"resolution must be a multiple of 8 (the VAE downscales by 8), got "
                               f"{self.resolution}: use {self.resolution // 8 * 8}")
        if not 0.0 <= float(self.caption_dropout) <= 1.0:
            raise DatasetError(f"caption_dropout is a probability: it must be between 0 and 1, "
                               f"got {self.caption_dropout!r}")
        if self.crop not in CROP_MODES:
            raise DatasetError(f"crop must be one of {', '.join(CROP_MODES)}, got {self.crop!r}")
        if not self.caption_extension.strip():
            raise DatasetError("caption_extension is empty: use the suffix of the caption files, "
                               "e.g. '.txt' or '.caption'")
        if self.bucketing:
            for name in ("min_bucket_resolution", "max_bucket_resolution"):
                value = getattr(self, name)
                if value % self.bucket_step:
                    raise DatasetError(f"{name} must be a multiple of bucket_step ({self.bucket_step}), "
                                       f"got {value}: use {value // self.bucket_step * self.bucket_step}")
            if self.min_bucket_resolution > self.max_bucket_resolution:
                raise DatasetError(f"min_bucket_resolution ({self.min_bucket_resolution}) is larger than "
                                   f"max_bucket_resolution ({self.max_bucket_resolution}): swap them")
            if not self.min_bucket_resolution <= self.resolution <= self.max_bucket_resolution:
                raise DatasetError(
                    f"resolution ({self.resolution}) must lie between min_bucket_resolution "
                    f"({self.min_bucket_resolution}) and max_bucket_resolution "
                    f"({self.max_bucket_resolution}): change the resolution or the bucket limits")

    @property
    def normalized_caption_extension(self) -> str:
        extension = self.caption_extension.strip()
        return extension if extension.startswith(".") else "." + extension


# --------------------------------------------------------------------------------------------
# Bucketing arithmetic (pure functions)
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BucketChoice:
    bucket: tuple[int, int]        # (width, height) fed to the model
    resized_size: tuple[int, int]  # (width, height) the image is resized to, covering the bucket
    crop_offset: tuple[int, int]   # (left, top) of the centre crop inside the resized image


def bucket_resolutions(resolution: int, min_side: int = 256, max_side: int = 1024,
                       step: int = 64) -> list[tuple[int, int]]:
    """All (width, height) buckets with area <= resolution^2, kohya's ``make_bucket_resolutions``.

    The square bucket is the largest multiple of ``step`` not above ``resolution``; then for every
    width from ``min_side`` to ``max_side`` in ``step`` increments, the tallest height (multiple of
    ``step``, at most ``max_side``) keeping the area within resolution^2, and its transpose.
    """
    max_area = resolution * resolution
    square = int(math.sqrt(max_area) // step) * step
    resolutions = {(square, square)}
    width = min_side
    while width <= max_side:
        height = min(max_side, int((max_area // width) // step) * step)
        if height >= min_side:
            resolutions.add((width, height))
            resolutions.add((height, width))
        width += step
    return sorted(resolutions)


def center_crop_offset(resized_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    return ((resized_size[0] - bucket[0]) // 2, (resized_size[1] - bucket[1]) // 2)


def _cover_size(width: int, height: int, bucket: tuple[int, int]) -> tuple[int, int]:
    """Size that keeps the aspect ratio and covers ``bucket`` with one side equal (kohya's rule)."""
    aspect_ratio = width / height
    if aspect_ratio > bucket[0] / bucket[1]:  # wider than the bucket: match heights
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    resized = (int(width * scale + 0.5), int(height * scale + 0.5))
    # Rounding must never leave the image smaller than the bucket.
    return (max(resized[0], bucket[0]), max(resized[1], bucket[1]))


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def select_bucket(width: int, height: int, resolutions: Sequence[tuple[int, int]], resolution: int,
                  step: int = 64, no_upscale: bool = False,
                  max_side: int | None = None) -> BucketChoice:
    """The bucket of an image of ``width`` x ``height`` (kohya ``BucketManager.select_bucket``).

    Without ``no_upscale``: the predefined bucket of nearest aspect ratio (an exact size match
    wins), the image resized to cover it. With ``no_upscale``: images larger than resolution^2 in
    area are shrunk to that area (long or short side rounded to the step, whichever keeps the aspect
    ratio better); smaller images keep their size; the bucket is the resized size rounded down to
    the step, so the image is only cropped, never upscaled. Unlike kohya, that bucket is also kept
    within ``max_side`` (it may fall below the minimum side: reaching it would need upscaling).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect_ratio = width / height
    if not no_upscale:
        if (width, height) in resolutions:
            bucket = (width, height)
        else:
            errors = [abs(bucket_width / bucket_height - aspect_ratio)
                      for bucket_width, bucket_height in resolutions]
            bucket = tuple(resolutions[errors.index(min(errors))])
        resized = _cover_size(width, height, bucket)
        return BucketChoice(bucket, resized, center_crop_offset(resized, bucket))

    max_area = resolution * resolution
    if width * height > max_area:
        resized_width = math.sqrt(max_area * aspect_ratio)
        resized_height = max_area / resized_width
        width_rounded = _round_to_step(resized_width, step)
        height_for_width = _round_to_step(width_rounded / aspect_ratio, step)
        height_rounded = _round_to_step(resized_height, step)
        width_for_height = _round_to_step(height_rounded * aspect_ratio, step)
        width_error = (abs(width_rounded / height_for_width - aspect_ratio)
                       if height_for_width else math.inf)
        height_error = (abs(width_for_height / height_rounded - aspect_ratio)
                        if height_rounded else math.inf)
        if width_error < height_error:
            resized = (width_rounded, int(width_rounded / aspect_ratio + 0.5))
        else:
            resized = (int(height_rounded * aspect_ratio + 0.5), height_rounded)
    else:
        resized = (width, height)
    if max_side is not None and max(resized) > max_side:
        scale = max_side / max(resized)
        resized = (int(resized[0] * scale + 0.5), int(resized[1] * scale + 0.5))
        resized = (min(resized[0], max_side), min(resized[1], max_side))
    bucket = (resized[0] - resized[0] % step, resized[1] - resized[1] % step)
    if bucket[0] == 0 or bucket[1] == 0:
        raise ValueError(f"a {width}x{height} image is too small for bucket_step {step}: without "
                         f"upscaling each side must be at least {step} pixels")
    return BucketChoice(bucket, resized, center_crop_offset(resized, bucket))


def square_bucket(width: int, height: int, resolution: int) -> BucketChoice:
    """Bucketing off: resize so the short side is ``resolution``, then crop a square."""
    scale = resolution / min(width, height)
    resized = (max(resolution, int(width * scale + 0.5)), max(resolution, int(height * scale + 0.5)))
    bucket = (resolution, resolution)
    return BucketChoice(bucket, resized, center_crop_offset(resized, bucket))


def choose_bucket(width: int, height: int, options: DatasetOptions,
                  resolutions: Sequence[tuple[int, int]] | None = None) -> BucketChoice:
    if not options.bucketing:
        return square_bucket(width, height, options.resolution)
    if resolutions is None:
        resolutions = bucket_resolutions(options.resolution, options.min_bucket_resolution,
                                         options.max_bucket_resolution, options.bucket_step)
    return select_bucket(width, height, resolutions, options.resolution, options.bucket_step,
                         options.bucket_no_upscale, options.max_bucket_resolution)


# --------------------------------------------------------------------------------------------
# Captions (pure functions)
# --------------------------------------------------------------------------------------------

def split_tags(caption: str) -> list[str]:
    """Comma-separated tags, stripped, empty ones dropped."""
    return [tag.strip() for tag in caption.split(",") if tag.strip()]


def place_trigger_word(caption: str, trigger_word: str) -> str:
    """The caption with the trigger word first, unless it already starts with it.

    "Starts with" means the caption equals the trigger word or continues after it with a comma or a
    space ("sks, dog", "sks dog"); a missing caption becomes the trigger word alone.
    """
    caption = caption.strip()
    trigger_word = trigger_word.strip()
    if not trigger_word:
        return caption
    if not caption:
        return trigger_word
    if caption.startswith(trigger_word) and (len(caption) == len(trigger_word)
                                             or caption[len(trigger_word)] in ", "):
        return caption
    return f"{trigger_word}, {caption}"


def caption_for_step(caption: str, rng: random.Random, trigger_word: str = "",
                     shuffle: bool = False, keep_tokens: int = 0, dropout: float = 0.0) -> str:
    """The caption used for one training step.

    1. Dropout (drawn first, only when ``dropout > 0``): with probability ``dropout`` the step's
       caption is "" (kohya's caption_dropout_rate; the trigger word is dropped too).
    2. The trigger word is put first (:func:`place_trigger_word`).
    3. Shuffle (only when ``shuffle``): the comma-separated tags after the first ``keep_tokens`` are
       shuffled. ``keep_tokens`` counts tags of the caption *with the trigger word already first*,
       so ``keep_tokens=1`` keeps the trigger word in front (as kohya does when the trigger word is
       written in the caption files). Tags are re-joined with ", ".
    No shuffle and no dropout: the caption is deterministic and ``rng`` is not used.
    """
    if dropout > 0.0 and rng.random() < dropout:
        return ""
    text = place_trigger_word(caption, trigger_word)
    if not shuffle:
        return text
    tags = split_tags(text)
    kept, shuffled = tags[:keep_tokens], tags[keep_tokens:]
    rng.shuffle(shuffled)
    return ", ".join(kept + shuffled)


def read_caption(path: Path) -> str | None:
    """The caption in a side-car file: its first non-empty line, stripped; None when there is no file.

    Like kohya, only the first line is used. Files are UTF-8 (a BOM is accepted).
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise DatasetError(f"caption file {str(path)!r} cannot be read: {error}") from error
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"caption file {str(path)!r} is not UTF-8 text ({error}): "
                           f"save it as UTF-8") from error
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def tag_frequency(groups: Iterable[tuple[str, str]]) -> dict[str, dict[str, int]]:
    """kohya's ``ss_tag_frequency``: {group (folder name): {tag lower-cased: images with it}}."""
    frequency: dict[str, dict[str, int]] = {}
    for group, caption in groups:
        counts = frequency.setdefault(group, {})
        for tag in split_tags(caption):
            tag = tag.lower()
            counts[tag] = counts.get(tag, 0) + 1
    return frequency


# --------------------------------------------------------------------------------------------
# Image decoding helpers
# --------------------------------------------------------------------------------------------

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
        image = image.resize(tuple(resized_size), _RESAMPLE)
    left, top = offset
    return image.crop((left, top, left + bucket[0], top + bucket[1]))


def tensor_image_to_pil(image: "torch.Tensor") -> Image.Image:
    """One ComfyUI IMAGE ([H, W, C] float 0..1) as an RGB PIL image."""
    import torch
    array = image.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).round().to(dtype=torch.uint8).numpy()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    pil = Image.fromarray(array)
    return to_rgb(pil)


# --------------------------------------------------------------------------------------------
# The dataset
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSample:
    path: str                        # absolute image file path ("" for an in-memory image)
    image_index: int                 # index into LoraDataset.images for in-memory images, else -1
    caption: str                     # caption text as read (no trigger word added), "" when missing
    repeats: int                     # times the sample appears per epoch
    original_size: tuple[int, int]   # (width, height) after EXIF transpose
    bucket: tuple[int, int]          # (width, height) the trainer feeds the model
    resized_size: tuple[int, int]    # (width, height) after resize, before crop
    crop_offset: tuple[int, int]     # (left, top) for center crop; random crop draws its own


@dataclass
class LoraDataset:
    """The LORA_DATASET socket value: a plain description of what to train on (no pixels loaded).

    Options are copied from :class:`DatasetOptions`; the methods below are what the trainer uses.
    """

    samples: list[DatasetSample]        # one per image file (repeats are not expanded here)
    resolution: int                     # target side in pixels (bucket area about resolution^2)
    trigger_word: str                   # put first in every caption ("" = none)
    shuffle_captions: bool              # shuffle comma-separated tags per step
    keep_tokens: int                    # leading tags (trigger word included) kept in place
    caption_dropout: float              # probability that a step's caption is ""
    flip: bool                          # random horizontal flip per step (p = 0.5)
    bucketing: bool                     # aspect-ratio buckets (False: square crops)
    crop: str                           # "center" | "random"
    tag_frequency: dict                 # kohya ss_tag_frequency shape: {"<dir name>": {"tag": count}}
    images: "torch.Tensor | None" = None  # the IMAGE batch [B, H, W, 3] for in-memory datasets
    source: str = ""                    # folder path or "images input"
    fingerprint: str = ""               # content+settings key (used for latent cache keys)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason) left out as bad
    missing_captions: int = 0           # samples without a caption file (trigger word alone used)

    # --- what the trainer uses ---------------------------------------------------------------

    def epoch_indices(self, rng: random.Random) -> list[int]:
        """Each sample index ``repeats`` times, shuffled by ``rng``: one epoch."""
        indices = [index for index, sample in enumerate(self.samples) for _ in range(sample.repeats)]
        rng.shuffle(indices)
        return indices

    def buckets(self) -> dict[tuple[int, int], list[int]]:
        """Bucket (width, height) -> sample indices, buckets sorted."""
        grouped: dict[tuple[int, int], list[int]] = {}
        for index, sample in enumerate(self.samples):
            grouped.setdefault(sample.bucket, []).append(index)
        return dict(sorted(grouped.items()))

    def load_image(self, index: int, rng: random.Random | None = None
                   ) -> tuple[Image.Image, tuple[int, int], bool]:
        """(RGB image at bucket size, crop offset used (left, top), flipped).

        ``rng=None``: centre crop, no flip (deterministic; what latent caching encodes). With an
        rng: a random crop offset when ``crop == "random"`` (``rng.randint`` for left, then top),
        then a flip with probability 0.5 when ``flip`` (``rng.random() < 0.5``). The offset is in the
        unflipped image.
        """
        offset, flipped = self.augmentation(index, rng)
        return self.render(index, offset, flipped), offset, flipped

    def augmentation(self, index: int, rng: random.Random | None = None) -> tuple[tuple[int, int], bool]:
        """(crop offset, flipped) for one step without loading pixels: the same rng draws, in the same
        order, as :meth:`load_image`, so a trainer can look up a cached latent before decoding."""
        sample = self.samples[index]
        offset = sample.crop_offset
        if rng is not None and self.crop == "random":
            offset = (rng.randint(0, sample.resized_size[0] - sample.bucket[0]),
                      rng.randint(0, sample.resized_size[1] - sample.bucket[1]))
        flipped = bool(rng is not None and self.flip and rng.random() < 0.5)
        return offset, flipped

    def render(self, index: int, offset: tuple[int, int], flipped: bool) -> Image.Image:
        """The RGB image at bucket size for a given crop offset and flip."""
        sample = self.samples[index]
        cropped = resize_and_crop(self.source_image(index), sample.resized_size, sample.bucket, offset)
        if flipped:
            cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return cropped

    def source_image(self, index: int) -> Image.Image:
        """The full RGB image of a sample, EXIF orientation applied, before resize and crop."""
        sample = self.samples[index]
        if sample.image_index >= 0:
            if self.images is None:
                raise DatasetError("this in-memory dataset has lost its images tensor")
            return tensor_image_to_pil(self.images[sample.image_index])
        try:
            return open_rgb(sample.path)
        except (OSError, SyntaxError, ValueError) as error:
            raise BadImageError(sample.path, f"changed or unreadable since the scan ({error})") from error

    def base_caption(self, index: int) -> str:
        """The caption with the trigger word placed first, before shuffle/dropout."""
        return place_trigger_word(self.samples[index].caption, self.trigger_word)

    def caption_for_step(self, index: int, rng: random.Random) -> str:
        """Caption for one step: trigger word first, shuffle (keeping keep_tokens), dropout."""
        return caption_for_step(self.samples[index].caption, rng, self.trigger_word,
                                self.shuffle_captions, self.keep_tokens, self.caption_dropout)

    @property
    def caching_possible(self) -> bool:
        """Latents can be encoded once: False when every epoch draws a new random crop."""
        return self.crop != "random"

    @property
    def static_captions(self) -> bool:
        """Captions never change between steps (no shuffle, no dropout): TE outputs are cacheable."""
        return not self.shuffle_captions and self.caption_dropout <= 0.0

    @property
    def image_count(self) -> int:
        return len(self.samples)

    @property
    def effective_count(self) -> int:
        """Images per epoch, repeats included."""
        return sum(sample.repeats for sample in self.samples)


# --------------------------------------------------------------------------------------------
# Building datasets
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScannedFile:
    path: Path         # absolute image path
    repeats: int       # from the nearest "N_name" folder, else the repeats option
    group: str         # ss_tag_frequency key: that folder's name, else the scanned folder's name


def _repeats_of(folder_name: str) -> int | None:
    match = REPEATS_FOLDER_PATTERN.match(folder_name)
    return int(match.group(1)) if match and int(match.group(1)) > 0 else None


def list_image_files(root: Path, default_repeats: int) -> tuple[list[ScannedFile], int]:
    """Supported image files under ``root`` (recursive, sorted), and the count of other files.

    Hidden files and folders (name starting with ".") are ignored; linked folders are followed once
    (a link cycle does not loop).
    """
    found: list[ScannedFile] = []
    other_files = 0
    root_repeats = _repeats_of(root.name)
    root_group = root.name or str(root)
    visited: set[str] = set()

    def walk(folder: Path, repeats: int, group: str) -> None:
        nonlocal other_files
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
            elif entry.name.lower().endswith(SUPPORTED_EXTENSIONS):
                found.append(ScannedFile(Path(entry.path), repeats, group))
            else:
                other_files += 1
        for entry in subfolders:
            folder_repeats = _repeats_of(entry.name)
            if folder_repeats is None:
                walk(Path(entry.path), repeats, group)
            else:
                walk(Path(entry.path), folder_repeats, entry.name)

    walk(root, root_repeats or default_repeats, root_group)
    return found, other_files


def _caption_path(image_path: Path, extension: str) -> Path:
    return image_path.with_name(image_path.stem + extension)


def _settings_key(options: DatasetOptions) -> dict:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


def _digest(payload: object, extra: bytes = b"") -> str:
    hasher = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode("utf-8"))
    hasher.update(extra)
    return hasher.hexdigest()


def accepted_extensions_text() -> str:
    return ", ".join(SUPPORTED_EXTENSIONS)


def require_folder(path: Path, typed: str | None = None) -> Path:
    """`path` when it is an existing folder; else DatasetError naming what the user typed and the fix."""
    shown = repr(str(path)) if typed is None or typed == str(path) else f"{typed!r} (looked at {str(path)!r})"
    if not path.exists():
        raise DatasetError(f"folder {shown} does not exist: give a folder of images "
                           f"({accepted_extensions_text()}), absolute or relative to ComfyUI's input folder")
    if not path.is_dir():
        raise DatasetError(f"folder {shown} is a file, not a folder: give the folder that "
                           f"holds the images ({accepted_extensions_text()})")
    return path


def build_folder_dataset(folder: str | Path, options: DatasetOptions) -> LoraDataset:
    """Scan ``folder`` (read only) into a :class:`LoraDataset`. Raises DatasetError on bad input."""
    root = require_folder(Path(folder).expanduser()).resolve()
    files, other_files = list_image_files(root, options.repeats)
    if not files:
        what = "is empty" if other_files == 0 else f"holds {other_files} files but no images"
        raise DatasetError(f"folder {str(root)!r} {what}: accepted image extensions are "
                           f"{accepted_extensions_text()} (searched recursively)")

    resolutions = (bucket_resolutions(options.resolution, options.min_bucket_resolution,
                                      options.max_bucket_resolution, options.bucket_step)
                   if options.bucketing else None)
    extension = options.normalized_caption_extension
    samples: list[DatasetSample] = []
    skipped: list[tuple[str, str]] = []
    groups: list[tuple[str, str]] = []
    fingerprint_rows: list[list] = []
    missing = 0
    for scanned in files:
        try:
            width, height = probe_image(scanned.path)
            try:
                choice = choose_bucket(width, height, options, resolutions)
            except ValueError as error:
                raise BadImageError(scanned.path, str(error)) from error
        except BadImageError as error:
            if not options.skip_bad_images:
                raise
            logger.warning("LoRA Dataset: skipping %s: %s", scanned.path, error.reason)
            skipped.append((str(scanned.path), error.reason))
            continue
        caption = read_caption(_caption_path(scanned.path, extension))
        if caption is None:
            missing += 1
            caption = ""
        sample = DatasetSample(path=str(scanned.path), image_index=-1, caption=caption,
                               repeats=scanned.repeats, original_size=(width, height),
                               bucket=choice.bucket, resized_size=choice.resized_size,
                               crop_offset=choice.crop_offset)
        samples.append(sample)
        groups.append((scanned.group, place_trigger_word(caption, options.trigger_word)))
        stat = scanned.path.stat()
        fingerprint_rows.append([str(scanned.path.relative_to(root)), stat.st_size, stat.st_mtime_ns,
                                 caption, scanned.repeats])
    if not samples:
        raise DatasetError(f"folder {str(root)!r}: all {len(skipped)} images are unreadable "
                           f"(first: {skipped[0][0]}: {skipped[0][1]}); nothing to train on")
    return _make_dataset(samples, options, tag_frequency(groups), source=str(root),
                         fingerprint=_digest({"files": fingerprint_rows, "settings": _settings_key(options)}),
                         skipped=skipped, missing_captions=missing)


def split_caption_lines(captions: str | None) -> list[str]:
    """One caption per line; an empty text means no captions."""
    if captions is None or not captions.strip():
        return []
    return captions.splitlines()


def build_image_dataset(images: "torch.Tensor", captions: str | Sequence[str] | None,
                        options: DatasetOptions) -> LoraDataset:
    """A dataset from a ComfyUI IMAGE batch [B, H, W, C] and one caption per image (or none)."""
    if images is None or getattr(images, "ndim", 0) != 4 or images.shape[0] == 0:
        shape = tuple(getattr(images, "shape", ()))
        raise DatasetError(f"images must be a non-empty IMAGE batch [B, H, W, C], got shape {shape}")
    count = int(images.shape[0])
    lines = split_caption_lines(captions) if (captions is None or isinstance(captions, str)) \
        else [str(line) for line in captions]
    if lines and len(lines) != count:
        raise DatasetError(f"images has {count} images but captions has {len(lines)} lines: give one "
                           f"caption per line for every image (or leave captions empty)")
    height, width = int(images.shape[1]), int(images.shape[2])
    try:
        choice = choose_bucket(width, height, options)
    except ValueError as error:
        raise DatasetError(f"images: {error}") from error
    samples = []
    groups = []
    for index in range(count):
        caption = lines[index].strip() if lines else ""
        samples.append(DatasetSample(path="", image_index=index, caption=caption, repeats=options.repeats,
                                     original_size=(width, height), bucket=choice.bucket,
                                     resized_size=choice.resized_size, crop_offset=choice.crop_offset))
        groups.append((IN_MEMORY_TAG_GROUP, place_trigger_word(caption, options.trigger_word)))
    import torch
    # ComfyUI runs nodes under inference_mode; a copy made outside it is an ordinary tensor the
    # trainer can use freely.
    with torch.inference_mode(False):
        pixels = images.detach().float().cpu().clone().contiguous()
    content = hashlib.sha256(pixels.numpy().tobytes()).hexdigest()
    missing = count if not lines else 0
    return _make_dataset(samples, options, tag_frequency(groups), source=IN_MEMORY_SOURCE,
                         fingerprint=_digest({"images": content, "shape": list(pixels.shape),
                                              "captions": [sample.caption for sample in samples],
                                              "settings": _settings_key(options)}),
                         images=pixels, missing_captions=missing)


def _make_dataset(samples: list[DatasetSample], options: DatasetOptions, frequency: dict, *,
                  source: str, fingerprint: str, images: "torch.Tensor | None" = None,
                  skipped: list[tuple[str, str]] | None = None, missing_captions: int = 0) -> LoraDataset:
    dataset = LoraDataset(
        samples=samples, resolution=options.resolution, trigger_word=options.trigger_word.strip(),
        shuffle_captions=options.shuffle_captions, keep_tokens=options.keep_tokens,
        caption_dropout=float(options.caption_dropout), flip=options.flip, bucketing=options.bucketing,
        crop=options.crop, tag_frequency=frequency, images=images, source=source,
        fingerprint=fingerprint, skipped=list(skipped or []), missing_captions=missing_captions)
    logger.info("LoRA Dataset: %d images (%d with repeats) in %d buckets from %s",
                dataset.image_count, dataset.effective_count, len(dataset.buckets()), source)
    return dataset


# --------------------------------------------------------------------------------------------
# Change detection, summary, preview
# --------------------------------------------------------------------------------------------

def folder_fingerprint(folder: str | Path) -> str:
    """Hash of every file's relative path, size and modification time under ``folder``.

    Cheap (stat only): ComfyUI's IS_CHANGED uses it so that the node re-runs when any file (image or
    caption) is added, removed or modified, and only then. A missing folder hashes to a fixed value.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        return "missing:" + str(root)
    rows: list[tuple[str, int, int]] = []
    pending = [root]
    visited: set[str] = set()
    while pending:
        current = pending.pop()
        real = os.path.realpath(current)
        if real in visited:  # a link cycle
            continue
        visited.add(real)
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.is_dir():
                    pending.append(Path(entry.path))
                else:
                    stat = entry.stat()
                    rows.append((os.path.relpath(entry.path, root), stat.st_size, stat.st_mtime_ns))
            except OSError:
                continue
    rows.sort()
    return _digest({"root": str(root.resolve()), "files": rows})


def top_tags(dataset: LoraDataset, count: int = 10) -> list[tuple[str, int]]:
    totals: Counter = Counter()
    for counts in dataset.tag_frequency.values():
        totals.update(counts)
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:count]


def summarize(dataset: LoraDataset) -> str:
    """The node's STRING output: counts, buckets, captions, top tags and the caching note."""
    lines = [f"source: {dataset.source}",
             f"images: {dataset.image_count}",
             f"effective images per epoch (with repeats): {dataset.effective_count}"]
    repeat_counts = Counter(sample.repeats for sample in dataset.samples)
    if len(repeat_counts) > 1 or next(iter(repeat_counts)) != 1:
        lines.append("repeats: " + ", ".join(f"{repeats}x: {images} images"
                                             for repeats, images in sorted(repeat_counts.items())))
    buckets = dataset.buckets()
    kind = "buckets" if dataset.bucketing else "square crop (bucketing off)"
    lines.append(f"{kind}: {len(buckets)}")
    for bucket, indices in buckets.items():
        with_repeats = sum(dataset.samples[index].repeats for index in indices)
        lines.append(f"  {bucket[0]}x{bucket[1]}: {len(indices)} images ({with_repeats} with repeats)")
    lines.append(f"captions missing: {dataset.missing_captions}"
                 + (f" (trigger word '{dataset.trigger_word}' alone used)" if dataset.missing_captions
                    and dataset.trigger_word else ""))
    tags = top_tags(dataset)
    lines.append("top tags: " + (", ".join(f"{tag} ({count})" for tag, count in tags) if tags else "none"))
    caption_mode = []
    if dataset.shuffle_captions:
        caption_mode.append(f"tags shuffled per step (first {dataset.keep_tokens} kept)")
    if dataset.caption_dropout > 0:
        caption_mode.append(f"caption dropout {dataset.caption_dropout:g}")
    if caption_mode:
        lines.append("captions: " + "; ".join(caption_mode))
    if dataset.flip:
        lines.append("augmentation: random horizontal flip per step")
    if dataset.caching_possible:
        lines.append("caching: latents can be cached once (center crop is fixed"
                     + ("; with flip, both orientations" if dataset.flip else "") + ")")
    else:
        lines.append("caching: not possible, crop is random (a new crop each epoch): "
                     "latents are encoded every step")
    if dataset.skipped:
        lines.append(f"skipped bad images: {len(dataset.skipped)}")
        lines.extend(f"  {path}: {reason}" for path, reason in dataset.skipped)
    return "\n".join(lines)


PREVIEW_SEED = 0          # the preview's fixed seed: the dataset itself has none
PREVIEW_CELL = 256        # preview tile size in pixels
PREVIEW_LABEL_HEIGHT = 18


def preview_indices(dataset: LoraDataset, count: int) -> list[int]:
    """Up to ``count`` samples: one from each bucket first (largest buckets first), then the rest."""
    by_size = sorted(dataset.buckets().items(), key=lambda item: (-len(item[1]), item[0]))
    chosen = [indices[0] for _, indices in by_size][:count]
    for index in range(len(dataset.samples)):
        if len(chosen) >= count:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen


def preview_grid(dataset: LoraDataset, count: int = 8, columns: int = 4) -> Image.Image:
    """A grid of a few samples as they will be cropped (and flipped), each labelled with its bucket."""
    rng = random.Random(PREVIEW_SEED)
    indices = preview_indices(dataset, count)
    columns = max(1, min(columns, len(indices)))
    rows = math.ceil(len(indices) / columns)
    cell_height = PREVIEW_CELL + PREVIEW_LABEL_HEIGHT
    grid = Image.new("RGB", (columns * PREVIEW_CELL, rows * cell_height), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    for position, index in enumerate(indices):
        sample = dataset.samples[index]
        image, _offset, flipped = dataset.load_image(index, rng)
        image.thumbnail((PREVIEW_CELL, PREVIEW_CELL), _RESAMPLE)
        left = (position % columns) * PREVIEW_CELL
        top = (position // columns) * cell_height
        grid.paste(image, (left + (PREVIEW_CELL - image.width) // 2,
                           top + PREVIEW_LABEL_HEIGHT + (PREVIEW_CELL - image.height) // 2))
        label = f"{sample.bucket[0]}x{sample.bucket[1]}" + (" flipped" if flipped else "")
        draw.text((left + 4, top + 3), label, fill=(255, 255, 255))
    return grid
