#!/usr/bin/env python3
"""Benchmark: LoRA Lab's Train LoRA vs ComfyUI's built-in TrainLoraNode, same process, same settings.

Both train the tiny generated SD1.5-layout checkpoint (scripts/make_tiny_checkpoint.py) on the same
images, same steps, batch, rank, UNet only, fp32, gradient checkpointing off, AdamW at the same
rate. Layers: the built-in trains every linear/conv weight of the UNet; LoRA Lab runs with
target=all_linear_conv (every linear/conv inside the UNet blocks, as kohya's LoCon). Each trainer's
node time is measured on its own prompt after the upstream nodes (checkpoint, VAE encode, text
encode) were cached by a warm-up prompt, so only training is timed (LoRA Lab's time still includes
its own VAE encode of the dataset and writing the file). Not a test: nothing is asserted.

Prints one line per trainer, and last: ``ratio lora_lab/builtin steps_per_s: X``.

Usage: python3 scripts/setup_env.py run -- scripts/bench.py [--steps 30] [--batch 2] [--resolution 128]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "tests"))
sys.path.insert(0, str(REPO_ROOT / "scripts"))


def comfyui_dir() -> Path:
    import subprocess
    configured = os.environ.get("LORA_LAB_COMFYUI_DIR")
    if configured:
        return Path(configured)
    printed = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "setup_env.py"), "print", "comfyui-dir"],
                             check=True, capture_output=True, text=True)
    return Path(printed.stdout.strip())


def write_images(folder: Path, count: int, size: int) -> list[str]:
    import numpy
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = numpy.random.default_rng(0)
    names = []
    for index in range(count):
        # Smooth random blobs: structured enough to be a fair training signal.
        coarse = generator.random((8, 8, 3))
        image = Image.fromarray((coarse * 255).astype("uint8")).resize((size, size), Image.BICUBIC)
        name = f"bench_{index}.png"
        image.save(folder / name)
        (folder / f"bench_{index}.txt").write_text("a photo of a blob")
        names.append(name)
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    arguments = parser.parse_args()

    from support.inprocess import boot
    from make_tiny_checkpoint import ensure_tiny_sd15

    base = Path(tempfile.mkdtemp(prefix="lora_lab_bench_"))
    comfy = boot(comfyui_dir(), base)
    (comfy.models_dir / "checkpoints" / "tiny.safetensors").symlink_to(ensure_tiny_sd15())
    folder = comfy.input_dir / "bench"
    names = write_images(folder, arguments.images, arguments.resolution)

    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a blob"}}}
    batch_inputs = []
    for index, name in enumerate(names):
        graph[f"L{index}"] = {"class_type": "LoadImage", "inputs": {"image": f"bench/{name}"}}
        batch_inputs.append([f"L{index}", 0])
    previous = batch_inputs[0]
    for index, item in enumerate(batch_inputs[1:], start=1):
        graph[f"B{index}"] = {"class_type": "ImageBatch", "inputs": {"image1": previous, "image2": item}}
        previous = [f"B{index}", 0]
    graph["3"] = {"class_type": "VAEEncode", "inputs": {"pixels": previous, "vae": ["1", 2]}}
    # The built-in needs a list of latents (0.3.75 fails on a single LATENT, see COMFYUI_NOTES).
    graph["4"] = {"class_type": "RebatchLatents", "inputs": {"latents": ["3", 0], "batch_size": 1}}
    graph["5"] = {"class_type": "PreviewImage", "inputs": {"images": previous}}
    graph["10"] = {"class_type": "LoRALabDataset", "inputs": {
        **comfy.widget_defaults("LoRALabDataset"), "folder": str(folder), "resolution": arguments.resolution,
        "bucketing": False}}
    graph["11"] = {"class_type": "LoRALabLRSchedule", "inputs": {
        **comfy.widget_defaults("LoRALabLRSchedule"), "scheduler": "constant", "warmup": 0.0}}
    graph["12"] = {"class_type": "LoRALabLearningRates", "inputs": {
        **comfy.widget_defaults("LoRALabLearningRates"), "learning_rate": arguments.learning_rate,
        "text_encoder_lr": 0.0}}
    graph["13"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}}
    comfy.run(graph)   # warm-up: checkpoint, images, latents, conditioning now cached

    ours = dict(graph)
    ours["20"] = {"class_type": "LoRALabTrain", "inputs": {
        **comfy.widget_defaults("LoRALabTrain"), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
        "dataset": ["10", 0], "learning_rates": ["12", 0], "lr_schedule": ["11", 0], "steps": arguments.steps,
        "batch_size": arguments.batch, "rank": arguments.rank, "alpha": float(arguments.rank),
        "target": "all_linear_conv", "precision": "fp32", "gradient_checkpointing": False, "weight_decay": 0.01,
        "max_grad_norm": 0.0, "lora_name": "bench"}}
    builtin = dict(graph)
    builtin["30"] = {"class_type": "TrainLoraNode", "inputs": {
        "model": ["1", 0], "latents": ["4", 0], "positive": ["2", 0], "batch_size": arguments.batch,
        "grad_accumulation_steps": 1, "steps": arguments.steps, "learning_rate": arguments.learning_rate,
        "rank": arguments.rank, "optimizer": "AdamW", "loss_function": "MSE", "seed": 0, "training_dtype": "fp32",
        "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": False, "existing_lora": "[None]"}}
    builtin["31"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["30", 1], "prefix": "bench_builtin",
                                                           "steps": arguments.steps}}

    rates = {}
    for name, prompt in (("builtin", builtin), ("lora_lab", ours)):
        started = time.perf_counter()
        comfy.run(prompt)
        seconds = time.perf_counter() - started
        rates[name] = arguments.steps / seconds
        print(f"{name}: {arguments.steps} steps, batch {arguments.batch}, {arguments.resolution}px, rank "
              f"{arguments.rank}: {seconds:.2f} s, {rates[name]:.3f} steps/s, "
              f"{rates[name] * arguments.batch:.2f} img/s", flush=True)
    if not list(comfy.output_dir.glob("bench_builtin*.safetensors")):
        raise SystemExit("the built-in TrainLoraNode did not run (no SaveLoRA file): the comparison is void")
    print(f"ratio lora_lab/builtin steps_per_s: {rates['lora_lab'] / rates['builtin']:.2f}", flush=True)
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
