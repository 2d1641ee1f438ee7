"""Training with the frozen base streamed block by block (memory = auto / stream), in a real ComfyUI on
the CPU: host and device are one memory there, but the same code runs (loading into host memory
through ComfyUI, per-block copies, learned prefetch, recompute in backward), so the LoRA must be the
one a resident run trains, bit for bit, and the base bytes on the device stay in the budget. SD1.5 runs
under a budget (auto: some blocks stream, memory = stream: all); SDXL and the SD3 DiT on an fp8 base
stream every block (their tiny fixtures have two or three blocks per stage)."""
from __future__ import annotations

import json

import pytest
import torch

from .test_flow_families import load_sd3, no_unmatched, release_all_models
from .test_resume import assert_same_tensors
from .test_train import (InterruptingDataset, checkpoint, dataset, loaded, probe, rates, read_lora,  # noqa: F401
                         schedule, stock_lora_loader, tiny_sdxl, train, unet_outputs, clip_outputs)

GIB = 1024 ** 3


def model_bytes(model) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in model.model.diffusion_model.state_dict().values())


def tight_budget_gb(model) -> float:
    """60 % of the diffusion model's weights, in the widget's unit: the tiny UNet has few, large blocks
    (the largest ~15 % of it), and streaming needs room for two at once; a real UNet or DiT has dozens."""
    return model_bytes(model) * 0.6 / GIB


def plan_of(comfy, name: str) -> dict:
    return json.loads((comfy.output_dir / "lora_lab" / name / "memory_plan.json").read_text())


def no_loader_clone_left(model) -> bool:
    """The patcher clone that loaded the weights into host memory is unloaded again."""
    import comfy.model_management as model_management

    return not [entry for entry in model_management.current_loaded_models
                if entry.model is not model and entry.model.is_clone(model)]


@pytest.mark.compat   # streaming on either ComfyUI (the other families: the full suite)
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_sd15_streamed_under_a_budget_trains_the_resident_lora(comfy, loaded, dataset, use_dora):
    """UNet streamed (the text encoder trained beside it, resident), auto under its weights plus 60 % of
    the UNet's."""
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-4)
    common = dict(steps=3, use_dora=use_dora, save_precision="fp32", training_seed=5)
    _, _, resident, _ = train(comfy, loaded, dataset, learning_rates, schedule(comfy), memory="resident",
                              lora_name=f"resident_{use_dora}", **common)
    # The trained text encoder stays resident: the budget is its weights plus 60 % of the UNet's.
    encoder = sum(tensor.numel() * tensor.element_size() for tensor in loaded[1].cond_stage_model.state_dict().values())
    budget = tight_budget_gb(loaded[0]) + encoder / GIB
    _, _, streamed, _ = train(comfy, loaded, dataset, learning_rates, schedule(comfy), memory="auto",
                              vram_budget_gb=budget, lora_name=f"streamed_{use_dora}", **common)
    assert_same_tensors(comfy, resident, streamed)
    plan = plan_of(comfy, f"streamed_{use_dora}")
    assert plan["mode"] == "stream" and plan["requested"] == "auto"
    assert 0 < len(plan["streamed"]) <= len(plan["block_sizes"])
    assert plan["estimated_peak"] <= plan["budget"] == int(budget * GIB)
    assert plan_of(comfy, f"resident_{use_dora}")["mode"] == "resident"
    _, metadata = read_lora(comfy, streamed)
    assert json.loads(metadata["lora_lab_settings"])["memory_plan"]["mode"] == "stream"
    assert no_loader_clone_left(loaded[0])


@pytest.mark.compat
def test_streamed_base_bytes_stay_in_the_budget_and_resident_is_refused_with_the_numbers(comfy, loaded, dataset):
    """The device ledger (counted where the copies are made and where their storage is freed) never
    holds more base weights than the plan allows; resident under the same budget is refused."""
    pack = comfy.pack
    bridge, run = pack.nodes.comfy, pack.training.run
    model, clip, vae = loaded
    budget = tight_budget_gb(model)
    base = dict(steps=2, batch_size=2, rank=4, alpha=4.0, precision="fp32", lora_name="ledger",
                vram_budget_gb=budget)
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0)
    with torch.inference_mode():
        access = bridge.model_access(model, clip, vae, bridge.check_compatible(model, clip, vae))
        with pytest.raises(ValueError, match=r"does not fit on cpu.*memory = resident.*GiB.*Set memory to auto"):
            run.trainer.train_lora(run.train_settings.TrainSettings(memory="resident", **base), access, dataset,
                                   learning_rates, schedule(comfy), bridge.loras_dir(), bridge.output_dir())
        result = run.trainer.train_lora(run.train_settings.TrainSettings(memory="stream", **base), access, dataset,
                                        learning_rates, schedule(comfy), bridge.loras_dir(), bridge.output_dir())
    plan = plan_of(comfy, "ledger")
    assert plan["streamed"] == list(range(len(plan["block_sizes"])))    # stream: every block
    assert plan["resident_bytes"] < result.device_peak <= plan["resident_bytes"] + plan["window_bytes"]
    assert result.device_peak <= plan["budget"] - plan["training"] - plan["reserve"]
    assert "blocks stream from host memory" in result.memory


def test_sdxl_streamed_trains_the_resident_lora(comfy, tiny_sdxl, dataset):
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0)
    common = dict(steps=2, save_precision="fp32", gradient_checkpointing=True)
    _, _, resident, _ = train(comfy, tiny_sdxl, dataset, learning_rates, schedule(comfy), memory="resident",
                              lora_name="sdxl_resident", **common)
    _, _, streamed, _ = train(comfy, tiny_sdxl, dataset, learning_rates, schedule(comfy), memory="stream",
                              lora_name="sdxl_streamed", **common)
    assert_same_tensors(comfy, resident, streamed)
    assert plan_of(comfy, "sdxl_streamed")["mode"] == "stream"


def test_flow_dit_on_an_fp8_base_streamed_trains_the_resident_lora(comfy, dataset):
    """SD3's MMDiT with its weights loaded as fp8 (cast per layer by ComfyUI), bf16 compute: the
    streamed copies are the fp8 tensors themselves, so the run is the resident one, bit for bit."""
    try:
        loaded_fp8 = load_sd3(comfy, torch.float8_e4m3fn)
        learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0)
        common = dict(steps=2, batch_size=1, precision="bf16", target="attention_ff", save_precision="fp32")
        _, _, resident, _ = train(comfy, loaded_fp8, dataset, learning_rates, schedule(comfy), memory="resident",
                                  lora_name="fp8_resident", **common)
        _, _, streamed, _ = train(comfy, loaded_fp8, dataset, learning_rates, schedule(comfy), memory="stream",
                                  lora_name="fp8_streamed", **common)
        assert_same_tensors(comfy, resident, streamed)
        plan = plan_of(comfy, "fp8_streamed")
        assert plan["mode"] == "stream" and plan["streamed"]
        _, _, lines = stock_lora_loader(comfy, loaded_fp8, streamed)
        assert no_unmatched(lines), lines
    finally:
        release_all_models()


@pytest.mark.compat
def test_cancel_mid_stream_restores_models_and_unloads_the_loader(comfy, loaded, dataset, probe):
    import comfy.model_management as model_management

    latent, context = probe
    model, clip, _ = loaded
    before_unet, before_clip = unet_outputs(model, latent, context), clip_outputs(clip)
    state = {name: tensor.clone() for name, tensor in model.model.diffusion_model.state_dict().items()}
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            train(comfy, loaded, InterruptingDataset(dataset, after=5), rates(comfy, learning_rate=1e-3),
                  schedule(comfy), steps=50, batch_size=2, memory="stream", lora_name="cancelled_stream")
    finally:
        model_management.interrupt_current_processing(False)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.model.diffusion_model.state_dict().items())
    assert torch.equal(unet_outputs(model, latent, context), before_unet)
    assert torch.equal(clip_outputs(clip), before_clip)
    assert no_loader_clone_left(model)
    _, _, lines = stock_lora_loader(comfy, loaded, "cancelled_stream_interrupted.safetensors")
    assert not [line for line in lines if "lora key not loaded" in line]
