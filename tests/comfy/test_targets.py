"""target = kohya_default trains exactly sd-scripts' default LoRA module set: every Linear and 1x1
Conv2d inside each UNet transformer (attention, feed-forward, proj_in, proj_out), on ComfyUI's own
full-size SD1.5 and SDXL UNets (built on the meta device: structure only, no memory)."""
from __future__ import annotations

import pytest
import torch

from .test_train import checkpoint, dataset, loaded, rates, read_lora, schedule, stock_lora_loader, train  # noqa: F401


def full_size_unet(config_name: str) -> torch.nn.Module:
    from comfy import supported_models

    configs = {
        "SD15": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                 "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
                 "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
                 "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
                 "context_dim": 768, "num_heads": 8, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1],
                 "use_temporal_attention": False, "use_temporal_resblock": False},
        "SDXL": {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
                 "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
                 "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
                 "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
                 "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
                 "use_temporal_attention": False, "use_temporal_resblock": False},
    }
    with torch.device("meta"):
        model = getattr(supported_models, config_name)(configs[config_name]).get_model({})
    return model.diffusion_model


def kohya_count(unet: torch.nn.Module) -> int:
    """sd-scripts' default LoRA: per transformer, proj_in + proj_out + 10 linears per transformer block
    (attn1 q/k/v/out, attn2 q/k/v/out, ff in/out), counted from the model's own structure."""
    transformers = [module for module in unet.modules() if type(module).__name__ == "SpatialTransformer"]
    return sum(2 + 10 * len(transformer.transformer_blocks) for transformer in transformers)


@pytest.mark.parametrize("family, known", [("SD15", 192), ("SDXL", 722)])
def test_kohya_default_is_sd_scripts_default_module_set(comfy, family, known):
    targets = comfy.pack.training.network.targets
    entry = comfy.pack.training.families.table.FAMILIES["sdxl" if family == "SDXL" else "sd1"]
    unet = full_size_unet(family)
    paths = targets.unet_target_paths(unet, "kohya_default", entry)
    assert len(paths) == kohya_count(unet)
    assert len(paths) == known   # the counts sd-scripts reports for these models (cross-check of the formula)
    assert set(targets.unet_target_paths(unet, "attention_ff", entry)) < set(paths)
    extra = set(paths) - set(targets.unet_target_paths(unet, "attention_ff", entry))
    assert {path.rsplit(".", 1)[1] for path in extra} == {"proj_in", "proj_out"}


def test_kohya_default_trains_and_loads_with_no_unmatched_key(comfy, loaded, dataset):
    _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-4),
                          schedule(comfy), steps=2, target="kohya_default", lora_name="kohya_default")
    tensors, _ = read_lora(comfy, name)
    modules = {key.split(".")[0] for key in tensors if key.startswith("lora_unet_")}
    assert len(modules) == kohya_count(loaded[0].model.diffusion_model)
    assert any(module.endswith("proj_in") for module in modules) and any(module.endswith("proj_out") for module in modules)
    _, _, log_lines = stock_lora_loader(comfy, loaded, name)
    assert not [line for line in log_lines if "lora key not loaded" in line], log_lines


@pytest.mark.parametrize("save_precision, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16),
                                                    ("fp32", torch.float32)])
def test_save_precision_sets_the_file_dtype(comfy, loaded, dataset, save_precision, dtype):
    _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                          schedule(comfy), steps=1, save_precision=save_precision,
                          lora_name=f"save_{save_precision}")
    tensors, _ = read_lora(comfy, name)
    assert {tensor.dtype for key, tensor in tensors.items() if not key.endswith(".alpha")} == {dtype}
    _, _, log_lines = stock_lora_loader(comfy, loaded, name)
    assert not [line for line in log_lines if "lora key not loaded" in line], log_lines
