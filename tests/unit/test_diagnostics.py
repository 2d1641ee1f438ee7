"""SDXL crop conditioning of flipped images, and what the NaN error blames (no ComfyUI)."""
from __future__ import annotations

import pytest

from lora_lab.training.run.loop import TrainingDiverged
from lora_lab.training.data.feeder import conditioning_crop


def test_crop_of_an_unflipped_image_is_its_offset():
    assert conditioning_crop((16, 8), False, (1152, 1024), (1024, 1024)) == (16, 8)


@pytest.mark.parametrize("left", [0, 40, 128])
def test_flipped_crop_is_mirrored_in_the_resized_image(left):
    """The pixels the model sees after a flip are the mirror of the crop: their left edge in the
    flipped image is where the crop's right edge was (sd-scripts conditions SDXL the same way)."""
    resized, bucket = (1152, 1024), (1024, 1024)
    mirrored = conditioning_crop((left, 8), True, resized, bucket)
    assert mirrored == (resized[0] - left - bucket[0], 8)
    # Mirroring twice gives the crop back; a centred crop stays where it is.
    assert conditioning_crop(mirrored, True, resized, bucket) == (left, 8)
    assert conditioning_crop((64, 0), True, resized, bucket) == (64, 0)


def test_nan_after_a_rising_loss_blames_the_learning_rate():
    message = str(TrainingDiverged(5, float("nan"), "bf16", history=[1.0, 0.9, 1.5, 4.0]))
    assert "learning rate is probably too high" in message and "0.9 to 4" in message


@pytest.mark.parametrize("history", [[], [1.0, 0.98, 1.01]])
def test_nan_without_a_rising_loss_points_at_numerics_not_the_rate(history):
    message = str(TrainingDiverged(len(history), float("nan"), "fp32", history=history))
    assert "too high" not in message and "numerical problem, not the learning rate" in message
    assert ("first step" in message) == (not history)


def test_fp16_nan_without_a_rising_loss_names_overflow():
    message = str(TrainingDiverged(2, float("inf"), "fp16", history=[1.0, 1.0]))
    assert "fp16 overflow" in message and "too high" not in message
