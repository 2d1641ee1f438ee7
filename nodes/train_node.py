"""Train LoRA node: trains a LoRA on the loaded MODEL/CLIP in the ComfyUI process, writes a kohya file
into models/loras and returns MODEL/CLIP with that file applied (ready for KSampler)."""
from __future__ import annotations

import logging

from ..training.kohya import lora_name_for
from ..training.loop import OPTIMIZERS
from ..training.lora import TARGETS
from ..training.resume import resolve_state_path
from ..training.sampling import parse_sample_prompts
from ..training.train_plots import training_chart
from ..training.trainer import SAVE_DTYPES, TEXT_PARTS, TrainCallbacks, TrainSettings, check_inputs, part_rates_for, train_lora
from . import comfy_bridge
from ..training.image_tensors import pil_to_image

logger = logging.getLogger("lora_lab")

PRECISIONS = ["bf16", "fp16", "fp32"]


class TrainNode:
    """Input order is a public API (saved workflows store widget values by position): append only."""

    CATEGORY = "LoRA Lab"
    DESCRIPTION = ("Trains a LoRA (UNet and, when their rate is above 0, the text encoders) on a LoRA Dataset, "
                   "writes it to models/loras in kohya format, and returns the MODEL/CLIP with it applied.")
    RETURN_TYPES = ("MODEL", "CLIP", "STRING", "IMAGE")
    RETURN_NAMES = ("model", "clip", "lora_name", "chart")
    OUTPUT_TOOLTIPS = ("The input model with the trained LoRA file applied (through ComfyUI's LoRA loader).",
                       "The input CLIP with the LoRA file applied (unchanged when the text encoder was frozen).",
                       "The file name as LoraLoader lists it.",
                       "Loss, smoothed loss and the learning rate applied to each part per step.")
    FUNCTION = "train"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to train on (from Load Checkpoint). It is not changed."}),
                "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint. It is not changed."}),
                "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint; encodes the training images."}),
                "dataset": ("LORA_DATASET", {"tooltip": "Images and captions, from the LoRA Dataset node."}),
                "learning_rates": ("LORA_LEARNING_RATES", {"tooltip": "Rates per part, from UNet/TE Learning Rates. "
                                                                      "A part at rate 0 is frozen and gets no keys."}),
                "lr_schedule": ("LR_SCHEDULE", {"tooltip": "How the rates change over the steps (LR Schedule)."}),
                "steps": ("INT", {"default": 1000, "min": 1, "max": 1_000_000, "tooltip":
                                  "Optimizer updates. One step = batch_size x gradient_accumulation images."}),
                "batch_size": ("INT", {"default": 1, "min": 1, "max": 256, "tooltip":
                                       "Images per forward pass (all from one aspect-ratio bucket)."}),
                "gradient_accumulation": ("INT", {"default": 1, "min": 1, "max": 1024, "tooltip":
                                                  "Forward passes summed into one update (bigger effective batch, "
                                                  "same memory)."}),
                "rank": ("INT", {"default": 16, "min": 1, "max": 1024, "tooltip":
                                 "LoRA rank (network_dim): capacity and file size."}),
                "alpha": ("FLOAT", {"default": 16.0, "min": 0.01, "max": 1024.0, "step": 0.5, "tooltip":
                                    "LoRA alpha: the update is scaled by alpha / rank."}),
                "target": (list(TARGETS), {"default": "attention_ff", "tooltip":
                                           "Which layers get LoRA: attention only, attention + feed-forward, every "
                                           "linear and conv layer of the UNet blocks, or kohya_default: exactly "
                                           "sd-scripts' default LoRA (every linear / 1x1 conv of the UNet's "
                                           "transformers, proj_in/proj_out included; 192 modules on SD1.5)."}),
                "use_dora": ("BOOLEAN", {"default": False, "tooltip": "Weight-decomposed LoRA (DoRA)."}),
                "optimizer": (list(OPTIMIZERS), {"default": "AdamW", "tooltip":
                                                 "AdamW is the safe choice. 8-bit ones need bitsandbytes and an NVIDIA "
                                                 "GPU; Prodigy needs prodigyopt (use rates near 1.0)."}),
                "weight_decay": ("FLOAT", {"default": 0.01, "min": 0.0, "max": 10.0, "step": 0.001, "tooltip":
                                           "Decoupled weight decay of the LoRA matrices. The DoRA magnitude gets "
                                           "none: it is a per-row norm, and decay would shrink every layer."}),
                "max_grad_norm": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1000.0, "step": 0.1, "tooltip":
                                            "Clip the gradient norm to this; 0 = off."}),
                "precision": (PRECISIONS, {"default": "bf16", "tooltip":
                                           "Compute precision. bf16 on modern GPUs; fp16 uses loss scaling; fp32 on "
                                           "CPU (bf16 is very slow there). The file's dtype is save_precision."}),
                "gradient_checkpointing": ("BOOLEAN", {"default": True, "tooltip":
                                                       "Recompute activations in backward: much less memory, "
                                                       "~20-30% slower."}),
                "training_seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFF, "tooltip":
                                          "Drives data order, caption shuffle/dropout, flips, crops, noise, "
                                          "timesteps and LoRA init. Same seed + settings = same LoRA."}),
                "noise_offset": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01, "tooltip":
                                           "kohya noise offset (0.05-0.1 helps very dark/bright images); 0 = off."}),
                "min_snr_gamma": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5, "tooltip":
                                            "Min-SNR loss weighting (5 is typical); 0 = off."}),
                "lora_name": ("STRING", {"default": "lora_lab", "tooltip":
                                         "File name in models/loras (sub-folders allowed). A taken name gets _2, _3..."}),
                "save_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                                               "Also save <lora_name>_stepNNNNN every N steps; 0 = off."}),
                "cache_latents_to_disk": ("BOOLEAN", {"default": False, "tooltip":
                                                      "Keep encoded latents in the run folder (output/lora_lab/<name>) "
                                                      "so re-runs skip the VAE. Not possible with random crop."}),
            },
            "optional": {
                "sample_prompt": ("STRING", {"default": "", "multiline": True, "tooltip": (
                    "Preview prompts drawn with the model being trained, one per line, kohya options allowed: "
                    "'a photo of sks --n blurry --w 512 --h 512 --d 42 --l 7 --s 20' (negative, size, seed, cfg, "
                    "steps; Euler sampler). Saved in output/lora_lab/<name>/samples/ and shown on this node.")}),
                "sample_every_n_steps": ("INT", {"default": 0, "min": 0, "max": 1_000_000, "tooltip":
                                                 "Draw the sample prompts every N optimizer steps; 0 = off."}),
                "resume_from": ("STRING", {"default": "", "tooltip": (
                    "Continue a stopped run from its last checkpoint: the run folder (output/lora_lab/<name>, or "
                    "just <name>) or its resume_state.json. Checkpoints are written every save_every_n_steps and on "
                    "Cancel. The model, dataset, rates, schedule and settings must match the saved run (lora_name, "
                    "save_every_n_steps, cache_latents_to_disk, gradient_checkpointing and save_precision may "
                    "change); the result equals an uninterrupted run. Empty = start a new run.")}),
                "save_precision": (list(SAVE_DTYPES), {"default": "fp16", "tooltip": (
                    "Dtype of the weights in the saved file (kohya's --save_precision): fp16 is what most "
                    "LoRAs ship in and every loader takes; fp32 keeps the trained values exactly (twice the size); "
                    "bf16 keeps fp32's range at fp16's size.")}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def train(self, model, clip, vae, dataset, learning_rates, lr_schedule, steps, batch_size, gradient_accumulation,
              rank, alpha, target, use_dora, optimizer, weight_decay, max_grad_norm, precision,
              gradient_checkpointing, training_seed, noise_offset, min_snr_gamma, lora_name, save_every_n_steps,
              cache_latents_to_disk, sample_prompt="", sample_every_n_steps=0, resume_from="", save_precision="fp16",
              unique_id=None):
        settings = TrainSettings(
            steps=steps, batch_size=batch_size, gradient_accumulation=gradient_accumulation, rank=rank, alpha=alpha,
            target=target, use_dora=use_dora, optimizer=optimizer, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, precision=precision, gradient_checkpointing=gradient_checkpointing,
            training_seed=training_seed, noise_offset=noise_offset, min_snr_gamma=min_snr_gamma, lora_name=lora_name,
            save_every_n_steps=save_every_n_steps, cache_latents_to_disk=cache_latents_to_disk,
            save_precision=save_precision)
        family = comfy_bridge.check_compatible(model, clip, vae)
        part_rates = part_rates_for(learning_rates, family)
        check_inputs(settings, dataset, part_rates, lr_schedule, family, comfy_bridge.device_type(model))
        sample_prompts = parse_sample_prompts(sample_prompt or "", dataset.resolution, training_seed)
        if sample_prompts and sample_every_n_steps <= 0:
            logger.warning("LoRA Lab: sample_prompt is set but sample_every_n_steps is 0: no previews will be drawn.")

        if resume_from.strip():   # a wrong path fails now; what the checkpoint holds is checked in train_lora
            resolve_state_path(resume_from, comfy_bridge.output_dir() / "lora_lab")

        train_text = any(part_rates[part] > 0 for part in TEXT_PARTS)
        result = self._run(model, clip, vae, family, train_text, settings, dataset, learning_rates, lr_schedule,
                           sample_prompts, sample_every_n_steps, resume_from.strip(), unique_id)
        trained_model, trained_clip = comfy_bridge.apply_lora_file(model, clip, result.path)
        name = lora_name_for(result.path, comfy_bridge.loras_dir())
        chart = pil_to_image(training_chart(result.records, title=f"Train LoRA: {name}"))
        logger.info("LoRA Lab: trained %s in %.1f s (%d steps, final loss %.4f)", name, result.seconds, steps,
                    result.records[-1].loss)
        return {"ui": {"text": [name]}, "result": (trained_model, trained_clip, name, chart)}

    @staticmethod
    def _run(model, clip, vae, family, train_text, settings, dataset, learning_rates, lr_schedule, sample_prompts,
             sample_every_n_steps, resume_from, unique_id):
        """Train on the models `training_models` hands out (the user's, or private copies under dynamic
        VRAM, released when this returns)."""
        with comfy_bridge.training_models(model, clip, train_text) as (train_model, train_clip):
            access = comfy_bridge.model_access(train_model, train_clip, vae, family)
            callbacks = TrainCallbacks(
                on_step=comfy_bridge.progress_reporter(settings.steps, unique_id, training_chart),
                check_cancel=comfy_bridge.check_cancel, is_cancel=comfy_bridge.is_cancel,
                on_sample=comfy_bridge.sample_previewer(train_model, vae, access, sample_prompts, sample_every_n_steps,
                                                        settings.steps, unique_id))
            return train_lora(settings, access, dataset, learning_rates, lr_schedule, comfy_bridge.loras_dir(),
                              comfy_bridge.output_dir(), callbacks, resume_from=resume_from)
