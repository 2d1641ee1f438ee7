#!/usr/bin/env python3
"""Evidence for the LR Finder: is its suggestion a good rate? (make lr-finder-bench)

On the tiny SD1.5 checkpoint (or, with --checkpoint sd3, the tiny SD3 MMDiT; CPU) and four datasets of
different kinds, it runs the LR Finder (with refine_runs confirmation runs), then trains a LoRA at every rate of a half-decade grid, at the sweep's
own suggestion and at the refined one, for the same steps with the default cosine schedule, and
measures each one's final stable validation loss (the same fixed images, noise and timesteps for every
run: training/run/validation.py). Prints, per dataset, the ranking and, for the plain and the refined
suggestion, the regret (its loss minus the grid's best), the kept gain (its gain over the untrained
model's loss / the best grid rate's gain) and the distance from the best rate in decades; writes a
chart and the numbers as JSON. Not a test: nothing is asserted.

Usage: python3 scripts/setup_env.py run -- scripts/lr_finder_bench.py [--steps 40] [--finder-steps 60]
       [--refine-runs 3] [--refine-steps 20] [--datasets line] [--rules] [--checkpoint sd3]
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

GRID = [10 ** (-6 + 0.5 * index) for index in range(11)]   # 1e-6 ... 1e-1, half-decade steps


def write_blobs(folder: Path, count: int = 6) -> Path:
    """Harder: smooth random colour fields, one shared caption (little to learn per image)."""
    import numpy
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    generator = numpy.random.default_rng(7)
    for index in range(count):
        coarse = generator.random((6, 6, 3))
        Image.fromarray((coarse * 255).astype("uint8")).resize((64, 64), Image.BICUBIC).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text("a photo of a blob\n")
    return folder


def write_flat(folder: Path) -> Path:
    """Easier: four flat colours, a caption naming each."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220),
                         "yellow": (230, 210, 40)}.items():
        Image.new("RGB", (64, 64), colour).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"a flat {name} square\n")
    return folder


def write_line_art(folder: Path, count: int = 6) -> Path:
    """Another kind (the held-out one): black pen strokes on white, lines and arcs drawn from a fixed seed,
    a caption naming the drawing."""
    import numpy
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    generator = numpy.random.default_rng(11)
    for index in range(count):
        image = Image.new("RGB", (64, 64), (255, 255, 255))
        draw = ImageDraw.Draw(image)
        for _ in range(4 + index % 3):
            x0, y0, x1, y1 = (int(value) for value in generator.integers(4, 60, size=4))
            width = int(generator.integers(1, 4))
            if generator.random() < 0.5:
                draw.line((x0, y0, x1, y1), fill=(0, 0, 0), width=width)
            else:
                box = (min(x0, x1), min(y0, y1), max(x0, x1) + 6, max(y0, y1) + 6)
                draw.arc(box, int(generator.integers(0, 180)), int(generator.integers(180, 360)), fill=(0, 0, 0),
                         width=width)
        image.save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a black ink line drawing number {index}\n")
    return folder


def untrained_loss(comfy, model, clip, vae, dataset) -> float:
    """The stable validation loss (Train LoRA's set: 4 images x 8 timesteps) of the model without a LoRA."""
    import torch

    pack = comfy.pack
    bridge = pack.nodes.comfy
    with torch.inference_mode():
        access = bridge.model_access(model, clip, vae, bridge.check_compatible(model, clip, vae))
        settings = pack.training.run.train_settings.TrainSettings(precision="fp32", cache_latents_to_disk=False)
        feeder = pack.training.data.feeder.BatchFeeder(dataset, access, False, settings,
                                                       comfy.output_dir / "lora_lab" / "bench_unused")
        return pack.training.run.validation.ValidationSet(feeder, access.objective, "fp32", access.device).loss()


def kept(loss: float, untrained: float, best: float) -> float:
    """The share of the best grid rate's gain over the untrained model that `loss` keeps, in %."""
    return 100.0 * (untrained - loss) / (untrained - best) if math.isfinite(loss) else -math.inf


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="training steps per grid rate")
    parser.add_argument("--finder-steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--refine-runs", type=int, default=3, help="the finder's refine_runs (0: the plain sweep)")
    parser.add_argument("--refine-steps", type=int, default=20, help="the finder's refine_steps")
    parser.add_argument("--datasets", default="sample,flat,blobs,line",
                        help="comma-separated, of: sample, flat, blobs, line (line art: the held-out kind)")
    parser.add_argument("--rules", action="store_true",
                        help="also train at the other candidate rules' rates (minimum / 10, minimum / 3, minimum)")
    parser.add_argument("--checkpoint", choices=("sd15", "sd3"), default="sd15",
                        help="the tiny random-weight model: sd15 (UNet, epsilon) or sd3 (MMDiT, flow matching: the "
                             "held-out kind)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the chart and JSON")
    arguments = parser.parse_args()

    from lora_lab_devtools.inprocess import boot

    base = Path(tempfile.mkdtemp(prefix="lora_lab_lr_bench_"))
    comfy = boot(find_comfyui_dir(), base, cpu=True)
    out = arguments.out or (base / "output" / "lr_finder_bench")
    out.mkdir(parents=True, exist_ok=True)
    if arguments.checkpoint == "sd3":
        from lora_lab_devtools.flow_fixtures import ensure_sd3_checkpoint
        checkpoint = link_checkpoint(ensure_sd3_checkpoint(), comfy.models_dir / "checkpoints")
    else:
        checkpoint = link_checkpoint(ensure_tiny_sd15(), comfy.models_dir / "checkpoints")
    model, clip, vae = comfy.outputs("CheckpointLoaderSimple", ckpt_name=checkpoint)[:3]
    makers = {"sample": ("sample (8 checkers + discs)", ensure_sample_dataset),
              "flat": ("flat colours (4, easy)", lambda: write_flat(base / "input" / "flat")),
              "blobs": ("random blobs (6, hard)", lambda: write_blobs(base / "input" / "blobs")),
              "line": ("line art (6, held out)", lambda: write_line_art(base / "input" / "line"))}
    folders = {makers[key][0]: makers[key][1]() for key in arguments.datasets.split(",")}
    schedule = comfy.outputs("LoRALabLRSchedule", **comfy.widget_defaults("LoRALabLRSchedule"))[0]   # cosine, 5 %
    train_defaults = {key: value for key, value in comfy.widget_defaults("LoRALabTrain").items()}
    results = {}
    for label, folder in folders.items():
        dataset = comfy.outputs("LoRALabDataset", **{**comfy.widget_defaults("LoRALabDataset"), "folder": str(folder),
                                                    "resolution": 64, "bucketing": False})[0]
        started = time.monotonic()
        finder = comfy.outputs("LoRALabLRFinder", model=model, clip=clip, vae=vae, dataset=dataset,
                      **{**comfy.widget_defaults("LoRALabLRFinder"), "steps": arguments.finder_steps,
                         "min_lr": 1e-6, "max_lr": 1e-1, "rank": 4, "alpha": 4.0,
                         "batch_size": arguments.batch, "precision": "fp32",
                         "refine_runs": arguments.refine_runs, "refine_steps": arguments.refine_steps})
        finder_seconds = time.monotonic() - started
        summary = finder[3]
        refined = finder[1]
        # The sweep's own suggestion (refine off gives exactly it), from the summary (3 digits).
        suggestion = (float(summary.split("the sweep's suggestion was ", 1)[1].split(",")[0])
                      if "the sweep's suggestion was " in summary else refined)
        refine_runs = []
        if "Confirmation runs: " in summary:
            refine_path = Path(summary.split("Confirmation runs: ", 1)[1].splitlines()[0].strip())
            refine_runs = [json.loads(line) for line in refine_path.read_text().splitlines()]
        timing = summary.split("Refine cost: ", 1)[1].splitlines()[0] if "Refine cost: " in summary else ""
        # The candidate rules, from the finder's own numbers (its summary prints 3 digits).
        minimum = float(summary.split("Minimum of the smoothed validation loss at ", 1)[1].split()[0])
        steepest = float(summary.split("Steepest descent at ", 1)[1].split()[0])
        rules = ({"minimum / 10": minimum / 10, "steepest descent": steepest, "minimum / 3": minimum / 3,
                  "minimum": minimum} if arguments.rules else {})
        untrained = untrained_loss(comfy, model, clip, vae, dataset)
        losses = {}
        started = time.monotonic()
        for rate in dict.fromkeys(GRID + [suggestion, refined] + list(rules.values())):
            rates = comfy.outputs("LoRALabLearningRates", **{**comfy.widget_defaults("LoRALabLearningRates"),
                                                          "learning_rate": rate, "text_encoder_lr": 0.0})[0]
            outcome = comfy.outputs("LoRALabTrain", model=model, clip=clip, vae=vae, dataset=dataset,
                           learning_rates=rates, lr_schedule=schedule,
                           **{**train_defaults, "steps": arguments.steps, "batch_size": arguments.batch, "rank": 4,
                              "alpha": 4.0, "precision": "fp32", "gradient_checkpointing": False,
                              "lora_name": f"bench_{len(results)}_{rate:.2e}", "save_precision": "fp32",
                              "validate_every_n_steps": arguments.steps})
            log = (comfy.output_dir / "lora_lab" / outcome[2].removesuffix(".safetensors") / "log.jsonl")
            last = json.loads(log.read_text().splitlines()[-1])
            losses[rate] = last.get("val_loss", math.nan)
        grid_seconds = time.monotonic() - started
        grid = {rate: losses[rate] for rate in GRID}
        ranked = sorted(grid, key=lambda rate: grid[rate] if math.isfinite(grid[rate]) else math.inf)
        best = ranked[0]
        position = sum(1 for rate in GRID if grid[rate] < losses[suggestion]) + 1
        rule_results = {name: {"rate": rate, "val_loss": losses[rate], "regret": losses[rate] - grid[best],
                               "decades_from_best": abs(math.log10(rate) - math.log10(best)),
                               "rank_among_grid": sum(1 for grid_rate in GRID if grid[grid_rate] < losses[rate]) + 1}
                        for name, rate in rules.items()}
        refined_position = sum(1 for rate in GRID if grid[rate] < losses[refined]) + 1
        results[label] = {"rules": rule_results, "suggestion": suggestion, "suggestion_val_loss": losses[suggestion], "best_rate": best,
                          "best_val_loss": grid[best], "regret": losses[suggestion] - grid[best],
                          "decades_from_best": abs(math.log10(suggestion) - math.log10(best)),
                          "rank_among_grid": position, "grid": {f"{rate:.1e}": grid[rate] for rate in GRID},
                          "untrained_val_loss": untrained, "kept": kept(losses[suggestion], untrained, grid[best]),
                          "refined": refined, "refined_val_loss": losses[refined],
                          "refined_regret": losses[refined] - grid[best],
                          "refined_kept": kept(losses[refined], untrained, grid[best]),
                          "refined_decades_from_best": abs(math.log10(refined) - math.log10(best)),
                          "refined_rank_among_grid": refined_position, "refine_runs": refine_runs,
                          "refine_cost": timing,
                          "finder_seconds": finder_seconds, "grid_seconds": grid_seconds,
                          "finder_summary": summary}
        print(f"\n== {label}: suggestion {suggestion:.3g}, refined {refined:.3g} (finder {finder_seconds:.0f} s; "
              f"refine: {timing or 'off'})")
        print(f"   untrained val loss {untrained:.5f}")
        print("   rate      final val loss")
        for rate in GRID:
            mark = "  <- best" if rate == best else ""
            print(f"   {rate:8.1e}  {grid[rate]:.5f}{mark}")
        for name, rate, rank in (("suggested", suggestion, position), ("refined  ", refined, refined_position)):
            print(f"   {name} {rate:.2e}: val loss {losses[rate]:.5f}, would rank {rank} of {len(GRID) + 1}; "
                  f"regret {losses[rate] - grid[best]:+.5f}; kept {kept(losses[rate], untrained, grid[best]):.0f} % "
                  f"of the best rate's gain; {abs(math.log10(rate) - math.log10(best)):.2f} decades from the best "
                  "rate", flush=True)
        for run in refine_runs:
            print(f"   confirmation run {run['lr']:.2e}: val loss after {run['steps']} steps {run['val_loss']}"
                  f"{'  <- chosen' if run['chosen'] else ''}")
        for name, rule in rule_results.items():
            print(f"   rule {name:17s} {rule['rate']:.2e}: val loss {rule['val_loss']:.5f}, rank {rule['rank_among_grid']}, "
                  f"regret {rule['regret']:+.5f}, {rule['decades_from_best']:.2f} decades", flush=True)
    print("\nper dataset: plain suggestion -> refined")
    print("| dataset | best grid rate | suggestion: rate, regret, kept | refined: rate, regret, kept |")
    print("|---|---|---|---|")
    for label, result in results.items():
        print(f"| {label} | {result['best_rate']:.2g} | {result['suggestion']:.2g}, {result['regret']:+.4f}, "
              f"{result['kept']:.0f} % | {result['refined']:.2g}, {result['refined_regret']:+.4f}, "
              f"{result['refined_kept']:.0f} % |")
    print("\nmean over the datasets, per rule:")
    for name in next(iter(results.values()))["rules"]:
        regrets = [result["rules"][name]["regret"] for result in results.values()]
        decades = [result["rules"][name]["decades_from_best"] for result in results.values()]
        print(f"   {name:17s} regret {sum(regrets) / len(regrets):+.5f} (worst {max(regrets):+.5f}), "
              f"{sum(decades) / len(decades):.2f} decades from the best rate (worst {max(decades):.2f})")
    (out / "lr_finder_bench.json").write_text(json.dumps(results, indent=1))
    chart = out / "lr_finder_bench.png"
    draw(results, chart)
    print(f"\nchart: {chart}\nnumbers: {out / 'lr_finder_bench.json'}")
    return 0


def draw(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.0 * len(results), 4.0), dpi=100)
    for index, (label, result) in enumerate(results.items(), start=1):
        axes = figure.add_subplot(1, len(results), index)
        rates = [float(rate) for rate in result["grid"]]
        axes.plot(rates, list(result["grid"].values()), "o-", color="#1f77b4", label="final val loss, fixed rate")
        axes.axvline(result["suggestion"], color="#d62728", linewidth=2,
                     label=f"finder's suggestion {result['suggestion']:.2g}")
        axes.plot([result["suggestion"]], [result["suggestion_val_loss"]], "s", color="#d62728")
        if result["refined"] != result["suggestion"]:
            axes.axvline(result["refined"], color="#9467bd", linewidth=2,
                         label=f"refined {result['refined']:.2g} (kept {result['refined_kept']:.0f} %)")
            axes.plot([result["refined"]], [result["refined_val_loss"]], "D", color="#9467bd")
        axes.set_xscale("log")
        axes.set_title(label, fontsize=10)
        axes.set_xlabel("learning rate")
        axes.set_ylabel("final validation loss")
        axes.grid(True, alpha=0.3, which="both")
        axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    raise SystemExit(main())
