"""LoRA Dataset with video clips: frame rate change and clip windows (hand-computed), real clips written
with PyAV in every container the dataset reads, which source frames a sample decodes to, images and
clips mixed, bad and short clips, the summary, the fingerprints and the options' errors."""
from __future__ import annotations

import os
import random
import struct
import sys
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from support.images import hash_tree, write_image

from lora_lab.training.data import dataset
from lora_lab.training.data.dataset import BadClipError, DatasetError, DatasetOptions
from lora_lab_devtools.sample_dataset import TRIGGER_WORD, make_sample_clips

av = pytest.importorskip("av", reason="PyAV (a ComfyUI dependency) reads and writes the clips")

BITS = 6                  # a frame shows its index as 6 horizontal stripes (white = bit set), up to 63
# One bucket equal to the clip size (no resize, no crop), unless a test says otherwise.
SMALL = dict(resolution=64, min_bucket_resolution=64, max_bucket_resolution=128, bucket_step=32)


def stripes(index: int, size: tuple[int, int]) -> np.ndarray:
    """A frame whose stripes spell ``index`` in binary: rows survive any horizontal crop, flip and
    proportional resize, and lossy codecs keep black and white apart."""
    width, height = size
    pixels = np.zeros((height, width, 3), np.uint8)
    for bit in range(BITS):
        if index >> bit & 1:
            pixels[bit * height // BITS:(bit + 1) * height // BITS] = 255
    return pixels


def frame_id(image: Image.Image) -> int:
    """The index a frame written by :func:`stripes` shows (read at the middle of each stripe)."""
    pixels = np.asarray(image.convert("L"), dtype=np.float64)
    height, width = pixels.shape
    column = pixels[:, width // 4:3 * width // 4].mean(axis=1)
    return sum(1 << bit for bit in range(BITS) if column[int((bit + 0.5) * height / BITS)] > 128)


def require_encoder(name: str) -> None:
    try:
        av.codec.Codec(name, "w")
    except Exception:  # the wheel was built without it
        pytest.skip(f"this PyAV has no {name} encoder")


# (extension, encoder, pixel format): every container the dataset reads, each with a common codec.
CONTAINERS = [(".mp4", "mpeg4", "yuv420p"), (".webm", "libvpx", "yuv420p"), (".mov", "libx264", "yuv420p"),
              (".gif", "gif", "rgb8")]


def write_clip(path: Path, count: int, fps: int = 30, size: tuple[int, int] = (64, 48), codec: str = "mpeg4",
               pixel_format: str = "yuv420p", caption: str | None = None, first: int = 0) -> Path:
    """A clip whose frame k shows index first + k (:func:`stripes`), and its caption file."""
    require_encoder(codec)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pixel_format
        for index in range(count):
            frame = av.VideoFrame.from_ndarray(stripes(first + index, size), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def build(folder: Path, **options) -> dataset.LoraDataset:
    return dataset.build_folder_dataset(folder, DatasetOptions(**{**SMALL, **options}))


def decoded_ids(data: dataset.LoraDataset, index: int, flipped: bool = False) -> list[int]:
    sample = data.samples[index]
    frames = data.render_frames(index, sample.crop_offset, flipped)
    assert all(frame.size == sample.bucket and frame.mode == "RGB" for frame in frames)
    return [frame_id(frame) for frame in frames]


# ---------------------------------------------------------------------------------------------
# The frame arithmetic, computed by hand
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("count, source, target, expected", [
    # 30 -> 16 fps: frame k is round(k * 1.875), halves up: 0, 2.375, 4.25, 6.125, 8.0, 9.875, ...; 30.5 >= 30 ends it
    (30, 30, 16, [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 23, 24, 26, 28]),
    # 24 -> 16: steps of 1.5: 0, 1.5 -> 2, 3.0, 4.5 -> 5, 6, 7.5 -> 8, 9 >= 9 ends it
    (9, 24, 16, [0, 2, 3, 5, 6, 8]),
    (7, 32, 16, [0, 2, 4, 6]),
    (10, 12, 16, list(range(10))),     # slower than the target: every frame, never one twice
    (5, 16, 16, list(range(5))),
    (5, 24, 0, list(range(5))),        # target 0: each file keeps its own rate
    (0, 30, 16, []),
])
def test_resampled_frames_hand_computed(count, source, target, expected):
    assert dataset.resampled_frames(count, source, target) == expected


def test_resampled_frames_ntsc_rate_keeps_the_average_rate_without_drift():
    ntsc = Fraction(30000, 1001)
    indices = dataset.resampled_frames(3000, ntsc, 16)      # 100 s of 29.97 fps video
    assert indices == sorted(set(indices)) and indices[0] == 0 and indices[-1] < 3000
    assert len(indices) == 1602                              # 3000 frames * 16 / 29.97 = 1601.6, halves up
    assert dataset.resampled_frames(3000, float(ntsc), 16) == indices   # a float rate gives the same frames


@pytest.mark.parametrize("mode, lengths, stride, count, expected", [
    ("head", [5, 9], 1, 1, [(0, 5), (0, 9)]),
    ("head", [9, 25], 1, 1, [(0, 9)]),                                  # 25 frames do not fit
    ("chunk", [9, 5], 1, 1, [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (9, 9)]),   # lengths ascending
    ("slide", [9], 4, 1, [(0, 9), (4, 9), (8, 9)]),                     # last start 20 - 9 = 11
    ("slide", [5, 17], 8, 1, [(0, 5), (8, 5), (0, 17)]),
    # linspace(0, 11, 4, dtype=int) = 0, 3.67, 7.33, 11 -> 0, 3, 7, 11
    ("uniform", [9], 1, 4, [(0, 9), (3, 9), (7, 9), (11, 9)]),
    ("uniform", [9], 1, 1, [(0, 9)]),
    ("uniform", [19], 1, 4, [(0, 19), (1, 19)]),                        # 0, 0, 0, 1: each start once
])
def test_clip_windows_hand_computed(mode, lengths, stride, count, expected):
    assert dataset.clip_windows(20, lengths, mode, stride, count) == expected


def test_uniform_windows_are_musubi_linspace_starts():
    for frames in range(1, 60):
        for length in (1, 5, 9, 17, 33):
            for count in range(1, 9):
                if frames < length:
                    assert dataset.clip_windows(frames, [length], "uniform", 1, count) == []
                    continue
                linspace = np.linspace(0, frames - length, count, dtype=int).tolist()
                starts = [start for start, _ in dataset.clip_windows(frames, [length], "uniform", 1, count)]
                assert starts == list(dict.fromkeys(linspace)), (frames, length, count)


def test_clips_shorter_than_every_length_give_no_window():
    for mode in dataset.FRAME_EXTRACTION_MODES:
        assert dataset.clip_windows(8, [9, 17], mode, 2, 3) == []
        assert dataset.clip_windows(9, [9, 17], mode, 2, 3) == [(0, 9)]


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, message", [
    ({"frames_per_clip": 31}, r"frames_per_clip = 31 must be 4n\+1 frames .*use 29 or 33"),
    ({"frames_per_clip": 2}, r"frames_per_clip = 2 must be 4n\+1 .*use 1 or 5"),
    ({"frames_per_clip": 0}, r"frames_per_clip = 0 must be between 1 and 1025"),
    ({"frames_per_clip": 1029}, r"frames_per_clip = 1029 must be between 1 and 1025"),
    ({"frame_buckets": "17, 30"}, r"frame_buckets entry '30' \(in '17, 30'\) must be 4n\+1 .*use 29 or 33"),
    ({"frame_buckets": "17; 49"}, r"frame_buckets entry '17; 49' .* is not a whole number: .*separated by commas"),
    ({"frame_buckets": "9, nine"}, r"frame_buckets entry 'nine'"),
    ({"frame_buckets": "0"}, r"frame_buckets entry '0' .*between 1 and 1025"),
    ({"frame_extraction": "random"}, r"frame_extraction must be one of head, chunk, slide, uniform, got 'random'"),
    ({"frame_stride": 0}, r"frame_stride must be an integer >= 1, got 0"),
    ({"clips_per_video": 0}, r"clips_per_video must be an integer >= 1, got 0"),
    ({"target_fps": 300.0}, r"target_fps must be a frame rate between 0 and 240 .*got 300\.0"),
    ({"target_fps": -1.0}, r"target_fps .*got -1\.0"),
])
def test_bad_clip_options_are_rejected_naming_the_value_and_the_fix(options, message):
    with pytest.raises(DatasetError, match=message):
        DatasetOptions(**options)


def test_clip_options_defaults_order_and_lengths():
    fields = list(DatasetOptions.__dataclass_fields__)
    # Appended after the existing widgets (saved workflows store widget values by position).
    assert fields[fields.index("skip_bad_images") + 1:] == list(dataset.CLIP_OPTION_NAMES)
    options = DatasetOptions()
    assert (options.frames_per_clip, options.frame_buckets, options.frame_extraction, options.frame_stride,
            options.clips_per_video, options.target_fps) == (33, "", "head", 8, 4, 16.0)
    assert options.clip_lengths == (33,)
    assert DatasetOptions(frame_buckets=" 49, 17,, 33 ").clip_lengths == (17, 33, 49)
    assert DatasetOptions(target_fps=24).target_fps == 24.0 and isinstance(DatasetOptions(target_fps=24).target_fps,
                                                                           float)
    assert DatasetOptions.from_values({"frames_per_clip": "17", "target_fps": "24"}).frames_per_clip == 17


# ---------------------------------------------------------------------------------------------
# Real clips: every container, which frames a sample holds and decodes to
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extension, codec, pixel_format", CONTAINERS)
def test_every_container_scans_and_decodes_the_right_source_frames(tmp_path: Path, extension, codec, pixel_format):
    # GIF stores delays in 1/100 s: 10 fps is exact; brought to 5 fps it keeps every other frame.
    fps, target = (10, 5.0) if extension == ".gif" else (30, 16.0)
    clip = write_clip(tmp_path / "data" / f"walk{extension.upper()}", 24, fps, codec=codec,
                      pixel_format=pixel_format, caption="sks, walking")
    data = build(tmp_path / "data", frames_per_clip=5, frame_extraction="slide", frame_stride=3, target_fps=target)
    sequence = dataset.resampled_frames(24, fps, target)
    if extension != ".gif":   # 30 -> 16 fps, by hand: round(k * 1.875) below 24
        assert sequence == [0, 2, 4, 6, 8, 9, 11, 13, 15, 17, 19, 21, 23]
    expected = [tuple(sequence[start:start + 5]) for start in range(0, len(sequence) - 4, 3)]
    assert [sample.frames for sample in data.samples] == expected
    assert all(sample.path == str(clip.resolve()) and sample.caption == "sks, walking" for sample in data.samples)
    assert all(sample.fps == target and sample.original_size == (64, 48) for sample in data.samples)
    assert data.has_clips and data.tag_frequency == {"data": {"sks": 1, "walking": 1}}   # one count per file
    for index, sample in enumerate(data.samples):
        assert decoded_ids(data, index) == list(sample.frames), index
        assert decoded_ids(data, index, flipped=True) == list(sample.frames)
    offset = data.samples[0].crop_offset
    plain, mirrored = data.render_frames(0, offset, False), data.render_frames(0, offset, True)
    assert all(np.array_equal(np.asarray(one)[:, ::-1], np.asarray(other)) for one, other in zip(plain, mirrored))
    assert np.array_equal(np.asarray(data.render(0, offset, False)), np.asarray(plain[0]))
    assert frame_id(data.source_image(1)) == data.samples[1].frames[0]


def test_webm_frames_are_counted_from_the_packets(tmp_path: Path):
    """WebM files carry no frame count (PyAV's stream.frames is 0): the scan counts packets."""
    clip = write_clip(tmp_path / "a.webm", 13, 16, codec="libvpx")
    with av.open(str(clip)) as container:
        assert container.streams.video[0].frames == 0
    data = build(tmp_path, frames_per_clip=13)
    assert [sample.frames for sample in data.samples] == [tuple(range(13))]


def test_each_extraction_mode_through_a_real_clip(tmp_path: Path):
    write_clip(tmp_path / "c.mp4", 20, 16)
    lengths = dict(frames_per_clip=9, frame_buckets="5")
    by_mode = {mode: [(sample.frames[0], sample.frame_count)
                      for sample in build(tmp_path, frame_extraction=mode, frame_stride=4, clips_per_video=4,
                                          **lengths).samples]
               for mode in dataset.FRAME_EXTRACTION_MODES}
    assert by_mode == {"head": [(0, 5), (0, 9)],
                       "chunk": [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (9, 9)],
                       "slide": [(0, 5), (4, 5), (8, 5), (12, 5), (0, 9), (4, 9), (8, 9)],
                       "uniform": [(0, 5), (5, 5), (10, 5), (15, 5), (0, 9), (3, 9), (7, 9), (11, 9)]}


def test_target_fps_zero_and_slower_clips_keep_every_frame(tmp_path: Path):
    write_clip(tmp_path / "fast.mp4", 12, 30)
    write_clip(tmp_path / "slow.mp4", 12, 12)
    own = build(tmp_path, frames_per_clip=9, target_fps=0)
    assert [(Path(sample.path).name, sample.frames, sample.fps) for sample in own.samples] == [
        ("fast.mp4", tuple(range(9)), 30.0), ("slow.mp4", tuple(range(9)), 12.0)]
    assert "target fps: 0 (each clip keeps its own rate: 12 fps, 30 fps)" in dataset.summarize(own)
    data = build(tmp_path, frames_per_clip=5, target_fps=16)
    assert [(Path(sample.path).name, sample.frames, sample.fps) for sample in data.samples] == [
        ("fast.mp4", (0, 2, 4, 6, 8), 16.0), ("slow.mp4", (0, 1, 2, 3, 4), 12.0)]
    assert ("target fps: 16 (faster clips drop frames to reach it); slower clips keep every frame at their own "
            "rate: slow.mp4 (12 fps)") in dataset.summarize(data)


def test_transparent_gif_frames_are_composited_on_white(tmp_path: Path):
    frames = []
    for index in range(5):
        frame = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
        frame.paste((200, 30, 30, 255), (index * 8, 8, index * 8 + 16, 40))
        frames.append(frame)
    frames[0].save(tmp_path / "moving.gif", save_all=True, append_images=frames[1:], duration=100, loop=0,
                   disposal=2)
    data = build(tmp_path, frames_per_clip=5, target_fps=0)
    rendered = data.render_frames(0, data.samples[0].crop_offset, False)
    assert len(rendered) == 5 and data.samples[0].fps == 10.0
    for index, frame in enumerate(rendered):
        pixels = np.asarray(frame).astype(int)
        assert (pixels[2, 60] >= 250).all(), index                    # the transparent corner: white
        red = pixels[24, index * 8 + 8]
        assert red[0] > 150 and red[1] < 90 and red[2] < 90, index     # the square, where it moved to


def test_a_one_frame_gif_is_an_image(tmp_path: Path):
    Image.new("RGB", (64, 48), (10, 200, 10)).save(tmp_path / "still.gif")
    data = build(tmp_path)
    assert data.samples[0].frames == () and data.samples[0].batch_key == data.samples[0].bucket
    assert not data.has_clips
    assert np.asarray(data.load_image(0)[0])[20, 20].tolist() == [10, 200, 10]


# ---------------------------------------------------------------------------------------------
# Images and clips together; frame buckets; batches
# ---------------------------------------------------------------------------------------------

def test_images_and_clips_mix_with_batch_keys_by_frame_count(tmp_path: Path):
    root = tmp_path / "mixed"
    write_image(root / "a.png", (64, 64), 1, caption="sks, still")
    write_image(root / "b.png", (96, 32), 2, caption="sks, still, wide")
    write_clip(root / "5_clips" / "walk.mp4", 21, 16, (96, 32), caption="sks, walking")
    write_clip(root / "run.webm", 7, 16, (96, 32), codec="libvpx")     # no caption, holds only 5 frames
    data = build(root, min_bucket_resolution=32, frames_per_clip=9, frame_buckets="5, 17", frame_extraction="head",
                 trigger_word="sks")
    by_file = {}
    for sample in data.samples:
        by_file.setdefault(Path(sample.path).name, []).append(sample)
    assert sorted(by_file) == ["a.png", "b.png", "run.webm", "walk.mp4"]
    assert [sample.frame_count for sample in by_file["walk.mp4"]] == [5, 9, 17]   # every length it holds
    assert [sample.frame_count for sample in by_file["run.webm"]] == [5]          # short clips still train
    assert all(sample.repeats == 5 and sample.caption == "sks, walking" for sample in by_file["walk.mp4"])
    image = by_file["b.png"][0]
    assert image.frames == () and image.fps == 0.0 and image.frame_count == 1 and image.batch_key == image.bucket
    walk = by_file["walk.mp4"][1]
    assert walk.batch_key == (*walk.bucket, 9) and walk.bucket == image.bucket
    buckets = data.buckets()
    assert list(buckets) == [(64, 64), (96, 32), (96, 32, 5), (96, 32, 9), (96, 32, 17)]
    for key, indices in buckets.items():
        assert {data.samples[index].batch_key for index in indices} == {key}
    # an image renders as one frame
    index = data.samples.index(image)
    frames = data.render_frames(index, image.crop_offset, True)
    assert len(frames) == 1 and np.array_equal(np.asarray(frames[0]), np.asarray(data.render(index, image.crop_offset,
                                                                                               True)))
    assert data.effective_count == 2 + 3 * 5 + 1
    assert data.missing_captions == 1 and data.base_caption(data.samples.index(by_file["run.webm"][0])) == "sks"
    epoch = data.epoch_indices(random.Random(0))
    assert len(epoch) == data.effective_count
    # the preview shows the clips' first frames, labelled with their frame count
    assert dataset.preview_grid(data, count=8).mode == "RGB"


def test_samples_made_the_old_way_are_one_frame_samples():
    sample = dataset.DatasetSample("a.png", -1, "cat", 1, (80, 64), (64, 64), (80, 64), (8, 0))
    assert (sample.frames, sample.fps, sample.frame_count, sample.batch_key) == ((), 0.0, 1, (64, 64))
    window = dataset.DatasetSample("a.mp4", -1, "cat", 1, (80, 64), (64, 64), (80, 64), (8, 0), frames=(0, 2, 4, 6, 8),
                                   fps=16.0)
    assert (window.frame_count, window.batch_key) == (5, (64, 64, 5))
    assert dataset.DatasetSample("a.mp4", -1, "", 1, (8, 8), (8, 8), (8, 8), (0, 0), frames=(3,)).batch_key == (8, 8)


def test_summary_reports_clips_windows_lengths_fps_and_clip_buckets(tmp_path: Path):
    write_image(tmp_path / "a.png", (64, 64), 1, caption="sks, still")
    write_clip(tmp_path / "walk.mp4", 21, 16, caption="sks, walking")
    write_clip(tmp_path / "run.mp4", 9, 16, caption="sks, running")
    data = build(tmp_path, frames_per_clip=9, frame_buckets="5, 33", frame_extraction="chunk")
    lines = dataset.summarize(data).splitlines()
    assert lines[:6] == [f"source: {tmp_path.resolve()}",
                         "images: 1",
                         "clips: 2 files, 8 training windows",
                         "frames per window: 5, 9 (no clip holds 33); frame_extraction chunk (back-to-back windows)",
                         "target fps: 16 (faster clips drop frames to reach it)",
                         "effective samples per epoch (with repeats): 9"]
    assert "buckets: 3" in lines
    assert "  64x64: 1 images (1 with repeats)" in lines
    assert "  64x64 x 5 frames: 5 clips (5 with repeats)" in lines      # walk: 4 chunks of 5, run: 1
    assert "  64x64 x 9 frames: 3 clips (3 with repeats)" in lines      # walk: 2 chunks of 9, run: 1
    assert "top tags: sks (3), running (1), still (1), walking (1)" in lines
    assert "caching: latents can be cached once (center crop is fixed)" in lines


def test_image_only_summary_is_unchanged(tmp_path: Path):
    write_image(tmp_path / "a.png", (64, 64), 1, caption="cat")
    lines = dataset.summarize(build(tmp_path)).splitlines()
    assert lines[1:5] == ["images: 1", "effective images per epoch (with repeats): 1", "buckets: 1",
                          "  64x64: 1 images (1 with repeats)"]


def test_the_sample_clips_helper_writes_captioned_clips(tmp_path: Path):
    clips = make_sample_clips(tmp_path / "clips", count=3)
    assert [path.name for path in clips] == ["clip00_blue.mp4", "clip01_green.mp4", "clip02_yellow.mp4"]
    assert all(path.with_suffix(".txt").read_text(encoding="utf-8").startswith(TRIGGER_WORD) for path in clips)
    again = make_sample_clips(tmp_path / "again", count=3)
    assert [path.read_bytes() for path in clips] == [path.read_bytes() for path in again]   # deterministic
    data = build(tmp_path / "clips", frames_per_clip=9)
    assert [(sample.frames, sample.fps, sample.original_size) for sample in data.samples] == [
        (tuple(range(9)), 16.0, (64, 48))] * 3
    first, last = data.render_frames(0, data.samples[0].crop_offset, False)[::8]
    assert not np.array_equal(np.asarray(first), np.asarray(last))       # the disc moves


# ---------------------------------------------------------------------------------------------
# Bad clips
# ---------------------------------------------------------------------------------------------

def test_too_short_clip_is_a_bad_clip_naming_frames_fps_and_the_fix(tmp_path: Path):
    write_image(tmp_path / "a.png", (64, 64))
    write_clip(tmp_path / "short.mp4", 12, 30)       # 12 frames at 30 fps = 7 at 16 fps
    with pytest.raises(BadClipError) as caught:
        build(tmp_path, frames_per_clip=9)
    message = str(caught.value)
    assert message.startswith(f"clip {str(tmp_path.resolve() / 'short.mp4')!r} cannot be used: it is too short: 7 "
                              "frames at 16 fps (12 at its own 30 fps), fewer than the shortest clip length, 9 frames")
    assert "Lower frames_per_clip or add a shorter length (4n+1) to frame_buckets" in message
    assert message.endswith("Fix or remove the file, or enable skip_bad_images to leave it out")
    assert isinstance(caught.value, dataset.BadImageError)
    assert len(build(tmp_path, frames_per_clip=9, frame_buckets="5").samples) == 2
    skipped = build(tmp_path, frames_per_clip=9, skip_bad_images=True)
    assert [Path(sample.path).name for sample in skipped.samples] == ["a.png"]
    assert [Path(path).name for path, _ in skipped.skipped] == ["short.mp4"]
    summary = dataset.summarize(skipped)
    assert "skipped bad images and clips: 1" in summary and "short.mp4: it is too short" in summary


@pytest.fixture
def folder_with_bad_clips(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_clip(root / "good.mp4", 9, 16, caption="good")
    (root / "garbage.mp4").write_bytes(b"this is not a video at all" * 20)
    full = write_clip(tmp_path / "full.mp4", 30, 16).read_bytes()
    (root / "truncated.mp4").write_bytes(full[: len(full) // 2])
    return root


def test_broken_clips_name_the_file_and_can_be_skipped(folder_with_bad_clips: Path):
    with pytest.raises(BadClipError) as caught:
        build(folder_with_bad_clips, frames_per_clip=9)
    assert str(caught.value).startswith(f"clip {str(folder_with_bad_clips.resolve() / 'garbage.mp4')!r} cannot be "
                                        "used: not a readable video")
    assert "skip_bad_images" in str(caught.value)
    (folder_with_bad_clips / "garbage.mp4").unlink()
    with pytest.raises(BadClipError, match=r"truncated\.mp4' cannot be used"):
        build(folder_with_bad_clips, frames_per_clip=9)
    (folder_with_bad_clips / "garbage.MP4").write_bytes(b"\x00" * 100)     # any case of the extension is a clip
    before = hash_tree(folder_with_bad_clips)
    data = build(folder_with_bad_clips, frames_per_clip=9, skip_bad_images=True)
    assert [Path(sample.path).name for sample in data.samples] == ["good.mp4"]
    assert sorted(Path(path).name for path, _ in data.skipped) == ["garbage.MP4", "truncated.mp4"]
    assert hash_tree(folder_with_bad_clips) == before


def test_all_clips_bad_is_an_error_even_when_skipping(tmp_path: Path):
    (tmp_path / "bad.webm").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="all 1 images and clips are unreadable"):
        build(tmp_path, skip_bad_images=True)


def test_a_file_without_a_video_stream_is_a_bad_clip(tmp_path: Path):
    require_encoder("aac")
    with av.open(str(tmp_path / "sound.mp4"), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        container.mux(stream.encode(frame))
        container.mux(stream.encode())
    with pytest.raises(BadClipError, match=r"sound\.mp4' cannot be used: it holds no video stream"):
        build(tmp_path)


def test_a_clip_that_changes_after_the_scan_is_reported_when_decoded(tmp_path: Path):
    clip = write_clip(tmp_path / "c.mp4", 13, 16)
    data = build(tmp_path, frames_per_clip=13)
    write_clip(clip, 5, 16)
    with pytest.raises(BadClipError, match=r"c\.mp4' cannot be used: only 5 frames decode, but the scan counted at "
                                           r"least 13"):
        data.render_frames(0, data.samples[0].crop_offset, False)
    clip.write_bytes(b"gone")
    with pytest.raises(BadClipError, match=r"c\.mp4' cannot be used: changed or unreadable since the scan"):
        data.render(0, data.samples[0].crop_offset, False)


def test_control_folder_with_clips_is_refused_naming_both_inputs(tmp_path: Path):
    write_image(tmp_path / "data" / "a.png", (64, 64))
    write_clip(tmp_path / "data" / "b.mp4", 9, 16)
    write_image(tmp_path / "controls" / "a.png", (64, 64))
    with pytest.raises(DatasetError) as caught:
        dataset.build_folder_dataset(tmp_path / "data", DatasetOptions(**SMALL), tmp_path / "controls")
    message = str(caught.value)
    assert str(tmp_path / "controls") in message and str((tmp_path / "data").resolve()) in message
    assert "control_folder" in message and "b.mp4" in message and "Clear control_folder" in message


def test_without_pyav_images_still_load_and_clips_name_the_package(tmp_path: Path, monkeypatch):
    write_image(tmp_path / "images" / "a.png", (64, 64))
    write_clip(tmp_path / "clips" / "b.mp4", 9, 16)
    monkeypatch.setitem(sys.modules, "av", None)      # what `import av` meets where PyAV is not installed
    assert len(build(tmp_path / "images").samples) == 1
    with pytest.raises(DatasetError, match=r"PyAV package \('av'\), which is not installed.*pip install av"):
        build(tmp_path / "clips", frames_per_clip=9)


def test_accepted_extensions_list_images_and_clips(tmp_path: Path):
    text = dataset.accepted_extensions_text()
    assert text == ".jpg, .jpeg, .png, .webp, .bmp images; .mp4, .webm, .mov, .gif clips"
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DatasetError, match=r"holds 1 files but no images or clips: accepted image extensions are "
                                           r"\.jpg, .*\.bmp and clip extensions \.mp4, \.webm, \.mov, \.gif"):
        build(tmp_path)


# ---------------------------------------------------------------------------------------------
# Fingerprints
# ---------------------------------------------------------------------------------------------

def test_fingerprints_follow_the_clips(tmp_path: Path):
    write_image(tmp_path / "a.png", (64, 64))
    clip = write_clip(tmp_path / "c.mp4", 9, 16, caption="one")
    change_check = dataset.folder_fingerprint(tmp_path)
    key = build(tmp_path, frames_per_clip=9).fingerprint
    assert build(tmp_path, frames_per_clip=9).fingerprint == key
    assert build(tmp_path, frames_per_clip=5).fingerprint != key     # clip options shape the clip samples
    write_clip(clip, 9, 16, first=9)                                  # same length, other frames
    mtime = clip.stat().st_mtime_ns + 10**9
    os.utime(clip, ns=(mtime, mtime))
    assert dataset.folder_fingerprint(tmp_path) != change_check
    assert build(tmp_path, frames_per_clip=9).fingerprint != key


def test_clip_options_leave_an_image_dataset_key_alone(tmp_path: Path):
    """Latents cached for an image dataset stay valid whatever the clip options say."""
    write_image(tmp_path / "a.png", (64, 64))
    key = build(tmp_path).fingerprint
    assert build(tmp_path, frames_per_clip=17, frame_buckets="5", frame_extraction="slide", target_fps=24.0
                 ).fingerprint == key
    assert build(tmp_path, flip=True).fingerprint != key


# ---------------------------------------------------------------------------------------------
# Damaged clips: whatever the bytes, only our clear errors, and the folder is left as it was
# ---------------------------------------------------------------------------------------------

DAMAGE = st.one_of(st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
                   st.tuples(st.just("flip_bytes"), st.lists(st.integers(0, 100_000), min_size=1, max_size=12)))


@pytest.fixture(scope="module")
def intact_clips(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("intact")
    return {extension: write_clip(folder / f"c{extension}", 12, 16, codec=codec, pixel_format=pixel_format
                                  ).read_bytes()
            for extension, codec, pixel_format in CONTAINERS}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(extension=st.sampled_from([extension for extension, _, _ in CONTAINERS]), how=DAMAGE,
       skip_bad=st.booleans())
def test_damaged_clips_give_clear_errors_and_leave_the_folder_untouched(intact_clips, extension, how, skip_bad):
    data = bytearray(intact_clips[extension])
    kind, argument = how
    if kind == "truncate":
        data = data[: int(len(data) * argument)]
    else:
        for position in argument:
            data[position % len(data)] ^= 0xFF
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        (root / f"clip{extension}").write_bytes(bytes(data))
        write_image(root / "a.png", (64, 64))
        before = hash_tree(root)
        try:
            built = build(root, frames_per_clip=5, frame_extraction="chunk", skip_bad_images=skip_bad)
        except DatasetError as error:
            assert str(error)
        else:
            for index, sample in enumerate(built.samples):
                try:
                    frames = built.render_frames(index, sample.crop_offset, False)
                except DatasetError as error:
                    assert str(error)   # damage past the first frame shows when decoding; reported clearly
                    continue
                assert len(frames) == sample.frame_count
                assert all(frame.size == sample.bucket and frame.mode == "RGB" for frame in frames)
        assert hash_tree(root) == before


def test_a_phone_clip_with_a_display_rotation_is_shown_upright(tmp_path: Path):
    """Phones store portrait video as landscape frames plus a display matrix (the clip's EXIF
    orientation): the scan's size and every decoded frame follow it, as players do."""
    pixels = np.zeros((48, 64, 3), np.uint8)
    pixels[:16, :16] = 255                                           # a white square at the top left
    clip = tmp_path / "portrait.mp4"
    with av.open(str(clip), "w") as container:
        stream = container.add_stream("mpeg4", rate=16)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(5):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    # The track header's matrix (ISO 14496-12 tkhd): identity -> turned 90 degrees clockwise for display.
    data = clip.read_bytes()
    identity = struct.pack(">9i", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    at = data.index(identity, data.index(b"tkhd"))
    clip.write_bytes(data[:at] + struct.pack(">9i", 0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000) + data[at + 36:])
    data = build(tmp_path, frames_per_clip=5, target_fps=0)
    assert data.samples[0].original_size == (48, 64)
    upright = np.asarray(data.source_image(0))
    assert upright.shape == (64, 48, 3)
    assert upright[4, 44].min() > 200 and upright[4, 4].max() < 60   # the square went to the top right
    frames = data.render_frames(0, data.samples[0].crop_offset, False)
    assert all(np.array_equal(np.asarray(frame), np.asarray(frames[0])) for frame in frames)


def test_a_run_refuses_clips_on_an_image_model_and_stills_on_an_image_to_video_model(tmp_path: Path):
    """Train LoRA's checks before any model loads (training/run/plan.py check_run): clips train video
    models only; an image-to-video model (each clip's first frame is its start image) trains on clips only."""
    from lora_lab.training.lr.rates import LearningRates
    from lora_lab.training.lr.schedules import ScheduleSettings
    from lora_lab.training.run.plan import check_run
    from lora_lab.training.run.train_settings import TrainSettings

    make_sample_clips(tmp_path / "data", count=2, frames=9, size=(64, 64))
    clips = build(tmp_path / "data", resolution=64, min_bucket_resolution=64, frames_per_clip=5)
    write_image(tmp_path / "data" / "still.png", (64, 64))
    mixed = build(tmp_path / "data", resolution=64, min_bucket_resolution=64, frames_per_clip=5)
    settings = TrainSettings(steps=4, precision="fp32")

    def check(data, family):
        return check_run(settings, data, LearningRates(), ScheduleSettings(scheduler="constant", warmup=0.0), family, "cpu")

    with pytest.raises(ValueError, match="dataset holds video clips but model is SDXL, an image model.*Wan"):
        check(clips, "sdxl")
    with pytest.raises(ValueError, match="dataset holds video clips but model is Qwen-Image"):
        check(clips, "qwen_image")
    with pytest.raises(ValueError, match="1 still image.*Wan 2.2 image-to-video.*clips only"):
        check(mixed, "wan_i2v")
    assert check(clips, "wan_i2v").family == "wan" + "_i2v" and check(mixed, "wan").family == "wan"
