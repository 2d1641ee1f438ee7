"""Streaming the frozen base weights of chosen blocks to the compute device, block by block.

A model larger than the card trains when most of its frozen weights stay in host memory: each
streamed block's weights are copied to the device just before the block runs (the next block's copy
already under way on a side CUDA stream), and put back to the host tensors as soon as it returns. The
LoRA parameters, their optimizer state and the activations stay on the device.

Backward never keeps a streamed weight: a streamed block always runs under activation checkpointing
with the streaming inside the checkpointed function, so the forward's copies are dropped when the
block returns and backward's recompute makes fresh ones, freed once that block's backward is done.

Why our own block swap rather than ComfyUI's partial loading (``ModelPatcher.load(lowvram_model_memory)``
with ``comfy_cast_weights``, and in 0.33 its pinned memory, prefetch and offload streams): that path
casts each weight per Linear/Conv inside ComfyUI's ops and differs between releases (0.3.75 has no
prefetch or pinned memory), and its lowvram modules apply LoRA patches per forward where we swap
tensors. Swapping whole blocks works the same on every ComfyUI and on any torch module (peft's layers
included, so DoRA reads the streamed weight like any other), moves a block in one burst of copies
that a side stream overlaps with the previous block's compute, and runs the very same code on a CPU,
where host and device are one memory and the copies are real copies (so the CPU tests cover it).

Prefetch order is learned, not assumed: the first step records which block follows which (forward,
and backward's recompute in reverse), every later step prefetches the recorded successor. That holds
for a UNet's nested call order, a DiT's block list, text encoder layers and previews alike.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import torch

logger = logging.getLogger("lora_lab")


def stored_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors that hold `tensor`'s data: itself, or for a tensor subclass that wraps others (a
    quantized weight, e.g. ComfyUI 0.33's QuantizedTensor: fp8 data and its scales) the inner tensors its
    ``__tensor_flatten__`` names (torch's protocol for such subclasses), whose dtype and size are what it
    really takes."""
    if type(tensor) in (torch.Tensor, torch.nn.Parameter) or not hasattr(tensor, "__tensor_flatten__"):
        return [tensor]
    names, _ = tensor.__tensor_flatten__()
    return [stored for name in names for stored in stored_tensors(getattr(tensor, name))]


def tensor_bytes(tensor: torch.Tensor) -> int:
    return sum(stored.numel() * stored.element_size() for stored in stored_tensors(tensor))


def frozen_tensors(module: torch.nn.Module, trained: frozenset[int] = frozenset()
                   ) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """(store, name, tensor) for every parameter and buffer under `module` but the trained ones (ids in
    `trained`: the LoRA parameters, which stay on the device): what streams."""
    for child in module.modules():
        for store in (child._parameters, child._buffers):
            for name, tensor in store.items():
                if tensor is not None and id(tensor) not in trained:
                    yield store, name, tensor


def frozen_bytes(module: torch.nn.Module, trained: frozenset[int] = frozenset()) -> int:
    return sum(tensor_bytes(tensor) for _, _, tensor in frozen_tensors(module, trained))


@dataclass
class DeviceLedger:
    """Bytes of frozen base weights on the compute device, counted by the code that puts them there:
    the resident ones, plus every streamed copy from the moment it is made until its storage is freed
    (autograd can hold a copy until its block's backward is done, so release is tracked on the storage,
    not on the streamer's own references)."""

    resident: int = 0
    streamed: int = 0
    peak: int = 0
    copies: int = 0

    def add(self, size: int) -> None:
        self.streamed += size
        self.copies += 1
        self.peak = max(self.peak, self.resident + self.streamed)

    def release(self, size: int) -> None:
        self.streamed -= size

    @property
    def current(self) -> int:
        return self.resident + self.streamed


@dataclass
class _Copies:
    tensors: list[torch.Tensor]
    ready: object = None        # a CUDA event the compute stream waits on; None on a CPU


@dataclass
class _Block:
    module: torch.nn.Module
    entries: list[tuple[dict, str, torch.Tensor]] = field(default_factory=list)   # host tensors


def _in_backward() -> bool:
    """True while autograd's engine runs (a checkpointed block's recompute)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class BlockStreamer:
    """Keeps the frozen weights of `blocks` in host memory and lends them to the device per call.

    Use: ``streamer.forward(block, fn)`` gives the block's forward (wrap it in checkpointing outside),
    then ``with streamer.active(lora_parameters):`` after the LoRA layers are in (it collects the blocks' frozen
    tensors, pins them where the host allows, and gives everything back on exit).
    """

    def __init__(self, blocks: Sequence[torch.nn.Module], device: torch.device, prefetch: int = 1,
                 ledger: DeviceLedger | None = None, pin: bool = True) -> None:
        self.device = torch.device(device)
        self.prefetch = max(0, prefetch)
        self.ledger = ledger if ledger is not None else DeviceLedger()
        self.pin = pin and self.device.type == "cuda"
        self.blocks = [_Block(module) for module in blocks]
        self._index = {id(block.module): index for index, block in enumerate(self.blocks)}
        self._pending: dict[int, _Copies] = {}
        self._successor: dict[tuple[int, bool], tuple[int, bool]] = {}
        self._last: tuple[int, bool] | None = None
        self._registered: list[int] = []     # host pointers pinned in place (cudaHostRegister)
        self._side = None
        self._active = False
        self.lends = 0              # block calls served
        self.prefetched = 0         # ... of which the copies were already made ahead of use

    # Set-up ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def active(self, trained: Iterable[torch.Tensor] = ()) -> Iterator["BlockStreamer"]:
        """Streaming on, for everything in the blocks but the `trained` tensors (the LoRA parameters)."""
        trained_ids = frozenset(id(tensor) for tensor in trained)
        for block in self.blocks:
            block.entries = list(frozen_tensors(block.module, trained_ids))
        if self.device.type == "cuda":
            self._side = torch.cuda.Stream(self.device)
        if self.pin:
            self._pin_hosts()
        self._active = True
        try:
            yield self
        finally:
            self._active = False
            self._pending.clear()
            if self._side is not None:
                torch.cuda.current_stream(self.device).wait_stream(self._side)
            self._unpin_hosts()
            for block in self.blocks:
                block.entries = []

    def _pin_hosts(self) -> None:
        """Page-lock the host tensors in place (what makes a host-to-device copy asynchronous), without
        a second copy in RAM; where the host refuses (limits, containers), copies stay synchronous."""
        cudart = torch.cuda.cudart()
        seen = set()
        for block in self.blocks:
            for stored in (stored for _, _, tensor in block.entries for stored in stored_tensors(tensor)):
                if stored.device.type != "cpu":
                    continue
                storage = stored.untyped_storage()
                pointer = storage.data_ptr()
                if pointer in seen or storage.nbytes() == 0:
                    continue
                seen.add(pointer)
                try:
                    status = cudart.cudaHostRegister(pointer, storage.nbytes(), 0)
                except Exception as error:   # no such call in this torch build
                    logger.info("LoRA Lab: streaming without pinned memory (%s)", error)
                    return
                if int(status) == 0:
                    self._registered.append(pointer)
        logger.info("LoRA Lab: streaming: %d host buffers pinned", len(self._registered))

    def _unpin_hosts(self) -> None:
        if not self._registered:
            return
        cudart = torch.cuda.cudart()
        for pointer in self._registered:
            cudart.cudaHostUnregister(pointer)
        self._registered.clear()

    # Per call ---------------------------------------------------------------------------------------
    def forward(self, module: torch.nn.Module, forward: Callable | None = None) -> Callable:
        """The block's forward with its frozen weights on the device for the duration of the call."""
        original = forward if forward is not None else functools.partial(type(module).forward, module)
        index = self._index[id(module)]

        def streamed(*args, **kwargs):
            if not self._active:
                return original(*args, **kwargs)
            with self._lent(index):
                return original(*args, **kwargs)

        return streamed

    @contextlib.contextmanager
    def _lent(self, index: int) -> Iterator[None]:
        block = self.blocks[index]
        key = (index, _in_backward())
        if self._last is not None:
            self._successor[self._last] = key
        self._last = key
        copies = self._pending.pop(index, None)
        self.lends += 1
        if copies is None:
            copies = self._copy(index)
        else:
            self.prefetched += 1
        if copies.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(copies.ready)
            for tensor in copies.tensors:   # the caching allocator must not reuse them while compute runs
                tensor.record_stream(stream)
        self._prefetch(key)
        try:
            for (store, name, host), tensor in zip(block.entries, copies.tensors):
                store[name] = torch.nn.Parameter(tensor, requires_grad=False) if isinstance(host, torch.nn.Parameter) \
                    else tensor
            yield
        finally:
            for store, name, host in block.entries:
                store[name] = host
            following = self._successor.get(key)
            if following is not None and following[0] == index and self._active:
                # The same block runs next (the last block's forward, then its recompute): keep its copies.
                self._pending[index] = _Copies(copies.tensors)
            del copies

    def _prefetch(self, key: tuple[int, bool]) -> None:
        """Start the copies of the blocks predicted to run next; drop prefetched copies no longer
        predicted (a changed call order wastes a copy, never correctness)."""
        wanted = []
        for _ in range(self.prefetch):
            key = self._successor.get(key)
            if key is None or key[0] in wanted:
                break
            wanted.append(key[0])
        for index in list(self._pending):
            if index not in wanted:
                del self._pending[index]
        for index in wanted:
            if index not in self._pending and index != self._last[0]:
                self._pending[index] = self._copy(index)

    def _copy(self, index: int) -> _Copies:
        """The block's host tensors copied onto the device (on the side stream where there is one)."""
        entries = self.blocks[index].entries
        context = torch.cuda.stream(self._side) if self._side is not None else contextlib.nullcontext()
        with context, torch.no_grad():
            tensors = [host.to(self.device, non_blocking=True, copy=True) for _, _, host in entries]
            ready = None
            if self._side is not None:
                ready = torch.cuda.Event()
                ready.record(self._side)
        for tensor in tensors:
            size = tensor_bytes(tensor)
            self.ledger.add(size)
            weakref.finalize(tensor.untyped_storage(), self.ledger.release, size)
        return _Copies(tensors, ready)
