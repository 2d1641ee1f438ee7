"""Backward without the forward's weight casts: a frozen layer's cast weight is made again in backward
instead of being kept.

A frozen base layer whose weight is stored in another dtype than the run computes in (a CLIP loaded in
fp16 trained in fp32 or bf16, an fp8 base, a ComfyUI manual_cast model) casts it in every forward
(ComfyUI's ``cast_bias_weight``), and its matmul hands autograd that copy: the input's gradient needs it.
Kept from forward to backward, those copies add up to the whole trained part in the compute dtype
(measured: SD3's fp16 CLIP-G and CLIP-L trained in fp32 with gradient checkpointing off grew the process
by ~11 GB over a step), and an fp8 base keeps a bf16 copy of every layer: its saving gone. Gradient
checkpointing avoids it for the blocks it covers; this covers the rest, and runs with it off.

How: while a frozen Linear/Conv runs, a saved tensor that is a view of its weight cast (the values of
``weight.to(dtype, device)``, as is, transposed as ``linear`` saves it, or expanded over a batch as
``matmul`` does) is stored by autograd as a recipe (the layer, the dtype, the device, the view), and
unpacked by casting again. The first copy of each layer, dtype and view is compared with the recast,
value for value; a layer whose forward makes
something else (ComfyUI's per-forward LoRA patches under partial loading, a quantized format that
dequantizes with scales) keeps its copies as before. So backward computes with the very same values,
and the cost is one more cast per layer per backward (memory traffic, no matmul).

Streamed blocks are not covered here: they run under checkpointing with the streaming inside
(training/run/streaming.py), so autograd never keeps their copies.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

LAYER_KINDS = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)


@dataclass(frozen=True)
class Recast:
    """What autograd keeps instead of a view of a cast weight: the layer, the cast, and the view."""

    layer: torch.nn.Module
    dtype: torch.dtype
    device: torch.device
    view: tuple[tuple[int, ...], tuple[int, ...], int]     # size, stride, storage offset

    def unpack(self) -> torch.Tensor:
        return cast_weight(self.layer, self.dtype, self.device).as_strided(*self.view)


def cast_weight(layer: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    with torch.no_grad():
        return layer.weight.to(device=device, dtype=dtype)


class WeightRecaster:
    """Forward hooks that tell which frozen layer is running, and the saved-tensor hooks that replace a view
    of its cast weight (the weight itself, ``weight.t()`` as linear saves it, its batch expansion as
    matmul saves it) by a Recast."""

    def __init__(self) -> None:
        self.running: list[torch.nn.Module] = []
        self.verified: dict[tuple, bool] = {}   # (layer id, dtype, device, view): the recast gives its values
        self.recast = 0          # copies autograd did not keep

    def enter(self, layer, _inputs) -> None:
        self.running.append(layer)

    def leave(self, layer, _inputs, _output) -> None:
        if self.running and self.running[-1] is layer:
            self.running.pop()

    def pack(self, tensor: torch.Tensor):
        if (not self.running or type(tensor) is not torch.Tensor or tensor.requires_grad
                or not tensor.is_floating_point()):
            return tensor    # a cast copy is a plain tensor (a subclass, e.g. a quantized weight, is kept as is)
        layer = self.running[-1]
        weight = layer.weight
        if tensor.dtype == weight.dtype and tensor.device == weight.device:
            return tensor    # the stored weight itself (or a view of it): nothing was copied
        if tensor.untyped_storage().nbytes() != weight.numel() * tensor.element_size():
            return tensor    # not held by a weight-sized buffer
        view = (tuple(tensor.shape), tuple(tensor.stride()), tensor.storage_offset())
        key = (id(layer), tensor.dtype, tensor.device, view)
        same = self.verified.get(key)
        if same is None:
            recast = cast_weight(layer, tensor.dtype, tensor.device)
            same = self.verified[key] = recast.is_contiguous() and torch.equal(recast.as_strided(*view), tensor)
        if not same:
            return tensor
        self.recast += 1
        return Recast(layer, tensor.dtype, tensor.device, view)

    @staticmethod
    def unpack(saved):
        return saved.unpack() if isinstance(saved, Recast) else saved


def frozen_layers(roots: Iterable[torch.nn.Module], skip: frozenset[int] = frozenset()) -> list[torch.nn.Module]:
    """The Linear/Conv layers under `roots` with a frozen tensor weight (module ids in `skip` left out)."""
    return [module for root in roots for module in root.modules()
            if isinstance(module, LAYER_KINDS) and id(module) not in skip
            and isinstance(getattr(module, "weight", None), torch.Tensor) and not module.weight.requires_grad]


@contextlib.contextmanager
def recast_saved_weights(layers: list[torch.nn.Module]) -> Iterator[WeightRecaster]:
    """For the duration, backward casts `layers`' weights again rather than autograd keeping the forward's
    copies (hooks removed afterwards)."""
    recaster = WeightRecaster()
    handles = []
    try:
        for layer in layers:
            handles.append(layer.register_forward_pre_hook(recaster.enter))
            handles.append(layer.register_forward_hook(recaster.leave, always_call=True))
        with torch.autograd.graph.saved_tensors_hooks(recaster.pack, recaster.unpack):
            yield recaster
    finally:
        for handle in handles:
            handle.remove()
