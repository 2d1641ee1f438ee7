"""The dataset's errors and the options the LoRA Dataset node's widgets decide (validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...settings import NodeSettings, setting

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
class DatasetOptions(NodeSettings):
    """Everything the LoRA Dataset node's widgets decide (each field is the one source of its default,
    range and help: the node's schema inputs are generated from it); validated on construction, with
    DatasetError messages that name the option, the value and the fix."""

    TITLE = "LoRA Dataset"

    resolution: int = setting(512, "Training resolution: buckets have about resolution x resolution pixels. 512 "
                                   "for SD1.x, 768 for SD2.x, 1024 for SDXL.", min=64, max=4096, step=8)
    repeats: int = setting(1, "How many times each image counts per epoch, for images not inside an 'N_name' "
                              "folder (those use N).", min=1, max=10000)
    caption_extension: str = setting(".txt", "Suffix of the caption file next to each image (same name): 'a.png' "
                                             "-> 'a.txt'. First line used, UTF-8. Images without one are trained "
                                             "with the trigger word alone.")
    trigger_word: str = setting("", "Word put first in every caption (unless the caption already starts with it), "
                                    "e.g. 'sks'. Empty = none.")
    shuffle_captions: bool = setting(False, "Shuffle the comma-separated tags of each caption at every step (keeps "
                                            "the first keep_tokens in place).")
    keep_tokens: int = setting(0, "Tags at the front that shuffling never moves, counted after the trigger word is "
                                  "put first (1 = keep the trigger word first).", min=0, max=255)
    caption_dropout: float = setting(0.0, "Probability that a step trains with an empty caption (helps "
                                          "unconditional generation). 0 = never.", min=0.0, max=1.0, step=0.01)
    flip: bool = setting(False, "Randomly mirror images left-right (half the steps). Avoid for asymmetric subjects "
                                "or text.")
    bucketing: bool = setting(True, "Aspect-ratio buckets (kohya): each image trains near its own shape. Off: every "
                                    "image is resized and cropped to a resolution x resolution square.")
    min_bucket_resolution: int = setting(256, "Smallest bucket side in pixels (a multiple of bucket_step).",
                                         min=64, max=4096, step=8)
    max_bucket_resolution: int = setting(1024, "Largest bucket side in pixels (a multiple of bucket_step). SDXL: "
                                               "2048 allows the usual tall/wide buckets.", min=64, max=8192, step=8)
    bucket_step: int = setting(64, "Bucket sides are multiples of this many pixels (64 as in kohya; at least 8 for "
                                   "the VAE).", min=8, max=256, step=8)
    bucket_no_upscale: bool = setting(False, "Images smaller than resolution x resolution get a bucket that fits "
                                             "them, so they are only cropped, never enlarged.")
    crop: str = setting("center", "Where to crop the resized image to its bucket. 'random' draws a new crop every "
                                  "time, so latents cannot be cached (slower training).", choices=CROP_MODES)
    skip_bad_images: bool = setting(False, "Leave corrupt or truncated images out (listed in the summary) instead "
                                           "of stopping with an error.")

    def __post_init__(self) -> None:
        # A whole-number dropout (0 from an API prompt) is stored as the float the widget gives.
        if isinstance(self.caption_dropout, int) and not isinstance(self.caption_dropout, bool):
            object.__setattr__(self, "caption_dropout", float(self.caption_dropout))
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
    def trigger(self) -> str:
        """The trigger word as captions use it (surrounding spaces dropped)."""
        return self.trigger_word.strip()

    @property
    def normalized_caption_extension(self) -> str:
        extension = self.caption_extension.strip()
        return extension if extension.startswith(".") else "." + extension
