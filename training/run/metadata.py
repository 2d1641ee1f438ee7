"""What a LoRA file records about the run that made it: sd-scripts' ss_* training fields, the
settings, the modelspec.* keys and the sshs_* hashes."""
from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..data.feeder import batches_per_epoch_of
from ..families.table import family_labels
from ..network import kohya, lycoris
from .host import ModelAccess
from .train_settings import TrainSettings


# lora_lab_dora_scale: what a DoRA file's dora_scale holds (lora.lora_weights), for tools and people.
DORA_SCALE_RULES = {
    "original": "m*|W|/|W+dW| per output row: ComfyUI's loader (<=0.33) divides by |W|; "
                "DoRA-paper loaders (LyCORIS, diffusers) divide by |W+dW|",
    "updated": "m per output row: the DoRA magnitude; the loader divides by |W+dW|",
}


def kohya_fields(settings: TrainSettings, rates, schedule, dataset, access: ModelAccess, started: float,
                  part_rates: dict[str, float], steps_done: int, conv_trained: bool, name: str,
                  fp8_base: bool = False) -> dict[str, Any]:
    """sd-scripts' ss_* training metadata for this run, as train_network.py names and fills it
    (tests/comfy/test_kohya_metadata.py lists every key and each deliberate difference)."""
    network_args: dict[str, str] = {}
    if conv_trained:   # 3x3 convolutions trained (LoCon): kohya records their rank/alpha this way
        network_args.update({"conv_dim": str(settings.rank), "conv_alpha": str(settings.alpha)})
    if settings.use_dora:
        # What sd-scripts writes for a LyCORIS DoRA run (--network_module lycoris.kohya
        # --network_args algo=lora dora_wd=True): sd-scripts' networks.lora would drop dora_scale
        # without a word; lycoris.kohya reads it. Which norm the scale assumes: lora_lab_dora_scale.
        network_args.update({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    batches_per_epoch = max(1, batches_per_epoch_of(dataset, settings.batch_size))
    micro_batches = steps_done * settings.gradient_accumulation
    network = {"ss_network_module": "lycoris.kohya" if settings.use_dora else "networks.lora",
               "ss_network_dim": settings.rank, "ss_network_alpha": settings.alpha,
               "ss_network_args": network_args or None}
    if lycoris.is_lycoris(settings.network):   # LoKr / LoHa: what sd-scripts records for a LyCORIS run
        network = lycoris.network_fields(settings, conv_trained)
    return {
        "ss_output_name": name,
        "ss_network_module": network["ss_network_module"],
        "lora_lab_dora_scale": DORA_SCALE_RULES[access.dora_norm] if settings.use_dora else None,
        "ss_network_dim": network["ss_network_dim"],
        "ss_network_alpha": network["ss_network_alpha"],
        "ss_network_args": network["ss_network_args"],
        "ss_learning_rate": rates.learning_rate,
        "ss_unet_lr": part_rates["unet"],
        "ss_text_encoder_lr": part_rates["text_encoder"],
        # sd-scripts keeps only the first text encoder's rate in ss_text_encoder_lr; SDXL's second one:
        "ss_text_encoder_2_lr": part_rates["text_encoder_2"] if "text_encoder_2" in access.entry.text_parts else None,
        "ss_lr_scheduler": schedule.scheduler,
        "ss_lr_warmup_steps": schedule.warmup_steps(settings.steps),
        "ss_max_train_steps": settings.steps,
        "ss_steps": steps_done,
        "ss_epoch": math.ceil(micro_batches / batches_per_epoch),
        "ss_num_epochs": math.ceil(settings.steps * settings.gradient_accumulation / batches_per_epoch),
        "ss_num_train_images": dataset.effective_count,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_resolution": f"({dataset.options.resolution}, {dataset.options.resolution})",
        "ss_base_model_version": access.entry.base_model_version,
        "ss_v2": access.entry.kohya_v2,
        "ss_clip_skip": access.clip_skip,
        "ss_optimizer": settings.optimizer,
        "ss_seed": settings.training_seed,
        "ss_tag_frequency": dataset.tag_frequency,
        "ss_training_started_at": started,
        "ss_training_finished_at": time.time(),
        "ss_mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[settings.precision],
        "ss_full_fp16": False,
        "ss_min_snr_gamma": settings.min_snr_gamma,
        "ss_noise_offset": settings.noise_offset,
        "ss_batch_size_per_device": settings.batch_size,
        "ss_total_batch_size": settings.batch_size * settings.gradient_accumulation,
        "ss_gradient_accumulation_steps": settings.gradient_accumulation,
        "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_max_grad_norm": settings.max_grad_norm,
        "ss_cache_latents": dataset.caching_possible,
        "ss_flip_aug": dataset.options.flip,
        "ss_random_crop": dataset.options.crop == "random",
        "ss_shuffle_caption": dataset.options.shuffle_captions,
        "ss_keep_tokens": dataset.options.keep_tokens,
        "ss_caption_dropout_rate": dataset.options.caption_dropout,
        "ss_enable_bucket": dataset.options.bucketing,
        "ss_zero_terminal_snr": False,
        # sd-scripts' --fp8_base / --fp8_base_unet: the diffusion model's frozen weights were fp8 while training
        # (loaded so, or base_weights); the text encoders are never quantized, so both say the same.
        "ss_fp8_base": fp8_base,
        "ss_fp8_base_unet": fp8_base,
        # Flow-matching runs: how sigmas were drawn (sd-scripts' names) and the guidance trained with.
        "ss_timestep_sampling": access.sampling[0] if access.entry.flow else None,
        "ss_discrete_flow_shift": access.sampling[1] if access.entry.flow and access.sampling[0] == "shift" else None,
        "ss_guidance_scale": access.training_guidance,
        "lora_lab_generic_path": generic_path_note(access),
    }


def generic_path_note(access: ModelAccess) -> str | None:
    """For a model trained through the generic path: which model, and that it is not a first-class family."""
    entry = access.entry
    if not entry.structural:
        return None
    return (f"{entry.model_name} has no first-class entry ({family_labels()}): trained through the generic "
            f"path, targets found by its structure ({', '.join(entry.dit.call_order)}), objective "
            f"{access.objective.prediction_type} from its model_sampling, conditioning from its extra_conds, "
            "text encoders frozen, ComfyUI-native diffusion_model.<path> keys")


def file_metadata(fields: dict[str, Any], lora_settings: dict[str, Any], tensors: dict[str, torch.Tensor],
                  access: ModelAccess, title: str, resolution: int, started: float) -> dict[str, str]:
    """Everything the file's header holds: ss_* fields, our settings, the modelspec.* keys and the
    sshs_* hashes (computed last, over the tensors and ss_* fields, as sd-scripts does)."""
    metadata = kohya.kohya_metadata(fields, lora_settings)
    metadata.update(kohya.modelspec_metadata(access.entry, access.objective.prediction_type, title,
                                             resolution, started, access.clip_skip,
                                             guidance_input=access.training_guidance is not None))
    metadata.update(kohya.safetensors_hashes(tensors, metadata))
    return metadata
