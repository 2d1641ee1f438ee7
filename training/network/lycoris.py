"""LyCORIS LoKr and LoHa, trained with peft's layers and saved in LyCORIS's own key layout.

peft's ``LoKrConfig`` / ``LoHaConfig`` layers go into ComfyUI's modules exactly as the LoRA layers do
(training/network/lora.py: same injection, same removal). This module holds what differs from LoRA:

* initialisation as LyCORIS does it (``lycoris/modules/lokr.py``, ``loha.py``), not peft's;
* the scale: alpha / rank, except a LoKr layer whose two factors are both full matrices, which LyCORIS
  trains and ComfyUI applies unscaled (ComfyUI's LoKr adapter takes alpha / dim only where a factor is
  decomposed, dim being that factor's rank; its LoHa adapter takes alpha / rank of ``hada_w1_b``);
* the forward of a LoKr Linear layer: ``kron(w1, w2) @ x`` computed as ``w1 @ X @ w2ᵀ`` on the input
  folded to (in_m, in_n), so the full-size weight delta is never built (LyCORIS's bypass forward); a
  convolution, and LoHa, build the delta and apply it, as peft does;
* the file's tensors: ``lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``,
  ``hada_w1_a``/``hada_w1_b``/``hada_w2_a``/``hada_w2_b``, and ``alpha``, the names ComfyUI's
  weight adapters (comfy/weight_adapter/lokr.py, loha.py) and LyCORIS read;
* the ss_* metadata LyCORIS runs carry (``ss_network_module = lycoris.kohya`` and its network args).

Not supported, refused with the input to change: DoRA (use_dora; peft trains it for LoRA only) and
LoRA+ (lora_plus_ratio; there is no B matrix); a fused layer split into row slices in the file (SD3's
diffusers names), where a slice of a Kronecker or Hadamard product is not one (SD3 files of these
networks use kohya names instead).
"""
from __future__ import annotations

import contextlib
import functools
import math
import weakref
from typing import Any, Iterator

import torch

LYCORIS_NETWORKS = ("lokr", "loha")
# The trainable tensors of each network, in peft's (and LyCORIS's and the file's) names.
FACTOR_NAMES = {
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
NETWORK_LABELS = {"lokr": "LoKr", "loha": "LoHa"}


def is_lycoris(network: str) -> bool:
    return network in LYCORIS_NETWORKS


def check_network(network: str, use_dora: bool = False, lora_plus_ratio: float = 1.0) -> None:
    """Raise ValueError (naming both inputs and the fix) for a combination a LyCORIS network cannot train."""
    if network not in ("lora", *LYCORIS_NETWORKS):
        raise ValueError(f"Train LoRA: network = {network!r} is unknown. Pick lora, lokr or loha.")
    if not is_lycoris(network):
        return
    label = NETWORK_LABELS[network]
    if use_dora:
        raise ValueError(f"Train LoRA: use_dora = True with network = {network!r}: DoRA's magnitude is trained for "
                         f"LoRA only here ({label} has no DoRA in peft, which trains it). Turn use_dora off, or set "
                         "network to lora.")
    if lora_plus_ratio != 1.0:
        raise ValueError(f"Train LoRA: lora_plus_ratio = {lora_plus_ratio:g} (UNet/TE Learning Rates) with network = "
                         f"{network!r}: LoRA+ speeds up LoRA's B (lora_up) matrices, and {label} has no such matrix. "
                         "Set lora_plus_ratio to 1, or network to lora.")


def rank_and_alpha(settings) -> tuple[int, float]:
    """The rank and alpha a network trains with: LoRA and LoKr use rank/alpha, LoHa loha_rank/loha_alpha."""
    if getattr(settings, "network", "lora") == "loha":
        return settings.loha_rank, settings.loha_alpha
    return settings.rank, settings.alpha


def peft_config(network: str, paths: list[str], rank: int, alpha: float, factor: int = -1,
                decompose_both: bool = False):
    """peft's config for `network` on exactly `paths`: no dropout, no Tucker decomposition of convolutions
    (ComfyUI and LyCORIS read the plain layout; LyCORIS's use_tucker is off by default too)."""
    common = dict(r=rank, alpha=alpha, target_modules=list(paths), rank_dropout=0.0, module_dropout=0.0,
                  use_effective_conv2d=False, init_weights=True)
    if network == "lokr":
        from peft import LoKrConfig
        return LoKrConfig(decompose_both=decompose_both, decompose_factor=factor, **common)
    if network == "loha":
        from peft import LoHaConfig
        return LoHaConfig(**common)
    raise ValueError(f"not a LyCORIS network: {network!r}")


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """LyCORIS's split of a layer dimension into (m, n), m <= n, m * n = dimension
    (lycoris/functional/general.py): m = `factor` when it divides the dimension, else the divisor pair
    nearest the square root with m <= factor; -1 = nearest the square root. peft's copy (an older
    LyCORIS) does not order the pair when `factor` exceeds the square root, which makes other shapes."""
    if factor > 0 and dimension % factor == 0:
        m, n = factor, dimension // factor
        return (n, m) if m > n else (m, n)
    if factor < 0:
        factor = dimension
    m, n = 1, dimension
    length = m + n
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > length or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@contextlib.contextmanager
def lycoris_shapes(network: str) -> Iterator[None]:
    """While peft injects LoKr layers: LyCORIS's factorization (peft's LoKr layer looks it up by name)."""
    if network != "lokr":
        yield
        return
    from peft.tuners.lokr import layer as lokr_layer

    original = lokr_layer.factorization
    lokr_layer.factorization = factorization
    try:
        yield
    finally:
        lokr_layer.factorization = original


def factors(layer: torch.nn.Module, network: str, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The layer's trainable tensors by their file name (only those this layer has)."""
    found = {}
    for name in FACTOR_NAMES[network]:
        store = getattr(layer, name, None)
        if store is not None and adapter in store:
            found[name] = store[adapter]
    return found


def prepare_layer(layer: torch.nn.Module, network: str, adapter: str) -> None:
    """After injection (tensors already fp32): LyCORIS's initialisation, its scale rule, and the LoKr
    Linear forward that never builds the full delta. Draws from the global RNG (the caller seeds it)."""
    tensors = factors(layer, network, adapter)
    if not tensors:
        raise RuntimeError(f"peft did not inject a {NETWORK_LABELS[network]} layer")
    with torch.no_grad():
        if network == "lokr":
            # LyCORIS: the small factor kaiming-uniform, the large one zero (its B half where decomposed).
            for name in ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a"):
                if name in tensors:
                    torch.nn.init.kaiming_uniform_(tensors[name], a=math.sqrt(5))
            for name in ("lokr_w2", "lokr_w2_b"):
                if name in tensors:
                    torch.nn.init.zeros_(tensors[name])
            if "lokr_w1" in tensors and "lokr_w2" in tensors:
                layer.scaling[adapter] = 1.0   # both full: LyCORIS and ComfyUI apply no alpha
        else:
            # LyCORIS: w1 = N(0, 0.1) x N(0, 1), w2 = 0 x N(0, 1).
            torch.nn.init.normal_(tensors["hada_w1_a"], std=0.1)
            torch.nn.init.normal_(tensors["hada_w1_b"], std=1.0)
            torch.nn.init.zeros_(tensors["hada_w2_a"])
            torch.nn.init.normal_(tensors["hada_w2_b"], std=1.0)
    # (a weak reference: the layer holding its own forward would keep it, and its factors, alive in a cycle)
    layer.forward = functools.partial(_forward, weakref.ref(layer), network, adapter)


def _forward(reference: weakref.ref, network: str, adapter: str, x: torch.Tensor, *args: Any, **kwargs: Any):
    """peft's LyCORIS forward (base output + the adapter's), without its per-call module-dropout draw
    (``torch.rand(1) > 0`` skips the adapter when the draw is exactly 0) and with the LoKr Linear shortcut."""
    layer = reference()
    result = layer.base_layer(x, *args, **kwargs)
    if network == "lokr" and isinstance(layer.get_base_layer(), torch.nn.Linear):
        delta = kron_linear(x, factors(layer, network, adapter), layer.scaling[adapter])
    else:
        delta = layer._get_delta_activations(adapter, x, *args, **kwargs)
    return (result + delta).to(x.dtype)


def kron_linear(x: torch.Tensor, tensors: dict[str, torch.Tensor], scale: float) -> torch.Tensor:
    """x @ (scale * kron(w1, w2))ᵀ without building the kron: with w1 (a, c) and w2 (b, d), the input's last
    axis (c * d) folded to (c, d) gives y = w1 @ X @ w2ᵀ, unfolded to a * b."""
    w1 = tensors["lokr_w1"] if "lokr_w1" in tensors else tensors["lokr_w1_a"] @ tensors["lokr_w1_b"]
    x = x.to(w1.dtype)
    folded = x.reshape(*x.shape[:-1], w1.shape[1], -1)                     # (..., c, d)
    if "lokr_w2" in tensors:
        inner = folded @ tensors["lokr_w2"].t()                            # (..., c, b)
    else:
        inner = (folded @ tensors["lokr_w2_b"].t()) @ tensors["lokr_w2_a"].t()
    out = torch.matmul(w1, inner)                                         # (..., a, b)
    out = out.reshape(*x.shape[:-1], -1)
    return out * scale if scale != 1.0 else out


def delta_weight(layer: torch.nn.Module, adapter: str) -> torch.Tensor:
    """The layer's weight delta as trained (scale included), in the base weight's shape, fp32."""
    return layer.get_delta_weight(adapter).float()


def file_tensors(layer: torch.nn.Module, network: str, adapter: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The layer's tensors as the file holds them: each factor as trained (detached, CPU, `dtype`) and
    ``alpha`` = scale x rank, so that alpha / rank (ComfyUI: the decomposed factor's rank, LoHa's
    hada_w1_b rows) is the trained scale; a LoKr layer with both factors full gets alpha = rank (LyCORIS
    writes its lora_dim there; ComfyUI applies no alpha to it)."""
    tensors = {name: tensor.detach().float().to("cpu", dtype).contiguous()
               for name, tensor in factors(layer, network, adapter).items()}
    tensors["alpha"] = torch.tensor(float(layer.scaling[adapter]) * layer.r[adapter], dtype=torch.float32)
    return tensors


def is_lycoris_entry(weights: dict[str, torch.Tensor]) -> bool:
    return any(name in weights for names in FACTOR_NAMES.values() for name in names)


def network_fields(settings, conv_trained: bool) -> dict[str, Any]:
    """ss_network_module / _dim / _alpha / _args of a LoKr or LoHa file, as sd-scripts records a run with
    ``--network_module lycoris.kohya --network_args algo=...`` (each arg a string): LoKr's factor and
    decompose_both; conv_dim / conv_alpha when convolutions trained (LyCORIS's own inputs for them)."""
    network = settings.network
    rank, alpha = rank_and_alpha(settings)
    args = {"algo": network}
    if network == "lokr":
        args.update({"factor": str(settings.lokr_factor), "decompose_both": str(bool(settings.lokr_decompose_both))})
    if conv_trained:
        args.update({"conv_dim": str(rank), "conv_alpha": str(alpha)})
    return {"ss_network_module": "lycoris.kohya", "ss_network_dim": rank, "ss_network_alpha": alpha,
            "ss_network_args": args}
