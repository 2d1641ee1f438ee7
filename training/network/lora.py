"""peft LoRA layers injected into plain torch modules (ComfyUI's own UNet / CLIP text model),
trained in place, extracted as A/B matrices, and removed again so the module tree is exactly as before.
LyCORIS LoKr / LoHa (`network`) go in the same way as peft's LoKr / LoHa layers (training/network/lycoris.py).

Why not a PeftModel: ``ModelPatcher.clone()`` shares the torch module with every clone and with
ComfyUI's cache, and a PeftModel wrapper would change module paths. peft's
``inject_adapter_in_model`` swaps each target layer for a ``lora.Linear``/``lora.Conv2d`` whose
``base_layer`` is the original module object; :class:`InjectedLora.remove` puts those original
objects back, restores ``requires_grad`` flags and deletes anything peft added to the root.
"""
from __future__ import annotations

import contextlib
import functools
import logging
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from . import lycoris

logger = logging.getLogger("lora_lab")

ADAPTER_NAME = "default"



@dataclass
class LoraModule:
    """One injected layer: where it is, its peft layer, and what to export."""

    part: str                   # "unet" | "text_encoder" | "text_encoder_2"
    path: str                   # module path inside the part's root module
    layer: torch.nn.Module      # the peft LoRA (LoKr, LoHa) layer now sitting at `path`
    network: str = "lora"       # "lora" | "lokr" | "loha"

    @property
    def down(self) -> torch.nn.Parameter | None:   # A (LoRA only)
        return self.layer.lora_A[ADAPTER_NAME].weight if self.network == "lora" else None

    @property
    def up(self) -> torch.nn.Parameter | None:     # B (LoRA only)
        return self.layer.lora_B[ADAPTER_NAME].weight if self.network == "lora" else None

    @property
    def magnitude(self) -> torch.nn.Parameter | None:
        vectors = getattr(self.layer, "lora_magnitude_vector", None)
        if vectors is None or ADAPTER_NAME not in vectors:
            return None
        return vectors[ADAPTER_NAME].weight

    @property
    def factors(self) -> dict[str, torch.nn.Parameter]:
        """LoKr / LoHa: the trainable tensors by their file names (lokr_w1, hada_w1_a, ...); {} for LoRA."""
        return lycoris.factors(self.layer, self.network, ADAPTER_NAME) if lycoris.is_lycoris(self.network) else {}

    def tensors(self) -> dict[str, torch.nn.Parameter]:
        """Every trainable tensor by name: down / up (/ magnitude) for LoRA, the factors for LoKr / LoHa."""
        if self.network != "lora":
            return self.factors
        named = {"down": self.down, "up": self.up, "magnitude": self.magnitude}
        return {name: tensor for name, tensor in named.items() if tensor is not None}


@dataclass
class InjectedLora:
    """LoRA layers living in one root module; `remove()` restores the root exactly."""

    part: str
    root: torch.nn.Module
    modules: list[LoraModule]
    _originals: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)
    _requires_grad: dict[int, bool] = field(default_factory=dict)
    _root_attributes: set[str] = field(default_factory=set)
    _removed: bool = False

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        for module in self.modules:
            yield from module.tensors().values()

    def remove(self) -> None:
        """Put every original layer back and undo peft's side effects (idempotent)."""
        if self._removed:
            return
        for parent, name, original in self._originals:
            setattr(parent, name, original)
        for parameter in self.root.parameters():
            wanted = self._requires_grad.get(id(parameter))
            if wanted is not None and parameter.requires_grad != wanted:
                # A streamed block keeps the loader's inference tensors: only inference mode may flag them.
                with torch.inference_mode(parameter.is_inference()):
                    parameter.requires_grad_(wanted)
        for attribute in set(vars(self.root)) - self._root_attributes:
            delattr(self.root, attribute)
        self._removed = True


def _parent_of(root: torch.nn.Module, path: str) -> tuple[torch.nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (root.get_submodule(parent_path) if parent_path else root), name


def inject_lora(root: torch.nn.Module, part: str, paths: list[str], rank: int, alpha: float,
                use_dora: bool = False, init_seed: int = 0, network: str = "lora", lokr_factor: int = -1,
                lokr_decompose_both: bool = False) -> InjectedLora:
    """Inject peft LoRA layers at `paths` of `root` (in place). LoRA weights (A, B and the DoRA
    magnitude) are fp32.

    A is kaiming-uniform, B is zero (peft's default, as in the LoRA paper), drawn from `init_seed`
    without touching the global RNG.

    network "lokr" / "loha": peft's LoKr / LoHa layers instead (rank and alpha are the network's own:
    LoHa's loha_rank / loha_alpha), initialised and scaled as LyCORIS does (training/network/lycoris.py).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not paths:
        raise ValueError(f"no layers to train were found in the {part}")
    lycoris.check_network(network, use_dora)
    originals = []
    for path in paths:
        parent, name = _parent_of(root, path)
        originals.append((parent, name, getattr(parent, name)))
    requires_grad = {id(parameter): parameter.requires_grad for parameter in root.parameters()}
    root_attributes = set(vars(root))
    injected = InjectedLora(part=part, root=root, modules=[], _originals=originals,
                            _requires_grad=requires_grad, _root_attributes=root_attributes)
    if lycoris.is_lycoris(network):
        config = lycoris.peft_config(network, paths, rank, alpha, lokr_factor, lokr_decompose_both)
    else:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(paths), lora_dropout=0.0,
                            use_dora=use_dora, init_lora_weights=True, bias="none")
    try:
        with torch.random.fork_rng(devices=[]), _float8_bases_read_as_float32(), lycoris.lycoris_shapes(network):
            torch.manual_seed(init_seed)
            inject_adapter_in_model(config, root, adapter_name=ADAPTER_NAME)
            for path in paths:
                layer = root.get_submodule(path)
                module = LoraModule(part=part, path=path, layer=layer, network=network)
                if not (hasattr(layer, "lora_A") if network == "lora" else module.factors):
                    raise RuntimeError(f"peft did not inject a {network} layer at {part}.{path}")
                injected.modules.append(module)
            # Every trainable tensor lives in fp32, whatever the base dtype: peft makes them in the base
            # layer's dtype. An fp16 DoRA magnitude breaks AdamW (its eps of 1e-8 and the squared
            # gradients underflow to 0 in fp16: 0/0 = NaN after the first update, at any rate) and the fp16
            # GradScaler ("Attempting to unscale FP16 gradients"); in bf16 typical updates (~1e-4) are
            # below its resolution near the magnitude's values (~0.004 at 0.5), so it never moves.
            for parameter in injected.parameters():
                parameter.data = parameter.data.float()
                parameter.requires_grad_(True)
            if lycoris.is_lycoris(network):   # LyCORIS's initial values, drawn in fp32 (from the same seed)
                for module in injected.modules:
                    lycoris.prepare_layer(module.layer, network, ADAPTER_NAME)
    except BaseException:
        injected.remove()
        raise
    return injected


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _is_float8(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point and torch.finfo(dtype).bits == 8


def readable_weight(weight: torch.Tensor) -> torch.Tensor:
    """A base weight's values as a plain fp32 tensor: fp8 upcast, a quantized tensor subclass (e.g.
    ComfyUI 0.33's QuantizedTensor) through its ``dequantize()``."""
    weight = weight.detach()
    if type(weight) not in _PLAIN and callable(getattr(weight, "dequantize", None)):
        weight = weight.dequantize()
    return weight.float()


@contextlib.contextmanager
def _float8_bases_read_as_float32() -> Iterator[None]:
    """While peft injects over fp8 base weights (loaded so, or base_weights): the LoRA layers are made
    in fp32, not in the base weight's dtype (peft's rule, which would round A's initial values to fp8's 3
    mantissa bits), and DoRA's initial magnitude (the base weight's row norms) is computed from the fp8
    weight upcast to fp32, one layer at a time (torch has no fp8 arithmetic on the CPU, nor mixed fp8
    promotion). peft reads the weight through ``dequantize_module_weight``, its hook for quantized layers,
    and casts it to the input's dtype itself in forward."""
    from peft.tuners.lora import dora
    from peft.tuners.tuners_utils import BaseTunerLayer

    dequantize_original = dora.dequantize_module_weight
    device_and_dtype = BaseTunerLayer._get_base_layer_device_and_dtype

    def dequantize(module: torch.nn.Module) -> torch.Tensor:
        weight = dequantize_original(module)
        return readable_weight(weight) if _is_float8(weight.dtype) or type(weight) not in _PLAIN else weight

    def adapter_device_and_dtype(self, base_layer):
        device, dtype = device_and_dtype(self, base_layer)
        return device, (torch.float32 if dtype is not None and _is_float8(dtype) else dtype)

    dora.dequantize_module_weight = dequantize
    BaseTunerLayer._get_base_layer_device_and_dtype = adapter_device_and_dtype
    try:
        yield
    finally:
        dora.dequantize_module_weight = dequantize_original
        BaseTunerLayer._get_base_layer_device_and_dtype = device_and_dtype


def _normal_view(tensor: torch.Tensor) -> torch.Tensor:
    """A normal (not inference-mode) tensor on `tensor`'s memory; a clone for a tensor subclass (a quantized
    weight), whose storage is not its data."""
    if type(tensor) not in _PLAIN:
        return tensor.detach().clone()
    view = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    view.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return view


@contextlib.contextmanager
def trainable_copies(*roots: torch.nn.Module, offload_device: torch.device | None = None,
                     device: torch.device | None = None, streamed: frozenset[int] = frozenset()) -> Iterator[None]:
    """Swap inference-mode parameters/buffers for normal tensors while training; restore the originals.

    Tensors created under ``torch.inference_mode()`` (everything ComfyUI's loaders produce) cannot
    be saved for backward. A tensor that stays on its device gets a normal tensor over the same memory
    (nothing copied: the run never writes to frozen weights, and the tests check the user's model bit for
    bit afterwards); one that moves, or whose original goes to the offload device, gets a copy. They are
    frozen (requires_grad False); the original objects are put back in ``finally``, so the user's model
    keeps its exact tensors.

    offload_device: where the originals wait meanwhile (ComfyUI's offload device, the CPU), so a GPU
    holds one copy of the frozen weights, not two; their storage returns to its device on restore,
    same tensor objects.

    device / streamed (streaming runs, whose weights were loaded into host memory): every tensor of
    the modules not in `streamed` (ids) is copied onto `device`, where it stays resident; the modules
    in `streamed` keep their host tensors, which the block streamer lends to the device per call.
    """
    swapped: list[tuple[dict, str, torch.Tensor, torch.device]] = []
    try:
        with torch.inference_mode(False):
            for root in roots:
                for module in root.modules():
                    if id(module) in streamed:
                        continue
                    for store in (module._parameters, module._buffers):
                        for name, tensor in list(store.items()):
                            moving = tensor is not None and device is not None and tensor.device != device
                            if tensor is None or not (tensor.is_inference() or moving):
                                continue
                            if moving:
                                copy = tensor.detach().to(device, copy=True)
                            elif offload_device is None or tensor.device == offload_device:
                                copy = _normal_view(tensor)   # stays where it is: no second copy
                            else:
                                copy = tensor.detach().clone()
                            if isinstance(tensor, torch.nn.Parameter):
                                copy = torch.nn.Parameter(copy, requires_grad=False)
                            swapped.append((store, name, tensor, tensor.device))
                            store[name] = copy
                            if offload_device is not None and tensor.device != offload_device:
                                with torch.inference_mode():
                                    tensor.data = tensor.data.to(offload_device)
        yield
    finally:
        for store, name, original, home in reversed(swapped):
            if original.device != home:
                with torch.inference_mode():
                    original.data = original.data.to(home)
            store[name] = original


@contextlib.contextmanager
def patched_forwards(patches: list[tuple[torch.nn.Module, Callable]]) -> Iterator[None]:
    """Give modules an instance-level forward for the duration (restored by deleting it)."""
    applied = []
    try:
        for module, forward in patches:
            had_instance_forward = "forward" in vars(module)
            previous = vars(module).get("forward")
            module.forward = forward
            applied.append((module, had_instance_forward, previous))
        yield
    finally:
        for module, had_instance_forward, previous in reversed(applied):
            if had_instance_forward:
                module.forward = previous
            else:
                del module.forward


def out_of_place_clip_layer_forward(layer: torch.nn.Module) -> Callable:
    """ComfyUI's CLIPLayer.forward adds in place (``x += ...``), which breaks backward once LoRA
    layers sit inside it; this is the same computation, out of place."""

    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))

    return forward


class _OutOfPlace(torch.Tensor):
    """A tensor whose augmented assignments (``x += y``) make a new tensor instead of writing in place.
    Every tensor computed from it is one too (torch's default __torch_function__ keeps the subclass)."""

    def __iadd__(self, other):
        return torch.add(self, other)

    def __isub__(self, other):
        return torch.sub(self, other)

    def __imul__(self, other):
        return torch.mul(self, other)


def _retag(value, kind):
    if isinstance(value, torch.Tensor):
        return value.as_subclass(kind)
    if isinstance(value, tuple):
        return tuple(_retag(item, kind) for item in value)
    if isinstance(value, list):
        return [_retag(item, kind) for item in value]
    return value


def out_of_place_forward(module: torch.nn.Module, forward: Callable | None = None) -> Callable:
    """The module's forward with ``x += y`` on its activations made out of place.

    ComfyUI's DiT blocks update their streams in place (Flux: ``img += gate * attn``, then a LayerNorm of
    that img, then ``img += gate * mlp``), which autograd refuses once a LoRA needs those activations
    for backward. Rather than re-implement each block (their code differs between ComfyUI releases),
    the block's tensor arguments are tagged so that its augmented assignments allocate; the results
    are plain tensors again. The same computation, with one more activation kept per update."""
    original = forward if forward is not None else functools.partial(type(module).forward, module)

    def run(*args, **kwargs):
        args = _retag(args, _OutOfPlace)
        kwargs = {key: _retag(value, _OutOfPlace) for key, value in kwargs.items()}
        return _retag(original(*args, **kwargs), torch.Tensor)

    return run


def checkpointed_forward(module: torch.nn.Module, forward: Callable | None = None) -> Callable:
    """The module's forward (or `forward`, a replacement for it) under activation checkpointing
    (recomputed in backward)."""
    original = forward if forward is not None else functools.partial(type(module).forward, module)

    def checkpointed(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(original, *args, use_reentrant=False, **kwargs)

    return checkpointed


def lora_weights(module: LoraModule, dtype: torch.dtype, dora_norm: str = "updated") -> dict[str, torch.Tensor]:
    """{"down": A, "up": B[, "magnitude": dora_scale]} detached, on CPU, in `dtype`. A LoKr / LoHa layer:
    its factors by file name plus "alpha" (fp32), as lycoris.file_tensors writes them.

    DoRA: peft trains W' = m * (W + dW) / |W + dW| per output row. A loader that divides by the
    updated norm (`dora_norm` "updated": the DoRA paper, peft, LyCORIS, diffusers) needs m itself.
    ComfyUI's loader (weight_decompose, output-axis case, up to at least 0.33) divides by the norm
    of the *original* W ("original"): there m * |W| / |W + dW| gives the trained weights exactly,
    for the base weights the LoRA was trained on. No single dora_scale serves both rules (README,
    "The file and other tools").
    """
    if dora_norm not in ("original", "updated"):
        raise ValueError(f"dora_norm must be 'original' or 'updated', not {dora_norm!r}")
    if lycoris.is_lycoris(module.network):
        return lycoris.file_tensors(module.layer, module.network, ADAPTER_NAME, dtype)
    down = module.down.detach().float()
    up = module.up.detach().float()
    weights = {"down": down.to("cpu", dtype).contiguous(), "up": up.to("cpu", dtype).contiguous()}
    if module.magnitude is not None:
        scale = module.magnitude.detach().float().reshape(-1)
        if dora_norm == "original":
            base = readable_weight(module.layer.get_base_layer().weight)
            scaling = module.layer.scaling[ADAPTER_NAME]
            delta = (up.flatten(1) @ down.flatten(1)).reshape(base.shape) * scaling
            scale = scale * base.flatten(1).norm(dim=1) / (base + delta).flatten(1).norm(dim=1)
        weights["magnitude"] = scale.to("cpu", dtype).contiguous()
    return weights
