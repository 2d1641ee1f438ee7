#!/usr/bin/env python3
"""Regenerate the training example workflows by building them in the real graph editor.

Starts a real ComfyUI with the pack and its frontend, opens it in Debian's headless Chromium,
creates the nodes with LiteGraph, connects them, sets the widget values, and writes
``app.graph.serialize()``: exactly what the editor's "Save" writes. Run it after a node's inputs
change (the e2e schema test says when): ``scripts/setup_env.py run -- scripts/make_example_workflows.py``.
compare_schedules.json is not rebuilt here (it was saved from the editor by hand).

The values are a real user's starting point (their checkpoint name, 512/1024 px, bf16, 1500 steps,
a dataset folder in ComfyUI's input folder); demo and tests change only the inputs declared in
lora_lab_devtools.workflow_api.DEMO_OVERRIDES.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import _repo_path  # noqa: F401  (puts the checkout on sys.path)
from lora_lab_devtools.comfy_server import ComfyServer
from lora_lab_devtools.environment import REPO_ROOT
from lora_lab_devtools.workflow_api import check_workflow

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
# Debian's chromium on these machines: no sandbox as root, and no background network traffic.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TRIGGER_WORD = "lrlab_checker"
# Inputs naming a user's model files (not on the machine that builds the workflows).
FREE_COMBOS = ("ckpt_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name")


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def training_graph(checkpoint: str, resolution: int, rates: dict, steps: int, lora_name: str,
                   max_bucket_resolution: int) -> dict:
    """Load Checkpoint -> LoRA Lab's four nodes -> KSampler/VAE Decode/Save Image on the trained MODEL/CLIP,
    plus the charts saved as images. ids are the saved node ids; nodes are stacked in their column, in
    list order, at the size the editor gives them (at least "size")."""
    nodes = [
        # column 1: inputs
        {"id": 1, "type": "CheckpointLoaderSimple", "column": 0, "widgets": {"ckpt_name": checkpoint}},
        {"id": 2, "type": "LoRALabDataset", "column": 0, "widgets": {
            "folder": "my_dataset", "resolution": resolution, "trigger_word": TRIGGER_WORD,
            "max_bucket_resolution": max_bucket_resolution}},
        # column 2: the learning rate
        {"id": 3, "type": "LoRALabLRSchedule", "column": 1, "widgets": {
            "scheduler": "cosine", "warmup": 5.0, "warmup_unit": "percent", "preview_steps": steps}},
        {"id": 4, "type": "LoRALabLearningRates", "column": 1, "widgets": rates},
        # column 3: training
        {"id": 5, "type": "LoRALabTrain", "column": 2, "widgets": {
            "steps": steps, "batch_size": 1, "rank": 16, "alpha": 16.0, "precision": "bf16",
            "gradient_checkpointing": True, "training_seed": 0, "min_snr_gamma": 5.0, "lora_name": lora_name}},
        # column 4: sampling with the trained MODEL/CLIP
        {"id": 6, "type": "CLIPTextEncode", "column": 3, "title": "Prompt (with the trigger word)",
         "widgets": {"text": f"{TRIGGER_WORD}, a blue disc in the centre"}},
        {"id": 7, "type": "CLIPTextEncode", "column": 3, "title": "Negative prompt",
         "widgets": {"text": "blurry, low quality"}},
        {"id": 8, "type": "EmptyLatentImage", "column": 3, "widgets": {
            "width": resolution, "height": resolution, "batch_size": 1}},
        {"id": 9, "type": "KSampler", "column": 4, "widgets": {
            "seed": 42, "control_after_generate": "fixed", "steps": 25, "cfg": 7.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        {"id": 10, "type": "VAEDecode", "column": 4, "widgets": {}},
        {"id": 11, "type": "SaveImage", "column": 5, "title": "Sample with the LoRA", "size": [320, 380],
         "widgets": {"filename_prefix": "lora_lab/sample"}},
        # charts
        {"id": 12, "type": "SaveImage", "column": 3, "title": "Training chart (loss + rates)", "size": [400, 280],
         "widgets": {"filename_prefix": "lora_lab/train_chart"}},
        {"id": 13, "type": "SaveImage", "column": 1, "title": "Learning-rate chart", "size": [270, 220],
         "widgets": {"filename_prefix": "lora_lab/lr_chart"}},
        {"id": 14, "type": "PreviewImage", "column": 0, "title": "Dataset preview", "size": [400, 300],
         "widgets": {}},
    ]
    links = [  # (from id, output slot, to id, input name)
        (1, 0, 5, "model"), (1, 1, 5, "clip"), (1, 2, 5, "vae"),
        (2, 0, 5, "dataset"), (4, 0, 5, "learning_rates"), (3, 0, 5, "lr_schedule"), (3, 0, 4, "lr_schedule"),
        (5, 1, 6, "clip"), (5, 1, 7, "clip"),
        (5, 0, 9, "model"), (6, 0, 9, "positive"), (7, 0, 9, "negative"), (8, 0, 9, "latent_image"),
        (9, 0, 10, "samples"), (1, 2, 10, "vae"), (10, 0, 11, "images"),
        (5, 3, 12, "images"), (4, 2, 13, "images"), (2, 2, 14, "images"),
    ]
    return {"nodes": nodes, "links": links}


def finder_graph(checkpoint: str, resolution: int, rates: dict, steps: int, lora_name: str) -> dict:
    """The SD1.5 training graph with the LR Finder between UNet/TE Learning Rates and Train LoRA: the
    finder sweeps the given rates (their ratios kept) and hands Train LoRA its suggestion."""
    graph = training_graph(checkpoint, resolution, rates, steps, lora_name, max_bucket_resolution=1024)
    graph["nodes"].insert(4, {"id": 15, "type": "LoRALabLRFinder", "column": 2, "widgets": {
        "min_lr": 1e-6, "max_lr": 1e-2, "steps": 100, "rank": 16, "alpha": 16.0, "batch_size": 1,
        "precision": "bf16", "training_seed": 0}})
    graph["nodes"].append({"id": 16, "type": "SaveImage", "column": 3, "title": "LR Finder chart",
                           "size": [400, 280], "widgets": {"filename_prefix": "lora_lab/lr_finder"}})
    graph["links"] = [link for link in graph["links"] if link != (4, 0, 5, "learning_rates")] + [
        (1, 0, 15, "model"), (1, 1, 15, "clip"), (1, 2, 15, "vae"), (2, 0, 15, "dataset"),
        (4, 0, 15, "learning_rates"), (15, 0, 5, "learning_rates"), (15, 2, 16, "images")]
    return graph


def dit_graph(family: str, loaders: list[dict], model_link: tuple, clip_link: tuple, vae_link: tuple, rates: dict,
              train: dict, sampler: dict, lora_name: str, guidance: float | None = None,
              empty_latent: str = "EmptySD3LatentImage", network: dict | None = None) -> dict:
    """A flow-matching family's graph: its loaders (as users load it for generating) -> LoRA Lab's four
    nodes -> sampling with the trained MODEL/CLIP at the family's usual settings (1024 px). The empty
    latent is the family's own node (Flux.2: EmptyFlux2LatentImage, 128 channels at 1/16)."""
    network = network or {"rank": 16, "alpha": 16.0}
    nodes = [
        *loaders,
        {"id": 2, "type": "LoRALabDataset", "column": 0, "widgets": {
            "folder": "my_dataset", "resolution": 1024, "trigger_word": TRIGGER_WORD, "max_bucket_resolution": 2048}},
        {"id": 3, "type": "LoRALabLRSchedule", "column": 1, "widgets": {
            "scheduler": "cosine", "warmup": 5.0, "warmup_unit": "percent", "preview_steps": train["steps"]}},
        {"id": 4, "type": "LoRALabLearningRates", "column": 1, "widgets": rates},
        {"id": 5, "type": "LoRALabTrain", "column": 2, "widgets": {
            "batch_size": 1, **network, "precision": "bf16", "gradient_checkpointing": True,
            "training_seed": 0, "min_snr_gamma": 0.0, "noise_offset": 0.0, "lora_name": lora_name,
            "timestep_sampling": "auto", **train}},
        {"id": 6, "type": "CLIPTextEncode", "column": 3, "title": "Prompt (with the trigger word)",
         "widgets": {"text": f"{TRIGGER_WORD}, a blue disc in the centre"}},
        {"id": 7, "type": "CLIPTextEncode", "column": 3, "title": "Negative prompt", "widgets": {"text": ""}},
        {"id": 8, "type": empty_latent, "column": 3, "widgets": {"width": 1024, "height": 1024, "batch_size": 1}},
        {"id": 9, "type": "KSampler", "column": 4, "widgets": {
            "seed": 42, "control_after_generate": "fixed", "denoise": 1.0, **sampler}},
        {"id": 10, "type": "VAEDecode", "column": 4, "widgets": {}},
        {"id": 11, "type": "SaveImage", "column": 5, "title": "Sample with the LoRA", "size": [320, 380],
         "widgets": {"filename_prefix": f"lora_lab/{family}_sample"}},
        {"id": 12, "type": "SaveImage", "column": 3, "title": "Training chart (loss + rates)", "size": [400, 280],
         "widgets": {"filename_prefix": "lora_lab/train_chart"}},
        {"id": 13, "type": "SaveImage", "column": 1, "title": "Learning-rate chart", "size": [270, 220],
         "widgets": {"filename_prefix": "lora_lab/lr_chart"}},
        {"id": 14, "type": "PreviewImage", "column": 0, "title": "Dataset preview", "size": [400, 300], "widgets": {}},
    ]
    positive = (6, 0)
    links = [
        (*model_link, 5, "model"), (*clip_link, 5, "clip"), (*vae_link, 5, "vae"),
        (2, 0, 5, "dataset"), (4, 0, 5, "learning_rates"), (3, 0, 5, "lr_schedule"), (3, 0, 4, "lr_schedule"),
        (5, 1, 6, "clip"), (5, 1, 7, "clip"),
        (5, 0, 9, "model"), (7, 0, 9, "negative"), (8, 0, 9, "latent_image"),
        (9, 0, 10, "samples"), (*vae_link, 10, "vae"), (10, 0, 11, "images"),
        (5, 3, 12, "images"), (4, 2, 13, "images"), (2, 2, 14, "images"),
    ]
    if guidance is not None:   # Flux-dev: the distilled guidance goes on the conditioning
        nodes.append({"id": 18, "type": "FluxGuidance", "column": 4, "widgets": {"guidance": guidance}})
        links += [(6, 0, 18, "conditioning")]
        positive = (18, 0)
    links.append((*positive, 9, "positive"))
    return {"nodes": nodes, "links": links}


def wan_graph() -> dict:
    """Wan 2.2 A14B text-to-video as ComfyUI's own Wan 2.2 template loads and samples it (two experts, each
    with ModelSamplingSD3 shift 8, KSamplerAdvanced: the high-noise expert the first 10 of 20 steps at cfg
    3.5, the low-noise one the rest): one Train LoRA per expert, each on its own noise range (high_noise /
    low_noise: sigma above / below Wan 2.2's boundary 0.875), each LoRA applied to its own expert (the MODEL
    its Train LoRA returns). Rank 32, alpha 32, rate 1e-4 as musubi-tuner's Wan 2.2 expert scripts train;
    33-frame clips at 16 fps (Wan's rate), about 512 x 512 pixels."""
    rates = {**FROZEN_TEXT_RATES, "learning_rate": 1e-4}
    train = {"steps": 1000, "batch_size": 1, "rank": 32, "alpha": 32.0, "precision": "bf16",
             "gradient_checkpointing": True, "training_seed": 0, "min_snr_gamma": 0.0, "noise_offset": 0.0,
             "timestep_sampling": "auto", "memory": "auto"}
    advanced = {"noise_seed": 42, "control_after_generate": "fixed", "steps": 20, "cfg": 3.5,
                "sampler_name": "euler", "scheduler": "simple"}
    nodes = [
        {"id": 1, "type": "UNETLoader", "column": 0, "title": "Load high-noise expert", "widgets": {
            "unet_name": "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}},
        {"id": 17, "type": "UNETLoader", "column": 0, "title": "Load low-noise expert", "widgets": {
            "unet_name": "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors", "weight_dtype": "default"}},
        {"id": 15, "type": "CLIPLoader", "column": 0, "widgets": {
            "clip_name": "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "type": "wan"}},
        {"id": 16, "type": "VAELoader", "column": 0, "widgets": {"vae_name": "wan_2.1_vae.safetensors"}},
        {"id": 2, "type": "LoRALabDataset", "column": 0, "widgets": {
            "folder": "my_clips", "resolution": 512, "trigger_word": TRIGGER_WORD, "max_bucket_resolution": 1024,
            "frames_per_clip": 33, "frame_extraction": "head", "target_fps": 16.0}},
        {"id": 3, "type": "LoRALabLRSchedule", "column": 1, "widgets": {
            "scheduler": "cosine", "warmup": 5.0, "warmup_unit": "percent", "preview_steps": train["steps"]}},
        {"id": 4, "type": "LoRALabLearningRates", "column": 1, "widgets": rates},
        {"id": 5, "type": "LoRALabTrain", "column": 2, "title": "Train LoRA (high-noise expert)", "widgets": {
            **train, "lora_name": "my_wan22_lora_high_noise", "noise_range": "high_noise"}},
        {"id": 19, "type": "LoRALabTrain", "column": 2, "title": "Train LoRA (low-noise expert)", "widgets": {
            **train, "lora_name": "my_wan22_lora_low_noise", "noise_range": "low_noise"}},
        {"id": 6, "type": "CLIPTextEncode", "column": 3, "title": "Prompt (with the trigger word)",
         "widgets": {"text": f"{TRIGGER_WORD}, a blue disc moving across the frame"}},
        {"id": 7, "type": "CLIPTextEncode", "column": 3, "title": "Negative prompt",
         "widgets": {"text": "blurry, static, low quality"}},
        {"id": 8, "type": "EmptyHunyuanLatentVideo", "column": 3, "widgets": {
            "width": 832, "height": 480, "length": 81, "batch_size": 1}},
        {"id": 20, "type": "ModelSamplingSD3", "column": 3, "title": "Shift (high-noise expert)", "widgets": {"shift": 8.0}},
        {"id": 21, "type": "ModelSamplingSD3", "column": 3, "title": "Shift (low-noise expert)", "widgets": {"shift": 8.0}},
        {"id": 9, "type": "KSamplerAdvanced", "column": 4, "title": "High-noise expert: steps 0-10", "widgets": {
            "add_noise": "enable", **advanced, "start_at_step": 0, "end_at_step": 10,
            "return_with_leftover_noise": "enable"}},
        {"id": 22, "type": "KSamplerAdvanced", "column": 4, "title": "Low-noise expert: steps 10-20", "widgets": {
            "add_noise": "disable", **advanced, "start_at_step": 10, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        {"id": 10, "type": "VAEDecode", "column": 5, "widgets": {}},
        {"id": 11, "type": "SaveAnimatedWEBP", "column": 5, "title": "Clip with both LoRAs", "size": [320, 380],
         "widgets": {"filename_prefix": "lora_lab/wan_sample", "fps": 16.0, "lossless": False, "quality": 90,
                     "method": "default"}},
        {"id": 12, "type": "SaveImage", "column": 3, "title": "Training chart (high-noise expert)",
         "size": [400, 280], "widgets": {"filename_prefix": "lora_lab/train_chart_high_noise"}},
        {"id": 23, "type": "SaveImage", "column": 3, "title": "Training chart (low-noise expert)",
         "size": [400, 280], "widgets": {"filename_prefix": "lora_lab/train_chart_low_noise"}},
        {"id": 13, "type": "SaveImage", "column": 1, "title": "Learning-rate chart", "size": [270, 220],
         "widgets": {"filename_prefix": "lora_lab/lr_chart"}},
        {"id": 14, "type": "PreviewImage", "column": 0, "title": "Dataset preview", "size": [400, 300], "widgets": {}},
    ]
    links = [
        (1, 0, 5, "model"), (17, 0, 19, "model"), (15, 0, 5, "clip"), (15, 0, 19, "clip"),
        (16, 0, 5, "vae"), (16, 0, 19, "vae"),
        (2, 0, 5, "dataset"), (2, 0, 19, "dataset"), (4, 0, 5, "learning_rates"), (4, 0, 19, "learning_rates"),
        (3, 0, 5, "lr_schedule"), (3, 0, 19, "lr_schedule"), (3, 0, 4, "lr_schedule"),
        (5, 1, 6, "clip"), (5, 1, 7, "clip"),
        (5, 0, 20, "model"), (19, 0, 21, "model"),
        (20, 0, 9, "model"), (6, 0, 9, "positive"), (7, 0, 9, "negative"), (8, 0, 9, "latent_image"),
        (21, 0, 22, "model"), (6, 0, 22, "positive"), (7, 0, 22, "negative"), (9, 0, 22, "latent_image"),
        (22, 0, 10, "samples"), (16, 0, 10, "vae"), (10, 0, 11, "images"),
        (5, 3, 12, "images"), (19, 3, 23, "images"), (4, 2, 13, "images"), (2, 2, 14, "images"),
    ]
    return {"nodes": nodes, "links": links}


# The text encoders of Flux and Z-Image stay frozen (their rates are not used): 0 says so in the graph.
FROZEN_TEXT_RATES = {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 0.0, "text_encoder_2_lr": -1.0,
                     "lora_plus_ratio": 1.0, "unet_block_weights": ""}

WORKFLOWS = {
    "sd15_train_lora": training_graph(
        "v1-5-pruned-emaonly.safetensors", 512,
        {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 5e-5, "text_encoder_2_lr": -1.0,
         "lora_plus_ratio": 1.0, "unet_block_weights": ""},
        steps=1500, lora_name="my_first_lora", max_bucket_resolution=1024),
    # SDXL: each text encoder at its own rate, both below the UNet's (CLIP-G is the larger one).
    "sdxl_train_lora": training_graph(
        "sd_xl_base_1.0.safetensors", 1024,
        {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 2e-5, "text_encoder_2_lr": 1e-5,
         "lora_plus_ratio": 1.0, "unet_block_weights": ""},
        steps=1500, lora_name="my_first_sdxl_lora", max_bucket_resolution=2048),
    # Find the rate first: the finder sweeps UNet and TE together (TE at half the UNet's rate).
    "find_lr_then_train": finder_graph(
        "v1-5-pruned-emaonly.safetensors", 512,
        {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 5e-5, "text_encoder_2_lr": -1.0,
         "lora_plus_ratio": 1.0, "unet_block_weights": ""},
        steps=1500, lora_name="my_found_lr_lora"),
    # Flux.1 dev as ComfyUI's own Flux template loads it; guidance 3.5 for the sample (trained at 1.0).
    "flux_train_lora": dit_graph(
        "flux", [
            {"id": 1, "type": "UNETLoader", "column": 0, "widgets": {"unet_name": "flux1-dev.safetensors",
                                                                     "weight_dtype": "default"}},
            {"id": 15, "type": "DualCLIPLoader", "column": 0, "widgets": {
                "clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}},
            {"id": 16, "type": "VAELoader", "column": 0, "widgets": {"vae_name": "ae.safetensors"}}],
        (1, 0), (15, 0), (16, 0), FROZEN_TEXT_RATES, {"steps": 1500}, {
            "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
        "my_first_flux_lora", guidance=3.5),
    # SD3.5 medium with its CLIPs in the checkpoint: CLIP-L and CLIP-G train at their own rates.
    "sd35_train_lora": dit_graph(
        "sd35", [{"id": 1, "type": "CheckpointLoaderSimple", "column": 0, "widgets": {
            "ckpt_name": "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"}}],
        (1, 0), (1, 1), (1, 2),
        {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 2e-5, "text_encoder_2_lr": 1e-5,
         "lora_plus_ratio": 1.0, "unet_block_weights": ""}, {"steps": 1500}, {
            "steps": 30, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform"},
        "my_first_sd35_lora"),
    # Z-Image Turbo as ComfyUI's template loads it: 8 steps at cfg 1.
    "zimage_train_lora": dit_graph(
        "zimage", [
            {"id": 1, "type": "UNETLoader", "column": 0, "widgets": {"unet_name": "z_image_turbo_bf16.safetensors",
                                                                     "weight_dtype": "default"}},
            {"id": 15, "type": "CLIPLoader", "column": 0, "widgets": {"clip_name": "qwen_3_4b.safetensors",
                                                                      "type": "lumina2"}},
            {"id": 16, "type": "VAELoader", "column": 0, "widgets": {"vae_name": "ae.safetensors"}}],
        (1, 0), (15, 0), (16, 0), FROZEN_TEXT_RATES, {"steps": 1500}, {
            "steps": 8, "cfg": 1.0, "sampler_name": "res_multistep", "scheduler": "simple"},
        "my_first_zimage_lora"),
    # Qwen-Image as ComfyUI's own Qwen-Image template loads it (its file names); rate 1e-4, rank 16 and 2000
    # steps as ai-toolkit's Qwen-Image example (config/examples/train_lora_qwen_image_24gb.yaml); the sample at
    # the template's 20 steps, cfg 2.5.
    "qwen_image_train_lora": dit_graph(
        "qwen_image", [
            {"id": 1, "type": "UNETLoader", "column": 0, "widgets": {"unet_name": "qwen_image_fp8_e4m3fn.safetensors",
                                                                     "weight_dtype": "default"}},
            {"id": 15, "type": "CLIPLoader", "column": 0, "widgets": {
                "clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors", "type": "qwen_image"}},
            {"id": 16, "type": "VAELoader", "column": 0, "widgets": {"vae_name": "qwen_image_vae.safetensors"}}],
        (1, 0), (15, 0), (16, 0), FROZEN_TEXT_RATES, {"steps": 2000}, {
            "steps": 20, "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple"},
        "my_first_qwen_image_lora"),
    # Flux.2 dev as ComfyUI's own Flux.2 template loads it; rate 1e-4 and rank 32 as musubi-tuner's Flux.2
    # guide (docs/flux_2.md); trained at guidance 1.0, sampled at FluxGuidance 4.0 (the template's value)
    # on Flux.2's own empty latent.
    "flux2_train_lora": dit_graph(
        "flux2", [
            {"id": 1, "type": "UNETLoader", "column": 0, "widgets": {"unet_name": "flux2_dev_fp8mixed.safetensors",
                                                                     "weight_dtype": "default"}},
            {"id": 15, "type": "CLIPLoader", "column": 0, "widgets": {
                "clip_name": "mistral_3_small_flux2_fp8.safetensors", "type": "flux2"}},
            {"id": 16, "type": "VAELoader", "column": 0, "widgets": {"vae_name": "flux2-vae.safetensors"}}],
        (1, 0), (15, 0), (16, 0), FROZEN_TEXT_RATES, {"steps": 1500}, {
            "steps": 20, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"},
        "my_first_flux2_lora", guidance=4.0, empty_latent="EmptyFlux2LatentImage",
        network={"rank": 32, "alpha": 32.0}),
    "wan_train_lora": wan_graph(),
}

BUILD_GRAPH = """async (spec) => {
  app.graph.clear();
  const made = {};
  for (const item of spec.nodes) {
    const node = LiteGraph.createNode(item.type);
    if (!node) throw new Error(`no node type ${item.type}`);
    node.id = item.id;
    if (item.title) node.title = item.title;
    app.graph.add(node);
    for (const [name, value] of Object.entries(item.widgets)) {
      const widget = node.widgets?.find((candidate) => candidate.name === name);
      if (!widget) throw new Error(`${item.type} has no widget ${name}`);
      widget.value = value;
    }
    made[item.id] = node;
  }
  for (const [from, slot, to, inputName] of spec.links) {
    const target = made[to];
    const index = target.inputs.findIndex((input) => input.name === inputName);
    if (index < 0) throw new Error(`${target.type} has no input ${inputName}`);
    if (!made[from].connect(slot, target, index)) throw new Error(`cannot link ${from}:${slot} -> ${to}.${inputName}`);
  }
  // Let the editor draw once, so nodes with DOM widgets (the charts) know their height.
  app.graph.setDirtyCanvas(true, true);
  for (let frame = 0; frame < 3; frame++) await new Promise((resolve) => requestAnimationFrame(resolve));
  const titleHeight = LiteGraph.NODE_TITLE_HEIGHT, gap = 40;
  let x = 20;
  const columns = [...new Set(spec.nodes.map((item) => item.column))].sort((a, b) => a - b);
  for (const column of columns) {
    let y = 40 + titleHeight, width = 0;
    for (const item of spec.nodes.filter((candidate) => candidate.column === column)) {
      const node = made[item.id];
      const computed = node.computeSize();
      const wanted = item.size ?? [0, 0];
      node.setSize([Math.max(node.size[0], computed[0], wanted[0]), Math.max(node.size[1], computed[1], wanted[1])]);
      node.pos = [x, y];
      // Nodes 2.0 draws nodes taller (and sometimes wider) than the canvas does: leave room for the
      // larger of the two, so that neither mode has a node over another.
      const rendered = spec.rendered?.[item.id] ?? [0, 0];
      y += Math.max(node.size[1] + titleHeight, rendered[1]) + gap;
      width = Math.max(width, node.size[0], rendered[0]);
    }
    x += width + gap;
  }
  app.graph.setDirtyCanvas(true, true);
  return JSON.parse(JSON.stringify(app.graph.serialize()));
}"""


# Outer size [width, height] (title included, canvas units) of each node as Nodes 2.0 renders it.
MEASURE_RENDERED = """async () => {
  app.canvas.ds.scale = 1; app.canvas.ds.offset = [0, 0]; app.canvas.setDirty(true, true);
  for (let frame = 0; frame < 20; frame++) await new Promise((resolve) => requestAnimationFrame(resolve));
  await new Promise((resolve) => setTimeout(resolve, 1500));
  const sizes = {};
  for (const node of app.graph.nodes) {
    const element = document.querySelector(`[data-node-id="${node.id}"]`);
    if (!element) throw new Error(`Nodes 2.0 did not render node ${node.id}`);
    const box = element.getBoundingClientRect();
    sizes[node.id] = [box.width / app.canvas.ds.scale, box.height / app.canvas.ds.scale];
  }
  return sizes;
}"""


def open_editor(browser, server: ComfyServer, nodes2: bool):
    server.request("POST", "/settings/Comfy.TutorialCompleted", True)
    server.request("POST", "/settings/Comfy.VueNodes.Enabled", nodes2)
    page = browser.new_page(viewport={"width": 5000, "height": 3200})
    page.goto(server.url, wait_until="networkidle", timeout=120_000)
    page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=120_000)
    page.wait_for_timeout(1000)  # the editor loads its start-up workflow asynchronously
    return page


def rendered_sizes(browser, servers: list[ComfyServer]) -> dict[str, dict[str, list[float]]]:
    """Per workflow, the largest Nodes 2.0 size of each node over every frontend given."""
    sizes: dict[str, dict[str, list[float]]] = {}
    for server in servers:
        page = open_editor(browser, server, nodes2=True)
        for name, spec in WORKFLOWS.items():
            page.evaluate(BUILD_GRAPH, spec)
            for node_id, (width, height) in page.evaluate(MEASURE_RENDERED).items():
                known = sizes.setdefault(name, {}).setdefault(node_id, [0.0, 0.0])
                sizes[name][node_id] = [max(known[0], width), max(known[1], height)]
        page.close()
    return sizes


def main() -> int:
    if chromium_path() is None:
        print("Debian's chromium is needed (make setup installs it)", file=sys.stderr)
        return 1
    from playwright.sync_api import sync_playwright

    base_dir = Path(tempfile.mkdtemp(prefix="lora_lab_workflows_"))
    comfyui_dir = Path(os.environ["LORA_LAB_COMFYUI_DIR"])
    server = ComfyServer(comfyui_dir, base_dir / "pinned", with_frontend=True).start()
    servers = [server]
    newest = os.environ.get("LORA_LAB_NEWEST_FRONTEND", "")
    if newest:
        servers.append(ComfyServer(comfyui_dir, base_dir / "newest", front_end_root=Path(newest)).start())
    try:
        object_info = server.get("/object_info")
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
            rendered = rendered_sizes(browser, servers)
            # Saved from the pinned editor in classic mode: the format every supported frontend reads.
            page = open_editor(browser, server, nodes2=False)
            for name, spec in WORKFLOWS.items():
                workflow = page.evaluate(BUILD_GRAPH, {**spec, "rendered": rendered[name]})
                problems = check_workflow(workflow, object_info, free_combos=FREE_COMBOS)
                if problems:
                    raise SystemExit(f"{name}: " + "; ".join(problems))
                path = EXAMPLES_DIR / f"{name}.json"
                path.write_text(json.dumps(workflow, indent=2) + "\n", encoding="utf-8")
                print(path)
            browser.close()
    finally:
        for running in servers:
            running.stop()
        shutil.rmtree(base_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
