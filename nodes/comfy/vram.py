"""Where the weights are while a run trains: dynamic VRAM's private resident copies, loading for a
resident or a streamed run, what the device has free, and giving the memory back."""
from __future__ import annotations

import contextlib
import gc
import logging

import torch

from ...training.run.memory import check_fits
from .quantize import linear_views

logger = logging.getLogger("lora_lab")


def is_dynamic(patcher) -> bool:
    """True for a model that ComfyUI streams to the GPU per forward (ModelPatcherDynamic: dynamic VRAM,
    the NVIDIA default since ComfyUI 0.3x of 2026-02). Older ComfyUI has no such patcher."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(callable(check) and check())


@contextlib.contextmanager
def training_models(model, clip, train_text: bool, memory: str = "auto"):
    """The MODEL and CLIP the training run injects into: (model, clip), given back in `finally`.

    A model loaded for dynamic VRAM cannot take peft layers: ``ModelPatcherDynamic.load`` re-creates
    every parameter of a module without ``comfy_cast_weights`` as a frozen ``nn.Parameter``, so
    lora_A/lora_B would be swapped for copies the optimizer never sees, and the base weights are not
    resident. So a dynamic MODEL (and a dynamic CLIP whose encoders train) is trained on a private,
    non-dynamic copy: ``clone(disable_dynamic=True)`` reloads the same checkpoint through the
    loader's ``cached_patcher_init`` (the user's patches, object patches and model options come
    along), the copy is loaded whole onto the GPU for the run, and afterwards it is unloaded through
    ComfyUI's model management and dropped, which gives its memory back after success, error and
    Cancel alike. The user's MODEL/CLIP are never touched and stay dynamic; the returned ones are
    theirs with the saved file applied, which dynamic VRAM streams like any LoRA.

    Any other model (ComfyUI before dynamic VRAM, --highvram, the CPU) is trained in place exactly as
    before: the same module, with every injection undone by the trainer. A frozen CLIP is only used to
    encode captions, which works on a dynamic one, so it is never copied.

    Chosen over ComfyUI's per-forward weight path (weight wrappers / bypass hooks, what its own
    trainer does): that path would replace peft's layers and our exact kohya export, and it gains
    only for models larger than the card, which SD1.x/SDXL never are on a card that can train them.
    """
    private = []
    for name, patcher in (("model", model), ("clip", clip.patcher if train_text else None)):
        if patcher is not None and is_dynamic(patcher) and getattr(patcher, "cached_patcher_init", None) is None:
            raise ValueError(f"Train LoRA: {name} is loaded for dynamic VRAM and ComfyUI cannot make a resident copy "
                             "of it to train (it was not loaded from a file by a stock loader node). Connect the "
                             f"{name.upper()} output of Load Checkpoint (or Load Diffusion Model / Load CLIP), or start "
                             "ComfyUI with --disable-dynamic-vram.")
    try:
        if is_dynamic(model):
            model = model.clone(disable_dynamic=True)
            private.append(model)
        if train_text and is_dynamic(clip.patcher):
            clip = clip.clone(disable_dynamic=True)
            # CLIP.clone keeps cond_stage_model pointing at the user's encoder: use the reloaded one.
            clip.cond_stage_model = clip.patcher.model
            private.append(clip.patcher)
        if private:
            logger.info("LoRA Lab: dynamic VRAM: training on a private resident copy of %s",
                        ", ".join(type(patcher.model).__name__ for patcher in private))
            if memory == "resident":   # otherwise the trainer's memory plan decides what stays and what streams
                check_private_copies_fit(private)
        # ComfyUI's quantized checkpoints: their Linear layers train as Linears (quantize.py).
        with linear_views(model.model.diffusion_model):
            yield model, clip
    finally:
        if private:
            release_models(private)
            del model, clip
            private.clear()
            gc.collect()
            release_models([])


def check_private_copies_fit(patchers: list) -> None:
    """Before loading the private copies: make room as ComfyUI would, then refuse clearly if they
    still cannot fit (sizes, free memory, what to change)."""
    import comfy.model_management

    device = patchers[0].load_device
    if torch.device(device).type == "cpu":
        return
    sizes = {type(patcher.model).__name__: patcher.model_size() for patcher in patchers}
    reserve = comfy.model_management.minimum_inference_memory()
    comfy.model_management.free_memory(sum(sizes.values()) + reserve, device)
    check_fits(sizes, reserve, comfy.model_management.get_free_memory(device), str(device))


@contextlib.contextmanager
def loaded_for_training(model, clip, stream: bool):
    """MODEL and CLIP loaded through ComfyUI's model management, patches applied, for the run.

    Resident: both fully onto the compute device (what sampling would do). Streaming: the model's
    weights into host memory instead, through a clone of the patcher whose load device is the offload
    device, so ComfyUI applies the user's patches there and knows where the weights are; the block
    streamer lends them to the GPU per block, and the clone is unloaded afterwards (unpatched,
    weights as before). The CLIP is loaded as for a resident run: a trained text encoder stays on the
    device, a frozen one only encodes the captions and is released before training."""
    import comfy.model_management

    if not stream:
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        yield
        return
    loader = model.clone()
    loader.load_device = model.offload_device
    try:
        comfy.model_management.load_models_gpu([loader, clip.patcher], force_full_load=True)
        yield
    finally:
        release_models([loader])


def device_memory(device, wanted: int) -> tuple[int, int]:
    """(free bytes on `device` once ComfyUI unloaded what it can toward `wanted`, ComfyUI's working
    reserve); (0, 0) on a CPU: no limit to plan for."""
    import comfy.model_management

    if torch.device(device).type == "cpu":
        return 0, 0
    reserve = comfy.model_management.minimum_inference_memory()
    comfy.model_management.free_memory(wanted + reserve, device)
    return comfy.model_management.get_free_memory(device), reserve


def release_models(patchers: list) -> None:
    """Unload these models from the compute device through ComfyUI's model management (so ComfyUI
    knows, and loads them again itself when they are used next)."""
    import comfy.model_management

    loaded = comfy.model_management.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        if any(loaded[index].model is patcher for patcher in patchers):
            if loaded[index].model_unload():
                loaded.pop(index)
    comfy.model_management.soft_empty_cache()


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's own "a trainer runs" switch, as its built-in trainer sets it: in 0.33 its DiTs then use
    plain torch ops where they would call fused comfy_kitchen kernels that have no backward (Flux's and
    Z-Image's RoPE). Older ComfyUI has no switch: nothing to do."""
    import comfy.model_management

    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous
