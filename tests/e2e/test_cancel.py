"""Cancel (POST /interrupt, what the Cancel button sends) through a real ComfyUI server, at three points of
a run: at the start (first batch: latents being encoded and cached), between steps, and after the last step
(saving). Each time the checkpoint's MODEL and CLIP still sample the same image, byte for byte, every
LoRA file left is complete, nothing half-written remains, and the next queued run works."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy
import pytest
from PIL import Image

from lora_lab_devtools.comfy_server import widget_defaults
from lora_lab_devtools.tiny_checkpoint import ensure_tiny_sd15

CHECKPOINT = "lora_lab_tiny_sd15.safetensors"
STEPS = 200          # never reached: every run here is cancelled or short


@pytest.fixture(scope="module")
def prepared(server):
    link = server.models_dir / "checkpoints" / CHECKPOINT
    if not link.exists():
        link.symlink_to(ensure_tiny_sd15())
    folder = server.input_dir / "cancel_set"
    folder.mkdir(exist_ok=True)
    generator = numpy.random.default_rng(0)
    for index in range(12):
        pixels = (generator.random((96, 96, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"pattern number {index}")
    return folder


def sampling_nodes(variant: int) -> dict:
    """KSamplerAdvanced on the loader's own MODEL/CLIP. `variant` only changes inputs that cannot change the
    image (end_at_step above steps, spaces after the prompt) so ComfyUI's cache does not answer instead."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": CHECKPOINT}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "pattern number 3" + " " * variant}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "add_noise": "enable", "noise_seed": 5, "steps": 2, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "start_at_step": 0, "end_at_step": 10000 - variant,
            "return_with_leftover_noise": "disable"}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": f"cancel_probe_{variant}"}},
    }


def sampled_pixels(server, variant: int) -> numpy.ndarray:
    entry = server.run(sampling_nodes(variant), timeout=120)
    (image,) = entry["outputs"]["7"]["images"]
    with Image.open(server.output_file(image)) as picture:
        return numpy.asarray(picture.convert("RGB")).copy()


def training_prompt(server, folder: Path, lora_name: str, steps: int = STEPS) -> dict:
    info = {name: server.get(f"/object_info/{name}")[name]["input"]
            for name in ("LoRALabDataset", "LoRALabLRSchedule", "LoRALabLearningRates", "LoRALabTrain")}
    prompt = sampling_nodes(0)
    del prompt["7"]
    prompt.update({
        "10": {"class_type": "LoRALabDataset", "inputs": {**widget_defaults(info["LoRALabDataset"]),
                                                         "folder": str(folder), "resolution": 64, "bucketing": False}},
        "11": {"class_type": "LoRALabLRSchedule", "inputs": widget_defaults(info["LoRALabLRSchedule"])},
        "12": {"class_type": "LoRALabLearningRates", "inputs": {**widget_defaults(info["LoRALabLearningRates"]),
                                                                "learning_rate": 1e-3, "text_encoder_lr": 5e-4}},
        "13": {"class_type": "LoRALabTrain", "inputs": {
            **widget_defaults(info["LoRALabTrain"]), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
            "dataset": ["10", 0], "learning_rates": ["12", 0], "lr_schedule": ["11", 0], "steps": steps,
            "batch_size": 4, "rank": 4, "alpha": 4.0, "precision": "fp32", "gradient_checkpointing": False,
            "lora_name": lora_name}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["13", 1], "text": "pattern number 3"}},
        "21": {"class_type": "KSampler", "inputs": {
            "model": ["13", 0], "positive": ["20", 0], "negative": ["3", 0], "latent_image": ["4", 0], "seed": 1,
            "steps": 1, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "22": {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}},
    })
    return prompt


def wait_until(condition, timeout: float = 120.0, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        time.sleep(interval)


def logged_steps(server, lora_name: str) -> int | None:
    """Lines in the run's log.jsonl (None until the trainer has created it, right before step 0)."""
    path = server.output_dir / "lora_lab" / lora_name / "log.jsonl"
    try:
        return len(path.read_text().splitlines())
    except OSError:
        return None


def assert_no_damage(server, lora_name: str) -> None:
    loras = server.models_dir / "loras"
    for path in loras.glob(f"{lora_name}*"):
        from safetensors import safe_open
        with safe_open(str(path), "pt") as handle:    # complete: header and every tensor readable
            assert [handle.get_tensor(key).shape for key in handle.keys()]
    assert not list(loras.rglob(".lora_lab_*")) and not list((server.output_dir / "lora_lab").rglob(".lora_lab_*"))


# (name, when to press Cancel: steps logged, counting from log.jsonl's creation)
CANCEL_POINTS = {"at_start": 0, "between_steps": 2, "after_last_step": 3}


def test_cancel_at_start_between_steps_and_while_saving_leaves_models_and_files_whole(server, prepared):
    before = sampled_pixels(server, variant=1)
    for variant, (point, press_at) in enumerate(CANCEL_POINTS.items(), start=2):
        name = f"cancel_{point}"
        steps = 3 if point == "after_last_step" else STEPS
        prompt_id = server.queue(training_prompt(server, prepared, name, steps))
        wait_until(lambda: (logged_steps(server, name) or 0) >= press_at and logged_steps(server, name) is not None)
        status, _ = server.post("/interrupt", {})
        assert status == 200
        entry = server.wait(prompt_id, timeout=120)
        done = logged_steps(server, name)
        interrupted = server.models_dir / "loras" / f"{name}_interrupted.safetensors"
        final = server.models_dir / "loras" / f"{name}.safetensors"
        if point == "after_last_step":
            # Training had finished: either the interrupt reached the last progress update (the LoRA is kept
            # as _interrupted) or it came during saving / the sampler after it (the final file is complete).
            assert done == 3 and (interrupted.is_file() or final.is_file())
        else:
            assert entry["status"]["status_str"] == "error"
            assert any(message[0] == "execution_interrupted" for message in entry["status"]["messages"])
            assert not final.exists() and done < STEPS
            assert interrupted.is_file() == (done > 0)   # something trained: kept; nothing trained: no file
        if point == "between_steps":
            assert done >= 2 and interrupted.is_file()
        assert_no_damage(server, name)
        assert numpy.array_equal(sampled_pixels(server, variant), before), f"model changed after cancel {point}"

    # The next queued run works.
    entry = server.run(training_prompt(server, prepared, "after_cancels", steps=2), timeout=300)
    assert entry["outputs"]["13"]["text"] == ["after_cancels.safetensors"]
    assert logged_steps(server, "after_cancels") == 2
    assert numpy.array_equal(sampled_pixels(server, variant=9), before)
