"""The dataset's errors and the options the LoRA Dataset node's widgets decide (validated on construction)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...settings import NodeSettings, setting

CROP_MODES = ("center", "random")
# How a clip is cut into training windows (musubi-tuner's frame_extraction): see video.clip_windows.
FRAME_EXTRACTION_MODES = ("head", "chunk", "slide", "uniform")
# Wan's VAE keeps the first frame and compresses the rest by 4 in time: a clip has 4n+1 frames.
FRAME_GROUP = 4
MAX_FRAMES_PER_CLIP = 1025
# The options only clips use, in field order: an image-only dataset's key leaves them out (changing
# them must not re-encode image latents), and a node can place their widgets apart from the others.
CLIP_OPTION_NAMES = ("frames_per_clip", "frame_buckets", "frame_extraction", "frame_stride", "clips_per_video",
                     "target_fps")


class DatasetError(ValueError):
    """Bad dataset input (folder, files, options); the message names the input, value and fix."""


class BadImageError(DatasetError):
    """One image (or clip: ``kind``) file cannot be used (corrupt, truncated, unreadable, too small, too
    short); skip_bad_images leaves such files out instead of stopping, whichever their kind."""

    def __init__(self, path: Path | str, reason: str, kind: str = "image") -> None:
        self.path = str(path)
        self.reason = reason
        self.kind = kind
        super().__init__(f"{kind} {self.path!r} cannot be used: {reason}. Fix or remove the file, "
                         f"or enable skip_bad_images to leave it out")


class BadClipError(BadImageError):
    """One video clip cannot be used (no video stream, undecodable, too short for every clip length)."""

    def __init__(self, path: Path | str, reason: str) -> None:
        super().__init__(path, reason, kind="clip")


def positive_int(name: str, value: int, minimum: int) -> None:
    """DatasetError unless ``value`` is an integer (not a bool) of at least ``minimum``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise DatasetError(f"{name} must be an integer >= {minimum}, got {value!r}")


def frame_count_problem(value: int) -> str | None:
    """None when ``value`` is a valid clip length (4n+1, 1..MAX_FRAMES_PER_CLIP), else the fix to show."""
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be a whole number of frames of the form 4n+1 (1, 5, 9, ..., 33, ...)"
    if not 1 <= value <= MAX_FRAMES_PER_CLIP:
        return f"must be between 1 and {MAX_FRAMES_PER_CLIP} frames"
    if (value - 1) % FRAME_GROUP:
        lower = (value - 1) // FRAME_GROUP * FRAME_GROUP + 1
        nearest = [str(option) for option in (lower, lower + FRAME_GROUP) if 1 <= option <= MAX_FRAMES_PER_CLIP]
        return (f"must be 4n+1 frames (Wan's VAE keeps the first frame and compresses the rest by 4 in time): "
                f"use {' or '.join(nearest)}")
    return None


def parse_frame_buckets(text: str) -> tuple[int, ...]:
    """The clip lengths listed in ``frame_buckets`` ("17, 49"), in the order given; DatasetError naming
    the first bad entry."""
    if not isinstance(text, str):
        raise DatasetError(f"frame_buckets must be text such as '17, 49', got {text!r}")
    lengths = []
    for entry in text.split(","):
        entry = entry.strip()
        if not entry:
            continue
        try:
            length = int(entry)
        except ValueError:
            raise DatasetError(f"frame_buckets entry {entry!r} (in {text!r}) is not a whole number: list clip "
                               "lengths separated by commas, e.g. '17, 49'") from None
        problem = frame_count_problem(length)
        if problem:
            raise DatasetError(f"frame_buckets entry {entry!r} (in {text!r}) {problem}")
        lengths.append(length)
    return tuple(lengths)


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
                                           "of stopping with an error; clips too, and clips shorter than every "
                                           "clip length.")
    # Video clips (.mp4, .webm, .mov, .gif) for video models such as Wan; images ignore these.
    frames_per_clip: int = setting(33, "Video clips: frames in each training clip, 4n+1 (Wan's VAE compresses time "
                                       "by 4 after the first frame): 33 is about 2 s at 16 fps. Clips are cut "
                                       "into windows of this length (see frame_extraction).",
                                   min=1, max=MAX_FRAMES_PER_CLIP, step=4)
    frame_buckets: str = setting("", "Video clips: more clip lengths besides frames_per_clip, comma-separated, "
                                     "each 4n+1, e.g. '17, 49': every clip gives windows of each length it holds, "
                                     "so short clips still train and long ones train at several lengths; a batch "
                                     "always holds one length. Empty = frames_per_clip only.")
    frame_extraction: str = setting("head", "Video clips: which windows each clip gives. head: the first frames; "
                                            "chunk: back-to-back windows; slide: a window every frame_stride "
                                            "frames; uniform: clips_per_video evenly spaced windows.",
                                    choices=FRAME_EXTRACTION_MODES)
    frame_stride: int = setting(8, "Video clips, frame_extraction 'slide': frames between the starts of "
                                   "consecutive windows (after the frame rate change).", min=1, max=1024)
    clips_per_video: int = setting(4, "Video clips, frame_extraction 'uniform': windows taken from each clip, "
                                      "evenly spaced from its start to its end.", min=1, max=1024)
    target_fps: float = setting(16.0, "Video clips: frame rate the clips are brought to first, by dropping frames "
                                      "(a slower clip keeps all its frames). 16 for Wan 2.1 and Wan 2.2 A14B, 24 "
                                      "for Wan 2.2 TI2V 5B. 0 = keep each file's own rate.",
                                min=0.0, max=240.0, step=0.5)

    def __post_init__(self) -> None:
        # A whole-number dropout (0 from an API prompt) is stored as the float the widget gives.
        for name in ("caption_dropout", "target_fps"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
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
        self._check_clip_options()

    def _check_clip_options(self) -> None:
        problem = frame_count_problem(self.frames_per_clip)
        if problem:
            raise DatasetError(f"frames_per_clip = {self.frames_per_clip!r} {problem}")
        parse_frame_buckets(self.frame_buckets)
        if self.frame_extraction not in FRAME_EXTRACTION_MODES:
            raise DatasetError(f"frame_extraction must be one of {', '.join(FRAME_EXTRACTION_MODES)}, "
                               f"got {self.frame_extraction!r}")
        positive_int("frame_stride", self.frame_stride, 1)
        positive_int("clips_per_video", self.clips_per_video, 1)
        fps = self.target_fps
        if isinstance(fps, bool) or not isinstance(fps, float) or not 0.0 <= fps <= 240.0:
            raise DatasetError(f"target_fps must be a frame rate between 0 and 240 (16 for Wan 2.1 and Wan 2.2 "
                               f"A14B, 24 for Wan 2.2 TI2V 5B; 0 keeps each clip's own rate), got {fps!r}")

    @property
    def trigger(self) -> str:
        """The trigger word as captions use it (surrounding spaces dropped)."""
        return self.trigger_word.strip()

    @property
    def clip_lengths(self) -> tuple[int, ...]:
        """Every training clip length, ascending: frames_per_clip and the frame_buckets entries."""
        return tuple(sorted({self.frames_per_clip, *parse_frame_buckets(self.frame_buckets)}))

    @property
    def normalized_caption_extension(self) -> str:
        extension = self.caption_extension.strip()
        return extension if extension.startswith(".") else "." + extension
