"""Fuzz the dataset loader and caption rules with malformed files (hypothesis).

Whatever the bytes, the only failures allowed are our clear DatasetError messages, and nothing in
the source folder is modified.
"""
from __future__ import annotations

import io
import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from support.images import gradient_image, hash_tree

from lora_lab.training.data.dataset import DatasetError, DatasetOptions, build_folder_dataset, caption_for_step

FORMATS = {"png": "PNG", "jpg": "JPEG", "webp": "WEBP", "bmp": "BMP"}


def encoded(extension: str, seed: int) -> bytes:
    buffer = io.BytesIO()
    gradient_image((72, 56), seed).save(buffer, format=FORMATS[extension])
    return buffer.getvalue()


damage = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip_bytes"), st.lists(st.integers(0, 10_000), min_size=1, max_size=12)),
    st.tuples(st.just("garbage"), st.binary(max_size=300)),
    st.tuples(st.just("intact"), st.none()),
)


def damaged(data: bytes, how) -> bytes:
    kind, argument = how
    if kind == "truncate":
        return data[: int(len(data) * argument)]
    if kind == "flip_bytes":
        mutable = bytearray(data)
        for position in argument:
            mutable[position % len(mutable)] ^= 0xFF
        return bytes(mutable)
    if kind == "garbage":
        return argument
    return data


caption_bytes = st.one_of(st.none(), st.binary(max_size=200),
                          st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass")
                                                    if all(not 0xD800 <= ord(c) <= 0xDFFF for c in text) else b""))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(files=st.lists(st.tuples(st.sampled_from(sorted(FORMATS)), damage, caption_bytes), min_size=1, max_size=4),
       skip_bad=st.booleans(), crop=st.sampled_from(["center", "random"]), bucketing=st.booleans())
def test_malformed_files_give_clear_errors_and_leave_the_folder_untouched(files, skip_bad, crop, bucketing):
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary) / "3_data"
        root.mkdir()
        for index, (extension, how, caption) in enumerate(files):
            (root / f"image{index}.{extension}").write_bytes(damaged(encoded(extension, index), how))
            if caption is not None:
                (root / f"image{index}.txt").write_bytes(caption)
        before = hash_tree(root)
        options = DatasetOptions(resolution=64, min_bucket_resolution=64, max_bucket_resolution=128,
                                 bucket_step=64, skip_bad_images=skip_bad, crop=crop, bucketing=bucketing,
                                 shuffle_captions=True, caption_dropout=0.3, trigger_word="sks", flip=True)
        try:
            dataset = build_folder_dataset(root, options)
        except DatasetError as error:
            assert str(error)  # a message for the user
        else:
            rng = random.Random(0)
            for index in range(len(dataset.samples)):
                try:
                    image, offset, flipped = dataset.load_image(index, rng)
                except DatasetError:
                    continue  # decoding may still find damage the scan could not; it is reported clearly
                assert image.size == dataset.samples[index].bucket and image.mode == "RGB"
                assert isinstance(dataset.caption_for_step(index, rng), str)
        assert hash_tree(root) == before


@settings(max_examples=200, deadline=None)
@given(caption=st.text(max_size=120), trigger=st.text(max_size=12), shuffle=st.booleans(),
       keep=st.integers(0, 5), dropout=st.floats(0.0, 1.0), seed=st.integers(0, 2**32 - 1))
def test_caption_rules_never_crash_and_keep_their_promises(caption, trigger, shuffle, keep, dropout, seed):
    result = caption_for_step(caption, random.Random(seed), trigger, shuffle, keep, dropout)
    assert isinstance(result, str)
    if dropout == 0.0 and trigger.strip() and not shuffle:
        assert result.startswith(trigger.strip())
    if dropout == 0.0 and shuffle:
        from lora_lab.training.data.dataset import place_trigger_word, split_tags

        expected = split_tags(place_trigger_word(caption, trigger))
        assert sorted(split_tags(result)) == sorted(expected)
        assert split_tags(result)[:keep] == expected[:keep]


def test_a_decodable_but_huge_header_is_refused_not_decoded(tmp_path):
    # A PNG whose header claims an enormous size: PIL's decompression-bomb guard must surface as our error.
    image = Image.new("RGB", (1, 1))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")  # IHDR width, height
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "bomb.png").write_bytes(bytes(data))
    before = hash_tree(folder)
    try:
        build_folder_dataset(folder, DatasetOptions(resolution=64, min_bucket_resolution=64,
                                                    max_bucket_resolution=128))
        raised = None
    except DatasetError as error:
        raised = error
    assert raised is not None and "bomb.png" in str(raised)
    assert hash_tree(folder) == before
