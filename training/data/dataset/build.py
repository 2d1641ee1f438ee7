"""Building datasets: a scanned folder or an IMAGE batch with captions -> :class:`LoraDataset`."""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from .buckets import bucket_resolutions, choose_bucket
from .captions import place_trigger_word, read_caption, tag_frequency
from .images import probe_image
from .lora_dataset import DatasetSample, LoraDataset
from .options import BadImageError, DatasetError, DatasetOptions
from .scan import accepted_extensions_text, json_digest, list_image_files, require_folder

if TYPE_CHECKING:
    import torch

logger = logging.getLogger("lora_lab")

IN_MEMORY_SOURCE = "images input"
# Key of the in-memory images in ss_tag_frequency (kohya uses the folder name).
IN_MEMORY_TAG_GROUP = "images"


def _caption_path(image_path: Path, extension: str) -> Path:
    return image_path.with_name(image_path.stem + extension)


def _settings_key(options: DatasetOptions) -> dict:
    return {name: getattr(options, name) for name in options.__dataclass_fields__}


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
    input."""
    root = require_folder(Path(folder).expanduser()).resolve()
    controls = (control_images(require_folder(Path(control_folder).expanduser(), name="control_folder").resolve())
                if control_folder else None)
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
        path = scanned.path
        try:
            width, height = probe_image(path)
            try:
                choice = choose_bucket(width, height, options, resolutions)
            except ValueError as error:
                raise BadImageError(path, str(error)) from error
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
        sample = DatasetSample(path=str(path), image_index=-1, caption=caption,
                               repeats=scanned.repeats, original_size=(width, height),
                               bucket=choice.bucket, resized_size=choice.resized_size,
                               crop_offset=choice.crop_offset, control_path=control)
        samples.append(sample)
        groups.append((scanned.group, place_trigger_word(caption, options.trigger_word)))
        stat = path.stat()
        row = [str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns, caption, scanned.repeats]
        if control:
            control_stat = Path(control).stat()
            row += [control, control_stat.st_size, control_stat.st_mtime_ns]
        fingerprint_rows.append(row)
    if not samples:
        raise DatasetError(f"folder {str(root)!r}: all {len(skipped)} images are unreadable "
                           f"(first: {skipped[0][0]}: {skipped[0][1]}); nothing to train on")
    return _make_dataset(samples, options, tag_frequency(groups), source=str(root),
                         fingerprint=json_digest({"files": fingerprint_rows,
                                                  "settings": _settings_key(options)}),
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
    logger.info("LoRA Dataset: %d images (%d with repeats) in %d buckets from %s",
                dataset.image_count, dataset.effective_count, len(dataset.buckets()), source)
    return dataset
