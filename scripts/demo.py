#!/usr/bin/env python3
"""`make demo`: run LoRA Lab's example graph through a real headless ComfyUI and print where the files went.

Until the trainer lands, the demo renders the learning-rate charts (LR Schedule and UNet/TE
Learning Rates) through the real server and saves them as PNGs.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_server import ComfyServer  # noqa: E402


def demo_prompt() -> dict:
    schedule = {"scheduler": "cosine", "warmup": 5.0, "warmup_unit": "percent", "num_cycles": 1, "power": 1.0,
                "min_lr_ratio": 0.0, "decay_ratio": 0.2, "step_rules": "", "preview_steps": 1000}
    rates = {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 5e-5, "text_encoder_2_lr": -1.0,
             "lora_plus_ratio": 1.0, "unet_block_weights": ""}
    return {
        "schedule": {"class_type": "LoRALabLRSchedule", "inputs": schedule},
        "rates": {"class_type": "LoRALabLearningRates", "inputs": {**rates, "lr_schedule": ["schedule", 0]}},
        "save_schedule": {"class_type": "SaveImage", "inputs": {"images": ["schedule", 1],
                                                                "filename_prefix": "lora_lab_demo/lr_schedule"}},
        "save_rates": {"class_type": "SaveImage", "inputs": {"images": ["rates", 2],
                                                             "filename_prefix": "lora_lab_demo/lr_per_part"}},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", help="a real checkpoint (used once the trainer lands)")
    parser.add_argument("--data", help="a real dataset folder (used once the trainer lands)")
    arguments = parser.parse_args()
    if arguments.checkpoint or arguments.data:
        print("note: CKPT/DATA are used by the training demo, which arrives with the Train LoRA node; "
              "this demo renders the learning-rate charts only.", file=sys.stderr)
    cache = Path(os.environ.get("LORA_LAB_CACHE", Path.home() / ".cache" / "lora_lab")).expanduser()
    server = ComfyServer(Path(os.environ["LORA_LAB_COMFYUI_DIR"]), cache / "demo").start()
    try:
        entry = server.run(demo_prompt(), timeout=600)
        for node_id, label in (("save_schedule", "LR schedule chart"), ("save_rates", "LR per part chart")):
            for image in entry["outputs"][node_id]["images"]:
                print(f"{label}: {server.output_file(image).resolve()}")
    except Exception as error:  # noqa: BLE001  (the demo reports any failure and exits non-zero)
        print(f"demo failed: {error}\n--- server log ---\n{server.log()[-4000:]}", file=sys.stderr)
        return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
