"""The LoRA Dataset node inside a real ComfyUI (in-process executor, stock nodes around it)."""
from __future__ import annotations

import copy
import os
import time
import uuid
from pathlib import Path

import pytest
from support.images import hash_tree, write_image
from lora_lab_devtools.inprocess import PromptFailed

DEFAULTS = {"folder": "", "resolution": 512, "repeats": 1, "caption_extension": ".txt", "trigger_word": "",
            "shuffle_captions": False, "keep_tokens": 0, "caption_dropout": 0.0, "flip": False, "bucketing": True,
            "min_bucket_resolution": 256, "max_bucket_resolution": 1024, "bucket_step": 64,
            "bucket_no_upscale": False, "crop": "center", "skip_bad_images": False}
SMALL = {"resolution": 128, "min_bucket_resolution": 64, "max_bucket_resolution": 256, "bucket_step": 32}


def dataset_prompt(**inputs) -> dict:
    return {
        "1": {"class_type": "LoRALabDataset", "inputs": {**DEFAULTS, **SMALL, **inputs}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
    }


def outputs_of(results: dict):
    dataset, summary, preview = (results["1"]["outputs"][index][0] for index in range(3))
    return dataset, summary, preview


@pytest.fixture
def kohya_folder(comfy) -> tuple[str, Path]:
    """A kohya folder inside ComfyUI's input folder; returns (name relative to input/, path)."""
    name = f"dataset-{uuid.uuid4().hex[:8]}"
    root = comfy.input_dir / name
    write_image(root / "4_cat" / "a.png", (192, 128), 1, caption="cat, window")
    write_image(root / "4_cat" / "b.jpg", (128, 192), 2, caption="cat, grass")
    write_image(root / "plain.webp", (128, 128), 3)
    return name, root


@pytest.mark.compat
def test_registered_with_ordered_inputs_defaults_and_tooltips(comfy):
    import nodes

    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LoRALabDataset"] == "LoRA Dataset"
    node_class = comfy.node_class("LoRALabDataset")
    assert node_class.CATEGORY == "LoRA Lab"
    assert tuple(node_class.RETURN_TYPES) == ("LORA_DATASET", "STRING", "IMAGE")
    types = node_class.INPUT_TYPES()
    assert list(types["required"]) == list(DEFAULTS)
    assert {name: spec[1]["default"] for name, spec in types["required"].items()} == DEFAULTS
    assert types["required"]["crop"][0] == "COMBO" and types["required"]["crop"][1]["options"] == ["center", "random"]
    assert list(types["optional"]) == ["images", "captions", "control_folder",   # appended: the public API
                                       "frames_per_clip", "frame_buckets", "frame_extraction", "frame_stride",
                                       "clips_per_video", "target_fps"]
    assert {name: types["optional"][name][1]["default"] for name in list(types["optional"])[3:]} == {
        "frames_per_clip": 33, "frame_buckets": "", "frame_extraction": "head", "frame_stride": 8,
        "clips_per_video": 4, "target_fps": 16.0}
    for spec in [*types["required"].values(), *types["optional"].values()]:
        assert spec[1].get("tooltip"), spec


@pytest.mark.compat
def test_folder_relative_to_input_dir_builds_the_dataset(comfy, kohya_folder):
    name, root = kohya_folder
    before = hash_tree(root)
    results = comfy.run(dataset_prompt(folder=name, repeats=2, trigger_word="sks", crop="random"))
    dataset, summary, preview = outputs_of(results)
    assert sorted((Path(sample.path).name, sample.repeats) for sample in dataset.samples) == [
        ("a.png", 4), ("b.jpg", 4), ("plain.webp", 2)]
    assert dataset.source == str(root.resolve())
    assert dataset.tag_frequency["4_cat"] == {"sks": 2, "cat": 2, "window": 1, "grass": 1}
    assert "images: 3" in summary and "(with repeats): 10" in summary and "captions missing: 1" in summary
    assert "caching: not possible" in summary
    assert not dataset.caching_possible
    buckets = dataset.buckets()
    assert len(buckets) == 3
    for bucket in buckets:
        assert f"{bucket[0]}x{bucket[1]}" in summary
    assert preview.ndim == 4 and preview.shape[0] == 1 and preview.shape[3] == 3
    assert 0.0 <= float(preview.min()) and float(preview.max()) <= 1.0 and float(preview.std()) > 0.05
    assert results["2"]["ui"]["images"]  # PreviewImage received the grid
    assert hash_tree(root) == before  # only read


@pytest.mark.compat
def test_absolute_folder_and_rerun_only_when_files_change(comfy, kohya_folder, tmp_path):
    _, root = kohya_folder
    prompt = dataset_prompt(folder=str(root))
    # A fresh copy per run, as the server gets: ComfyUI stores the IS_CHANGED result in the prompt dict.
    first = outputs_of(comfy.run(copy.deepcopy(prompt)))[0]
    again = outputs_of(comfy.run(copy.deepcopy(prompt)))[0]
    assert again is first  # nothing changed: ComfyUI used its cache, no rescan, no retraining
    caption = root / "4_cat" / "a.txt"
    caption.write_text("cat, window, sunlight")
    later = time.time() + 5
    os.utime(caption, (later, later))
    changed = outputs_of(comfy.run(copy.deepcopy(prompt)))[0]
    assert changed is not first
    assert any(sample.caption == "cat, window, sunlight" for sample in changed.samples)


@pytest.mark.compat
def test_images_input_with_one_caption_per_line(comfy):
    prompt = {
        "0": {"class_type": "EmptyImage", "inputs": {"width": 96, "height": 64, "batch_size": 2, "color": 0x336699}},
        "1": {"class_type": "LoRALabDataset", "inputs": {**DEFAULTS, **SMALL, "images": ["0", 0],
                                                          "captions": "red thing\nblue thing", "repeats": 3}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 2]}},
    }
    dataset, summary, _ = outputs_of(comfy.run(prompt))
    assert [sample.caption for sample in dataset.samples] == ["red thing", "blue thing"]
    assert dataset.source == "images input" and dataset.effective_count == 6
    image, _, _ = dataset.load_image(0, None)
    assert image.size == dataset.samples[0].bucket
    assert image.getpixel((5, 5)) == (0x33, 0x66, 0x99)
    prompt["1"]["inputs"]["captions"] = "only one"
    with pytest.raises(PromptFailed, match="2 images but captions has 1 lines"):
        comfy.run(prompt)
    prompt["1"]["inputs"]["captions"] = "a\nb"
    prompt["1"]["inputs"]["folder"] = str(comfy.input_dir)
    with pytest.raises(PromptFailed, match="both folder"):
        comfy.run(prompt)


@pytest.mark.compat
def test_missing_folder_is_refused_before_running(comfy):
    with pytest.raises(PromptFailed) as caught:
        comfy.run(dataset_prompt(folder="no-such-folder-here"))
    message = str(caught.value)
    assert "no-such-folder-here" in message and "does not exist" in message and ".png" in message


def test_empty_folder_and_nothing_connected(comfy):
    empty = comfy.input_dir / f"empty-{uuid.uuid4().hex[:8]}"
    empty.mkdir()
    with pytest.raises(PromptFailed, match=r"is empty: accepted image extensions are \.jpg"):
        comfy.run(dataset_prompt(folder=empty.name))
    with pytest.raises(PromptFailed, match="folder is empty and no images are connected"):
        comfy.run(dataset_prompt(folder=""))


def test_corrupt_image_is_named_or_skipped(comfy, kohya_folder):
    name, root = kohya_folder
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(PromptFailed, match="broken.png"):
        comfy.run(dataset_prompt(folder=name))
    dataset, summary, _ = outputs_of(comfy.run(dataset_prompt(folder=name, skip_bad_images=True)))
    assert len(dataset.samples) == 3
    assert "skipped bad images: 1" in summary and "broken.png" in summary


@pytest.mark.parametrize("inputs, fragment", [
    ({"min_bucket_resolution": 512, "max_bucket_resolution": 256}, "swap them"),
    ({"bucket_step": 32, "min_bucket_resolution": 80}, "multiple of bucket_step"),
    ({"caption_dropout": 2.0}, "bigger than max of 1.0"),  # ComfyUI's own range check
    ({"repeats": 0}, "smaller than min of 1"),
    ({"resolution": 1024, "max_bucket_resolution": 512}, "resolution .1024. must lie between"),
])
def test_bad_options_are_refused_with_the_value(comfy, kohya_folder, inputs, fragment):
    with pytest.raises(PromptFailed, match=fragment):
        comfy.run(dataset_prompt(folder=kohya_folder[0], **inputs))
