"""The memory plan of a run, computed before anything loads: which frozen weights stay on the
compute device, which blocks stream from host memory, and the estimated peak.

``memory`` (Train LoRA and LR Finder):
- ``auto``: everything resident when it fits the budget with headroom; otherwise the fewest blocks
  streamed (largest first) that make it fit;
- ``resident``: everything on the device (refused, with the numbers, when it cannot fit);
- ``stream``: every block streamed, only the rest resident (the least device memory), on any device.

The budget is ``vram_budget_gb`` (0 = what is free on the device after ComfyUI unloaded what it
could). The estimate counts the resident base weights, the streamed weights on the device at once
(the block running and the one prefetched), the
training state (the network's trained tensors and their gradients in fp32, counted for the run's
network, and the optimizer's state at its own bytes per value) and the host's working reserve for
activations.
"""
from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from ..lr.optimizers import OPTIMIZERS
from ..network.lycoris import rank_and_alpha
from ..network.targets import text_target_paths, unet_target_paths
from .base_weights import BASE_WEIGHTS, bytes_saved
from .streaming import frozen_bytes

MEMORY_MODES = ("auto", "resident", "stream")
GIB = 1024 ** 3
HEADROOM = 0.10            # auto stays resident only with 10 % of the budget to spare


def gib(size: int) -> str:
    return f"{size / GIB:.2f} GiB"


@dataclass(frozen=True)
class MemoryPlan:
    """What stays, what streams, and the estimated peak on the compute device (bytes)."""

    requested: str                  # the memory option: auto | resident | stream
    mode: str                       # what the run does: resident | stream
    device: str
    budget: int                     # 0 = no limit known (a CPU run with no vram_budget_gb)
    fixed: int                      # frozen weights outside the streamable blocks (always resident)
    block_sizes: tuple[int, ...]    # frozen weights per streamable block, in the model's order
    streamed: tuple[int, ...]       # indices of the blocks that stream
    training: int                   # LoRA weights + gradients + optimizer state
    reserve: int                    # activations and working memory
    prefetch: int = 1
    base_weights: str = "as_loaded"  # the base_weights option: sizes above count the quantized bytes

    @property
    def host_loaded(self) -> bool:
        """The weights load into host memory first: to stream, or to be quantized there (the device then
        only ever holds the quantized copies)."""
        return self.mode == "stream" or self.base_weights != "as_loaded"

    @property
    def streamed_bytes(self) -> int:
        return sum(self.block_sizes[index] for index in self.streamed)

    @property
    def resident_bytes(self) -> int:
        """Base weights that live on the device for the whole run."""
        return self.fixed + sum(self.block_sizes) - self.streamed_bytes

    @property
    def window_bytes(self) -> int:
        """Streamed weights on the device at once: the running block and the prefetched ones (a block's
        backward ends before the recompute of the one before it starts: the ledger measures it in the
        tests)."""
        if not self.streamed:
            return 0
        return (self.prefetch + 1) * max(self.block_sizes[index] for index in self.streamed)

    @property
    def base_budget(self) -> int:
        """What the base weights may take on the device (the budget less training state and reserve);
        0 = no limit."""
        return max(1, self.budget - self.training - self.reserve) if self.budget else 0

    @property
    def estimated_peak(self) -> int:
        return self.resident_bytes + self.window_bytes + self.training + self.reserve

    def summary(self) -> str:
        blocks = len(self.block_sizes)
        budget = gib(self.budget) if self.budget else "no limit"
        if self.mode == "resident":
            what = f"all {blocks} blocks resident ({gib(self.resident_bytes)} of base weights)"
        else:
            what = (f"{len(self.streamed)} of {blocks} blocks stream from host memory ({gib(self.streamed_bytes)}), "
                    f"{gib(self.resident_bytes)} of base weights resident, {gib(self.window_bytes)} streamed at once")
        if self.base_weights != "as_loaded":
            what += f", Linear/Conv weights as {self.base_weights}"
        return (f"memory {self.requested} -> {self.mode} on {self.device}: {what}; LoRA training state "
                f"{gib(self.training)}, working reserve {gib(self.reserve)}; estimated peak "
                f"{gib(self.estimated_peak)} (budget {budget})")

    def as_dict(self) -> dict:
        values = asdict(self)
        values.update(streamed_bytes=self.streamed_bytes, resident_bytes=self.resident_bytes,
                      window_bytes=self.window_bytes, estimated_peak=self.estimated_peak)
        return values

    def as_record(self) -> dict:
        """The plan in words and numbers: the `memory` field of the first step's line in log.jsonl."""
        return {"summary": self.summary(), **self.as_dict()}


def plan_memory(requested: str, device: str, budget: int, fixed: int, block_sizes: list[int], training: int,
                reserve: int, prefetch: int = 1, base_weights: str = "as_loaded") -> MemoryPlan:
    """The plan for `requested` under `budget` bytes (0 = no limit); ValueError with the numbers when
    even streaming every block cannot fit."""
    if requested not in MEMORY_MODES:
        raise ValueError(f"Train LoRA: memory = {requested!r} is not one of {', '.join(MEMORY_MODES)}.")
    sizes = tuple(int(size) for size in block_sizes)

    def make(streamed) -> MemoryPlan:
        mode = "stream" if streamed else "resident"
        return MemoryPlan(requested=requested, mode=mode, device=device, budget=budget, fixed=fixed,
                          block_sizes=sizes, streamed=tuple(sorted(streamed)), training=training,
                          reserve=reserve, prefetch=prefetch, base_weights=base_weights)

    resident = make(())
    everything = make(range(len(sizes)))
    if requested == "stream":
        plan = everything
    elif requested == "resident" or not budget or resident.estimated_peak <= budget * (1 - HEADROOM):
        plan = resident
    else:   # auto: the fewest blocks, largest first, that bring the estimate under the budget
        plan = everything
        order = sorted(range(len(sizes)), key=lambda index: (-sizes[index], index))
        for count in range(1, len(order) + 1):
            candidate = make(order[:count])
            if candidate.estimated_peak <= budget:
                plan = candidate
                break
    if budget and plan.estimated_peak > budget:
        raise ValueError(does_not_fit(plan))
    return plan


def does_not_fit(plan: MemoryPlan) -> str:
    """The refusal: the numbers, and what to change."""
    numbers = (f"it needs about {gib(plan.estimated_peak)} ({gib(plan.resident_bytes)} of base weights resident, "
               f"{gib(plan.window_bytes)} streamed at once, {gib(plan.training)} LoRA training state, "
               f"{gib(plan.reserve)} working reserve) but the budget is {gib(plan.budget)}")
    if plan.mode == "resident" and plan.requested == "resident":
        fix = ("Set memory to auto (streams as many blocks as needed) or stream, or set base_weights to fp8_e4m3fn "
               "(or load the model with an fp8 weight dtype).")
    else:
        fix = ("Even with every block streamed it does not fit: set base_weights to fp8_e4m3fn (or load the model "
               "with an fp8 weight dtype), "
               "lower rank, set the text-encoder rates to 0, raise vram_budget_gb (0 = all that is free) or close "
               "other programs that use the GPU.")
    return f"Train LoRA: the model does not fit on {plan.device} for training (memory = {plan.requested}): {numbers}. {fix}"


def training_state_bytes(modules: list[torch.nn.Module], settings) -> int:
    """The trained tensors of the run's network on these layers (fp32), their gradients (fp32) and the
    run's optimizer state (OptimizerSpec.state_bytes per trained value)."""
    network = (settings.network, *rank_and_alpha(settings), settings.use_dora, settings.lokr_factor,
               settings.lokr_decompose_both)
    parameters = sum(adapter_parameters(layer_shape(module), network) for module in modules)
    return int(parameters * (4 + 4 + OPTIMIZERS[settings.optimizer].state_bytes))


def layer_shape(module: torch.nn.Module) -> tuple:
    """(kind, out, in, kernel, groups) of a Linear/Conv layer, from its weight (a quantized weight gives its
    logical shape)."""
    shape = tuple(module.weight.shape)
    kind = "linear" if isinstance(module, torch.nn.Linear) else next(
        conv.__name__ for conv in (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d) if isinstance(module, conv))
    return kind, shape[0], shape[1], shape[2:], getattr(module, "groups", 1)


@functools.lru_cache(maxsize=512)
def adapter_parameters(shape: tuple, network: tuple) -> int:
    """Trainable values the network (name, rank, alpha, dora, lokr_factor, lokr_decompose_both) gives one layer of
    `shape`: counted on a layer of that shape on the meta device with the very adapter the run injects
    (nothing is allocated), so LoKr's factorization and LoHa's two pairs count as they train."""
    from ..network.lora import inject_lora

    kind, out_features, in_features, kernel, groups = shape
    name, rank, alpha, dora, factor, decompose_both = network
    root = torch.nn.Module()
    if kind == "linear":
        root.layer = torch.nn.Linear(in_features, out_features, bias=False, device="meta")
    else:
        root.layer = getattr(torch.nn, kind)(in_features * groups, out_features, kernel, groups=groups, bias=False,
                                             device="meta")
    injected = inject_lora(root, "unet", ["layer"], rank, alpha, dora, network=name, lokr_factor=factor,
                           lokr_decompose_both=decompose_both)
    try:
        return sum(parameter.numel() for parameter in injected.parameters())
    finally:
        injected.remove()


def plan_for_run(settings, access, trained_text: list[str]) -> MemoryPlan:
    """The plan for this run, from the module tree alone (sizes and shapes: nothing is loaded yet)."""
    dtype = BASE_WEIGHTS[settings.base_weights]
    quantized = frozenset(id(layer) for layer in access.quantizable_layers()) \
        if dtype is not None and access.quantizable_layers is not None else frozenset()
    blocks = list(access.unet_blocks)
    block_sizes = [frozen_bytes(block) - bytes_saved(block, quantized, dtype) for block in blocks]
    roots = [access.unet] + [access.text_encoders[part] for part in trained_text]
    fixed = sum(frozen_bytes(root) - bytes_saved(root, quantized, dtype) for root in roots) - sum(block_sizes)
    targets = [access.unet.get_submodule(path)
               for path in unet_target_paths(access.unet, settings.target, access.entry)]
    for part in trained_text:
        encoder = access.text_encoders[part]
        targets += [encoder.get_submodule(path) for path in text_target_paths(encoder, settings.target)]
    training = training_state_bytes(targets, settings)
    free, reserve = (access.device_memory(fixed + sum(block_sizes) + training)
                     if access.device_memory is not None else (0, 0))
    budget = int(settings.vram_budget_gb * GIB) if settings.vram_budget_gb > 0 else free
    return plan_memory(settings.memory, str(access.device), budget, fixed, block_sizes, training, reserve,
                       base_weights=settings.base_weights)
