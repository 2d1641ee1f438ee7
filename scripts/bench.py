#!/usr/bin/env python3
"""Benchmark: LoRA Lab's Train LoRA vs ComfyUI's built-in TrainLoraNode, same process, same settings.

Both train the tiny generated SD1.5-layout checkpoint (lora_lab_devtools/tiny_checkpoint.py) on the same
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

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.environment import SETUP_SCRIPT

os.environ.setdefault("OMP_NUM_THREADS", "1")


def comfyui_dir() -> Path:
    import subprocess
    configured = os.environ.get("LORA_LAB_COMFYUI_DIR")
    if configured:
        return Path(configured)
    printed = subprocess.run([sys.executable, str(SETUP_SCRIPT), "print", "comfyui-dir"],
                             check=True, capture_output=True, text=True)
    return Path(printed.stdout.strip())


def write_images(folder: Path, count: int, size: int) -> list[str]:
    """`count` smooth random images of `size` px with a caption each (reused when already there)."""
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


# One training step, per image (COMFYUI_NOTES, measured with the profiler on the real shapes).
TFLOP_PER_IMAGE = {("sd15", 512): 1.81, ("sdxl", 1024): 14.7}
# Dense bf16 matmul rate of the cards we are lent (vendor figures; the notes measured ~790 on an H200).
CARD_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}
SHAPES = ("tiny", "sd15", "sdxl", "flux", "sd35m", "flux_tiny", "sd3_tiny", "wan14b", "wan_tiny")
GPU_MATRIX = [  # (shape, resolution, batch, base weight dtype) as the issues ask; each at checkpointing on and off
    ("sd15", 512, 4, "default"),
    ("sdxl", 1024, 1, "default"),
    # Flow-matching families (issue 13): Flux-sized and SD3.5-medium-sized random models, bf16 and fp8 bases.
    ("flux", 1024, 1, "default"),
    ("flux", 1024, 1, "fp8_e4m3fn"),
    ("sd35m", 1024, 1, "default"),
    ("sd35m", 1024, 1, "fp8_e4m3fn"),
    # Video (issue 21): a Wan-14B-sized random model (Wan 2.1 T2V 14B, one Wan 2.2 A14B expert) on 512 px images
    ("wan14b", 512, 1, "fp8_e4m3fn"),
]
# Flow shapes: which diffusion model file (lora_lab_devtools/flow_fixtures.py) and how its CLIP/VAE load.
FLOW_SHAPES = {"flux": "flux_full", "flux_tiny": "flux_dev", "sd35m": "sd35m_full", "sd3_tiny": "sd3",
               "wan14b": "wan14b_full", "wan_tiny": "wan21_t2v"}


def flow_loaders(comfy, shape: str, weight_dtype: str) -> tuple[dict, dict]:
    """(loader nodes, {"model"|"clip"|"vae": [node, slot]}) for a flow shape, loaded as users load it:
    UNETLoader (in `weight_dtype`) + DualCLIPLoader (flux: CLIP-L + the reduced T5, which needs
    tests/support/reduced_text_encoders in this process) + VAELoader, or for SD3 the checkpoint's CLIP-L/G
    and VAE beside the diffusion model from UNETLoader."""
    from lora_lab_devtools import flow_fixtures
    from lora_lab_devtools.tiny_checkpoint import link_checkpoint

    def link(folder: str, source: Path) -> str:
        return link_checkpoint(source, comfy.models_dir / folder)

    from lora_lab_devtools import wan_fixtures

    wan = shape.startswith("wan")
    unet = link("diffusion_models", wan_fixtures.wan_model_file(FLOW_SHAPES[shape]) if wan
                else flow_fixtures.ensure_diffusion_model(FLOW_SHAPES[shape]))
    nodes = {"1u": {"class_type": "UNETLoader", "inputs": {"unet_name": unet, "weight_dtype": weight_dtype}}}
    if shape.startswith(("flux", "wan")):
        import importlib.util

        support = Path(__file__).resolve().parents[1] / "tests" / "support" / "reduced_text_encoders" / "__init__.py"
        spec = importlib.util.spec_from_file_location("lora_lab_reduced_text_encoders", support)
        spec.loader.exec_module(importlib.util.module_from_spec(spec))   # T5 / UMT5 built with the reduced config
    if wan:   # CLIPLoader (type wan) on the reduced UMT5, the Wan 2.1 VAE at dim 4
        nodes["1c"] = {"class_type": "CLIPLoader", "inputs": {
            "clip_name": link("text_encoders", wan_fixtures.umt5_file()), "type": "wan"}}
        nodes["1v"] = {"class_type": "VAELoader", "inputs": {"vae_name": link("vae", wan_fixtures.wan_vae_file("wan21"))}}
        return nodes, {"model": ["1u", 0], "clip": ["1c", 0], "vae": ["1v", 0]}
    if shape.startswith("flux"):
        clip_l, t5 = flow_fixtures.ensure_flux_text_encoder_files()
        nodes["1c"] = {"class_type": "DualCLIPLoader", "inputs": {
            "clip_name1": link("text_encoders", clip_l), "clip_name2": link("text_encoders", t5), "type": "flux"}}
        nodes["1v"] = {"class_type": "VAELoader", "inputs": {"vae_name": link("vae", flow_fixtures.ensure_vae16())}}
        return nodes, {"model": ["1u", 0], "clip": ["1c", 0], "vae": ["1v", 0]}
    nodes["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {
        "ckpt_name": link("checkpoints", flow_fixtures.ensure_sd3_checkpoint())}}
    return nodes, {"model": ["1u", 0], "clip": ["1", 1], "vae": ["1", 2]}


def use_loaders(graph: dict, nodes: dict, outputs: dict) -> dict:
    """The graph with its CheckpointLoaderSimple outputs taken from `nodes` instead."""
    slots = {0: outputs["model"], 1: outputs["clip"], 2: outputs["vae"]}
    result = {key: value for key, value in graph.items() if key != "1"}
    for node in result.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and value[0] == "1":
                node["inputs"][name] = list(slots[value[1]])
    return {**nodes, **result}


def checkpoint_for(shape: str) -> Path:
    from lora_lab_devtools.tiny_checkpoint import ensure_full_sd15, ensure_full_sdxl, ensure_tiny_sd15

    return {"tiny": ensure_tiny_sd15, "sd15": ensure_full_sd15, "sdxl": ensure_full_sdxl}[shape]()


def build_graphs(comfy, checkpoint: str, folder: Path, names: list[str], options) -> tuple[dict, dict, dict]:
    """(warm-up graph, graph with LoRA Lab's trainer, graph with the built-in trainer): same inputs."""
    graph = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
             "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a photo of a blob"}}}
    batch_inputs = []
    for index, name in enumerate(names):
        graph[f"L{index}"] = {"class_type": "LoadImage", "inputs": {"image": f"{folder.name}/{name}"}}
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
        **comfy.widget_defaults("LoRALabDataset"), "folder": str(folder), "resolution": options.resolution,
        "bucketing": False}}
    graph["11"] = {"class_type": "LoRALabLRSchedule", "inputs": {
        **comfy.widget_defaults("LoRALabLRSchedule"), "scheduler": "constant", "warmup": 0.0}}
    graph["12"] = {"class_type": "LoRALabLearningRates", "inputs": {
        **comfy.widget_defaults("LoRALabLearningRates"), "learning_rate": options.learning_rate,
        "text_encoder_lr": 0.0}}
    graph["13"] = {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}}

    ours = dict(graph)
    ours["20"] = {"class_type": "LoRALabTrain", "inputs": {
        **comfy.widget_defaults("LoRALabTrain"), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
        "dataset": ["10", 0], "learning_rates": ["12", 0], "lr_schedule": ["11", 0], "steps": options.steps,
        "batch_size": options.batch, "rank": options.rank, "alpha": float(options.rank),
        "target": "all_linear_conv", "precision": options.precision,
        "gradient_checkpointing": options.checkpointing, "weight_decay": 0.01, "max_grad_norm": 0.0,
        "lora_name": "bench", "memory": options.memory, "vram_budget_gb": options.vram_budget_gb}}
    builtin = dict(graph)
    # Built from the node's own schema: newer ComfyUI versions add inputs (checkpoint_depth, offloading,
    # bucket_mode, bypass_mode, ...) and moved the LoRA output from index 1 to 0.
    trainer_class = comfy.node_class("TrainLoraNode")
    wanted = {"batch_size": options.batch, "grad_accumulation_steps": 1, "steps": options.steps,
              "learning_rate": options.learning_rate, "rank": options.rank, "optimizer": "AdamW",
              "loss_function": "MSE", "seed": 0, "training_dtype": options.precision,
              "lora_dtype": options.precision, "algorithm": "LoRA",
              "gradient_checkpointing": options.checkpointing, "existing_lora": "[None]",
              # 0.33's built-in streams with its `offloading` (partial load + recompute): the same budget
              "offloading": options.memory != "resident"}
    defaults = comfy.widget_defaults("TrainLoraNode")
    builtin["30"] = {"class_type": "TrainLoraNode", "inputs": {
        **defaults, **{key: value for key, value in wanted.items() if key in defaults},
        "model": ["1", 0], "latents": ["4", 0], "positive": ["2", 0]}}
    lora_output = list(trainer_class.RETURN_TYPES).index("LORA_MODEL") if hasattr(trainer_class, "RETURN_TYPES") else 1
    builtin["31"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["30", lora_output], "prefix": "bench_builtin",
                                                           "steps": options.steps}}
    return graph, ours, builtin


def timed_run(comfy, prompt: dict, cuda: bool) -> tuple[float, float | None]:
    """(seconds, peak GPU memory in GiB or None) of one prompt."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    comfy.run(prompt)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30) if cuda else None
    return seconds, peak


def compare(comfy, options, label: str) -> dict[str, float]:
    """Run both trainers once on the same inputs; print a line each; return steps/s per trainer."""
    import torch

    cuda = torch.cuda.is_available() and not options.cpu
    checkpoint = f"bench_{options.shape}.safetensors"
    if options.shape not in FLOW_SHAPES:
        link = comfy.models_dir / "checkpoints" / checkpoint
        if not link.exists():
            link.symlink_to(checkpoint_for(options.shape))
    folder = comfy.input_dir / f"bench_{options.resolution}"
    names = write_images(folder, options.images, options.resolution)
    graph, ours, builtin = build_graphs(comfy, checkpoint, folder, names, options)
    if options.shape in FLOW_SHAPES:
        loaders, outputs = flow_loaders(comfy, options.shape, options.base_dtype)
        graph, ours, builtin = (use_loaders(prompt, loaders, outputs) for prompt in (graph, ours, builtin))
        ours["20"]["inputs"].update(min_snr_gamma=0.0, noise_offset=0.0)   # refused on flow models
    comfy.run(graph)   # warm-up: checkpoint, images, latents, conditioning now cached
    rates = {}
    card = torch.cuda.get_device_name() if cuda else "cpu"
    for name, prompt in (("builtin", builtin), ("lora_lab", ours)):
        try:
            seconds, peak = timed_run(comfy, prompt, cuda)
        except Exception as error:   # the built-in trainer cannot train every model (Flux in 0.3.75: in-place ops)
            if name == "lora_lab":
                raise
            print(f"{label}builtin: {options.shape} FAILED: {str(error).splitlines()[0][:300]}", flush=True)
            continue
        rates[name] = options.steps / seconds
        images_per_second = rates[name] * options.batch
        line = (f"{label}{name}: {options.shape} ({options.base_dtype} base) {options.resolution}px batch {options.batch} rank {options.rank} "
                f"{options.precision} checkpointing {'on' if options.checkpointing else 'off'}: {options.steps} steps "
                f"in {seconds:.2f} s, {rates[name]:.3f} steps/s, {images_per_second:.2f} img/s")
        if peak is not None:
            line += f", peak {peak[0]:.2f} GiB allocated, {peak[1]:.2f} GiB reserved"
        flop = TFLOP_PER_IMAGE.get((options.shape, options.resolution))
        rate = next((value for key, value in CARD_BF16_TFLOPS.items() if key in card), None)
        if cuda and flop and rate:
            line += f", {images_per_second * flop:.0f} TFLOP/s = {100 * images_per_second * flop / rate:.1f}% of {card}'s bf16 matmul rate"
        print(line, flush=True)
    if "builtin" not in rates:
        print(f"{label}ratio lora_lab/builtin steps_per_s: n/a (the built-in trainer failed on this model)", flush=True)
        return rates
    if not list(comfy.output_dir.glob("bench_builtin*.safetensors")):
        raise SystemExit("the built-in TrainLoraNode did not run (no SaveLoRA file): the comparison is void")
    print(f"{label}ratio lora_lab/builtin steps_per_s: {rates['lora_lab'] / rates['builtin']:.2f}", flush=True)
    return rates


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=1e-4)
    parser.add_argument("--shape", choices=SHAPES, default="tiny",
                        help="tiny (CPU default), or random-weight models of the real SD1.5 / SDXL size")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing on in both trainers")
    parser.add_argument("--base-dtype", choices=("default", "fp8_e4m3fn"), default="default",
                        help="weight dtype of a flow shape's diffusion model (UNETLoader's weight_dtype)")
    parser.add_argument("--gpu", action="store_true",
                        help="the GPU matrix: SD1.5-sized 512px batch 4, SDXL-sized 1024px batch 1, Flux-sized and "
                             "SD3.5-medium-sized 1024px batch 1 with bf16 and fp8 bases; bf16 compute, "
                             "checkpointing on then off, both trainers in this one process on the card in hand")
    parser.add_argument("--cpu", action="store_true", help="force CPU even where CUDA is available")
    parser.add_argument("--memory", choices=("auto", "resident", "stream"), default="auto",
                        help="Train LoRA's memory option (the built-in gets offloading for auto/stream where it has it)")
    parser.add_argument("--vram-budget-gb", type=float, default=0.0, help="Train LoRA's vram_budget_gb")
    parser.add_argument("--gpu-memory", action="store_true",
                        help="the memory matrix on a GPU: the SDXL- and Flux-sized models at card sizes of 8, 12, "
                             "16 and 24 GiB (simulated with torch.cuda.set_per_process_memory_fraction, memory auto "
                             "with that budget) and resident on the whole card; peak allocated/reserved, steps/s, "
                             "both trainers")
    arguments = parser.parse_args()

    from lora_lab_devtools.inprocess import boot

    comfy = boot(comfyui_dir(), Path(tempfile.mkdtemp(prefix="lora_lab_bench_")),
                 cpu=not (arguments.gpu or arguments.gpu_memory))
    if arguments.gpu_memory:
        return memory_matrix(comfy, arguments)
    if not arguments.gpu:
        arguments.precision = arguments.precision or "fp32"
        compare(comfy, arguments, "")
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device; run without --gpu for the CPU comparison")
    ratios = []
    for shape, resolution, batch, base_dtype in GPU_MATRIX:
        for checkpointing in (True, False):
            options = argparse.Namespace(**{**vars(arguments), "shape": shape, "resolution": resolution,
                                            "batch": batch, "checkpointing": checkpointing, "base_dtype": base_dtype,
                                            "precision": arguments.precision or "bf16", "images": max(batch * 2, 4)})
            rates = compare(comfy, options, f"[{shape} {base_dtype} ckpt {'on' if checkpointing else 'off'}] ")
            if "builtin" in rates:
                ratios.append(rates["lora_lab"] / rates["builtin"])
    print(f"ratio lora_lab/builtin steps_per_s: {min(ratios):.2f} (lowest of {len(ratios)} GPU settings)", flush=True)
    return 0


GIB = 1024 ** 3
CARD_SIZES_GIB = (8, 12, 16, 24)
MEMORY_SHAPES = (("sdxl", 1024, 1, "default"), ("flux", 1024, 1, "default"), ("flux", 1024, 1, "fp8_e4m3fn"),
                 ("wan14b", 512, 1, "default"), ("wan14b", 512, 1, "fp8_e4m3fn"))


def memory_matrix(comfy, arguments) -> int:
    """Each model at each simulated card size (memory auto under that budget), then resident on the whole
    card: steps/s and peak memory of both trainers, and streaming's speed against resident."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu-memory needs a CUDA device")
    total = torch.cuda.get_device_properties(0).total_memory
    for shape, resolution, batch, base_dtype in MEMORY_SHAPES:
        for card in (*CARD_SIZES_GIB, None):
            torch.cuda.set_per_process_memory_fraction(min(1.0, card * GIB / total) if card else 1.0)
            options = argparse.Namespace(**{**vars(arguments), "shape": shape, "resolution": resolution,
                                            "batch": batch, "checkpointing": True, "base_dtype": base_dtype,
                                            "precision": arguments.precision or "bf16", "images": 4,
                                            "memory": "auto" if card else "resident",
                                            "vram_budget_gb": float(card or 0)})
            try:
                compare(comfy, options, f"[{shape} {base_dtype} card {card or 'whole'} GiB] ")
            except Exception as error:   # a card too small for the plan: the refusal is the result
                print(f"[{shape} {base_dtype} card {card} GiB] lora_lab: {str(error).splitlines()[0][:300]}", flush=True)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
