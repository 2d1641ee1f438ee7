"""ComfyUI's side of quantized base weights: which layers of the diffusion model can hold an fp8 weight
for a run (base_weights, training/run/base_weights.py), the switch that makes them cast it per forward,
and the Linear view of ComfyUI 0.33's quantized checkpoints.

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


# ComfyUI 0.33's quantized checkpoints (comfy/quant_ops.py: scaled fp8, mxfp8, nvfp4, int8 ...) load through
# comfy.ops.mixed_precision_ops, whose Linear is a torch.nn.Module holding a QuantizedTensor weight, not a
# torch.nn.Linear: no LoRA target matched it and peft would not wrap it. For the run each such layer is
# presented as a Linear: its class becomes a subclass of its own class and torch.nn.Linear (same object,
# same state, its own forward first in the method order, so ComfyUI still dequantizes or runs its quantized
# kernels per forward), and gets its class back afterwards.
_LINEAR_VIEWS: dict[type, type] = {}


def _linear_view_of(kind: type) -> type:
    view = _LINEAR_VIEWS.get(kind)
    if view is None:
        view = type(f"{kind.__name__}AsLinear", (kind, torch.nn.Linear), {"__module__": kind.__module__})
        _LINEAR_VIEWS[kind] = view
    return view


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A ComfyUI op with a Linear's shape that is not a torch.nn.Linear (mixed_precision_ops' Linear)."""
    return (not isinstance(module, torch.nn.Linear) and hasattr(module, "comfy_cast_weights")
            and hasattr(module, "in_features") and hasattr(module, "out_features")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2)


def check_castable(path: str, weight: torch.Tensor) -> None:
    """Before any heavy work: a quantized weight must survive what ComfyUI's per-forward cast does to it
    in a training step (outside inference mode: clone, cast to the compute dtype, dequantize). ComfyUI
    0.3.75's QuantizedTensor fails this when the model's compute dtype is fp32 (its cast keeps no target
    dtype, so its fp8 dequantize multiplies in fp8); 0.33 passes. Probed on one layer's weight."""
    with torch.inference_mode(False), torch.no_grad():
        try:
            copy = weight.detach().clone().to(dtype=torch.float32)
            if callable(getattr(copy, "dequantize", None)) and type(copy) not in (torch.Tensor, torch.nn.Parameter):
                copy.dequantize()
        except (RuntimeError, NotImplementedError, TypeError) as error:
            raise ValueError(
                f"Train LoRA: model is a quantized checkpoint ({type(weight).__name__} weights, e.g. "
                f"diffusion_model.{path}) that this ComfyUI cannot cast to full precision in a training step "
                f"({type(error).__name__}: {error}). Update ComfyUI (0.33 trains these), or load an unquantized "
                "(bf16/fp16) or plain fp8 file of the model (base_weights can then round it to fp8).") from error


@contextlib.contextmanager
def linear_views(diffusion_model: torch.nn.Module) -> Iterator[int]:
    """For the duration: the quantized-checkpoint Linear layers of `diffusion_model` are torch.nn.Linear
    instances (see above). Yields how many."""
    changed = []
    probed = False
    try:
        for name, module in diffusion_model.named_modules():
            if is_quantized_linear(module):
                changed.append((module, type(module)))
                module.__class__ = _linear_view_of(type(module))
                if not probed and type(module.weight) not in (torch.Tensor, torch.nn.Parameter):
                    check_castable(name, module.weight)
                    probed = True
        yield len(changed)
    finally:
        for module, kind in reversed(changed):
            module.__class__ = kind

