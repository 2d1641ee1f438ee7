"""PIL images <-> ComfyUI IMAGE tensors (float32 [batch, height, width, channels] in 0..1).

The one place that converts between the two, for the nodes' chart and preview outputs, the dataset's
in-memory images and the sample previews, so every path rounds and clamps the same way. Knows the
IMAGE layout only, not ComfyUI: training/ stays importable without it. torch is imported when first
needed, so the dataset library (which uses this module) imports in a fraction of a second without it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy
from PIL import Image

if TYPE_CHECKING:
    import torch


def pil_to_image(image: Image.Image) -> "torch.Tensor":
    """One PIL image -> an IMAGE batch of one ([1, H, W, 3] float32, 8-bit value / 255); other modes
    are converted to RGB first."""
    import torch

    if image.mode != "RGB":
        image = image.convert("RGB")
    array = numpy.asarray(image, dtype=numpy.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)


def frames_to_image(frames: "list[Image.Image]") -> "torch.Tensor":
    """A clip's frames (PIL images of one size) -> an IMAGE batch [frames, H, W, 3]: what a video VAE
    encodes as one clip (ComfyUI's VAE takes a video's frames as the batch axis)."""
    import torch

    return torch.cat([pil_to_image(frame) for frame in frames])


def image_to_pil(image: "torch.Tensor") -> Image.Image:
    """One image of an IMAGE batch ([H, W, C] floats) -> a PIL image: values clamped to 0..1, scaled
    to 0..255 and rounded (half to even); one channel gives an "L" image, three "RGB", four "RGBA"."""
    array = image.detach().float().cpu().clamp(0.0, 1.0).mul(255.0).round().byte().numpy()
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    return Image.fromarray(array)
