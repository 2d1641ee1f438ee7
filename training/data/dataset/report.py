"""What the node shows about a dataset: the summary text and a preview grid of samples as they are cropped."""
from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

from PIL import Image, ImageDraw

from .images import RESAMPLE
from .lora_dataset import LoraDataset
from .scan import is_clip_name
from .video import fps_text


def top_tags(dataset: LoraDataset, count: int = 10) -> list[tuple[str, int]]:
    totals: Counter = Counter()
    for counts in dataset.tag_frequency.values():
        totals.update(counts)
    return sorted(totals.items(), key=lambda item: (-item[1], item[0]))[:count]


def extraction_text(dataset: LoraDataset) -> str:
    """How the clips are cut into windows, in words."""
    options = dataset.options
    return {"head": "head (the first frames of each clip)",
            "chunk": "chunk (back-to-back windows)",
            "slide": f"slide (a window every {options.frame_stride} frames)",
            "uniform": f"uniform (up to {options.clips_per_video} evenly spaced windows per clip)",
            }[options.frame_extraction]


def clip_lines(dataset: LoraDataset) -> list[str]:
    """The summary's lines about video clips: files, windows, their lengths and the frame rate."""
    options = dataset.options
    clips = [sample for sample in dataset.samples if sample.frames]
    rates = {sample.path: sample.fps for sample in clips}
    used = sorted({sample.frame_count for sample in clips})
    unused = [length for length in options.clip_lengths if length not in used]
    lines = [f"clips: {len(rates)} files, {len(clips)} training windows",
             "frames per window: " + ", ".join(str(length) for length in used)
             + (f" (no clip holds {', '.join(str(length) for length in unused)})" if unused else "")
             + f"; frame_extraction {extraction_text(dataset)}"]
    if options.target_fps > 0:
        slower = {path: fps for path, fps in rates.items() if fps < options.target_fps}
        line = f"target fps: {fps_text(options.target_fps)} (faster clips drop frames to reach it)"
        if slower:
            shown = ", ".join(f"{Path(path).name} ({fps_text(fps)} fps)" for path, fps in list(slower.items())[:5])
            more = f" and {len(slower) - 5} more" if len(slower) > 5 else ""
            line += f"; slower clips keep every frame at their own rate: {shown}{more}"
        lines.append(line)
    else:
        lines.append("target fps: 0 (each clip keeps its own rate: "
                     + ", ".join(f"{fps_text(fps)} fps" for fps in sorted(set(rates.values()))) + ")")
    return lines


def bucket_line(dataset: LoraDataset, key: tuple[int, ...], indices: list[int]) -> str:
    with_repeats = sum(dataset.samples[index].repeats for index in indices)
    if len(key) == 3:
        return f"  {key[0]}x{key[1]} x {key[2]} frames: {len(indices)} clips ({with_repeats} with repeats)"
    clip_windows = sum(1 for index in indices if dataset.samples[index].frames)
    what = (f"{len(indices)} images" if not clip_windows
            else f"{len(indices) - clip_windows} images, {clip_windows} one-frame clips")
    return f"  {key[0]}x{key[1]}: {what} ({with_repeats} with repeats)"


def summarize(dataset: LoraDataset) -> str:
    """The node's STRING output: counts, buckets, captions, top tags and the caching note (and, with clips,
    the clip files, their windows, the window lengths and the frame rate)."""
    has_clips = dataset.has_clips
    if has_clips:
        lines = [f"source: {dataset.source}",
                 f"images: {sum(1 for sample in dataset.samples if not sample.frames)}",
                 *clip_lines(dataset),
                 f"effective samples per epoch (with repeats): {dataset.effective_count}"]
    else:
        lines = [f"source: {dataset.source}",
                 f"images: {dataset.image_count}",
                 f"effective images per epoch (with repeats): {dataset.effective_count}"]
    if dataset.has_controls:
        lines.append(f"control images: {dataset.image_count}, paired by file name (an edit model's dataset)")
    repeat_counts = Counter(sample.repeats for sample in dataset.samples)
    if len(repeat_counts) > 1 or next(iter(repeat_counts)) != 1:
        unit = "samples" if has_clips else "images"
        lines.append("repeats: " + ", ".join(f"{repeats}x: {images} {unit}"
                                             for repeats, images in sorted(repeat_counts.items())))
    buckets = dataset.buckets()
    kind = "buckets" if dataset.options.bucketing else "square crop (bucketing off)"
    lines.append(f"{kind}: {len(buckets)}")
    lines.extend(bucket_line(dataset, key, indices) for key, indices in buckets.items())
    lines.append(f"captions missing: {dataset.missing_captions}"
                 + (f" (trigger word '{dataset.options.trigger}' alone used)" if dataset.missing_captions
                    and dataset.options.trigger else ""))
    tags = top_tags(dataset)
    lines.append("top tags: " + (", ".join(f"{tag} ({count})" for tag, count in tags) if tags else "none"))
    caption_mode = []
    if dataset.options.shuffle_captions:
        caption_mode.append(f"tags shuffled per step (first {dataset.options.keep_tokens} kept)")
    if dataset.options.caption_dropout > 0:
        caption_mode.append(f"caption dropout {dataset.options.caption_dropout:g}")
    if caption_mode:
        lines.append("captions: " + "; ".join(caption_mode))
    if dataset.options.flip:
        lines.append("augmentation: random horizontal flip per step")
    if dataset.caching_possible:
        lines.append("caching: latents can be cached once (center crop is fixed"
                     + ("; with flip, both orientations" if dataset.options.flip else "") + ")")
    else:
        lines.append("caching: not possible, crop is random (a new crop each epoch): "
                     "latents are encoded every step")
    if dataset.skipped:
        what = "images and clips" if any(is_clip_name(path) for path, _ in dataset.skipped) else "images"
        lines.append(f"skipped bad {what}: {len(dataset.skipped)}")
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
    """A grid of a few samples as they will be cropped (and flipped), each labelled with its bucket (a clip
    window shows its first frame, labelled with its frame count too)."""
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
        image.thumbnail((PREVIEW_CELL, PREVIEW_CELL), RESAMPLE)
        left = (position % columns) * PREVIEW_CELL
        top = (position // columns) * cell_height
        grid.paste(image, (left + (PREVIEW_CELL - image.width) // 2,
                           top + PREVIEW_LABEL_HEIGHT + (PREVIEW_CELL - image.height) // 2))
        label = (f"{sample.bucket[0]}x{sample.bucket[1]}" + (f" x {sample.frame_count} frames" if sample.frames else "")
                 + (" flipped" if flipped else ""))
        draw.text((left + 4, top + 3), label, fill=(255, 255, 255))
    return grid
