"""LoRA Dataset node: a kohya-style image folder (or an IMAGE batch + captions) -> LORA_DATASET."""
from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

from ..training.data.dataset.options import CLIP_OPTION_NAMES
from ..training.data.dataset import (DatasetError, DatasetOptions, accepted_extensions_text, require_folder,
                                     build_folder_dataset, build_image_dataset, folder_fingerprint,
                                     preview_grid, summarize)
from ..training.data.image_tensors import pil_to_image
from . import comfy
from .widgets import inputs, output, socket

def resolve_folder(folder: str) -> Path:
    """The folder as typed: absolute, or relative to ComfyUI's input folder; quotes are dropped."""
    text = folder.strip().strip('"').strip("'").strip()
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = comfy.input_dir() / path
    return path


def check_folder(folder: str, name: str = "folder") -> Path:
    return require_folder(resolve_folder(folder), folder, name)


class DatasetNode(io.ComfyNode):
    """Widget order is a public API (saved workflows store values by position): append only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRALabDataset", display_name="LoRA Dataset", category="LoRA Lab",
            description=("Images (and, for video models, clips) and captions to train a LoRA on: a kohya-style "
                         "folder (sub-folders 'N_name' "
                         "repeat their images N times, captions in side-car .txt files) or an IMAGE batch with one "
                         "caption per line. Aspect-ratio buckets like kohya; the folder is only read."),
            inputs=[
                io.String.Input("folder", default="", tooltip=(
                    "Folder of training images and video clips (" + accepted_extensions_text() + "), searched "
                    "recursively: an "
                    "absolute path or one relative to ComfyUI's input folder. kohya layout: sub-folders named "
                    "'10_name' repeat their images 10 times. Leave empty when images are connected. "
                    "The folder is only read.")),
                *inputs(DatasetOptions, exclude=CLIP_OPTION_NAMES),
                socket("IMAGE", "images", "Train on images made by other nodes instead of a folder (leave folder "
                                          "empty).", optional=True),
                io.String.Input("captions", multiline=True, default="", optional=True, tooltip=(
                    "With images: one caption per line, in image order. Empty = no captions (trigger word "
                    "alone).")),
                io.String.Input("control_folder", default="", optional=True, tooltip=(
                    "Edit models (Qwen-Image-Edit, Flux.2): a folder of control images, each paired with the "
                    "training image of the same file name (any image extension), as musubi-tuner's "
                    "control_directory. The model sees the control as its reference image and learns to turn it "
                    "into the training image. Absolute or relative to ComfyUI's input folder; with a folder "
                    "dataset only. Empty = none.")),
                # video clips (.mp4 .webm .mov .gif) for video models: appended after the inputs above
                *inputs(DatasetOptions, names=CLIP_OPTION_NAMES, optional=True),
            ],
            outputs=[output("LORA_DATASET", "dataset", "The dataset description, for Train LoRA."),
                     output("STRING", "summary", "Images, repeats, buckets, missing captions, top tags and whether "
                                                 "latents can be cached."),
                     output("IMAGE", "preview", "A few samples as they will be cropped, labelled with their bucket.")])

    @classmethod
    def validate_inputs(cls, folder=None, control_folder=None):
        # Only `folder` is named here: ComfyUI reports a failure once per named input, and skips its
        # own min/max checks for named inputs, so the numeric widgets keep ComfyUI's range checks
        # and their cross-field rules (DatasetOptions) run first thing when the node executes.
        for name, value in (("folder", folder), ("control_folder", control_folder)):
            if value and str(value).strip():  # empty folder: images may be connected, checked when the node runs
                try:
                    check_folder(value, name)
                except ValueError as error:
                    return str(error)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder="", control_folder="", **_other_inputs):
        # ComfyUI re-runs the node (and what follows: the training) when this value changes:
        # any file under the folder (or the control folder) added, removed, resized or touched.
        # Other inputs are already part of ComfyUI's cache key.
        return "|".join(folder_fingerprint(resolve_folder(value)) if value and str(value).strip() else ""
                        for value in (folder, control_folder)).rstrip("|")

    @classmethod
    def execute(cls, folder, images=None, captions="", control_folder="", **values) -> io.NodeOutput:
        options = DatasetOptions.from_values(values)
        has_folder = bool(folder and folder.strip())
        has_controls = bool(control_folder and control_folder.strip())
        if has_controls and not has_folder:
            raise DatasetError(f"control_folder ({control_folder!r}) pairs control images with a folder's images "
                               "by file name: set folder to the training images (connected images have no names "
                               "to pair), or clear control_folder")
        if images is not None and has_folder:
            raise DatasetError(f"both folder ({folder!r}) and images are given: clear folder to train on the "
                               f"connected images, or disconnect images to train on the folder")
        if images is not None:
            dataset = build_image_dataset(images, captions, options)
        elif has_folder:
            dataset = build_folder_dataset(check_folder(folder), options,
                                           check_folder(control_folder, "control_folder") if has_controls else None)
        else:
            raise DatasetError("folder is empty and no images are connected: set folder to a folder of images "
                               f"({accepted_extensions_text()}) or connect an IMAGE batch to images")
        return io.NodeOutput(dataset, summarize(dataset), pil_to_image(preview_grid(dataset)))
