"""The dataset's errors and the options the LoRA Dataset node's widgets decide (validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CROP_MODES = ("center", "random")


class DatasetError(ValueError):
    """Bad dataset input (folder, files, options); the message names the input, value and fix."""


class BadImageError(DatasetError):
    """One image file cannot be used (corrupt, truncated, unreadable, too small)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"image {self.path!r} cannot be used: {reason}. Fix or remove the file, "
                         f"or enable skip_bad_images to leave it out")


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
