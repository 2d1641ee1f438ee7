"""PIL <-> ComfyUI IMAGE conversion: the layout, value range and rounding every node output and preview uses."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support.images import gradient_image  # noqa: E402

from lora_lab.training.data.image_tensors import image_to_pil, pil_to_image  # noqa: E402


def test_a_pil_image_becomes_a_batch_of_one_in_zero_to_one():
    picture = gradient_image((40, 30), seed=1)
    image = pil_to_image(picture)
    assert image.shape == (1, 30, 40, 3) and image.dtype == torch.float32
    assert torch.equal(image[0], torch.from_numpy(np.asarray(picture, dtype=np.float32) / np.float32(255.0)))
    assert image.min() >= 0.0 and image.max() <= 1.0


def test_other_modes_are_converted_to_rgb_first():
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, "L")
    image = pil_to_image(gray)
    assert image.shape == (1, 3, 4, 3)
    assert torch.equal(image[0, :, :, 0], image[0, :, :, 2])
    assert image[0, 2, 3, 1].item() == np.float32(220) / np.float32(255.0)
    transparent = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert torch.equal(pil_to_image(transparent), pil_to_image(Image.new("RGB", (2, 2), (10, 20, 30))))


def test_an_rgb_image_survives_the_round_trip_exactly():
    picture = gradient_image((33, 17), seed=2)
    back = image_to_pil(pil_to_image(picture)[0])
    assert back.mode == "RGB" and np.array_equal(np.asarray(back), np.asarray(picture))


def test_image_values_are_clamped_and_rounded_half_to_even():
    values = torch.tensor([-0.5, 0.5 / 255, 1.5 / 255, 2.5 / 255, 0.3, 1.0, 1.7], dtype=torch.float32)
    picture = image_to_pil(values.reshape(1, -1, 1))
    assert picture.mode == "L"
    # 0.3 * 255 is 76.5 in float32, so it rounds to even too
    assert list(np.asarray(picture)[0]) == [0, 0, 2, 2, 76, 255, 255]


def test_the_channel_count_picks_the_mode():
    assert image_to_pil(torch.zeros(4, 5, 3)).mode == "RGB"
    rgba = image_to_pil(torch.ones(4, 5, 4))
    assert rgba.mode == "RGBA" and rgba.size == (5, 4) and rgba.getpixel((0, 0)) == (255, 255, 255, 255)
    half = torch.full((2, 2, 3), 0.5, dtype=torch.float16)
    assert image_to_pil(half).getpixel((1, 1)) == (128, 128, 128)
