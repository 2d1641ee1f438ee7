"""LoRA Dataset library: buckets (hand-computed), kohya folder scan, captions, images, bad input."""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from support.images import gradient_image, hash_tree, write_image

from lora_lab.training.data import dataset
from lora_lab.training.data.dataset import DatasetError, DatasetOptions
from lora_lab.training.data.image_tensors import pil_to_image


def build(folder: Path, **options) -> dataset.LoraDataset:
    return dataset.build_folder_dataset(folder, DatasetOptions(**options))


# ---------------------------------------------------------------------------------------------
# Bucketing arithmetic, against buckets computed by hand from kohya's make_bucket_resolutions
# ---------------------------------------------------------------------------------------------

def test_bucket_resolutions_512_match_hand_computed_list():
    # max_area 262144; for width w: height = min(1024, (262144 // w) // 64 * 64), kept if >= 256.
    expected = {(512, 512), (256, 1024), (320, 768), (384, 640), (448, 576), (576, 448), (640, 384),
                (704, 320), (768, 320), (832, 256), (896, 256), (960, 256), (1024, 256)}
    expected |= {(height, width) for width, height in expected}
    assert set(dataset.bucket_resolutions(512, 256, 1024, 64)) == expected
    assert len(expected) == 17


def test_bucket_resolutions_sdxl_contain_the_usual_sdxl_buckets():
    resolutions = dataset.bucket_resolutions(1024, 256, 2048, 64)
    for bucket in [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344), (640, 1536)]:
        assert bucket in resolutions
    assert all(width * height <= 1024 * 1024 for width, height in resolutions)
    assert all(width % 64 == 0 and height % 64 == 0 for width, height in resolutions)


@pytest.mark.parametrize("size, expected_bucket, expected_resized, expected_offset", [
    # 4:3 -> nearest ratio 576/448 = 1.286; wider than the bucket, so heights match: 1000 * 448/750.
    ((1000, 750), (576, 448), (597, 448), (10, 0)),
    # 1:2 -> 320/704 = 0.4545; wider than the bucket: width 600 * 704/1200 = 352.
    ((600, 1200), (320, 704), (352, 704), (16, 0)),
    # exact bucket size is kept as is
    ((448, 576), (448, 576), (448, 576), (0, 0)),
    # small square image is upscaled to the square bucket
    ((300, 300), (512, 512), (512, 512), (0, 0)),
])
def test_select_bucket_hand_computed(size, expected_bucket, expected_resized, expected_offset):
    choice = dataset.select_bucket(*size, dataset.bucket_resolutions(512), 512, 64)
    assert choice.bucket == expected_bucket
    assert choice.resized_size == expected_resized
    assert choice.crop_offset == expected_offset


@pytest.mark.parametrize("size, expected_bucket, expected_resized", [
    # 2:1 area 2e6 > 512^2: width sqrt(262144*2)=724 -> 704 -> height 352 -> 320 (ratio 2.2);
    # height 362 -> 320 -> width 640 (ratio 2.0, better) -> resized (640, 320)
    ((2000, 1000), (640, 320), (640, 320)),
    # smaller than the area: never upscaled, bucket = size rounded down to 64
    ((300, 300), (256, 256), (300, 300)),
    ((500, 130), (448, 128), (500, 130)),
    # 8:1 would be 1448 wide at the area: kept within max side 1024 -> (1024, 128)
    ((4000, 500), (1024, 128), (1024, 128)),
])
def test_select_bucket_no_upscale_hand_computed(size, expected_bucket, expected_resized):
    choice = dataset.select_bucket(*size, dataset.bucket_resolutions(512), 512, 64, no_upscale=True,
                                   max_side=1024)
    assert choice.bucket == expected_bucket
    assert choice.resized_size == expected_resized
    assert choice.resized_size[0] <= size[0] and choice.resized_size[1] <= size[1]


def test_select_bucket_no_upscale_rejects_images_smaller_than_the_step():
    with pytest.raises(ValueError, match="too small for bucket_step 64"):
        dataset.select_bucket(50, 400, dataset.bucket_resolutions(512), 512, 64, no_upscale=True)


def test_square_bucket_when_bucketing_is_off():
    choice = dataset.square_bucket(600, 400, 512)
    assert choice == dataset.BucketChoice((512, 512), (768, 512), (128, 0))


# ---------------------------------------------------------------------------------------------
# Folder scan: kohya repeats, captions, tag frequency
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def kohya_folder(tmp_path: Path) -> Path:
    root = tmp_path / "train"
    write_image(root / "10_cat" / "a.png", (96, 64), 1, caption="cat, sitting, window")
    write_image(root / "10_cat" / "b.jpg", (64, 96), 2, caption="Cat, grass")
    write_image(root / "10_cat" / "c.webp", (64, 64), 3)  # no caption
    write_image(root / "2_dog" / "nested" / "d.bmp", (80, 64), 4, caption="dog")
    write_image(root / "loose.png", (64, 64), 5, caption="sks, tree")
    (root / "notes.md").write_text("not an image")
    return root


def test_kohya_folder_repeats_captions_and_tag_frequency(kohya_folder: Path):
    data = build(kohya_folder, resolution=64, min_bucket_resolution=64, max_bucket_resolution=128,
                 bucket_step=32, repeats=3, trigger_word="sks")
    by_name = {Path(sample.path).name: sample for sample in data.samples}
    assert sorted(by_name) == ["a.png", "b.jpg", "c.webp", "d.bmp", "loose.png"]
    assert {name: sample.repeats for name, sample in by_name.items()} == {
        "a.png": 10, "b.jpg": 10, "c.webp": 10, "d.bmp": 2, "loose.png": 3}
    assert data.effective_count == 35
    assert all(Path(sample.path).is_absolute() and sample.image_index == -1 for sample in data.samples)
    assert by_name["a.png"].caption == "cat, sitting, window"
    assert by_name["c.webp"].caption == ""
    assert data.missing_captions == 1
    assert data.base_caption(data.samples.index(by_name["c.webp"])) == "sks"
    assert by_name["a.png"].original_size == (96, 64)
    # kohya ss_tag_frequency: per top folder, lower-cased tags, the trigger word as trained
    assert data.tag_frequency == {
        "10_cat": {"sks": 3, "cat": 2, "sitting": 1, "window": 1, "grass": 1},
        "2_dog": {"sks": 1, "dog": 1},
        "train": {"sks": 1, "tree": 1},
    }
    epoch = data.epoch_indices(random.Random(1))
    assert Counter(epoch) == {index: sample.repeats for index, sample in enumerate(data.samples)}
    assert epoch != sorted(epoch)


def test_scanned_folder_named_like_kohya_uses_its_repeats(tmp_path: Path):
    write_image(tmp_path / "5_style" / "x.png", (64, 64))
    data = build(tmp_path / "5_style", resolution=64, min_bucket_resolution=64, bucket_step=64, repeats=2)
    assert [sample.repeats for sample in data.samples] == [5]


def test_buckets_group_samples_and_every_sample_fits_its_bucket(tmp_path: Path):
    for index, size in enumerate([(1000, 750), (800, 600), (600, 1200), (512, 512)]):
        write_image(tmp_path / f"{index}.png", size, index)
    data = build(tmp_path)
    assert data.buckets() == {(320, 704): [2], (512, 512): [3], (576, 448): [0, 1]}
    for index, sample in enumerate(data.samples):
        image, offset, flipped = data.load_image(index, None)
        assert image.size == sample.bucket and offset == sample.crop_offset and not flipped
        assert sample.resized_size[0] >= sample.bucket[0] and sample.resized_size[1] >= sample.bucket[1]


def test_bucketing_off_gives_square_crops(tmp_path: Path):
    write_image(tmp_path / "wide.png", (300, 200))
    write_image(tmp_path / "tall.png", (200, 300))
    data = build(tmp_path, resolution=128, bucketing=False)
    assert [sample.bucket for sample in data.samples] == [(128, 128), (128, 128)]
    assert {sample.resized_size for sample in data.samples} == {(192, 128), (128, 192)}
    assert data.load_image(0, None)[0].size == (128, 128)


def test_exif_orientation_is_honoured(tmp_path: Path):
    # stored 120x80, orientation 6 (rotate 90 clockwise to view): the user sees 80x120
    write_image(tmp_path / "rotated.jpg", (120, 80), orientation=6)
    data = build(tmp_path, resolution=128, min_bucket_resolution=64, bucket_step=32, max_bucket_resolution=256)
    sample = data.samples[0]
    assert sample.original_size == (80, 120)
    assert sample.bucket == (96, 160)
    upright = np.asarray(data.source_image(0), dtype=np.float64)
    assert upright.shape[:2] == (120, 80)
    # the stored left-to-right gradient now runs top to bottom
    assert upright[:10].mean() + 100 < upright[-10:].mean()
    assert abs(upright[:, :10].mean() - upright[:, -10:].mean()) < 20


def test_image_modes_convert_to_rgb_correctly(tmp_path: Path):
    rgba = Image.new("RGBA", (64, 64), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (64, 64), 77).save(tmp_path / "gray.png")
    palette = Image.new("P", (64, 64), 3)
    palette.putpalette([0, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    palette.save(tmp_path / "palette.png")
    sixteen = np.full((64, 64), 32896, dtype=np.uint16)  # 128 * 257: mid-gray in 16 bits
    Image.fromarray(sixteen).save(tmp_path / "gray16.png")
    data = build(tmp_path, resolution=64, min_bucket_resolution=64, bucket_step=64, max_bucket_resolution=128)
    colours = {Path(sample.path).name: data.load_image(index, None)[0].getpixel((10, 10))
               for index, sample in enumerate(data.samples)}
    assert colours == {"rgba.png": (255, 255, 255), "gray.png": (77, 77, 77),
                       "palette.png": (70, 80, 90), "gray16.png": (128, 128, 128)}
    assert all(data.load_image(index, None)[0].mode == "RGB" for index in range(len(data.samples)))


def test_half_transparent_image_is_composited_on_white():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 128))
    assert dataset.to_rgb(image).getpixel((0, 0)) == (127, 127, 127)


# ---------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("caption, trigger, expected", [
    ("a dog, grass", "sks", "sks, a dog, grass"),
    ("sks, a dog", "sks", "sks, a dog"),
    ("sks dog on grass", "sks", "sks dog on grass"),
    ("sksx, dog", "sks", "sks, sksx, dog"),
    ("", "sks", "sks"),
    ("a dog", "", "a dog"),
])
def test_trigger_word_goes_first_once(caption, trigger, expected):
    assert dataset.place_trigger_word(caption, trigger) == expected


def test_shuffle_keeps_the_first_keep_tokens_tags():
    rng = random.Random(0)
    caption = "one, two, three, four, five, six"
    results = {dataset.caption_for_step(caption, rng, "sks", shuffle=True, keep_tokens=2) for _ in range(50)}
    assert len(results) > 5  # really shuffled
    for result in results:
        tags = result.split(", ")
        assert tags[:2] == ["sks", "one"]
        assert sorted(tags[2:]) == sorted(["two", "three", "four", "five", "six"])


def test_caption_dropout_drops_with_the_given_probability():
    rng = random.Random(0)
    results = [dataset.caption_for_step("a, b", rng, "sks", dropout=0.25) for _ in range(4000)]
    dropped = results.count("")
    assert 850 < dropped < 1150
    assert set(results) == {"", "sks, a, b"}
    assert dataset.caption_for_step("a", random.Random(0), "sks", dropout=1.0) == ""


def test_static_captions_do_not_touch_the_rng(kohya_folder: Path):
    data = build(kohya_folder, resolution=64, min_bucket_resolution=64, bucket_step=32,
                 max_bucket_resolution=128, trigger_word="sks")
    rng = random.Random(5)
    state = rng.getstate()
    assert data.static_captions
    assert [data.caption_for_step(index, rng) for index in range(len(data.samples))] == \
        [data.base_caption(index) for index in range(len(data.samples))]
    assert rng.getstate() == state
    shuffled = build(kohya_folder, resolution=64, min_bucket_resolution=64, bucket_step=32,
                     max_bucket_resolution=128, shuffle_captions=True)
    assert not shuffled.static_captions


def test_caption_file_rules(tmp_path: Path):
    write_image(tmp_path / "bom.png", (64, 64))
    (tmp_path / "bom.caption").write_bytes("\ufeffcafé, tag\n\nsecond line ignored\n".encode("utf-8"))
    write_image(tmp_path / "latin.png", (64, 64))
    (tmp_path / "latin.caption").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin.caption.*UTF-8"):
        build(tmp_path, resolution=64, min_bucket_resolution=64, caption_extension="caption")
    (tmp_path / "latin.caption").write_text("\n  spaced  \n", encoding="utf-8")
    data = build(tmp_path, resolution=64, min_bucket_resolution=64, caption_extension="caption")
    assert [sample.caption for sample in data.samples] == ["café, tag", "spaced"]
    assert data.missing_captions == 0


# ---------------------------------------------------------------------------------------------
# Augmentation and caching
# ---------------------------------------------------------------------------------------------

def test_random_crop_draws_offsets_and_disables_caching(tmp_path: Path):
    write_image(tmp_path / "wide.png", (400, 100))  # square crop: resized to 512x128, 384 px of room
    data = build(tmp_path, resolution=128, bucketing=False, crop="random")
    sample = data.samples[0]
    room = sample.resized_size[0] - sample.bucket[0]
    assert room == 384 and sample.crop_offset == (192, 0)
    rng = random.Random(3)
    offsets = {data.load_image(0, rng)[1] for _ in range(30)}
    assert len(offsets) > 3
    assert all(0 <= left <= room and top == 0 for left, top in offsets)
    assert data.load_image(0, None)[1] == sample.crop_offset
    assert not data.caching_possible
    assert "caching: not possible" in dataset.summarize(data)
    centre = build(tmp_path, resolution=128, bucketing=False)
    assert centre.caching_possible and "latents can be cached" in dataset.summarize(centre)


def test_flip_mirrors_the_image_about_half_the_time(tmp_path: Path):
    write_image(tmp_path / "x.png", (64, 64))
    data = build(tmp_path, resolution=64, min_bucket_resolution=64, bucket_step=64, flip=True)
    plain = np.asarray(data.load_image(0, None)[0])
    rng = random.Random(0)
    results = [data.load_image(0, rng) for _ in range(40)]
    flipped = [image for image, _, was_flipped in results if was_flipped]
    assert 10 < len(flipped) < 30
    assert np.array_equal(np.asarray(flipped[0]), plain[:, ::-1])
    assert all(np.array_equal(np.asarray(image), plain) for image, _, was in results if not was)


# ---------------------------------------------------------------------------------------------
# In-memory images (from other nodes)
# ---------------------------------------------------------------------------------------------

def test_dataset_from_an_image_batch():
    pixels = pil_to_image(gradient_image((96, 64)))[0]
    batch = torch.stack([pixels, pixels.flip(1)])
    data = dataset.build_image_dataset(batch, "a cat\nb dog\n",
                                       DatasetOptions(resolution=64, min_bucket_resolution=64, bucket_step=32,
                                                      repeats=4, trigger_word="sks"))
    assert [sample.caption for sample in data.samples] == ["a cat", "b dog"]
    assert [sample.image_index for sample in data.samples] == [0, 1]
    assert data.effective_count == 8 and data.source == "images input"
    assert data.tag_frequency == {"images": {"sks": 2, "a cat": 1, "b dog": 1}}
    image, _, _ = data.load_image(1, None)
    assert image.size == data.samples[1].bucket
    with pytest.raises(DatasetError, match="2 images but captions has 3 lines"):
        dataset.build_image_dataset(batch, "a\nb\nc", DatasetOptions())
    no_captions = dataset.build_image_dataset(batch, "", DatasetOptions(trigger_word="sks"))
    assert no_captions.missing_captions == 2 and no_captions.base_caption(0) == "sks"


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------

def test_missing_folder_names_path_and_extensions(tmp_path: Path):
    missing = tmp_path / "nope"
    with pytest.raises(DatasetError) as caught:
        build(missing)
    assert str(missing) in str(caught.value) and ".png" in str(caught.value) and "does not exist" in str(caught.value)


def test_empty_folder_and_unsupported_files(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"is empty.*\.jpg, \.jpeg, \.png, \.webp, \.bmp"):
        build(empty)
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "scan.tiff")
    (other / "a.txt").write_text("x")
    with pytest.raises(DatasetError) as caught:
        build(other)
    assert str(other) in str(caught.value) and "2 files but no images" in str(caught.value)
    assert ".webp" in str(caught.value)


def test_file_instead_of_folder(tmp_path: Path):
    image = write_image(tmp_path / "one.png", (64, 64))
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        build(image)


@pytest.fixture
def folder_with_bad_images(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    write_image(root / "good.png", (64, 64), caption="good")
    (root / "garbage.png").write_bytes(b"this is not a png at all")
    full = write_image(tmp_path / "full.jpg", (256, 256), 7).read_bytes()
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    return root


def test_corrupt_image_error_names_the_file(folder_with_bad_images: Path):
    with pytest.raises(dataset.BadImageError) as caught:
        build(folder_with_bad_images, resolution=64, min_bucket_resolution=64)
    assert "garbage.png" in str(caught.value) and "skip_bad_images" in str(caught.value)
    (folder_with_bad_images / "garbage.png").unlink()
    with pytest.raises(dataset.BadImageError, match="truncated.jpg.*truncated JPEG"):
        build(folder_with_bad_images, resolution=64, min_bucket_resolution=64)


def test_skip_bad_images_lists_them_in_the_summary(folder_with_bad_images: Path):
    data = build(folder_with_bad_images, resolution=64, min_bucket_resolution=64, skip_bad_images=True)
    assert [Path(sample.path).name for sample in data.samples] == ["good.png"]
    assert sorted(Path(path).name for path, _ in data.skipped) == ["garbage.png", "truncated.jpg"]
    summary = dataset.summarize(data)
    assert "skipped bad images: 2" in summary and "garbage.png" in summary and "truncated.jpg" in summary


def test_all_images_bad_is_an_error_even_when_skipping(tmp_path: Path):
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(DatasetError, match="all 1 images are unreadable"):
        build(tmp_path, skip_bad_images=True)


@pytest.mark.parametrize("options, message", [
    ({"min_bucket_resolution": 1024, "max_bucket_resolution": 256, "resolution": 512}, "swap them"),
    ({"min_bucket_resolution": 300}, "multiple of bucket_step"),
    ({"resolution": 2048}, "must lie between"),
    ({"caption_dropout": 1.5}, "caption_dropout"),
    ({"crop": "left"}, "crop must be one of center, random"),
    ({"repeats": 0}, "repeats must be an integer >= 1, got 0"),
    ({"keep_tokens": -1}, "keep_tokens"),
    ({"bucket_step": 60}, "bucket_step must be a multiple of 8"),
    ({"bucketing": False, "resolution": 500}, "resolution must be a multiple of 8 .*got 500: use 496"),
])
def test_bad_options_are_rejected_with_the_value(options, message):
    with pytest.raises(DatasetError, match=message):
        DatasetOptions(**options)


# ---------------------------------------------------------------------------------------------
# The folder is only read; fingerprints; summary and preview
# ---------------------------------------------------------------------------------------------

def test_folder_is_never_modified(kohya_folder: Path):
    before = hash_tree(kohya_folder)
    time.sleep(0.01)
    data = build(kohya_folder, resolution=64, min_bucket_resolution=64, bucket_step=32,
                 max_bucket_resolution=128, trigger_word="sks", flip=True, crop="random")
    for index in range(len(data.samples)):
        data.load_image(index, random.Random(index))
    dataset.preview_grid(data)
    dataset.summarize(data)
    dataset.folder_fingerprint(kohya_folder)
    assert hash_tree(kohya_folder) == before


def test_folder_fingerprint_changes_only_when_files_change(kohya_folder: Path):
    first = dataset.folder_fingerprint(kohya_folder)
    assert dataset.folder_fingerprint(kohya_folder) == first
    caption = kohya_folder / "10_cat" / "a.txt"
    caption.write_text("cat, sitting, window, sun")
    second = dataset.folder_fingerprint(kohya_folder)
    assert second != first
    (kohya_folder / "2_dog" / "nested" / "extra.png").write_bytes((kohya_folder / "loose.png").read_bytes())
    assert dataset.folder_fingerprint(kohya_folder) not in (first, second)


def test_the_change_check_sees_exactly_the_files_the_scan_sees(kohya_folder: Path, tmp_path: Path):
    """IS_CHANGED re-runs the node when any file the scan sees changes (nested, linked, caption or not)
    and never for hidden files, which the scan leaves out (a .DS_Store the file browser writes)."""
    write_image(tmp_path / "elsewhere" / "e.png", (64, 64), 6, caption="bird")
    try:
        (kohya_folder / "2_dog" / "3_bird").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links are not available here")
    write_image(kohya_folder / ".hidden" / "h.png", (64, 64), 7, caption="hidden")
    write_image(kohya_folder / "10_cat" / ".h.png", (64, 64), 8)
    (kohya_folder / ".DS_Store").write_bytes(b"finder")
    settings = dict(resolution=64, min_bucket_resolution=64, bucket_step=32, max_bucket_resolution=128)
    scanned = build(kohya_folder, **settings)
    assert [(Path(sample.path).relative_to(kohya_folder).as_posix(), sample.repeats) for sample in scanned.samples] == [
        ("loose.png", 1), ("10_cat/a.png", 10), ("10_cat/b.jpg", 10), ("10_cat/c.webp", 10),
        ("2_dog/3_bird/e.png", 3), ("2_dog/nested/d.bmp", 2)]
    seen = ["loose.png", "loose.txt", "notes.md", "10_cat/a.png", "10_cat/a.txt", "10_cat/b.jpg", "10_cat/b.txt",
            "10_cat/c.webp", "2_dog/3_bird/e.png", "2_dog/3_bird/e.txt", "2_dog/nested/d.bmp", "2_dog/nested/d.txt"]
    hidden = [".DS_Store", ".hidden/h.png", ".hidden/h.txt", "10_cat/.h.png"]
    assert sorted(seen + hidden) == sorted(Path(folder, name).relative_to(kohya_folder).as_posix()
                                           for folder, _, names in os.walk(kohya_folder, followlinks=True)
                                           for name in names)  # every file in the tree is in one list

    def touch(name: str) -> None:
        path = kohya_folder / name
        mtime = path.stat().st_mtime_ns + 10**9
        os.utime(path, ns=(mtime, mtime))

    fingerprint = dataset.folder_fingerprint(kohya_folder)
    for name in hidden:
        touch(name)
        assert dataset.folder_fingerprint(kohya_folder) == fingerprint, name
    (kohya_folder / ".hidden" / "new.png").write_bytes((kohya_folder / "loose.png").read_bytes())
    assert dataset.folder_fingerprint(kohya_folder) == fingerprint
    assert build(kohya_folder, **settings).fingerprint == scanned.fingerprint
    for name in seen:
        touch(name)
        changed = dataset.folder_fingerprint(kohya_folder)
        assert changed != fingerprint, name
        fingerprint = changed


def test_dataset_fingerprint_tracks_content_and_settings(kohya_folder: Path):
    settings = dict(resolution=64, min_bucket_resolution=64, bucket_step=32, max_bucket_resolution=128)
    first = build(kohya_folder, **settings).fingerprint
    assert build(kohya_folder, **settings).fingerprint == first
    assert build(kohya_folder, **settings, flip=True).fingerprint != first
    (kohya_folder / "loose.txt").write_text("sks, bush")
    assert build(kohya_folder, **settings).fingerprint != first


def test_summary_reports_counts_buckets_missing_captions_and_tags(kohya_folder: Path):
    data = build(kohya_folder, resolution=64, min_bucket_resolution=64, bucket_step=32,
                 max_bucket_resolution=128, trigger_word="sks", repeats=3)
    summary = dataset.summarize(data)
    assert "images: 5" in summary
    assert "effective images per epoch (with repeats): 35" in summary
    assert "captions missing: 1" in summary
    assert "top tags: sks (5), cat (2)" in summary
    for bucket, indices in data.buckets().items():
        assert f"{bucket[0]}x{bucket[1]}: {len(indices)} images" in summary


def test_preview_grid_shows_a_few_samples(kohya_folder: Path):
    data = build(kohya_folder, resolution=64, min_bucket_resolution=64, bucket_step=32, max_bucket_resolution=128)
    grid = dataset.preview_grid(data, count=4, columns=2)
    cell = dataset.PREVIEW_CELL
    assert grid.size == (2 * cell, 2 * (cell + dataset.PREVIEW_LABEL_HEIGHT))
    assert grid.mode == "RGB"
    again = dataset.preview_grid(data, count=4, columns=2)
    assert np.array_equal(np.asarray(grid), np.asarray(again))  # fixed preview seed


def test_linked_folder_cycle_does_not_loop(tmp_path: Path):
    write_image(tmp_path / "data" / "sub" / "x.png", (64, 64))
    try:
        (tmp_path / "data" / "sub" / "loop").symlink_to(tmp_path / "data", target_is_directory=True)
    except OSError:
        pytest.skip("symbolic links are not available here")
    data = build(tmp_path / "data", resolution=64, min_bucket_resolution=64)
    assert [Path(sample.path).name for sample in data.samples] == ["x.png"]
    assert dataset.folder_fingerprint(tmp_path / "data") == dataset.folder_fingerprint(tmp_path / "data")


def test_augmentation_draws_match_load_image(tmp_path: Path):
    write_image(tmp_path / "wide.png", (400, 100))
    data = build(tmp_path, resolution=128, bucketing=False, crop="random", flip=True)
    first, second = random.Random(11), random.Random(11)
    for _ in range(10):
        offset, flipped = data.augmentation(0, first)
        image, loaded_offset, loaded_flipped = data.load_image(0, second)
        assert (offset, flipped) == (loaded_offset, loaded_flipped)
        assert np.array_equal(np.asarray(data.render(0, offset, flipped)), np.asarray(image))
