"""ComfyUI's side of base_weights (training/run/base_weights.py): which layers of the diffusion model
can hold an fp8 weight for the run, and the switch that makes them cast it per forward.

ComfyUI's ops (comfy.ops disable_weight_init / manual_cast, in 0.3.75 and 0.33) run a layer through
``forward_comfy_cast_weights`` when its ``comfy_cast_weights`` is true: ``cast_bias_weight`` casts the
weight to the input's dtype and device for that call, which is exactly how a model loaded with an fp8
``weight_dtype`` runs. A model loaded in its compute dtype has the flag off (plain torch forward), so
the run turns it on for the quantized layers, per instance, and puts each layer's previous state back.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

# The layer kinds the base weights are quantized in: where the bytes are, and what ComfyUI's ops cast.
QUANTIZED_KINDS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
_MISSING = object()


def quantizable_layers(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The diffusion model's Linear and Conv layers that are ComfyUI ops (they can cast per forward)."""
    return [module for module in diffusion_model.modules()
            if isinstance(module, QUANTIZED_KINDS) and hasattr(module, "comfy_cast_weights")]


@contextlib.contextmanager
def cast_per_forward(layers: list[torch.nn.Module]) -> Iterator[None]:
    """ComfyUI's per-forward weight cast on for `layers` for the duration (each layer's own setting back
    afterwards: the class default, or what ComfyUI's partial loading set on the instance)."""
    previous = []
    try:
        for layer in layers:
            previous.append((layer, vars(layer).get("comfy_cast_weights", _MISSING)))
            layer.comfy_cast_weights = True
        yield
    finally:
        for layer, value in reversed(previous):
            if value is _MISSING:
                del layer.comfy_cast_weights
            else:
                layer.comfy_cast_weights = value
