"""Video clips: the frame arithmetic (frame rate change, training windows) and PyAV probing and decoding.

A clip file gives one training sample per window: a run of consecutive frames of one length (a
``clip_lengths`` entry, 4n+1 for Wan) taken from the clip after it is brought to ``target_fps``. The
arithmetic follows musubi-tuner's video dataset (``frame_extraction`` head/chunk/slide/uniform,
``target_frames``, ``frame_stride``, ``frame_sample``) and is kept in pure functions so that which source
frames a sample holds can be checked by hand. A sample stores the source-file frame indices of its
window, so decoding needs no arithmetic: it keeps the frames at those positions in decode order.

PyAV (``av``, a ComfyUI dependency) is imported only when a clip is met, so image datasets never
need it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from .images import to_rgb
from .options import FRAME_EXTRACTION_MODES, BadClipError, DatasetError, DatasetOptions

# A rate given as a float (a widget value, 29.97) becomes a Fraction close to what the user meant.
FPS_DENOMINATOR_LIMIT = 1_000_000


def load_av():
    """The PyAV module; DatasetError naming the package when it is not installed."""
    try:
        import av
    except ImportError as error:
        raise DatasetError("the folder holds video clips, and reading them needs the PyAV package ('av'), which "
                           "is not installed in this Python: install it (pip install av; ComfyUI's own "
                           "requirements include it), or take the clips out of the folder") from error
    return av


def fps_text(fps: float | Fraction) -> str:
    """A frame rate as the summary and the errors show it: 16, 29.97, 23.98."""
    return f"{float(fps):.4g}"


def _fraction(value: float | Fraction | int) -> Fraction:
    if isinstance(value, Fraction):
        return value
    return Fraction(value).limit_denominator(FPS_DENOMINATOR_LIMIT)


def resampled_frames(frame_count: int, source_fps: float | Fraction, target_fps: float | Fraction) -> list[int]:
    """Source frame indices of a clip of ``frame_count`` frames at ``source_fps`` brought to ``target_fps``.

    Only drops frames, never repeats them: frame k of the new sequence is source frame
    round(k * source_fps / target_fps) (halves rounded up, in exact fractions, so the pattern does not
    drift), for as long as that is below ``frame_count``. A clip that is not faster than the target
    (or ``target_fps`` 0: keep each file's own rate) keeps every frame, at its own rate: making up
    frames would teach the model duplicated motion.
    """
    if frame_count <= 0:
        return []
    source = _fraction(source_fps)
    target = _fraction(target_fps)
    if target <= 0 or source <= target:
        return list(range(frame_count))
    step = source / target
    indices = []
    k = 0
    while True:
        index = math.floor(k * step + Fraction(1, 2))
        if index >= frame_count:
            return indices
        indices.append(index)
        k += 1


def resampled_fps(source_fps: float | Fraction, target_fps: float | Fraction) -> float:
    """The rate a clip plays at after :func:`resampled_frames`: the target, or its own when it is not faster."""
    source = _fraction(source_fps)
    target = _fraction(target_fps)
    return float(target if 0 < target < source else source)


def clip_windows(frame_count: int, lengths: Sequence[int], mode: str, stride: int = 1, count: int = 1
                 ) -> list[tuple[int, int]]:
    """(start, length) of every training window of a clip of ``frame_count`` frames, for each length in
    ``lengths`` (ascending), in that order; a length the clip does not hold gives no window.

    * ``head``: the first ``length`` frames.
    * ``chunk``: back-to-back windows from the start (0, length, 2*length, ...); a shorter rest is left out.
    * ``slide``: a window starting every ``stride`` frames, as long as it fits.
    * ``uniform``: ``count`` windows with evenly spaced starts from 0 to ``frame_count - length``
      (musubi-tuner's ``np.linspace(0, frame_count - length, count, dtype=int)``, in exact integers).
      Starts that coincide (a clip barely longer than the window) are kept once: the same window twice
      would only weigh that clip more than the others, which is what repeats are for.
    """
    if mode not in FRAME_EXTRACTION_MODES:
        raise ValueError(f"frame_extraction must be one of {', '.join(FRAME_EXTRACTION_MODES)}, got {mode!r}")
    if stride < 1 or count < 1:
        raise ValueError(f"stride and count must be at least 1, got {stride} and {count}")
    windows: list[tuple[int, int]] = []
    for length in sorted(set(lengths)):
        if length < 1:
            raise ValueError(f"a clip length must be at least 1 frame, got {length}")
        last_start = frame_count - length
        if last_start < 0:
            continue
        if mode == "head":
            starts = [0]
        elif mode == "chunk":
            starts = list(range(0, last_start + 1, length))
        elif mode == "slide":
            starts = list(range(0, last_start + 1, stride))
        else:
            starts = [0] if count == 1 else list(dict.fromkeys(i * last_start // (count - 1) for i in range(count)))
        windows.extend((start, length) for start in starts)
    return windows


@dataclass(frozen=True)
class ClipInfo:
    """What the scan learns about a clip file without decoding more than its first frame."""

    width: int                # of the frames as shown (the first one's, its rotation applied)
    height: int
    fps: Fraction             # the file's own frame rate (average, else guessed)
    frame_count: int          # frames in its first video stream, counted from the packets


@dataclass(frozen=True)
class ClipPlan:
    """A probed clip and the windows the options cut from it."""

    info: ClipInfo
    fps: float                          # the rate after the frame rate change
    sequence_length: int                # frames after the frame rate change
    windows: list[tuple[int, ...]]      # per window: source frame indices, in decode order


def _stream_rate(stream) -> Fraction | None:
    for rate in (stream.average_rate, stream.guessed_rate):
        if rate is not None and rate > 0:
            return Fraction(rate)
    return None


def probe_clip(path: Path | str) -> ClipInfo:
    """Size, frame rate and frame count of the clip's first video stream, decoding only its first frame.

    The frames are counted by demuxing (reading the packets without decoding them): the container's
    own count (``stream.frames``) is often 0, e.g. for WebM. Decoding the first frame checks the codec
    can read the stream at all. Raises :class:`BadClipError` naming the clip.
    """
    av = load_av()
    errors = (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError)
    try:
        container = av.open(str(path))
    except errors as error:
        raise BadClipError(path, f"not a readable video ({error})") from error
    first = None
    count = 0
    try:
        with container:
            if not container.streams.video:
                raise BadClipError(path, "it holds no video stream")
            stream = container.streams.video[0]
            rate = _stream_rate(stream)
            if rate is None:
                raise BadClipError(path, "its frame rate is unknown (the file gives neither an average nor a "
                                         "guessed rate)")
            for packet in container.demux(stream):
                # An edit list's hidden frame (a discard packet) is decoded for its references but never
                # output, so it is not counted; the empty packet at the end flushes the decoder.
                if packet.size and not getattr(packet, "is_discard", False):
                    count += 1
                if first is None:
                    first = next(iter(packet.decode()), None)
    except BadClipError:
        raise
    except errors as error:
        raise BadClipError(path, f"corrupt or truncated ({error})") from error
    if first is None:
        raise BadClipError(path, f"none of its {count} frames can be decoded (corrupt or truncated)")
    if first.width <= 0 or first.height <= 0:
        raise BadClipError(path, f"has an empty frame size {first.width}x{first.height}")
    if quarter_turns(first) % 2:
        return ClipInfo(first.height, first.width, rate, count)
    return ClipInfo(first.width, first.height, rate, count)


def plan_clip(path: Path | str, options: DatasetOptions) -> ClipPlan:
    """Probe the clip and cut it into the windows ``options`` ask for; BadClipError when it holds none."""
    info = probe_clip(path)
    sequence = resampled_frames(info.frame_count, info.fps, options.target_fps)
    fps = resampled_fps(info.fps, options.target_fps)
    lengths = options.clip_lengths
    windows = clip_windows(len(sequence), lengths, options.frame_extraction, options.frame_stride,
                           options.clips_per_video)
    if not windows:
        own = (f" ({info.frame_count} at its own {fps_text(info.fps)} fps)"
               if len(sequence) != info.frame_count else "")
        frames = "frame" if len(sequence) == 1 else "frames"
        raise BadClipError(path, f"it is too short: {len(sequence)} {frames} at {fps_text(fps)} fps{own}, fewer "
                                 f"than the shortest clip length, {lengths[0]} frames. Lower frames_per_clip or add "
                                 f"a shorter length (4n+1) to frame_buckets")
    return ClipPlan(info, fps, len(sequence),
                    [tuple(sequence[start:start + length]) for start, length in windows])


# Quarter turns counterclockwise -> the PIL transpose that makes them.
TURNS = {1: Image.Transpose.ROTATE_90, 2: Image.Transpose.ROTATE_180, 3: Image.Transpose.ROTATE_270}


def quarter_turns(frame) -> int:
    """Quarter turns (counterclockwise, 0..3) that show the frame upright: the rotation of its display
    matrix, which phones write instead of turning the pixels of a portrait video (the clip's EXIF
    orientation). PyAV gives the matrix's counterclockwise angle; players, ffmpeg's autorotate among
    them, turn the frame by it."""
    rotation = getattr(frame, "rotation", 0) or 0
    return round(rotation / 90) % 4


def frame_to_rgb(frame) -> Image.Image:
    """A decoded frame as an upright RGB PIL image: its display rotation applied, transparency (a GIF's,
    a WebM's alpha) composited on white, as for images."""
    if any(component.is_alpha for component in frame.format.components):
        image = to_rgb(Image.fromarray(frame.to_ndarray(format="rgba"), "RGBA"))
    else:
        image = frame.to_image()
    turns = quarter_turns(frame)
    return image.transpose(TURNS[turns]) if turns else image


def decode_frames(path: Path | str, indices: Sequence[int],
                  transform: Callable[[Image.Image], Image.Image] | None = None) -> list[Image.Image]:
    """The frames at ``indices`` (positions in decode order), each as RGB passed through ``transform``.

    Decodes the file once, from the start up to the last frame wanted, converting only the frames kept;
    ``transform`` (resize and crop) runs as each frame arrives, so a long window of large frames is
    never held at full size. Raises :class:`BadClipError` when the file decodes to fewer frames than
    asked for or fails (changed or damaged since the scan).
    """
    if not indices:
        return []
    av = load_av()
    wanted = set(indices)
    last = max(indices)
    kept: dict[int, Image.Image] = {}
    decoded = 0
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise BadClipError(path, "it holds no video stream (changed since the scan)")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for position, frame in enumerate(container.decode(stream)):
                decoded = position + 1
                if position in wanted:
                    image = frame_to_rgb(frame)
                    kept[position] = transform(image) if transform is not None else image
                if position >= last:
                    break
    except BadClipError:
        raise
    except (av.error.FFmpegError, OSError, ValueError, EOFError, IndexError) as error:
        raise BadClipError(path, f"changed or unreadable since the scan ({error})") from error
    if len(kept) < len(wanted):
        raise BadClipError(path, f"only {decoded} frames decode, but the scan counted at least {last + 1} (the "
                                 "file changed since the scan, or is damaged after its start)")
    return [kept[index] for index in indices]
