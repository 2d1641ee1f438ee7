#!/usr/bin/env python3
"""`make demo`: train a LoRA with the SD1.5 example workflow in a real headless ComfyUI, then sample with it.

Without arguments: generates (never commits) a tiny random-weight SD1.5-layout checkpoint and a
small sample dataset into the cache, and runs example_workflows/sd15_train_lora.json with the
declared overrides (lora_lab_devtools.workflow_api.DEMO_OVERRIDES: checkpoint, dataset folder and
the tiny size, precision and step count). With ``--checkpoint`` and ``--data``: the same graph on
your files, at the workflow's own resolution and step count (fp32 when there is no CUDA GPU).

Prints the absolute paths of the LoRA file, the charts and the sample image; exits 1 with the
error (and the end of the server log) when anything failed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.comfy_server import ComfyServer
from lora_lab_devtools.environment import cache_dir
from lora_lab_devtools.sample_dataset import ensure_sample_dataset
from lora_lab_devtools.tiny_checkpoint import link_checkpoint, tiny_checkpoint
from lora_lab_devtools.workflow_api import DEMO_WORKFLOW, TINY_RUN, declared_overrides, to_api_prompt

TINY_STEPS = 40
# Titles of the workflow's image outputs, in the order they are printed.
OUTPUTS = {"Training chart (loss + rates)": "training chart (loss + rates)",
           "Learning-rate chart": "learning-rate chart", "Sample with the LoRA": "sample image"}


def has_cuda(python: str) -> bool:
    answer = subprocess.run([python, "-c", "import torch; print(torch.cuda.is_available())"],
                            capture_output=True, text=True)
    return answer.stdout.strip() == "True"


def overrides_for(arguments, server: ComfyServer) -> dict:
    checkpoints_dir = server.models_dir / "checkpoints"
    if arguments.checkpoint:
        checkpoint = link_checkpoint(Path(arguments.checkpoint).expanduser().resolve(), checkpoints_dir)
    else:
        checkpoint = tiny_checkpoint(checkpoints_dir).name
    data = Path(arguments.data).expanduser().resolve() if arguments.data else ensure_sample_dataset()
    if arguments.checkpoint:  # a real model: the workflow's own size and steps; fp32 without a GPU
        return declared_overrides(checkpoint=checkpoint, dataset_folder=str(data),
                                  precision=None if has_cuda(server.python) else "fp32")
    return declared_overrides(checkpoint=checkpoint, dataset_folder=str(data), steps=arguments.steps, **TINY_RUN)


def node_ids_by_title(prompt: dict) -> dict[str, str]:
    return {entry["_meta"]["title"]: node_id for node_id, entry in prompt.items()}


def report(entry: dict, prompt: dict, server: ComfyServer) -> list[str]:
    """The lines to print: LoRA file, charts, sample image (absolute paths)."""
    ids = node_ids_by_title(prompt)
    train_id = next(node_id for node_id, node in prompt.items() if node["class_type"] == "LoRALabTrain")
    lora_name = entry["outputs"][train_id]["text"][0]
    lines = [f"LoRA file: {(server.models_dir / 'loras' / lora_name).resolve()}"]
    stem = Path(lora_name).with_suffix("")
    lines.append(f"training log: {(server.output_dir / 'lora_lab' / stem / 'log.jsonl').resolve()}")
    for title, label in OUTPUTS.items():
        for image in entry["outputs"][ids[title]]["images"]:
            lines.append(f"{label}: {server.output_file(image).resolve()}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="your SD1.x checkpoint (.safetensors); default: a tiny generated one")
    parser.add_argument("--data", help="your dataset folder (images + .txt captions); default: a generated sample")
    parser.add_argument("--steps", type=int, default=TINY_STEPS, help="training steps of the tiny demo")
    arguments = parser.parse_args()
    if bool(arguments.checkpoint) != bool(arguments.data):
        parser.error("give both CKPT and DATA (a LoRA is trained on your images with your checkpoint), or neither")
    for given in filter(None, (arguments.checkpoint, arguments.data)):
        if not Path(given).expanduser().exists():
            print(f"demo failed: {given} does not exist", file=sys.stderr)
            return 1

    started = time.monotonic()
    # A real checkpoint trains on the GPU when there is one (ComfyUI's default flags); the tiny demo on the CPU.
    gpu = bool(arguments.checkpoint) and has_cuda(sys.executable)
    server = ComfyServer(Path(os.environ["LORA_LAB_COMFYUI_DIR"]), cache_dir() / "demo", cpu=not gpu)
    try:
        overrides = overrides_for(arguments, server)
        server.start()
        workflow = json.loads(DEMO_WORKFLOW.read_text(encoding="utf-8"))
        prompt = to_api_prompt(workflow, server.get("/object_info"), overrides)
        print(f"running {DEMO_WORKFLOW.name} with {json.dumps(overrides)}", flush=True)
        entry = server.run(prompt, timeout=24 * 3600)
        for line in report(entry, prompt, server):
            print(line)
    except Exception as error:  # noqa: BLE001  (the demo reports any failure and exits non-zero)
        print(f"demo failed: {error}\n--- end of the server log ({server.log_path}) ---\n{server.log()[-4000:]}",
              file=sys.stderr)
        return 1
    finally:
        server.stop()
    print(f"done in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
