"""Bucketing arithmetic (pure functions): kohya's bucket resolutions and the bucket, resize and crop of one image."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .options import DatasetOptions


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
