#!/usr/bin/env python3
"""Train LoRA through a real ComfyUI server started with its default flags (on an NVIDIA GPU with
ComfyUI 0.3x of 2026: dynamic VRAM), then sample with the result; report GPU memory before, at the
peak of and after the run, and the training speed.

    python scripts/gpu_dynamic_check.py --comfyui DIR [--python PY] [--steps 30] [--resolution 512]
                                        [--out result.json] [--cpu]

The checkpoint is a random-weight SD1.5-sized one (make_tiny_checkpoint.py --full-sd15), the data
the generated sample dataset; the graph is example_workflows/sd15_train_lora.json with the declared
overrides. Memory comes from the server's own /system_stats (what ComfyUI sees: free VRAM),
polled while the prompt runs: "peak" is the lowest free VRAM seen, "given back" is how much was
free again once the run ended. Run it once per ComfyUI (0.3.75 and 0.33.0) on the same card and
compare. --cpu runs the same flow on the CPU (a dry run of this script; no memory figures).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.comfy_server import ComfyServer
from lora_lab_devtools.sample_dataset import ensure_sample_dataset
from lora_lab_devtools.tiny_checkpoint import MAKER_SCRIPT, link_checkpoint
from lora_lab_devtools.workflow_api import DEMO_WORKFLOW, declared_overrides, to_api_prompt

MIB = 1024 ** 2


def free_vram(server: ComfyServer) -> int | None:
    devices = server.get("/system_stats").get("devices", [])
    return int(devices[0]["vram_free"]) if devices and "vram_free" in devices[0] else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--comfyui", required=True, help="the ComfyUI folder (holds main.py)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs that ComfyUI")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--out", help="write the result as JSON here too")
    parser.add_argument("--cpu", action="store_true", help="dry run on the CPU")
    arguments = parser.parse_args()

    environment = {**os.environ, "LORA_LAB_COMFYUI_DIR": arguments.comfyui}
    fixture = subprocess.run([arguments.python, str(MAKER_SCRIPT), "--full-sd15"],
                             check=True, capture_output=True, text=True, env=environment).stdout.strip()
    base_dir = Path(tempfile.mkdtemp(prefix="lora_lab_gpu_check_"))
    server = ComfyServer(Path(arguments.comfyui), base_dir, python=arguments.python, cpu=arguments.cpu)
    result: dict = {"comfyui": arguments.comfyui, "steps": arguments.steps, "resolution": arguments.resolution}
    try:
        checkpoint = link_checkpoint(Path(fixture), server.models_dir / "checkpoints")
        server.start()
        result["system"] = server.get("/system_stats").get("system", {})
        result["device"] = (server.get("/system_stats").get("devices") or [{}])[0].get("name")
        overrides = declared_overrides(checkpoint=checkpoint, dataset_folder=str(ensure_sample_dataset()),
                                       resolution=arguments.resolution, steps=arguments.steps,
                                       precision="fp32" if arguments.cpu else "bf16")
        workflow = json.loads(DEMO_WORKFLOW.read_text(encoding="utf-8"))
        prompt = to_api_prompt(workflow, server.get("/object_info"), overrides)
        before = free_vram(server)
        lowest = [before]
        done = threading.Event()

        def poll() -> None:
            while not done.is_set():
                value = free_vram(server)
                if value is not None and (lowest[0] is None or value < lowest[0]):
                    lowest[0] = value
                time.sleep(0.2)

        watcher = threading.Thread(target=poll, daemon=True)
        watcher.start()
        started = time.monotonic()
        entry = server.run(prompt, timeout=3600)
        result["prompt_seconds"] = round(time.monotonic() - started, 1)
        done.set()
        watcher.join()
        time.sleep(2)
        after = free_vram(server)
        log = server.log()
        trained = re.search(r"LoRA Lab: trained .* in ([0-9.]+) s \(([0-9]+) steps", log)
        if trained:
            seconds, steps = float(trained.group(1)), int(trained.group(2))
            result.update(train_seconds=seconds, steps_per_second=round(steps / seconds, 3))
        result["dynamic_vram_copy"] = "training on a private resident copy" in log
        result["sampled"] = any(output.get("images") for output in entry["outputs"].values())
        if before is not None and lowest[0] is not None and after is not None:
            result.update(vram_free_before_mib=before // MIB, vram_free_lowest_mib=lowest[0] // MIB,
                          vram_free_after_mib=after // MIB, peak_used_mib=(before - lowest[0]) // MIB,
                          given_back_mib=(after - lowest[0]) // MIB, kept_after_mib=(before - after) // MIB)
    except Exception as error:  # noqa: BLE001  (report what failed with the server log)
        result["error"] = f"{error}\n{server.log()[-3000:]}"
    finally:
        server.stop()
    text = json.dumps(result, indent=1)
    print(text)
    if arguments.out:
        Path(arguments.out).write_text(text + "\n", encoding="utf-8")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
