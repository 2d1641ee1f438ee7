"""The saved file's metadata, key by key, against what kohya sd-scripts' train_network.py writes for
the same run (read from sd-scripts at commit 48d368fa: the ``metadata`` dict, the single-dataset
branch, save_model's ss_steps/ss_epoch, networks/lora.py's sshs_* hashes and
library/sai_model_spec.py's modelspec.* keys).

Every sd-scripts key is either written by us (with the value checked where the run decides it) or
listed in NOT_WRITTEN with the reason; every key we write is sd-scripts' or listed in OURS_ONLY.
"""
from __future__ import annotations

import hashlib
import json

import torch

from .test_train import checkpoint, dataset, loaded, rates, read_lora, schedule, train  # noqa: F401

SD_SCRIPTS_WRITTEN = {
    # train_network.py metadata dict
    "ss_training_started_at", "ss_output_name", "ss_learning_rate", "ss_text_encoder_lr", "ss_unet_lr",
    "ss_num_train_images", "ss_num_reg_images", "ss_num_batches_per_epoch", "ss_num_epochs",
    "ss_gradient_checkpointing", "ss_gradient_accumulation_steps", "ss_max_train_steps", "ss_lr_warmup_steps",
    "ss_lr_scheduler", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_mixed_precision",
    "ss_full_fp16", "ss_v2", "ss_base_model_version", "ss_clip_skip", "ss_cache_latents", "ss_seed",
    "ss_noise_offset", "ss_zero_terminal_snr", "ss_optimizer", "ss_max_grad_norm", "ss_caption_dropout_rate",
    "ss_min_snr_gamma", "ss_fp8_base", "ss_fp8_base_unet",
    # single-dataset branch
    "ss_batch_size_per_device", "ss_total_batch_size", "ss_resolution", "ss_flip_aug", "ss_random_crop",
    "ss_shuffle_caption", "ss_enable_bucket", "ss_keep_tokens", "ss_tag_frequency",
    # save_model
    "ss_training_finished_at", "ss_steps", "ss_epoch",
    # networks/lora.py save_weights
    "sshs_model_hash", "sshs_legacy_hash",
    # sai_model_spec (LoRA)
    "modelspec.sai_model_spec", "modelspec.architecture", "modelspec.implementation", "modelspec.title",
    "modelspec.resolution", "modelspec.date", "modelspec.prediction_type", "modelspec.encoder_layer",
}
NOT_WRITTEN = {
    **{key: "no held-out validation split (see ss_num_validation_images)" for key in (
        "ss_validation_seed", "ss_validation_split", "ss_max_validation_steps", "ss_validate_every_n_epochs",
        "ss_validate_every_n_steps")},
    "ss_session_id": "a random number per sd-scripts process: nothing to mirror",
    "ss_num_validation_images": "no held-out split: validate_every_n_steps measures on training images "
                                "(lora_lab_settings records it)",
    "ss_network_dropout": "no dropout option (sd-scripts writes 'None' then too)",
    "ss_max_token_length": "ComfyUI's CLIP takes any length (75-token chunks): no such setting",
    "ss_lowram": "sd-scripts loader flag: no equivalent",
    "ss_multires_noise_iterations": "not offered", "ss_multires_noise_discount": "not offered",
    "ss_adaptive_noise_scale": "not offered", "ss_training_comment": "no comment input",
    "ss_sd_scripts_commit_hash": "not sd-scripts (lora_lab_settings records our settings)",
    "ss_caption_dropout_every_n_epochs": "not offered", "ss_caption_tag_dropout_rate": "not offered",
    "ss_face_crop_aug_range": "not offered", "ss_prior_loss_weight": "no regularisation images",
    "ss_scale_weight_norms": "not offered", "ss_ip_noise_gamma": "not offered",
    "ss_debiased_estimation": "not offered", "ss_noise_offset_random_strength": "not offered",
    "ss_ip_noise_gamma_random_strength": "not offered", "ss_loss_type": "always l2 (sd-scripts' default)",
    "ss_huber_schedule": "no huber loss", "ss_huber_scale": "no huber loss", "ss_huber_c": "no huber loss",
    "ss_resize_interpolation": "PIL's default resampling only",
    "ss_color_aug": "not offered", "ss_bucket_no_upscale": "dataset option not carried to the trainer yet",
    "ss_min_bucket_reso": "dataset option not carried to the trainer yet",
    "ss_max_bucket_reso": "dataset option not carried to the trainer yet",
    "ss_dataset_dirs": "folders are ComfyUI inputs, not kohya dataset dirs",
    "ss_reg_dataset_dirs": "no regularisation images", "ss_bucket_info": "not recorded",
    "ss_sd_model_name": "ComfyUI hands over a loaded model, not a file name",
    "ss_sd_model_hash": "ComfyUI hands over a loaded model, not a file",
    "ss_new_sd_model_hash": "ComfyUI hands over a loaded model, not a file",
    "ss_network_args": "written only when there are network args (conv_dim/conv_alpha, DoRA), as sd-scripts",
}
OURS_ONLY = {
    "ss_text_encoder_2_lr": "SDXL's second text-encoder rate (sd-scripts keeps only the first in ss_text_encoder_lr)",
    "lora_lab_settings": "every LoRA Lab setting as JSON",
    "lora_lab_dora_scale": "DoRA files: which norm dora_scale assumes (ComfyUI's |W| or the paper's |W + dW|)",
    "lora_lab_generic_path": "a model with no first-class entry: which model, trained through the generic path",
}


def model_hash_of(path) -> str:
    """sd-webui-additional-networks' model hash: sha256 of the file after its header."""
    data = path.read_bytes()
    return hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()


def test_metadata_matches_sd_scripts_key_by_key(comfy, loaded, dataset):
    model, clip, vae = loaded
    skipped = clip.clone()
    skipped.clip_layer(-2)   # CLIP Set Last Layer -2 = kohya clip_skip 2
    with torch.inference_mode():
        _, _, name, _ = train(comfy, (model, skipped, vae), dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=5e-4),
                              schedule(comfy, scheduler="cosine", warmup=25.0), steps=4, batch_size=2,
                              gradient_accumulation=2, rank=4, alpha=2.0, clip=skipped, lora_name="metadata_run")
    tensors, metadata = read_lora(comfy, name)

    assert not (set(NOT_WRITTEN) - {"ss_network_args"}) & set(metadata)
    assert SD_SCRIPTS_WRITTEN <= set(metadata), sorted(SD_SCRIPTS_WRITTEN - set(metadata))
    assert set(metadata) <= SD_SCRIPTS_WRITTEN | set(NOT_WRITTEN) | set(OURS_ONLY), \
        sorted(set(metadata) - SD_SCRIPTS_WRITTEN - set(NOT_WRITTEN) - set(OURS_ONLY))
    assert "ss_network_args" not in metadata   # plain LoRA on linear layers: sd-scripts writes none either

    images = len(dataset.samples)  # 4 images, one bucket, repeats 1: 2 batches of 2 per epoch
    expected = {
        "ss_output_name": "metadata_run", "ss_network_module": "networks.lora", "ss_network_dim": "4",
        "ss_network_alpha": "2.0", "ss_learning_rate": "0.001", "ss_unet_lr": "0.001", "ss_text_encoder_lr": "0.0005",
        "ss_lr_scheduler": "cosine", "ss_lr_warmup_steps": "1", "ss_max_train_steps": "4", "ss_steps": "4",
        "ss_num_batches_per_epoch": "2", "ss_epoch": "4", "ss_num_epochs": "4", "ss_num_train_images": str(images),
        "ss_num_reg_images": "0", "ss_batch_size_per_device": "2", "ss_total_batch_size": "4",
        "ss_gradient_accumulation_steps": "2", "ss_clip_skip": "2", "ss_v2": "False", "ss_base_model_version": "sd_v1",
        "ss_mixed_precision": "no", "ss_full_fp16": "False", "ss_resolution": "(64, 64)", "ss_seed": "0",
        "ss_fp8_base": "False", "ss_fp8_base_unet": "False",
        "modelspec.sai_model_spec": "1.0.1", "modelspec.architecture": "stable-diffusion-v1/lora",
        "modelspec.implementation": "diffusers", "modelspec.title": "metadata_run", "modelspec.resolution": "64x64",
        "modelspec.prediction_type": "epsilon", "modelspec.encoder_layer": "2",
    }
    assert {key: metadata[key] for key in expected} == expected
    assert json.loads(metadata["ss_tag_frequency"])
    assert float(metadata["ss_training_started_at"]) <= float(metadata["ss_training_finished_at"])
    # The hashes A1111 / additional-networks index LoRAs by, recomputed from the file itself.
    assert metadata["sshs_model_hash"] == model_hash_of(comfy.models_dir / "loras" / name)
    assert len(metadata["sshs_legacy_hash"]) == 8 and int(metadata["sshs_legacy_hash"], 16) >= 0


def test_conv_layers_and_dora_are_named_in_network_args(comfy, loaded, dataset):
    """all_linear_conv trains 3x3 convolutions: kohya records them as conv_dim/conv_alpha; DoRA is named."""
    _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                          schedule(comfy), steps=1, rank=4, alpha=2.0, target="all_linear_conv", use_dora=True,
                          lora_name="conv_metadata")
    _, metadata = read_lora(comfy, name)
    arguments = json.loads(metadata["ss_network_args"])
    assert arguments["conv_dim"] == "4" and arguments["conv_alpha"] == "2.0"
    assert (arguments["algo"], arguments["dora_wd"]) == ("lora", "True")   # LyCORIS's names (lycoris/kohya.py)
    assert metadata["ss_network_module"] == "lycoris.kohya"
