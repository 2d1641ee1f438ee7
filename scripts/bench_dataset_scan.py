#!/usr/bin/env python3
"""Benchmark: how fast the LoRA Dataset indexes a folder (headers + PIL verify, no full decode).

Generates N small images (PNG/JPEG/WebP mix, several aspect ratios, a caption each, kohya
"N_name" sub-folders) in a temporary folder, then times the scan (build_folder_dataset) and the
IS_CHANGED fingerprint. Prints images/s. Not a test: nothing is asserted.

Usage: python3 scripts/setup_env.py run -- scripts/bench_dataset_scan.py [--count 10000]
"""
from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.environment import register_lora_lab_package

register_lora_lab_package()  # the library without the pack's ComfyUI __init__
from lora_lab.training.data.dataset import DatasetOptions, build_folder_dataset, folder_fingerprint  # noqa: E402

SIZES = [(64, 64), (96, 64), (64, 96), (128, 72), (72, 128)]
FORMATS = [("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP")]


def encoded_variants() -> list[tuple[str, bytes]]:
    generator = np.random.default_rng(0)
    variants = []
    for width, height in SIZES:
        pixels = generator.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        for extension, image_format in FORMATS:
            buffer = io.BytesIO()
            image.save(buffer, format=image_format)
            variants.append((extension, buffer.getvalue()))
    return variants


def generate(root: Path, count: int) -> None:
    variants = encoded_variants()
    folders = [root / "10_subject", root / "2_style" / "nested", root]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        extension, payload = variants[index % len(variants)]
        folder = folders[index % len(folders)]
        (folder / f"image_{index:05d}.{extension}").write_bytes(payload)
        (folder / f"image_{index:05d}.txt").write_text(f"tag{index % 50}, tag{index % 7}, shared tag")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=10_000, help="number of images to generate")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lora_lab_bench_") as temporary:
        root = Path(temporary) / "dataset"
        started = time.perf_counter()
        generate(root, arguments.count)
        generated = time.perf_counter() - started
        options = DatasetOptions(resolution=512)
        started = time.perf_counter()
        dataset = build_folder_dataset(root, options)
        scanned = time.perf_counter() - started
        started = time.perf_counter()
        folder_fingerprint(root)
        fingerprinted = time.perf_counter() - started
        print(f"generated {arguments.count} images + captions in {generated:.1f} s")
        print(f"scan (headers + verify + captions + buckets): {len(dataset.samples)} images in {scanned:.2f} s "
              f"= {len(dataset.samples) / scanned:,.0f} images/s ({len(dataset.buckets())} buckets, "
              f"{dataset.effective_count} with repeats)")
        print(f"IS_CHANGED fingerprint (stat only): {2 * arguments.count} files in {fingerprinted:.3f} s")


if __name__ == "__main__":
    main()
