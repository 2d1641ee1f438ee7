"""Train LoRA on a model that ComfyUI loads for dynamic VRAM (ModelPatcherDynamic), as far as a CPU
can reach it.

Dynamic VRAM needs an NVIDIA card (comfy-aimdo), and on a CPU load device ComfyUI hands back a plain
ModelPatcher, so CI cannot load a truly dynamic model. These tests give the stock loader's MODEL and
CLIP a patcher class whose ``is_dynamic()`` is true, which sends Train LoRA down its dynamic-VRAM
route for real: ``clone(disable_dynamic=True)`` reloads the checkpoint through the loader's
``cached_patcher_init``, the copy is loaded whole, trained, then unloaded and dropped.

What they prove: the route runs on ComfyUI's own calls (0.33 and newer; 0.3.75 has no dynamic VRAM
and is skipped), the user's MODEL/CLIP keep their weights, modules and (fake) dynamic class, the
private copies leave ComfyUI's loaded-model list and are garbage-collected, and the returned MODEL/
CLIP equal LoraLoader on the saved file. What they do not prove: aimdo's streaming, real GPU memory
given back, or sampling with a truly dynamic patcher (an NVIDIA run of a real 0.33 server does; see
the README's "Supported ComfyUI").
"""
from __future__ import annotations

import gc
import inspect
import logging
import warnings

import pytest
import torch

from .test_train import (clip_outputs, dataset, loaded, probe, checkpoint, rates, read_lora, schedule,  # noqa: F401
                         stock_lora_loader, train, unet_outputs)


def _supports_dynamic_vram() -> bool:
    import comfy.model_patcher
    return "disable_dynamic" in inspect.signature(comfy.model_patcher.ModelPatcher.clone).parameters


@pytest.fixture(scope="module")
def dynamic_vram(comfy):
    if not _supports_dynamic_vram():
        pytest.skip("this ComfyUI has no dynamic VRAM (ModelPatcher.clone has no disable_dynamic): nothing to test")


def as_dynamic(patcher):
    """The same patcher, reporting itself as dynamic (what ModelPatcherDynamic does on a GPU)."""
    patcher.__class__ = type("DynamicOnCPU", (type(patcher),), {"is_dynamic": lambda self: True})
    return patcher


@pytest.fixture()
def dynamic_loaded(comfy, loaded, dynamic_vram):
    model, clip, vae = loaded
    dynamic_model = as_dynamic(model.clone())
    dynamic_clip = clip.clone()
    dynamic_clip.patcher = as_dynamic(dynamic_clip.patcher)
    assert dynamic_model.cached_patcher_init is not None, "the stock loader sets cached_patcher_init"
    return dynamic_model, dynamic_clip, vae


def module_state(module: torch.nn.Module) -> dict:
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def same_bits(first: torch.Tensor, second: torch.Tensor) -> bool:
    """Bit-identical (NaN-safe: weights a checkpoint does not hold, like SD1's CLIP text_projection,
    stay uninitialised memory in ComfyUI, where NaN != NaN would fail torch.equal)."""
    return first.shape == second.shape and first.dtype == second.dtype and torch.equal(
        first.contiguous().reshape(-1).view(torch.uint8), second.contiguous().reshape(-1).view(torch.uint8))


def live_ids(kind) -> set[int]:
    gc.collect()
    with warnings.catch_warnings():   # isinstance on some of torch's deprecated objects warns
        warnings.simplefilter("ignore")
        return {id(item) for item in gc.get_objects() if isinstance(item, kind)}


def test_dynamic_model_and_clip_train_on_private_copies(comfy, dynamic_loaded, dataset, probe, caplog):
    from comfy import model_base, model_management

    model, clip, vae = dynamic_loaded
    unet_before = module_state(model.model)
    clip_before = module_state(clip.cond_stage_model)
    modules_before = [type(item).__name__ for item in model.model.modules()]
    base_models_before = live_ids(model_base.BaseModel)
    latent, context = probe
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        trained_model, trained_clip, name, _ = train(
            comfy, (model, clip, vae), dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-3),
            schedule(comfy), steps=2, lora_name="dynamic_lora", model=model, clip=clip)
    copies = [record.getMessage() for record in caplog.records if "private resident copy" in record.getMessage()]
    assert len(copies) == 1 and "BaseModel" in copies[0] and "ClipModel" in copies[0], \
        f"a dynamic MODEL and a training dynamic CLIP must each be trained on a private copy: {copies}"

    # The user's objects: same weights, same module tree, still dynamic.
    assert model.is_dynamic() and clip.patcher.is_dynamic()
    assert [type(item).__name__ for item in model.model.modules()] == modules_before
    for name_, tensor in module_state(model.model).items():
        assert same_bits(tensor, unet_before[name_]), name_
    for name_, tensor in module_state(clip.cond_stage_model).items():
        assert same_bits(tensor, clip_before[name_]), name_

    # The file trained both parts and the returned MODEL/CLIP are LoraLoader on it.
    tensors, _ = read_lora(comfy, name)
    assert any(key.startswith("lora_te_") for key in tensors) and any(key.startswith("lora_unet_") for key in tensors)
    assert max(float(tensor.abs().max()) for key, tensor in tensors.items() if key.endswith("lora_up.weight")) > 0
    stock_model, stock_clip, log_lines = stock_lora_loader(comfy, (model, clip, vae), name)
    assert not [line for line in log_lines if "lora key not loaded" in line]
    assert torch.allclose(unet_outputs(trained_model, latent, context), unet_outputs(stock_model, latent, context),
                          atol=1e-5)
    assert torch.allclose(clip_outputs(trained_clip), clip_outputs(stock_clip), atol=1e-5)

    # The private copies were unloaded and dropped once the node returned: ComfyUI holds no model it
    # did not hold before, and no new diffusion model object survives (the returned MODEL shares the
    # user's module).
    assert live_ids(model_base.BaseModel) <= base_models_before
    loaded_now = {id(entry.model.model) for entry in model_management.current_loaded_models
                  if isinstance(entry.model.model, model_base.BaseModel)}
    assert loaded_now <= base_models_before


def test_frozen_text_encoder_is_not_copied(comfy, dynamic_loaded, dataset, caplog):
    """A frozen CLIP only encodes captions, which a dynamic CLIP does itself: only the UNet is copied."""
    model, clip, vae = dynamic_loaded
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        train(comfy, (model, clip, vae), dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
              schedule(comfy), steps=1, lora_name="dynamic_unet_only", model=model, clip=clip)
    copies = [record.getMessage() for record in caplog.records if "private resident copy" in record.getMessage()]
    assert len(copies) == 1 and "Clip" not in copies[0].split("copy of", 1)[1], copies


def test_model_without_reload_recipe_gets_a_clear_error(comfy, dynamic_loaded, dataset):
    """A dynamic model that ComfyUI cannot reload (no cached_patcher_init, e.g. built by another node)
    gets an error naming the way out before anything trains, and the model is untouched."""
    model, clip, vae = dynamic_loaded
    model.cached_patcher_init = None
    before = module_state(model.model)
    with pytest.raises(Exception, match="dynamic VRAM.*--disable-dynamic-vram"):
        train(comfy, (model, clip, vae), dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
              schedule(comfy), steps=1, lora_name="dynamic_no_recipe", model=model, clip=clip)
    assert all(same_bits(tensor, before[key]) for key, tensor in module_state(model.model).items())


@pytest.mark.parametrize("stop", ["cancel", "error"])
def test_private_copies_are_given_back_after_cancel_and_error(comfy, dynamic_loaded, dataset, stop):
    """Cancel mid-run, or a run that fails mid-way (a dataset that breaks after a few batches): the
    private copies are gone afterwards and the user's MODEL/CLIP keep their weights."""
    from comfy import model_base, model_management

    from .test_train import InterruptingDataset

    model, clip, vae = dynamic_loaded
    unet_before = module_state(model.model)
    base_models_before = live_ids(model_base.BaseModel)
    expected = model_management.InterruptProcessingException if stop == "cancel" else RuntimeError
    broken = InterruptingDataset(dataset, after=3) if stop == "cancel" else FailingDataset(dataset, after=3)
    try:
        with pytest.raises(expected):
            train(comfy, (model, clip, vae), broken, rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-3),
                  schedule(comfy), steps=20, lora_name=f"dynamic_{stop}", model=model, clip=clip)
    finally:
        model_management.interrupt_current_processing(False)
    assert model.is_dynamic() and clip.patcher.is_dynamic()
    assert all(same_bits(tensor, unet_before[key]) for key, tensor in module_state(model.model).items())
    assert live_ids(model_base.BaseModel) <= base_models_before


class FailingDataset:
    """The dataset, raising a RuntimeError once `after` captions were drawn (a failure mid-run)."""

    def __init__(self, dataset, after: int) -> None:
        self._dataset = dataset
        self._left = after

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def caption_for_step(self, index, rng):
        self._left -= 1
        if self._left < 0:
            raise RuntimeError("disk went away")
        return self._dataset.caption_for_step(index, rng)


def test_dynamic_model_streams_its_private_copy_when_asked(comfy, dynamic_loaded, dataset, caplog):
    """Under dynamic VRAM, memory = stream trains on the private copy loaded into host memory and lent
    block by block (what replaces a resident copy that cannot fit on the card): the same LoRA as the
    resident private copy trains, bit for bit; the user's MODEL keeps its weights and class, and the
    copies are given back."""
    from comfy import model_base

    from .test_resume import assert_same_tensors
    from .test_streaming import plan_of

    model, clip, vae = dynamic_loaded
    unet_before = module_state(model.model)
    base_models_before = live_ids(model_base.BaseModel)
    common = dict(steps=2, save_precision="fp32", training_seed=3, model=model, clip=clip)
    learning_rates = rates(comfy, learning_rate=1e-3)
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        _, _, resident, _ = train(comfy, (model, clip, vae), dataset, learning_rates, schedule(comfy),
                                  memory="resident", lora_name="dynamic_resident", **common)
        _, _, streamed, _ = train(comfy, (model, clip, vae), dataset, learning_rates, schedule(comfy),
                                  memory="stream", lora_name="dynamic_streamed", **common)
    copies = [record.getMessage() for record in caplog.records if "private resident copy" in record.getMessage()]
    assert len(copies) == 2, copies
    assert plan_of(comfy, "dynamic_streamed")["mode"] == "stream" and plan_of(comfy, "dynamic_resident")["mode"] == "resident"
    assert_same_tensors(comfy, resident, streamed)
    assert model.is_dynamic()
    for name_, tensor in module_state(model.model).items():
        assert same_bits(tensor, unet_before[name_]), name_
    # The private copies and the clone that loaded them into host memory are gone: no diffusion model
    # object survives that did not exist before, and ComfyUI holds none of them loaded.
    from comfy import model_management

    assert live_ids(model_base.BaseModel) <= base_models_before
    assert {id(entry.model.model) for entry in model_management.current_loaded_models
            if isinstance(entry.model.model, model_base.BaseModel)} <= base_models_before
