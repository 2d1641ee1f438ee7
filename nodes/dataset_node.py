"""LoRA Dataset node: a kohya-style image folder (or an IMAGE batch + captions) -> LORA_DATASET."""
from __future__ import annotations

from pathlib import Path

from comfy_api.latest import io

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


def check_folder(folder: str) -> Path:
    return require_folder(resolve_folder(folder), folder)


class DatasetNode(io.ComfyNode):
    """Widget order is a public API (saved workflows store values by position): append only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRALabDataset", display_name="LoRA Dataset", category="LoRA Lab",
            description=("Images and captions to train a LoRA on: a kohya-style folder (sub-folders 'N_name' "
                         "repeat their images N times, captions in side-car .txt files) or an IMAGE batch with one "
                         "caption per line. Aspect-ratio buckets like kohya; the folder is only read."),
            inputs=[
                io.String.Input("folder", default="", tooltip=(
                    "Folder of training images (" + accepted_extensions_text() + "), searched recursively: an "
                    "absolute path or one relative to ComfyUI's input folder. kohya layout: sub-folders named "
                    "'10_name' repeat their images 10 times. Leave empty when images are connected. "
                    "The folder is only read.")),
                *inputs(DatasetOptions),
                socket("IMAGE", "images", "Train on images made by other nodes instead of a folder (leave folder "
                                          "empty).", optional=True),
                io.String.Input("captions", multiline=True, default="", optional=True, tooltip=(
                    "With images: one caption per line, in image order. Empty = no captions (trigger word "
                    "alone).")),
            ],
            outputs=[output("LORA_DATASET", "dataset", "The dataset description, for Train LoRA."),
                     output("STRING", "summary", "Images, repeats, buckets, missing captions, top tags and whether "
                                                 "latents can be cached."),
                     output("IMAGE", "preview", "A few samples as they will be cropped, labelled with their bucket.")])

    @classmethod
    def validate_inputs(cls, folder=None):
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
    def fingerprint_inputs(cls, folder="", **_other_inputs):
        # ComfyUI re-runs the node (and what follows: the training) when this value changes:
        # any file under the folder added, removed, resized or touched. Other inputs are already
        # part of ComfyUI's cache key.
        if not folder or not str(folder).strip():
            return ""
        return folder_fingerprint(resolve_folder(folder))

    @classmethod
    def execute(cls, folder, images=None, captions="", **values) -> io.NodeOutput:
        options = DatasetOptions.from_values(values)
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
        return io.NodeOutput(dataset, summarize(dataset), pil_to_image(preview_grid(dataset)))
