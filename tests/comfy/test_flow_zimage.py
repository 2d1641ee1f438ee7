"""Z-Image in a real ComfyUI (a module of its own: its tiny model is Z-Image's real width, ~0.9 B
parameters, so it runs after the other families' models are released). See test_flow_families.py
for what the fixtures and the reduced text encoder cover."""
from __future__ import annotations

import torch

from .test_flow_families import (dataset, dit_outputs, load_dit, no_unmatched, release_all_models,  # noqa: F401
                                 release_models_after_each_test, state_bytes)
from .test_train import rates, read_lora, schedule, stock_lora_loader, train


def test_zimage_trains_and_its_file_loads_in_comfyui_and_diffusers(comfy, dataset):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_z_image_lora_to_diffusers

    release_all_models()   # room for a model at Z-Image's real width
    loaded = load_dit(comfy, "zimage", "zimage")
    model, clip, vae = loaded
    assert type(model.model.model_config).__name__ == "ZImage"
    base_bytes = state_bytes(model.model.diffusion_model, clip.cond_stage_model)
    trained_model, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3), schedule(comfy),
                                           steps=2, batch_size=2, target="kohya_default", lora_name="zimage_lora")
    assert state_bytes(model.model.diffusion_model, clip.cond_stage_model) == base_bytes
    tensors, metadata = read_lora(comfy, lora_name)
    stems = {key.split(".")[0] for key in tensors}
    assert {"lora_unet_layers_0_attention_qkv", "lora_unet_noise_refiner_1_feed_forward_w3",
            "lora_unet_context_refiner_0_attention_out"} <= stems
    assert not any("adaLN" in stem for stem in stems)
    assert metadata["ss_timestep_sampling"] == "shift" and metadata["ss_discrete_flow_shift"] == "3.0"

    stock_model, _, lines = stock_lora_loader(comfy, loaded, lora_name)
    assert no_unmatched(lines), lines
    torch.testing.assert_close(dit_outputs(trained_model, clip, vae), dit_outputs(stock_model, clip, vae),
                               rtol=0, atol=1e-4)
    converted = _convert_non_diffusers_z_image_lora_to_diffusers(dict(tensors))   # raises on a leftover key
    assert all(key.startswith("transformer.") for key in converted)
    assert "transformer.layers.0.attention.to_q.lora_A.weight" in converted
