"""The dataset: one :class:`DatasetSample` per image or clip window, and the :class:`LoraDataset` the trainer
consumes."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from ..image_tensors import image_to_pil
from .captions import caption_for_step, place_trigger_word
from .images import open_rgb, resize_and_crop, to_rgb
from .options import BadImageError, DatasetError, DatasetOptions
from .video import decode_frames

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DatasetSample:
    """One image, or one window of a video clip (a clip file gives one sample per window, all with the
    file's caption, bucket and sizes)."""

    path: str                        # absolute image or clip file path ("" for an in-memory image)
    image_index: int                 # index into LoraDataset.images for in-memory images, else -1
    caption: str                     # caption text as read (no trigger word added), "" when missing
    repeats: int                     # times the sample appears per epoch
    original_size: tuple[int, int]   # (width, height) after EXIF transpose
    bucket: tuple[int, int]          # (width, height) the trainer feeds the model
    resized_size: tuple[int, int]    # (width, height) after resize, before crop
    crop_offset: tuple[int, int]     # (left, top) for center crop; random crop draws its own
    control_path: str = ""           # its paired control image (an edit model's input), "" when none
    frames: tuple[int, ...] = ()     # a clip window's source-file frame indices, in decode order; () for an image
    fps: float = 0.0                 # a clip's frame rate after the target_fps change; 0 for an image

    @property
    def frame_count(self) -> int:
        """Frames the model sees: the window's length, 1 for an image."""
        return len(self.frames) or 1

    @property
    def batch_key(self) -> tuple[int, ...]:
        """What a batch must share: the bucket (width, height) for a one-frame sample (every image), so
        image datasets keep their keys, and (width, height, frames) for a longer clip window."""
        return self.bucket if self.frame_count == 1 else (*self.bucket, self.frame_count)


@dataclass
class LoraDataset:
    """The LORA_DATASET socket value: a plain description of what to train on (no pixels loaded).

    The methods below are what the trainer uses; the options (crop, flip, captions...) are in `options`.
    """

    samples: list[DatasetSample]        # one per image file or clip window (repeats are not expanded here)
    options: DatasetOptions             # what the LoRA Dataset node's widgets decided
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

    def buckets(self) -> dict[tuple[int, ...], list[int]]:
        """Batch key -> sample indices, keys sorted: a batch takes its samples from one key.

        The key is :attr:`DatasetSample.batch_key`: the bucket (width, height) for images (and one-frame
        clip windows), (width, height, frames) for clip windows, so a batch always has one shape and
        one frame count."""
        grouped: dict[tuple[int, ...], list[int]] = {}
        for index, sample in enumerate(self.samples):
            grouped.setdefault(sample.batch_key, []).append(index)
        return dict(sorted(grouped.items()))

    def load_image(self, index: int, rng: random.Random | None = None
                   ) -> tuple[Image.Image, tuple[int, int], bool]:
        """(RGB image at bucket size, crop offset used (left, top), flipped); a clip window's first frame.

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
        if rng is not None and self.options.crop == "random":
            offset = (rng.randint(0, sample.resized_size[0] - sample.bucket[0]),
                      rng.randint(0, sample.resized_size[1] - sample.bucket[1]))
        flipped = bool(rng is not None and self.options.flip and rng.random() < 0.5)
        return offset, flipped

    def render(self, index: int, offset: tuple[int, int], flipped: bool) -> Image.Image:
        """The RGB image at bucket size for a given crop offset and flip (a clip window's first frame,
        so the preview and anything that works on images see clips too)."""
        return self._place(index, self.source_image(index), offset, flipped)

    def render_frames(self, index: int, offset: tuple[int, int], flipped: bool) -> list[Image.Image]:
        """Every frame of the sample at bucket size, in time order, each resized, cropped and flipped
        exactly as :meth:`render` does an image (one crop and one flip for the whole window, so the
        motion stays intact); an image gives ``[render(...)]``. A clip is decoded once per call."""
        sample = self.samples[index]
        if not sample.frames:
            return [self.render(index, offset, flipped)]
        return decode_frames(sample.path, sample.frames,
                             lambda frame: self._place(index, frame, offset, flipped))

    def _place(self, index: int, image: Image.Image, offset: tuple[int, int], flipped: bool) -> Image.Image:
        sample = self.samples[index]
        cropped = resize_and_crop(image, sample.resized_size, sample.bucket, offset)
        if flipped:
            cropped = cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return cropped

    def render_control(self, index: int, offset: tuple[int, int], flipped: bool) -> Image.Image:
        """The sample's control image as the model sees it beside the target: resized to the target's
        size before cropping and cropped and flipped the same way (musubi-tuner's default: the control
        at the target's resolution), so the pair stays aligned."""
        sample = self.samples[index]
        try:
            control = open_rgb(sample.control_path)
        except (OSError, SyntaxError, ValueError) as error:
            raise BadImageError(sample.control_path, f"changed or unreadable since the scan ({error})") from error
        cropped = resize_and_crop(control, sample.resized_size, sample.bucket, offset)
        return cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flipped else cropped

    @property
    def has_clips(self) -> bool:
        """Some samples are clip windows (a video model's dataset): the trainer uses :meth:`render_frames`."""
        return any(sample.frames for sample in self.samples)

    @property
    def has_controls(self) -> bool:
        """Every sample has a control image (a dataset for an edit model)."""
        return bool(self.samples) and all(sample.control_path for sample in self.samples)

    def source_image(self, index: int) -> Image.Image:
        """The full RGB image of a sample, EXIF orientation applied, before resize and crop (a clip
        window's first frame)."""
        sample = self.samples[index]
        if sample.frames:
            return decode_frames(sample.path, sample.frames[:1])[0]
        if sample.image_index >= 0:
            if self.images is None:
                raise DatasetError("this in-memory dataset has lost its images tensor")
            return to_rgb(image_to_pil(self.images[sample.image_index]))
        try:
            return open_rgb(sample.path)
        except (OSError, SyntaxError, ValueError) as error:
            raise BadImageError(sample.path, f"changed or unreadable since the scan ({error})") from error

    def base_caption(self, index: int) -> str:
        """The caption with the trigger word placed first, before shuffle/dropout."""
        return place_trigger_word(self.samples[index].caption, self.options.trigger)

    def caption_for_step(self, index: int, rng: random.Random) -> str:
        """Caption for one step: trigger word first, shuffle (keeping keep_tokens), dropout."""
        options = self.options
        return caption_for_step(self.samples[index].caption, rng, options.trigger, options.shuffle_captions,
                                options.keep_tokens, options.caption_dropout)

    @property
    def caching_possible(self) -> bool:
        """Latents can be encoded once: False when every epoch draws a new random crop."""
        return self.options.crop != "random"

    @property
    def static_captions(self) -> bool:
        """Captions never change between steps (no shuffle, no dropout): TE outputs are cacheable."""
        return not self.options.shuffle_captions and self.options.caption_dropout <= 0.0

    @property
    def image_count(self) -> int:
        """Samples: images, and clip windows when there are clips."""
        return len(self.samples)

    @property
    def effective_count(self) -> int:
        """Samples (images, clip windows) per epoch, repeats included."""
        return sum(sample.repeats for sample in self.samples)
