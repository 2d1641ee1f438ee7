"""PIL <-> ComfyUI IMAGE (float32 tensor [batch, height, width, 3] in 0..1)."""
from __future__ import annotations

import numpy
import torch
from PIL import Image


def pil_to_image(image: Image.Image) -> torch.Tensor:
    """One PIL image -> a ComfyUI IMAGE batch of one."""
    array = numpy.asarray(image.convert("RGB"), dtype=numpy.float32) / 255.0
    return torch.from_numpy(array).unsqueeze(0)
