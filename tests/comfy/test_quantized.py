"""Training over quantized base weights, in a real ComfyUI on the CPU: the `base_weights` option (a
full-precision base rounded to fp8 for the run), bases loaded as fp8 by ComfyUI's own loaders
(fp8_e4m3fn, fp8_e5m2), and the combinations that cannot train, refused before any heavy work.

Every file trained over fp8 weights loads through the stock LoraLoader onto the unquantized model
with no unmatched key, and the user's MODEL keeps its exact tensors.
"""
from __future__ import annotations

import json

import pytest
import torch

from .test_flow_families import load_sd3, no_unmatched, release_all_models
from .test_train import (InterruptingDataset, checkpoint, dataset, loaded, rates, read_lora, schedule,  # noqa: F401
                         stock_lora_loader, train)


@pytest.fixture(scope="module", autouse=True)
def release_models_after_module():
    yield
    release_all_models()


@pytest.fixture(scope="module")
def sd3(comfy):
    """The tiny SD3 checkpoint through the stock CheckpointLoaderSimple (fp32 on the CPU)."""
    return load_sd3(comfy)


def plan_of(comfy, name: str) -> dict:
    return json.loads((comfy.output_dir / "lora_lab" / name / "memory_plan.json").read_text())


def comparable(tensor: torch.Tensor) -> torch.Tensor:
    """fp8 tensors compared by their bytes (torch has no fp8 comparison on the CPU)."""
    return tensor.view(torch.uint8) if tensor.element_size() == 1 and tensor.dtype.is_floating_point else tensor


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.model.diffusion_model.state_dict().items()}


def same_weights(before: dict[str, torch.Tensor], model) -> bool:
    after = model.model.diffusion_model.state_dict()
    return before.keys() == after.keys() and all(
        before[name].dtype == after[name].dtype and torch.equal(comparable(before[name]), comparable(after[name]))
        for name in before)


def no_cast_flag_left(model) -> bool:
    """The run's per-forward cast switch is off again (no instance attribute left on any layer)."""
    return not any("comfy_cast_weights" in vars(module) for module in model.model.diffusion_model.modules())


def linear_conv_weight_bytes(model) -> int:
    """Bytes of the diffusion model's Linear and Conv weights."""
    layers = [module for module in model.model.diffusion_model.modules()
              if isinstance(module, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    return sum(layer.weight.numel() * layer.weight.element_size() for layer in layers)


COMMON = dict(steps=2, batch_size=1, target="attention_ff", save_precision="fp32")


def test_fp8_e4m3fn_base_weights_train_count_and_load_on_the_unquantized_model(comfy, sd3, dataset):
    """SD3 loaded in fp32, trained over fp8 e4m3fn copies: the plan counts 1 byte per Linear/Conv weight,
    the LoRA differs from the as-loaded run's (the base it saw was rounded), the metadata says fp8, the
    model is untouched, and the file loads on the fp32 model with every key applied."""
    model = sd3[0]
    before = weights_of(model)
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0)
    _, _, full, _ = train(comfy, sd3, dataset, learning_rates, schedule(comfy), lora_name="sd3_as_loaded", **COMMON)
    _, _, quantized, _ = train(comfy, sd3, dataset, learning_rates, schedule(comfy), base_weights="fp8_e4m3fn",
                               lora_name="sd3_e4m3fn", **COMMON)
    assert same_weights(before, model) and no_cast_flag_left(model)

    full_plan, plan = plan_of(comfy, "sd3_as_loaded"), plan_of(comfy, "sd3_e4m3fn")
    weights = linear_conv_weight_bytes(model)   # fp32: 4 bytes per value, 1 as fp8
    as_loaded_bytes = full_plan["fixed"] + sum(full_plan["block_sizes"])
    assert plan["fixed"] + sum(plan["block_sizes"]) == as_loaded_bytes - weights * 3 // 4
    assert plan["base_weights"] == "fp8_e4m3fn"

    full_tensors, full_metadata = read_lora(comfy, full)
    tensors, metadata = read_lora(comfy, quantized)
    assert (metadata["ss_fp8_base"], metadata["ss_fp8_base_unet"]) == ("True", "True")
    assert (full_metadata["ss_fp8_base"], full_metadata["ss_fp8_base_unet"]) == ("False", "False")
    assert json.loads(metadata["lora_lab_settings"])["train"]["base_weights"] == "fp8_e4m3fn"
    assert tensors.keys() == full_tensors.keys()
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in tensors.values())
    assert any(not torch.equal(tensors[key], full_tensors[key]) for key in tensors if "lora_up" in key or "lora_B" in key)
    assert any(float(tensor.abs().max()) > 0 for key, tensor in tensors.items() if "lora_B" in key or "lora_up" in key)
    _, _, lines = stock_lora_loader(comfy, sd3, quantized)
    assert no_unmatched(lines), lines


def test_fp8_e5m2_base_weights_stream_with_dora(comfy, sd3, dataset):
    """fp8 e5m2 copies in host memory, every block streamed (the streamer lends the fp8 copies), DoRA over
    the fp8 Linear weights (its norms read by upcasting): trains, the base bytes on the device follow the
    quantized sizes, the file loads on the fp32 model."""
    model = sd3[0]
    before = weights_of(model)
    _, _, name, _ = train(comfy, sd3, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0), schedule(comfy),
                          base_weights="fp8_e5m2", memory="stream", use_dora=True, lora_name="sd3_e5m2_dora", **COMMON)
    assert same_weights(before, model) and no_cast_flag_left(model)
    plan = plan_of(comfy, "sd3_e5m2_dora")
    assert plan["mode"] == "stream" and plan["streamed"] and plan["base_weights"] == "fp8_e5m2"
    tensors, metadata = read_lora(comfy, name)
    assert metadata["ss_fp8_base"] == "True"
    assert any(key.endswith("dora_scale") for key in tensors)
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
    _, _, lines = stock_lora_loader(comfy, sd3, name)
    assert no_unmatched(lines), lines


def test_cancel_over_fp8_base_weights_gives_the_model_back(comfy, sd3, dataset):
    """Cancel mid-run with base_weights (streamed, so the fp8 copies are lent too): the MODEL keeps its exact
    fp32 tensors and layers, and what was trained so far loads on it with every key applied."""
    import comfy.model_management as model_management

    model = sd3[0]
    before = weights_of(model)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            train(comfy, sd3, InterruptingDataset(dataset, after=7), rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                  schedule(comfy), steps=20, batch_size=1, target="attention_ff", base_weights="fp8_e4m3fn",
                  memory="stream", lora_name="cancelled_fp8")
    finally:
        model_management.interrupt_current_processing(False)
    assert same_weights(before, model) and no_cast_flag_left(model)
    _, metadata = read_lora(comfy, "cancelled_fp8_interrupted.safetensors")
    assert metadata["ss_fp8_base"] == "True"
    _, _, lines = stock_lora_loader(comfy, sd3, "cancelled_fp8_interrupted.safetensors")
    assert no_unmatched(lines), lines


def test_a_base_loaded_as_fp8_e5m2_trains(comfy, dataset):
    """Load Diffusion Model's fp8_e5m2 weight dtype: ComfyUI casts per layer; the LoRA trains beside it,
    records fp8, and loads on the fp8 model and on the full-precision one with every key applied."""
    try:
        loaded_e5m2 = load_sd3(comfy, torch.float8_e5m2)
        assert loaded_e5m2[0].model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e5m2
        _, _, name, _ = train(comfy, loaded_e5m2, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                              schedule(comfy), precision="bf16", lora_name="sd3_loaded_e5m2", **COMMON)
        tensors, metadata = read_lora(comfy, name)
        assert metadata["ss_fp8_base"] == "True"
        assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
        assert any(float(tensor.abs().max()) > 0 for key, tensor in tensors.items() if "lora_B" in key or "lora_up" in key)
        _, _, lines = stock_lora_loader(comfy, loaded_e5m2, name)
        assert no_unmatched(lines), lines
        _, _, lines = stock_lora_loader(comfy, load_sd3(comfy), name)
        assert no_unmatched(lines), lines
    finally:
        release_all_models()


def test_dora_on_fp8_convolutions_is_refused_before_loading(comfy, loaded, dataset):
    """DoRA on 3x3 convolutions needs their weight in the compute dtype: refused with the inputs, the value
    and the ways out, before the model loads."""
    import comfy.model_management as model_management

    model = loaded[0]
    before = weights_of(model)
    model_management.unload_all_models()
    with pytest.raises(ValueError, match=r"use_dora = True with target = 'all_linear_conv'.*"
                                         r"base_weights = 'fp8_e4m3fn'.*Set base_weights to as_loaded"):
        train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0), schedule(comfy),
              steps=1, use_dora=True, target="all_linear_conv", base_weights="fp8_e4m3fn", lora_name="refused")
    assert not [entry for entry in model_management.current_loaded_models if entry.model is model]
    assert same_weights(before, model)


def test_lr_finder_sweeps_over_fp8_base_weights(comfy, sd3, dataset):
    from .test_lr_finder import find

    _, suggested, _, summary = find(comfy, sd3, dataset, steps=10, batch_size=1, min_lr=1e-5, max_lr=1e-2,
                                    base_weights="fp8_e4m3fn")
    assert 1e-5 <= suggested <= 1e-2 and "as fp8_e4m3fn" in summary


def load_scaled_fp8_sd3(comfy):
    """The tiny SD3 in ComfyUI's scaled-fp8 checkpoint format (comfy/quant_ops.py), through the stock
    CheckpointLoaderSimple (skipped on a ComfyUI without quantized checkpoints)."""
    from comfy import ops as comfy_ops

    from lora_lab_devtools import flow_fixtures

    from .test_flow_families import link

    if not hasattr(comfy_ops, "mixed_precision_ops"):
        pytest.skip("this ComfyUI has no quantized checkpoint format (comfy/quant_ops.py, ops.mixed_precision_ops)")
    name = link(comfy, "checkpoints", flow_fixtures.ensure_sd3_scaled_fp8_checkpoint())
    with torch.inference_mode():
        return comfy.node_class("CheckpointLoaderSimple")().load_checkpoint(name)[:3]


def castable(weight: torch.Tensor) -> bool:
    """What ComfyUI's per-forward cast does to a weight in a training step works on this ComfyUI."""
    with torch.inference_mode(False), torch.no_grad():
        try:
            weight.detach().clone().to(dtype=torch.float32).dequantize()
        except (RuntimeError, NotImplementedError):
            return False
    return True


def test_comfyui_quantized_checkpoint_trains_lora_and_dora_streamed(comfy, dataset):
    """ComfyUI 0.33's scaled-fp8 checkpoint (QuantizedTensor weights in its mixed-precision ops): its Linear
    layers train as Linears for the run (peft wraps them, ComfyUI dequantizes per forward), resident and
    streamed with DoRA and base_weights on top (its unquantized layers to fp8); the plan counts the stored
    fp8 bytes, the metadata says fp8, the layers get their own class back, and the file loads on the
    quantized model and on the full-precision one with every key applied."""
    from comfy.quant_ops import QuantizedTensor

    try:
        loaded_quantized = load_scaled_fp8_sd3(comfy)
        model = loaded_quantized[0]
        qkv = model.model.diffusion_model.joint_blocks[0].x_block.attn.qkv
        assert isinstance(qkv.weight, QuantizedTensor) and not isinstance(qkv, torch.nn.Linear)
        if not castable(qkv.weight):
            pytest.skip("this ComfyUI's QuantizedTensor cannot be cast outside inference mode with an fp32 compute "
                        "dtype (0.3.75 on the CPU); test_quantized_checkpoint_this_comfyui_cannot_cast_is_refused")
        before = weights_of(model)
        classes = {name: type(module) for name, module in model.model.diffusion_model.named_modules()}
        learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0)
        _, _, plain, _ = train(comfy, loaded_quantized, dataset, learning_rates, schedule(comfy),
                               lora_name="sd3_scaled_fp8", **COMMON)
        _, _, dora, _ = train(comfy, loaded_quantized, dataset, learning_rates, schedule(comfy), use_dora=True,
                              memory="stream", base_weights="fp8_e4m3fn", lora_name="sd3_scaled_fp8_dora", **COMMON)
        assert same_weights(before, model) and no_cast_flag_left(model)
        assert {name: type(module) for name, module in model.model.diffusion_model.named_modules()} == classes

        fp32_block_bytes = sum(tensor.numel() * 4 for tensor in model.model.diffusion_model.joint_blocks.parameters())
        assert sum(plan_of(comfy, "sd3_scaled_fp8")["block_sizes"]) < 0.4 * fp32_block_bytes
        for name in (plain, dora):
            tensors, metadata = read_lora(comfy, name)
            assert metadata["ss_fp8_base"] == "True"
            assert any(key.startswith("transformer.transformer_blocks.0.attn.to_q.") for key in tensors)  # a quantized qkv
            assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
            assert any(float(tensor.abs().max()) > 0 for key, tensor in tensors.items()
                       if "lora_B" in key or "lora_up" in key)
            _, _, lines = stock_lora_loader(comfy, loaded_quantized, name)
            assert no_unmatched(lines), lines
            _, _, lines = stock_lora_loader(comfy, load_sd3(comfy), name)
            assert no_unmatched(lines), lines
        assert any(key.endswith("dora_scale") for key in read_lora(comfy, dora)[0])
    finally:
        release_all_models()


def test_quantized_checkpoint_this_comfyui_cannot_cast_is_refused(comfy, dataset):
    """Where this ComfyUI cannot cast its quantized weights in a training step (0.3.75 on the CPU), Train
    LoRA says so before loading, naming the model's format and the ways out."""
    import comfy.model_management as model_management

    try:
        loaded_quantized = load_scaled_fp8_sd3(comfy)
        model = loaded_quantized[0]
        if castable(model.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight):
            pytest.skip("this ComfyUI casts its quantized weights in training (test_comfyui_quantized_checkpoint_trains...)")
        model_management.unload_all_models()
        with pytest.raises(ValueError, match=r"model is a quantized checkpoint \(QuantizedTensor weights.*cannot cast.*"
                                             r"Update ComfyUI"):
            train(comfy, loaded_quantized, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                  schedule(comfy), lora_name="refused_quantized", **COMMON)
        assert not [entry for entry in model_management.current_loaded_models if entry.model is model]
        assert all(not type(module).__name__.endswith("AsLinear") for module in model.model.diffusion_model.modules())
    finally:
        release_all_models()
