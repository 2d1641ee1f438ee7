"""Generate a small sample LoRA dataset: images with an obvious learnable pattern, with captions.

Never committed: generated on demand into ``$LORA_LAB_CACHE/fixtures/`` (default
``~/.cache/lora_lab/fixtures/``); an existing complete folder is reused.

Every image shows the same thing the LoRA should learn, a bold red-and-white checkerboard, with a
coloured disc of varying colour, size and place on top; the captions name only the disc (what
varies) and start with the trigger word ``lrlab_checker``, which so comes to mean the checkerboard. After a few hundred steps on a real checkpoint, prompts with the
trigger word turn into checkerboards; on the tiny random demo checkpoint the loss curve is what to
look at.

From Python: ``ensure_sample_dataset()``; the command line is ``scripts/make_sample_dataset.py [FOLDER]``
(prints the folder). ``make_sample_clips(folder)`` writes a few tiny captioned video clips of the same
pattern (the disc moves) for video datasets (Wan), with PyAV.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from .environment import fixtures_dir, generated_once

DATASET_VERSION = 2
DATASET_NAME = f"lora_lab_sample_dataset_v{DATASET_VERSION}"
TRIGGER_WORD = "lrlab_checker"
IMAGE_SIZE = 256
SQUARES = 8  # checkerboard squares per side
COLOURS = {"blue": (40, 90, 230), "green": (40, 180, 70), "yellow": (240, 210, 40), "purple": (140, 60, 200),
           "black": (20, 20, 20), "orange": (250, 140, 30), "cyan": (40, 200, 220), "grey": (128, 128, 128)}
PLACES = {"in the centre": (0.5, 0.5), "at the top left": (0.3, 0.3), "at the bottom right": (0.7, 0.7),
          "at the top right": (0.7, 0.3), "at the bottom left": (0.3, 0.7)}
# Sample clips: (caption words, start and end of the disc's centre as fractions of the frame).
MOTIONS = [("moving right", (0.2, 0.5), (0.8, 0.5)), ("moving down", (0.5, 0.2), (0.5, 0.8)),
           ("moving left", (0.8, 0.5), (0.2, 0.5)), ("moving up", (0.5, 0.8), (0.5, 0.2))]
# mpeg4 (MPEG-4 Part 2) in .mp4: an encoder every PyAV wheel has, and every decoder reads.
CLIP_CODEC = "mpeg4"
CLIP_EXTENSION = ".mp4"


def checker_image(colour: tuple[int, int, int], centre: tuple[float, float], radius: float,
                  size: int = IMAGE_SIZE) -> Image.Image:
    """A red/white checkerboard with one filled disc (centre and radius as fractions of the side)."""
    ys, xs = np.mgrid[0:size, 0:size] / size
    squares = ((xs * SQUARES).astype(int) + (ys * SQUARES).astype(int)) % 2 == 0
    pixels = np.where(squares[..., None], np.array([220, 30, 30]), np.array([245, 245, 245]))
    disc = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 < radius ** 2
    pixels[disc] = colour
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def checker_frame(colour: tuple[int, int, int], centre: tuple[float, float], radius: float,
                  size: tuple[int, int]) -> np.ndarray:
    """A ``size`` (width, height) RGB frame of the checkerboard with one disc (centre and radius as
    fractions of the width and height), as the uint8 array [height, width, 3] an encoder takes."""
    width, height = size
    ys, xs = np.mgrid[0:height, 0:width]
    ys, xs = ys / height, xs / width
    squares = ((xs * SQUARES).astype(int) + (ys * SQUARES).astype(int)) % 2 == 0
    pixels = np.where(squares[..., None], np.array([220, 30, 30]), np.array([245, 245, 245]))
    disc = (xs - centre[0]) ** 2 + (ys - centre[1]) ** 2 < radius ** 2
    pixels[disc] = colour
    return pixels.astype(np.uint8)


def make_sample_clips(folder: Path | str, count: int = 2, frames: int = 9, size: tuple[int, int] = (64, 48),
                      fps: int = 16) -> list[Path]:
    """Write ``count`` tiny clips (``frames`` frames of ``size`` at ``fps``) into ``folder``, each with its
    caption file, and return the clip paths.

    Every clip shows the sample dataset's checkerboard with a coloured disc moving across it (a colour
    and a direction per clip), captioned like the images: the trigger word, then what varies.
    Deterministic: the same arguments give the same frames. Sides must be even (the encoder's 4:2:0
    chroma); PyAV (``av``, a ComfyUI dependency) writes them.
    """
    import av

    width, height = size
    if width % 2 or height % 2 or width < 2 or height < 2:
        raise ValueError(f"size must have even sides of at least 2 pixels (4:2:0 video), got {size}")
    if count < 1 or frames < 1:
        raise ValueError(f"count and frames must be at least 1, got {count} and {frames}")
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    colours = list(COLOURS.items())
    written = []
    for index in range(count):
        colour_name, colour = colours[index % len(colours)]
        motion, start, end = MOTIONS[index % len(MOTIONS)]
        path = target / f"clip{index:02d}_{colour_name}{CLIP_EXTENSION}"
        with av.open(str(path), "w") as container:
            stream = container.add_stream(CLIP_CODEC, rate=fps)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for position in range(frames):
                progress = position / max(1, frames - 1)
                centre = (start[0] + (end[0] - start[0]) * progress, start[1] + (end[1] - start[1]) * progress)
                frame = av.VideoFrame.from_ndarray(checker_frame(colour, centre, 0.18, size), format="rgb24")
                container.mux(stream.encode(frame))
            container.mux(stream.encode())
        caption = f"{TRIGGER_WORD}, a {colour_name} disc {motion}"
        path.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        written.append(path)
    return written


def sample_items() -> list[tuple[str, Image.Image, str]]:
    """(file stem, image, caption) for every sample, deterministic."""
    items = []
    places = list(PLACES.items())
    for index, (colour_name, colour) in enumerate(COLOURS.items()):
        place_name, centre = places[index % len(places)]
        size_name, radius = ("small", 0.12) if index % 2 else ("large", 0.22)
        # The caption names what varies (the disc), not the pattern: the pattern goes with the trigger word.
        caption = f"{TRIGGER_WORD}, a {size_name} {colour_name} disc {place_name}"
        items.append((f"{index:02d}_{colour_name}", checker_image(colour, centre, radius), caption))
    return items


@generated_once
def ensure_sample_dataset(folder: Path | str | None = None) -> Path:
    """Return the sample dataset folder, writing it (into a temporary folder, then renamed) when missing."""
    target = Path(folder) if folder is not None else fixtures_dir() / DATASET_NAME
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".dataset-"))
    try:
        for stem, image, caption in sample_items():
            image.save(staging / f"{stem}.png")
            (staging / f"{stem}.txt").write_text(caption + "\n", encoding="utf-8")
        try:
            os.replace(staging, target)
        except OSError:  # another process wrote it first
            if not target.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
