"""Device memory: whether a model fits before anything loads, giving memory back after an
out-of-memory error, and what to tell the user when a run ran out."""
from __future__ import annotations

import ctypes
import gc
import sys
from pathlib import Path

import torch

from .train_settings import TrainSettings

GIB = 1024 ** 3


def check_fits(model_bytes: dict[str, int], reserve_bytes: int, free_bytes: int, device: str) -> None:
    """Refuse, before anything loads, a model whose weights cannot be made resident on the device.

    model_bytes: weights to load per model (name -> bytes); reserve_bytes: what must stay free for
    activations (ComfyUI's minimum inference memory); free_bytes: free memory after ComfyUI unloaded
    what it could.
    """
    needed = sum(model_bytes.values()) + reserve_bytes
    if needed <= free_bytes:
        return
    parts = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in model_bytes.items())
    raise ValueError(f"Train LoRA: the model does not fit on {device} for training: it needs {needed / GIB:.2f} GiB "
                     f"({parts}, plus {reserve_bytes / GIB:.2f} GiB working memory) but only {free_bytes / GIB:.2f} GiB "
                     "is free after ComfyUI unloaded the other models. Set the text-encoder rates to 0 (a frozen "
                     "text encoder is not loaded for training), close other programs that use the GPU, or load the "
                     "checkpoint with a smaller weight dtype (fp16).")


def give_back_host_memory() -> None:
    """After a run: collect garbage and hand the allocator's freed pages back to the system (glibc keeps
    freed memory in its heap, so the process kept ~8 GB more than it used after training SD3's CLIP-G
    on a CPU: measured with VmRSS before and after malloc_trim). Nothing to do elsewhere."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):   # not glibc (musl): its allocator returns memory itself
            pass


def release_device_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back to the driver (after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory_message(settings: TrainSettings, dataset, step: int, saved_name: str,
                          checkpoint_dir: Path | None) -> str:
    """What ran out, what to lower (with the current values), and what was kept."""
    checkpointing = ("gradient_checkpointing is already on" if settings.gradient_checkpointing
                     else "turn gradient_checkpointing on")
    kept = (f" What was trained so far was saved as {saved_name}." if saved_name
            else " No step had finished, so nothing was saved.")
    if checkpoint_dir is not None:
        kept += (f" To continue from the last checkpoint, set resume_from to {checkpoint_dir} (gradient_checkpointing "
                 "may change on resume).")
    return (f"Train LoRA: the GPU ran out of memory at step {step}. Lower batch_size (now {settings.batch_size}; "
            f"raise gradient_accumulation to keep the effective batch), lower the LoRA Dataset resolution (now "
            f"{dataset.options.resolution}), {checkpointing}, or lower rank (now {settings.rank}); closing other programs "
            f"that use the GPU also helps.{kept}")
