#!/usr/bin/env python3
"""Benchmark: host memory while training on a large dataset, latent cache in memory vs on disk.

Generates a folder of N small images (default 2,000 at 64 px, one caption file each), then trains the
tiny SD1.5 checkpoint in a real in-process ComfyUI for one epoch (every image encoded once), once with
cache_latents_to_disk off and once on, each in its own process so the peak RSS (getrusage) is that
run's own. Prints peak RSS, RSS growth during training, and the bytes held by the in-memory caches.
Not a test: nothing is asserted.

Usage: python3 scripts/setup_env.py run -- scripts/bench_memory.py [--images 2000] [--batch-size 16]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _repo_path  # noqa: F401  (puts the checkout on sys.path)


def make_dataset(folder: Path, count: int, size: int, distinct_captions: int) -> None:
    import numpy
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = numpy.random.default_rng(0)
    for index in range(count):
        pixels = (generator.random((size // 8, size // 8, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).resize((size, size), Image.NEAREST).save(folder / f"{index:05d}.png")
        (folder / f"{index:05d}.txt").write_text(f"pattern {index % distinct_captions}, blocks")


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB, macOS in bytes.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def current_rss_mib() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 2**20


def run_child(arguments: argparse.Namespace) -> dict:
    """One training run in this process; returns the measurements."""
    import torch

    from lora_lab_devtools.environment import find_comfyui_dir
    from lora_lab_devtools.inprocess import boot
    from lora_lab_devtools.tiny_checkpoint import ensure_tiny_sd15

    base = Path(tempfile.mkdtemp(prefix="lora_lab_bench_memory_"))
    comfy = boot(find_comfyui_dir(), base)
    (comfy.models_dir / "checkpoints" / "tiny.safetensors").symlink_to(ensure_tiny_sd15())
    pack = comfy.pack
    dataset_module, run, bridge = pack.training.data.dataset, pack.training.run, pack.nodes.comfy
    with torch.inference_mode():
        model, clip, vae = comfy.node_class("CheckpointLoaderSimple")().load_checkpoint("tiny.safetensors")[:3]
    dataset = dataset_module.build_folder_dataset(arguments.data, dataset_module.DatasetOptions(
        resolution=arguments.size, bucketing=False))
    steps = -(-len(dataset.samples) // arguments.batch_size)   # one epoch: every image encoded once
    settings = run.train_settings.TrainSettings(steps=steps, batch_size=arguments.batch_size, rank=4, alpha=4.0,
                                                target="attention", precision="fp32", gradient_checkpointing=False,
                                                lora_name="bench_memory", cache_latents_to_disk=arguments.disk)
    rates = pack.training.lr.rates.LearningRates.from_values({"learning_rate": 1e-4, "text_encoder_lr": 0.0})
    schedule = pack.training.lr.schedules.ScheduleSettings.from_values({"scheduler": "constant", "warmup": 0.0})
    samples: list[float] = []

    def on_step(record, total) -> None:
        samples.append(current_rss_mib())

    rss_before = current_rss_mib()
    started = time.perf_counter()
    with torch.inference_mode():
        access = bridge.model_access(model, clip, vae, bridge.check_compatible(model, clip, vae))
        result = run.trainer.train_lora(settings, access, dataset, rates, schedule, bridge.loras_dir(),
                                        bridge.output_dir(), run.host.TrainCallbacks(on_step=on_step))
    cache_folder = bridge.output_dir() / "lora_lab" / run.trainer.LATENT_CACHE_FOLDER
    disk_bytes = sum(path.stat().st_size for path in cache_folder.glob("*.pt")) if cache_folder.is_dir() else 0
    return {"disk": arguments.disk, "images": len(dataset.samples), "steps": steps, "seconds": time.perf_counter() - started,
            "rss_before_mib": rss_before, "rss_after_first_step_mib": samples[0], "rss_end_mib": samples[-1],
            "peak_rss_mib": peak_rss_mib(), "latent_cache_bytes": result.cache_bytes["latents"],
            "text_cache_bytes": result.cache_bytes["text"], "disk_cache_bytes": disk_bytes}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--distinct-captions", type=int, default=20,
                        help="text encodings are cached per distinct caption (on the device)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--disk", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print("RESULT " + json.dumps(run_child(arguments)))
        return 0

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="lora_lab_bench_data_") as temporary:
        data = Path(temporary) / "1_bench"
        make_dataset(data, arguments.images, arguments.size, arguments.distinct_captions)
        results = []
        for disk in (False, True):
            command = [sys.executable, __file__, "--child", "--data", str(Path(temporary)), "--size", str(arguments.size),
                       "--batch-size", str(arguments.batch_size)] + (["--disk"] if disk else [])
            completed = subprocess.run(command, capture_output=True, text=True)
            lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
            if completed.returncode != 0 or not lines:
                print(completed.stdout[-3000:], completed.stderr[-3000:])
                return 1
            results.append(json.loads(lines[-1][len("RESULT "):]))
    latent_bytes_per_image = results[0]["latent_cache_bytes"] / max(results[0]["images"], 1)
    print(f"{arguments.images} images at {arguments.size} px, batch {arguments.batch_size}, one epoch "
          f"({results[0]['steps']} steps), tiny SD1.5, CPU fp32")
    print(f"{'latent cache':<14}{'peak RSS':>10}{'RSS 1st step':>14}{'RSS end':>10}{'latents in RAM':>16}"
          f"{'on disk':>10}{'text cache':>12}{'time':>8}")
    for result in results:
        print(f"{'disk' if result['disk'] else 'memory':<14}{result['peak_rss_mib']:>8.0f} M"
              f"{result['rss_after_first_step_mib']:>12.0f} M{result['rss_end_mib']:>8.0f} M"
              f"{result['latent_cache_bytes'] / 2**20:>14.2f} M{result['disk_cache_bytes'] / 2**20:>8.2f} M"
              f"{result['text_cache_bytes'] / 2**20:>10.2f} M{result['seconds']:>7.0f}s")
    # A latent is (channels, side/8, side/8) fp32: the in-memory cache scales with image area.
    for side in (512, 1024):
        projected = latent_bytes_per_image * (side / arguments.size) ** 2 * arguments.images / 2**20
        print(f"in-memory latent cache for {arguments.images} images at {side} px would be ~{projected:.0f} MiB "
              "(x2 with flip); with cache_latents_to_disk it stays 0")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
