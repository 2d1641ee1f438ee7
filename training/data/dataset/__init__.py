"""Image (and video clip) + caption datasets for LoRA training: kohya folder scan, captions, repeats,
buckets, crops, clip windows.

ComfyUI-agnostic (PIL, numpy, torch only). The node in ``nodes/dataset_node.py`` builds a
:class:`LoraDataset` with :func:`build_folder_dataset` or :func:`build_image_dataset`; the trainer
consumes it through the small API documented on :class:`LoraDataset`.

What the trainer can rely on
----------------------------
* ``dataset.samples[i]`` is one image or one window of a video clip (a :class:`DatasetSample`) with
  its bucket (the (width, height) fed to the model), the size it is resized to before cropping, and
  the centre-crop offset. SDXL's size conditioning uses ``original_size``, ``crop_offset`` (or the
  offset returned by ``load_image`` for random crops) and ``bucket`` as the target size.
* ``dataset.epoch_indices(rng)`` lists every sample index ``repeats`` times, shuffled; group them by
  ``dataset.samples[i].batch_key`` (``dataset.buckets()``) to form batches of one shape and one frame
  count: the key is the bucket (width, height) for images (and any one-frame sample), so image
  datasets keep those keys, and (width, height, frames) for clip windows.
* Clips (``dataset.has_clips``): a sample's ``frames`` are the source-file frame indices of its window
  (4n+1 of them for Wan; empty for an image), ``fps`` its frame rate after the ``target_fps`` change
  (0 for an image). ``dataset.render_frames(i, offset, flipped)`` gives every frame at bucket size,
  each resized, cropped and flipped as ``render`` does an image (one crop and flip per window); for an
  image it is ``[render(...)]``. ``render``, ``load_image`` and ``source_image`` give a clip window's
  first frame, so image-only code (the preview) still works. A clip file gives one sample per window,
  all sharing its caption and bucket.
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
* ``ss_tag_frequency`` is ``{folder name: {tag (lower case): count}}``, one count per image (or clip
  file, whatever its number of windows).

Video clips follow musubi-tuner's video dataset
-----------------------------------------------
* ``.mp4``, ``.webm``, ``.mov`` and ``.gif`` files are clips, read with PyAV (imported only when a
  clip is met); a one-frame GIF is a still image. Frames are first brought to ``target_fps`` by
  dropping frames (never repeating them), then cut into windows of each clip length
  (``frames_per_clip`` and ``frame_buckets``, musubi's ``target_frames``) by ``frame_extraction``
  head/chunk/slide/uniform (``frame_stride``, ``clips_per_video`` = musubi's ``frame_sample``).

Modules (one per part, each importable alone)
---------------------------------------------
``options`` (errors, :class:`DatasetOptions`), ``buckets`` (bucketing arithmetic), ``captions``,
``images`` (probing, decoding, resize and crop), ``video`` (frame rate change and clip windows, pure;
clip probing and decoding with PyAV), ``lora_dataset`` (:class:`DatasetSample`,
:class:`LoraDataset`), ``scan`` (the folder walk shared by the scan and the change check),
``build`` (folder or IMAGE batch -> dataset), ``report`` (summary text and preview grid). This
package re-exports the names the node, the scripts and the tests use.
"""
from __future__ import annotations

from .buckets import BucketChoice, bucket_resolutions, select_bucket, square_bucket
from .build import build_folder_dataset, build_image_dataset
from .captions import caption_for_step, place_trigger_word, split_tags
from .images import to_rgb
from .lora_dataset import DatasetSample, LoraDataset
from .options import (CLIP_OPTION_NAMES, CROP_MODES, FRAME_EXTRACTION_MODES, BadClipError, BadImageError,
                      DatasetError, DatasetOptions)
from .report import PREVIEW_CELL, PREVIEW_LABEL_HEIGHT, preview_grid, summarize
from .scan import CLIP_EXTENSIONS, accepted_extensions_text, folder_fingerprint, require_folder
from .video import clip_windows, resampled_frames

__all__ = [
    "CLIP_EXTENSIONS", "CLIP_OPTION_NAMES", "CROP_MODES", "FRAME_EXTRACTION_MODES", "PREVIEW_CELL",
    "PREVIEW_LABEL_HEIGHT", "BadClipError", "BadImageError", "BucketChoice", "DatasetError", "DatasetOptions",
    "DatasetSample", "LoraDataset", "accepted_extensions_text", "bucket_resolutions", "build_folder_dataset",
    "build_image_dataset", "caption_for_step", "clip_windows", "folder_fingerprint", "place_trigger_word",
    "preview_grid", "require_folder", "resampled_frames", "select_bucket", "split_tags", "square_bucket",
    "summarize", "to_rgb",
]
