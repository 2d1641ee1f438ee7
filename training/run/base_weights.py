"""The frozen base weights in a smaller dtype for the run (Train LoRA's and LR Finder's
``base_weights``): a bf16/fp16/fp32 diffusion model trains over fp8 copies of its Linear and Conv
weights, which the host casts to the compute dtype per layer (ComfyUI's ops do this for a model loaded
with an fp8 ``weight_dtype``). Half the bytes of bf16 on the device (a quarter of fp32), so the memory
plan keeps more blocks resident and ``auto`` streams less. ComfyUI-agnostic: the host says which layers
can cast their weight per forward and switches that on (ModelAccess.quantizable_layers / cast_per_forward).

The user's tensors are never changed: each quantized layer gets a new fp8 Parameter for the run and
its original Parameter object back afterwards (success, error and Cancel alike). The LoRA layers are
injected over the quantized layers and stay in fp32 (training/network/lora.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch

from .streaming import stored_tensors

BASE_WEIGHTS: dict[str, torch.dtype | None] = {
    "as_loaded": None,                      # the weights as the loader made them (today's behaviour)
    "fp8_e4m3fn": torch.float8_e4m3fn,      # 3 mantissa bits, range +-448: what fp8 checkpoints use
    "fp8_e5m2": torch.float8_e5m2,          # 2 mantissa bits, range +-57344
}


def is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits == 8


def plain_weight(layer: torch.nn.Module) -> torch.Tensor | None:
    """The layer's weight when it is a plain tensor (not a quantized tensor subclass), else None."""
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(weight) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return weight


def will_quantize(layer: torch.nn.Module, dtype: torch.dtype) -> bool:
    """True when `layer`'s weight is a plain floating tensor wider than `dtype` (fp8 weights as loaded,
    and quantized tensor subclasses, stay as they are)."""
    weight = plain_weight(layer)
    return (weight is not None and weight.dtype.is_floating_point
            and weight.element_size() > torch.finfo(dtype).bits // 8)


def bytes_saved(module: torch.nn.Module, layer_ids: frozenset[int], dtype: torch.dtype | None) -> int:
    """Bytes `module`'s frozen weights lose when the layers in `layer_ids` (ids) are stored in `dtype`."""
    if dtype is None:
        return 0
    saved = 0
    for child in module.modules():
        if id(child) in layer_ids and will_quantize(child, dtype):
            weight = child.weight
            saved += weight.numel() * (weight.element_size() - torch.finfo(dtype).bits // 8)
    return saved


def to_float8(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`weight` rounded to the fp8 `dtype`, saturated at its largest finite value (a plain cast turns
    values beyond e4m3fn's +-448 into NaN)."""
    limit = torch.finfo(dtype).max
    with torch.no_grad():
        return weight.detach().clamp(-limit, limit).to(dtype)


@contextlib.contextmanager
def quantized_weights(layers: Iterable[torch.nn.Module], dtype: torch.dtype) -> Iterator[int]:
    """For the duration: each layer's weight replaced by a frozen `dtype` copy on the same device (the
    original Parameter put back on exit). Yields the number of layers quantized."""
    swapped: list[tuple[torch.nn.Module, torch.Tensor]] = []
    try:
        with torch.inference_mode(False):
            for layer in layers:
                if not will_quantize(layer, dtype):
                    continue
                original = layer._parameters["weight"]
                swapped.append((layer, original))
                layer._parameters["weight"] = torch.nn.Parameter(to_float8(original, dtype), requires_grad=False)
        yield len(swapped)
    finally:
        for layer, original in reversed(swapped):
            layer._parameters["weight"] = original


def float8_layers(layers: Iterable[torch.nn.Module]) -> list[torch.nn.Module]:
    """The layers whose weight is stored in fp8: as loaded, quantized for the run, or the data of a
    quantized tensor subclass (a scaled fp8 checkpoint's weight reports its full-precision dtype)."""
    return [layer for layer in layers if isinstance(getattr(layer, "weight", None), torch.Tensor)
            and is_float8(max(stored_tensors(layer.weight), key=torch.Tensor.numel).dtype)]


def check_base_weights(settings, access, node: str = "Train LoRA") -> None:
    """Before anything loads: the base_weights option is possible on this host, and DoRA can read every
    base weight it trains over (it needs their row norms). ValueError naming input, value and fix."""
    from ..network.targets import unet_target_paths

    dtype = BASE_WEIGHTS[settings.base_weights]
    if dtype is not None and (access.quantizable_layers is None or access.cast_per_forward is None):
        raise ValueError(f"{node}: base_weights = {settings.base_weights!r} needs a host that casts weights per "
                         "layer (ComfyUI's ops); this one cannot. Set base_weights to as_loaded, or load the model "
                         "with an fp8 weight_dtype (Load Diffusion Model).")
    if not settings.use_dora:
        return
    quantizable = frozenset(id(layer) for layer in access.quantizable_layers()) \
        if dtype is not None and access.quantizable_layers is not None else frozenset()
    for path in unet_target_paths(access.unet, settings.target, access.entry):
        layer = access.unet.get_submodule(path)
        weight = getattr(layer, "weight", None)
        if weight is not None and plain_weight(layer) is None and not callable(getattr(weight, "dequantize", None)):
            raise ValueError(f"{node}: use_dora = True, but the model's weights are stored as "
                             f"{type(weight).__name__} (e.g. {path}), a format with no way to read its values "
                             "(no dequantize()), and DoRA needs them for its norms. Set use_dora to False (plain LoRA "
                             "trains on this model), or load an unquantized (bf16/fp16) or fp8 file of the model.")
        fp8 = weight is not None and (is_float8(weight.dtype) or (id(layer) in quantizable and will_quantize(layer, dtype)))
        if fp8 and weight.dim() > 2:
            where = ("as loaded" if is_float8(weight.dtype)
                     else f"with base_weights = {settings.base_weights!r}")
            raise ValueError(f"{node}: use_dora = True with target = {settings.target!r} puts DoRA on convolutions "
                             f"(e.g. {path}) whose weights are fp8 {where}; DoRA on a convolution needs its weight in "
                             "the compute dtype. Set base_weights to as_loaded (and load the model in bf16/fp16), "
                             "choose a target without convolutions (attention or attention_ff), or set use_dora to "
                             "False.")
