"""Building datasets: a scanned folder (images and video clips) or an IMAGE batch with captions ->
:class:`LoraDataset`."""
from __future__ import annotations

import hashlib
import logging
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from PIL import Image

from .buckets import bucket_resolutions, choose_bucket
from .captions import place_trigger_word, read_caption, tag_frequency
from .images import probe_image
from .lora_dataset import DatasetSample, LoraDataset
from .options import CLIP_OPTION_NAMES, BadClipError, BadImageError, DatasetError, DatasetOptions
from .scan import (CLIP_EXTENSIONS, SUPPORTED_EXTENSIONS, is_clip_name, json_digest, list_image_files,
                   require_folder)
from .video import ClipPlan, plan_clip

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lora_lab")

IN_MEMORY_SOURCE = "images input"
# Key of the in-memory images in ss_tag_frequency (kohya uses the folder name).
IN_MEMORY_TAG_GROUP = "images"


def _caption_path(image_path: Path, extension: str) -> Path:
    return image_path.with_name(image_path.stem + extension)


def _settings_key(options: DatasetOptions, clips: bool = False) -> dict:
    """The options that shape the samples. The clip options are left out when there are no clips:
    changing them changes nothing an image dataset holds, so its latent cache must stay valid (and
    its key stays what it was before clips were supported)."""
    return {name: getattr(options, name) for name in options.__dataclass_fields__
            if clips or name not in CLIP_OPTION_NAMES}


def control_images(folder: Path) -> dict[str, Path]:
    """File stem -> control image under `folder` (recursive); DatasetError when two share a stem."""
    found: dict[str, Path] = {}
    for scanned in list_image_files(folder, 1)[0]:
        other = found.setdefault(scanned.path.stem, scanned.path)
        if other != scanned.path:
            raise DatasetError(f"control_folder {str(folder)!r} holds two control images named {scanned.path.stem!r} "
                               f"({other.name} and {scanned.path.name}): a control image pairs with the training "
                               "image of the same file name, so keep one")
    return found


def build_folder_dataset(folder: str | Path, options: DatasetOptions, control_folder: str | Path | None = None
                         ) -> LoraDataset:
    """Scan ``folder`` (read only) into a :class:`LoraDataset`. With ``control_folder`` (an edit model's
    dataset) every image pairs with the control image of the same file name there (any image
    extension: musubi-tuner's control_directory, ai-toolkit's control_path). Raises DatasetError on bad
    input.

    A video clip gives one sample per window (:func:`video.plan_clip`), all with the clip's caption,
    repeats and bucket (chosen from its frame size exactly as for an image); a still GIF is an image.
    """
    root = require_folder(Path(folder).expanduser()).resolve()
    controls = (control_images(require_folder(Path(control_folder).expanduser(), name="control_folder").resolve())
                if control_folder else None)
    files, other_files = list_image_files(root, options.repeats, clips=True)
    if not files:
        what = "is empty" if other_files == 0 else f"holds {other_files} files but no images or clips"
        raise DatasetError(f"folder {str(root)!r} {what}: accepted image extensions are "
                           f"{', '.join(SUPPORTED_EXTENSIONS)} and clip extensions {', '.join(CLIP_EXTENSIONS)} "
                           "(searched recursively)")
    clip_files = [scanned.path for scanned in files if is_clip_name(scanned.path.name)]
    if controls is not None and clip_files:
        raise DatasetError(f"control_folder {str(control_folder)!r} is set, but folder {str(root)!r} holds "
                           f"{len(clip_files)} video clips (first: {clip_files[0].name}): control images pair "
                           "with training images only. Clear control_folder to train on the clips, or take "
                           "the clips out of the folder")

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
        path = scanned.path
        windows: list[tuple[int, ...]] = [()]   # an image is one sample with no frames
        fps = 0.0
        try:
            plan = _plan_clip_or_still(path, options) if is_clip_name(path.name) else None
            if plan is None:
                width, height = probe_image(path)
            else:
                width, height = plan.info.width, plan.info.height
                windows, fps = plan.windows, plan.fps
            try:
                choice = choose_bucket(width, height, options, resolutions)
            except ValueError as error:
                bad = BadImageError if plan is None else BadClipError
                raise bad(path, str(error)) from error
        except BadImageError as error:
            if not options.skip_bad_images:
                raise
            logger.warning("LoRA Dataset: skipping %s: %s", path, error.reason)
            skipped.append((str(path), error.reason))
            continue
        control = "" if controls is None else str(controls.get(path.stem, ""))
        if controls is not None and not control:
            reason = f"it has no control image of the same name in control_folder {str(control_folder)!r}"
            if not options.skip_bad_images:
                raise DatasetError(f"image {str(path)!r}: {reason}. Add one (any image extension), or enable "
                                   "skip_bad_images to leave the image out")
            logger.warning("LoRA Dataset: skipping %s: %s", path, reason)
            skipped.append((str(path), reason))
            continue
        caption = read_caption(_caption_path(path, extension))
        if caption is None:
            missing += 1
            caption = ""
        samples.extend(DatasetSample(path=str(path), image_index=-1, caption=caption,
                                     repeats=scanned.repeats, original_size=(width, height),
                                     bucket=choice.bucket, resized_size=choice.resized_size,
                                     crop_offset=choice.crop_offset, control_path=control, frames=frames, fps=fps)
                       for frames in windows)
        # One count per file (kohya counts per image): a clip's windows share its one caption.
        groups.append((scanned.group, place_trigger_word(caption, options.trigger_word)))
        stat = path.stat()
        row = [str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns, caption, scanned.repeats]
        if control:
            control_stat = Path(control).stat()
            row += [control, control_stat.st_size, control_stat.st_mtime_ns]
        fingerprint_rows.append(row)
    if not samples:
        what = "images and clips" if clip_files else "images"
        raise DatasetError(f"folder {str(root)!r}: all {len(skipped)} {what} are unreadable "
                           f"(first: {skipped[0][0]}: {skipped[0][1]}); nothing to train on")
    has_clips = any(sample.frames for sample in samples)
    return _make_dataset(samples, options, tag_frequency(groups), source=str(root),
                         fingerprint=json_digest({"files": fingerprint_rows,
                                                  "settings": _settings_key(options, has_clips)}),
                         skipped=skipped, missing_captions=missing)


def _plan_clip_or_still(path: Path, options: DatasetOptions) -> ClipPlan | None:
    """The clip's windows, or None for a GIF of one frame: a still picture saved as GIF is an image
    (read through PIL like the others, a one-frame sample), not a clip too short for every length."""
    still = path.suffix.lower() == ".gif"
    try:
        plan = plan_clip(path, options)
    except BadClipError:
        if still and _gif_frame_count(path) == 1:
            return None
        raise
    return None if still and plan.info.frame_count == 1 else plan


def _gif_frame_count(path: Path) -> int:
    """Frames PIL finds in a GIF; 0 when it cannot read it (the clip's own error is then the one shown)."""
    try:
        with Image.open(path) as image:
            return int(getattr(image, "n_frames", 1))
    except (OSError, SyntaxError, ValueError, struct.error, EOFError, IndexError):
        return 0


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
                         fingerprint=json_digest({"images": content, "shape": list(pixels.shape),
                                                  "captions": [sample.caption for sample in samples],
                                                  "settings": _settings_key(options)}),
                         images=pixels, missing_captions=missing)


def _make_dataset(samples: list[DatasetSample], options: DatasetOptions, frequency: dict, *,
                  source: str, fingerprint: str, images: "torch.Tensor | None" = None,
                  skipped: list[tuple[str, str]] | None = None, missing_captions: int = 0) -> LoraDataset:
    dataset = LoraDataset(
        samples=samples, options=options, tag_frequency=frequency, images=images, source=source,
        fingerprint=fingerprint, skipped=list(skipped or []), missing_captions=missing_captions)
    what = "samples (images and clip windows)" if dataset.has_clips else "images"
    logger.info("LoRA Dataset: %d %s (%d with repeats) in %d buckets from %s",
                dataset.image_count, what, dataset.effective_count, len(dataset.buckets()), source)
    return dataset
