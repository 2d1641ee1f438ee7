"""LoRA Dataset node: a kohya-style image folder (or an IMAGE batch + captions) -> LORA_DATASET."""
from __future__ import annotations

from pathlib import Path

from ..training.dataset import (CROP_MODES, DatasetError, DatasetOptions, accepted_extensions_text, require_folder,
                                build_folder_dataset, build_image_dataset, folder_fingerprint,
                                preview_grid, summarize)
from ..training.image_tensors import pil_to_image
from . import comfy_bridge

# Widget name -> DatasetOptions field (same names); order is the public widget order.
OPTION_NAMES = ("resolution", "repeats", "caption_extension", "trigger_word", "shuffle_captions", "keep_tokens",
                "caption_dropout", "flip", "bucketing", "min_bucket_resolution", "max_bucket_resolution",
                "bucket_step", "bucket_no_upscale", "crop", "skip_bad_images")


def resolve_folder(folder: str) -> Path:
    """The folder as typed: absolute, or relative to ComfyUI's input folder; quotes are dropped."""
    text = folder.strip().strip('"').strip("'").strip()
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = comfy_bridge.input_dir() / path
    return path


def options_from_values(values: dict) -> DatasetOptions:
    """DatasetOptions from widget values; missing ones (linked widgets) take the defaults."""
    present = {name: values[name] for name in OPTION_NAMES if values.get(name) is not None}
    for name in ("resolution", "repeats", "keep_tokens", "min_bucket_resolution", "max_bucket_resolution",
                 "bucket_step"):
        if name in present:
            present[name] = int(present[name])
    for name in ("shuffle_captions", "flip", "bucketing", "bucket_no_upscale", "skip_bad_images"):
        if name in present:
            present[name] = bool(present[name])
    if "caption_dropout" in present:
        present["caption_dropout"] = float(present["caption_dropout"])
    return DatasetOptions(**present)


def check_folder(folder: str) -> Path:
    return require_folder(resolve_folder(folder), folder)


class DatasetNode:
    """Widget order is a public API (saved workflows store values by position): append only."""

    CATEGORY = "LoRA Lab"
    DESCRIPTION = ("Images and captions to train a LoRA on: a kohya-style folder (sub-folders 'N_name' repeat "
                   "their images N times, captions in side-car .txt files) or an IMAGE batch with one caption "
                   "per line. Aspect-ratio buckets like kohya; the folder is only read.")
    RETURN_TYPES = ("LORA_DATASET", "STRING", "IMAGE")
    RETURN_NAMES = ("dataset", "summary", "preview")
    OUTPUT_TOOLTIPS = ("The dataset description, for Train LoRA.",
                       "Images, repeats, buckets, missing captions, top tags and whether latents can be cached.",
                       "A few samples as they will be cropped, labelled with their bucket.")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "folder": ("STRING", {"default": "", "tooltip": (
                    "Folder of training images (" + accepted_extensions_text() + "), searched recursively: an "
                    "absolute path or one relative to ComfyUI's input folder. kohya layout: sub-folders named "
                    "'10_name' repeat their images 10 times. Leave empty when images are connected. "
                    "The folder is only read.")}),
                "resolution": ("INT", {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": (
                    "Training resolution: buckets have about resolution x resolution pixels. 512 for SD1.x, "
                    "768 for SD2.x, 1024 for SDXL.")}),
                "repeats": ("INT", {"default": 1, "min": 1, "max": 10000, "tooltip": (
                    "How many times each image counts per epoch, for images not inside an 'N_name' folder "
                    "(those use N).")}),
                "caption_extension": ("STRING", {"default": ".txt", "tooltip": (
                    "Suffix of the caption file next to each image (same name): 'a.png' -> 'a.txt'. First "
                    "line used, UTF-8. Images without one are trained with the trigger word alone.")}),
                "trigger_word": ("STRING", {"default": "", "tooltip": (
                    "Word put first in every caption (unless the caption already starts with it), e.g. 'sks'. "
                    "Empty = none.")}),
                "shuffle_captions": ("BOOLEAN", {"default": False, "tooltip": (
                    "Shuffle the comma-separated tags of each caption at every step (keeps the first "
                    "keep_tokens in place).")}),
                "keep_tokens": ("INT", {"default": 0, "min": 0, "max": 255, "tooltip": (
                    "Tags at the front that shuffling never moves, counted after the trigger word is put first "
                    "(1 = keep the trigger word first).")}),
                "caption_dropout": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip": (
                    "Probability that a step trains with an empty caption (helps unconditional generation). "
                    "0 = never.")}),
                "flip": ("BOOLEAN", {"default": False, "tooltip": (
                    "Randomly mirror images left-right (half the steps). Avoid for asymmetric subjects or text.")}),
                "bucketing": ("BOOLEAN", {"default": True, "tooltip": (
                    "Aspect-ratio buckets (kohya): each image trains near its own shape. Off: every image is "
                    "resized and cropped to a resolution x resolution square.")}),
                "min_bucket_resolution": ("INT", {"default": 256, "min": 64, "max": 4096, "step": 8, "tooltip": (
                    "Smallest bucket side in pixels (a multiple of bucket_step).")}),
                "max_bucket_resolution": ("INT", {"default": 1024, "min": 64, "max": 8192, "step": 8, "tooltip": (
                    "Largest bucket side in pixels (a multiple of bucket_step). SDXL: 2048 allows the usual "
                    "tall/wide buckets.")}),
                "bucket_step": ("INT", {"default": 64, "min": 8, "max": 256, "step": 8, "tooltip": (
                    "Bucket sides are multiples of this many pixels (64 as in kohya; at least 8 for the VAE).")}),
                "bucket_no_upscale": ("BOOLEAN", {"default": False, "tooltip": (
                    "Images smaller than resolution x resolution get a bucket that fits them, so they are only "
                    "cropped, never enlarged.")}),
                "crop": (list(CROP_MODES), {"default": "center", "tooltip": (
                    "Where to crop the resized image to its bucket. 'random' draws a new crop every time, so "
                    "latents cannot be cached (slower training).")}),
                "skip_bad_images": ("BOOLEAN", {"default": False, "tooltip": (
                    "Leave corrupt or truncated images out (listed in the summary) instead of stopping with "
                    "an error.")}),
            },
            "optional": {
                "images": ("IMAGE", {"tooltip": (
                    "Train on images made by other nodes instead of a folder (leave folder empty).")}),
                "captions": ("STRING", {"multiline": True, "default": "", "tooltip": (
                    "With images: one caption per line, in image order. Empty = no captions (trigger word "
                    "alone).")}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, folder=None):
        # Only `folder` is named here: ComfyUI reports a failure once per named input, and skips its
        # own min/max checks for named inputs, so the numeric widgets keep ComfyUI's range checks
        # and their cross-field rules (DatasetOptions) run first thing when the node executes.
        if folder and str(folder).strip():  # empty: images may be connected, checked when the node runs
            try:
                check_folder(folder)
            except ValueError as error:
                return str(error)
        return True

    @classmethod
    def IS_CHANGED(cls, folder="", **_other_inputs):
        # ComfyUI re-runs the node (and what follows: the training) when this value changes:
        # any file under the folder added, removed, resized or touched. Other inputs are already
        # part of ComfyUI's cache key.
        if not folder or not str(folder).strip():
            return ""
        return folder_fingerprint(resolve_folder(folder))

    def build(self, folder, resolution, repeats, caption_extension, trigger_word, shuffle_captions, keep_tokens,
              caption_dropout, flip, bucketing, min_bucket_resolution, max_bucket_resolution, bucket_step,
              bucket_no_upscale, crop, skip_bad_images, images=None, captions=""):
        options = options_from_values(dict(
            resolution=resolution, repeats=repeats, caption_extension=caption_extension, trigger_word=trigger_word,
            shuffle_captions=shuffle_captions, keep_tokens=keep_tokens, caption_dropout=caption_dropout, flip=flip,
            bucketing=bucketing, min_bucket_resolution=min_bucket_resolution,
            max_bucket_resolution=max_bucket_resolution, bucket_step=bucket_step,
            bucket_no_upscale=bucket_no_upscale, crop=crop, skip_bad_images=skip_bad_images))
        has_folder = bool(folder and folder.strip())
        if images is not None and has_folder:
            raise DatasetError(f"both folder ({folder!r}) and images are given: clear folder to train on the "
                               f"connected images, or disconnect images to train on the folder")
        if images is not None:
            dataset = build_image_dataset(images, captions, options)
        elif has_folder:
            dataset = build_folder_dataset(check_folder(folder), options)
        else:
            raise DatasetError("folder is empty and no images are connected: set folder to a folder of images "
                               f"({accepted_extensions_text()}) or connect an IMAGE batch to images")
        return (dataset, summarize(dataset), pil_to_image(preview_grid(dataset)))
