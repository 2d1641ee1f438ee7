"""The only package of the pack that imports ComfyUI (comfy.*, folder_paths, server).

It adapts ComfyUI's objects (ModelPatcher, model_sampling, CLIP, VAE, ProgressBar, interrupt, folder
paths, LoRA loading) to the plain torch modules and callables that training/ works with, one concern
per module: detect (which family, do the parts belong together), access (ModelAccess), conditioning
(the family's extra model inputs), vram (dynamic VRAM copies, loading, freeing), feedback (progress,
previews, events, Cancel) and files (folders, applying the saved file). ComfyUI is imported inside
the functions: the pack always runs inside ComfyUI, and this keeps the modules importable by tools
that only inspect the pack. The names below are what the nodes use.
"""
from .access import model_access
from .detect import check_compatible, model_family
from .feedback import check_cancel, is_cancel, progress_reporter, prompt_server, sample_previewer, send_event
from .files import (apply_lora_file, device_type, dora_norm_of_loader, input_dir, loras_dir,
                    lora_names, lora_path, output_dir, run_loaders)
from .vram import is_dynamic, release_models, training_models

__all__ = ["apply_lora_file", "check_cancel", "check_compatible", "device_type", "dora_norm_of_loader", "input_dir",
           "is_cancel", "is_dynamic", "lora_names", "lora_path", "loras_dir", "model_access", "model_family", "output_dir", "progress_reporter",
           "prompt_server", "release_models", "run_loaders", "sample_previewer", "send_event", "training_models"]
