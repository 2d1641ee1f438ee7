#!/usr/bin/env python3
"""Evidence for Train LoRA's max_effective_lr: does capping Prodigy's step at the LR Finder's suggestion help?

On the tiny SD1.5 checkpoint (CPU) and the sample dataset at 64 px, it runs the LR Finder with AdamW,
then trains the same LoRA with Prodigy (learning_rate 1.0, the default cosine LR Schedule) uncapped and
with max_effective_lr = the suggestion, and AdamW at the suggestion for reference, each with the stable
validation loss (fixed images, noise and timesteps: training/run/validation.py) every few steps. Prints
per run the validation losses, the last and the lowest, and the largest effective step (d x lr) Prodigy
took; writes the numbers as JSON. Not a test: nothing is asserted.

Usage: python3 scripts/setup_env.py run -- scripts/prodigy_cap_bench.py [--steps 80] [--seeds 0 1] [--cap RATE]
       [--scheduler constant_with_warmup] [--prodigy-lr 1.0]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.environment import find_comfyui_dir
from lora_lab_devtools.sample_dataset import ensure_sample_dataset
from lora_lab_devtools.tiny_checkpoint import ensure_tiny_sd15, link_checkpoint

os.environ.setdefault("OMP_NUM_THREADS", "2")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=80, help="training steps per run")
    parser.add_argument("--validate-every", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds (one run of each per seed)")
    parser.add_argument("--finder-steps", type=int, default=60)
    parser.add_argument("--cap", type=float, default=0.0, help="the cap to use instead of running the LR Finder")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prodigy-lr", type=float, default=1.0, help="Prodigy's learning_rate (its multiplier of d)")
    parser.add_argument("--scheduler", default="", help="the runs' LR Schedule scheduler (default: the node's, cosine)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the JSON")
    arguments = parser.parse_args()

    from lora_lab_devtools.inprocess import boot

    base = Path(tempfile.mkdtemp(prefix="lora_lab_prodigy_cap_"))
    comfy = boot(find_comfyui_dir(), base, cpu=True)
    out = arguments.out or (base / "output" / "prodigy_cap_bench")
    out.mkdir(parents=True, exist_ok=True)
    checkpoint = link_checkpoint(ensure_tiny_sd15(), comfy.models_dir / "checkpoints")
    model, clip, vae = comfy.outputs("CheckpointLoaderSimple", ckpt_name=checkpoint)[:3]
    dataset = comfy.outputs("LoRALabDataset", **{**comfy.widget_defaults("LoRALabDataset"),
                                               "folder": str(ensure_sample_dataset()), "resolution": 64,
                                               "bucketing": False})[0]
    schedule_values = comfy.widget_defaults("LoRALabLRSchedule")   # cosine, 5 % warmup
    if arguments.scheduler:
        schedule_values["scheduler"] = arguments.scheduler
    schedule = comfy.outputs("LoRALabLRSchedule", **schedule_values)[0]
    shape = {"rank": 4, "alpha": 4.0, "batch_size": arguments.batch, "precision": "fp32"}

    cap, finder_summary = arguments.cap, ""
    if cap <= 0:
        started = time.monotonic()
        finder = comfy.outputs("LoRALabLRFinder", model=model, clip=clip, vae=vae, dataset=dataset,
                      **{**comfy.widget_defaults("LoRALabLRFinder"), **shape, "optimizer": "AdamW",
                         "steps": arguments.finder_steps, "min_lr": 1e-6, "max_lr": 1e-1})
        cap, finder_summary = float(finder[1]), finder[3]
        print(f"LR Finder (AdamW, {arguments.finder_steps} steps, {time.monotonic() - started:.0f} s): "
              f"suggested {cap:.3g}", flush=True)

    def rates(rate: float):
        return comfy.outputs("LoRALabLearningRates", **{**comfy.widget_defaults("LoRALabLearningRates"),
                                                     "learning_rate": rate, "text_encoder_lr": 0.0})[0]

    prodigy = arguments.prodigy_lr
    runs = {"Prodigy uncapped": ("Prodigy", prodigy, 0.0), f"Prodigy capped at {cap:.3g}": ("Prodigy", prodigy, cap),
            f"AdamW at {cap:.3g}": ("AdamW", cap, 0.0)}
    train_defaults = comfy.widget_defaults("LoRALabTrain")
    results: dict[str, list[dict]] = {label: [] for label in runs}
    for seed in arguments.seeds:
        for label, (optimizer, rate, run_cap) in runs.items():
            started = time.monotonic()
            name = f"cap_bench_{len(results[label])}_{seed}_{optimizer}_{run_cap:.2e}"
            outcome = comfy.outputs("LoRALabTrain", model=model, clip=clip, vae=vae, dataset=dataset,
                           learning_rates=rates(rate), lr_schedule=schedule,
                           **{**train_defaults, **shape, "steps": arguments.steps, "optimizer": optimizer,
                              "gradient_checkpointing": False, "training_seed": seed, "lora_name": name,
                              "save_precision": "fp32", "validate_every_n_steps": arguments.validate_every,
                              "max_effective_lr": run_cap})
            log = comfy.output_dir / "lora_lab" / outcome[2].removesuffix(".safetensors") / "log.jsonl"
            lines = [json.loads(line) for line in log.read_text().splitlines()]
            validation = {line["step"] + 1: line["val_loss"] for line in lines if "val_loss" in line}
            steps_taken = [max(line["effective_lr"].values()) for line in lines if "effective_lr" in line]
            result = {"seed": seed, "validation": validation, "last": validation[arguments.steps],
                      "lowest": min(validation.values()), "seconds": time.monotonic() - started,
                      "largest_effective_lr": max(steps_taken) if steps_taken else None}
            results[label].append(result)
            curve = "  ".join(f"{step}:{loss:.4f}" for step, loss in validation.items())
            taken = f", largest d x lr {result['largest_effective_lr']:.3g}" if steps_taken else ""
            print(f"seed {seed} {label:26s} last {result['last']:.4f} lowest {result['lowest']:.4f}{taken} "
                  f"({result['seconds']:.0f} s)\n    val loss after step {curve}", flush=True)
    print("\nmean over seeds:")
    for label, entries in results.items():
        last = sum(entry["last"] for entry in entries) / len(entries)
        lowest = sum(entry["lowest"] for entry in entries) / len(entries)
        print(f"   {label:26s} last val loss {last:.4f}, lowest {lowest:.4f}"
              + ("" if all(math.isfinite(entry["last"]) for entry in entries) else " (a run diverged)"))
    document = {"cap": cap, "steps": arguments.steps, "validate_every": arguments.validate_every,
                "schedule": schedule.describe(), "prodigy_lr": prodigy,
                "finder_summary": finder_summary, "runs": results}
    (out / "prodigy_cap_bench.json").write_text(json.dumps(document, indent=1))
    print(f"\nnumbers: {out / 'prodigy_cap_bench.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
