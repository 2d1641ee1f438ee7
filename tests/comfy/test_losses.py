"""Train LoRA's `loss` (mse, huber, smooth_l1, l1) with huber_c and huber_schedule, trained for real on a UNet
(the tiny SD1.5 checkpoint, min-SNR on, with its text encoder) and a DiT (the tiny Wan 2.1, flow
matching, on clips): the robust losses learn (the MSE at fixed noise falls), the file records the loss, and the stable
validation loss stays MSE whatever the training loss, so runs compare."""
from __future__ import annotations

import json

import pytest

from .test_generic_family import fixed_loss
from .test_train import (checkpoint, dataset, fixed_pair_inputs, fixed_pair_loss, loaded, rates,  # noqa: F401
                         read_lora, schedule, train)


def log_of(comfy, lora_name: str) -> list[dict]:
    path = comfy.output_dir / "lora_lab" / lora_name / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("loss,huber_schedule", [("huber", "exponential"), ("l1", "snr")])
def test_robust_losses_train_a_unet_with_min_snr(comfy, loaded, dataset, loss, huber_schedule):
    latents, context, small = fixed_pair_inputs(loaded, dataset)
    before = fixed_pair_loss(loaded[0], latents, context)
    name = f"loss_{loss}"
    trained, _, lora_name, _ = train(comfy, loaded, small, rates(comfy, learning_rate=2e-3, text_encoder_lr=1e-3),
                                     schedule(comfy), steps=12, rank=8, alpha=8.0, lora_name=name, loss=loss,
                                     huber_c=0.2, huber_schedule=huber_schedule, min_snr_gamma=5.0)
    assert fixed_pair_loss(trained, latents, context) < 0.95 * before
    _, metadata = read_lora(comfy, lora_name)
    settings = json.loads(metadata["lora_lab_settings"])["train"]
    assert (settings["loss"], settings["huber_c"], settings["huber_schedule"]) == (loss, 0.2, huber_schedule)


def test_smooth_l1_with_its_snr_schedule_trains_a_flow_dit(comfy, tmp_path):
    """The snr schedule on flow matching (noise ratio sigma / (1 - sigma)), on the tiny Wan 2.1 and two clips."""
    from lora_lab_devtools import wan_fixtures

    from .test_video_families import RATE, clip_dataset, clip_folder, load

    loaded = load(comfy, wan_fixtures.wan_example_files(comfy.models_dir), wan_fixtures.wan_clip(), "wan21_t2v",
                  "wan21_vae")
    folder, pixels = clip_folder(tmp_path)
    before = fixed_loss(*loaded, pixels)
    trained, _, _, _ = train(comfy, loaded, clip_dataset(comfy, folder), rates(comfy, learning_rate=RATE,
                             text_encoder_lr=0.0), schedule(comfy), steps=4, lora_name="wan_smooth_l1",
                             loss="smooth_l1", huber_schedule="snr")
    assert fixed_loss(trained, loaded[1], loaded[2], pixels) < 0.95 * before


def test_the_validation_loss_stays_mse_whatever_the_training_loss(comfy, loaded, dataset):
    """Two runs that barely move the weights (rate 1e-12), same seed: their stable validation losses agree
    (both MSE), while the training losses differ (each its own loss)."""
    lines = {}
    for loss in ("mse", "smooth_l1"):
        train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-12, text_encoder_lr=0.0), schedule(comfy),
              steps=2, lora_name=f"validation_{loss}", loss=loss, huber_c=0.01, huber_schedule="constant",
              validate_every_n_steps=1)
        lines[loss] = log_of(comfy, f"validation_{loss}")
    assert lines["mse"][0]["val_loss"] == pytest.approx(lines["smooth_l1"][0]["val_loss"], rel=1e-6)
    assert abs(lines["mse"][0]["loss"] - lines["smooth_l1"][0]["loss"]) > 0.1 * lines["mse"][0]["loss"]
