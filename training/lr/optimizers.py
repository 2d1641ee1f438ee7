"""Parameter groups and optimizers (ComfyUI-agnostic): one group per part (and LoRA+ half, UNet
block and DoRA magnitude), each with its own base rate, and the optimizers Train LoRA offers."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import torch

@dataclass(frozen=True)
class TrainedLayer:
    """One LoRA layer's trainable tensors and where it sits (for grouping)."""

    part: str                          # "unet" | "text_encoder" | "text_encoder_2"
    block: str                         # "down" | "mid" | "up" for the UNet, "" for encoders
    down: torch.nn.Parameter           # A
    up: torch.nn.Parameter             # B
    magnitude: torch.nn.Parameter | None = None   # DoRA magnitude (A rate, no weight decay)


def build_param_groups(layers: list[TrainedLayer], part_rates: dict[str, float], lora_plus_ratio: float,
                       block_weight: Callable[[str], float]) -> list[dict[str, Any]]:
    """One group per (part, UNet block, A/B/M). Base rate = part rate x block weight (x LoRA+ ratio for B).

    "M" holds the DoRA magnitudes: trained at the A rate, with no weight decay (a per-row norm, like
    a normalisation scale: decay would pull every layer's norm toward zero, not the update toward 0).
    Every group carries "base_lr" (rate before the schedule) and "part"/"block"/"matrix" tags.
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for layer in layers:
        rate = part_rates[layer.part] * (block_weight(layer.block) if layer.part == "unet" else 1.0)
        magnitudes = [layer.magnitude] if layer.magnitude is not None else []
        for matrix, tensors in (("A", [layer.down]), ("B", [layer.up]), ("M", magnitudes)):
            if not tensors:
                continue
            base = rate * (lora_plus_ratio if matrix == "B" else 1.0)
            key = (layer.part, layer.block, matrix)
            group = groups.setdefault(key, {"params": [], "lr": base, "base_lr": base, "part": layer.part,
                                            "block": layer.block, "matrix": matrix,
                                            "name": "/".join(filter(None, key))})
            if matrix == "M":
                group["weight_decay"] = 0.0
            group["params"].extend(tensors)
    return list(groups.values())


@dataclass(frozen=True)
class OptimizerSpec:
    module: str                 # importable module that must exist
    install_hint: str           # what to tell the user when it does not
    needs_cuda: bool            # bitsandbytes 8-bit optimizers run on CUDA only
    build: Callable[[list[dict], float], torch.optim.Optimizer]


def _adamw(groups, weight_decay):
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _sgd(groups, weight_decay):
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=weight_decay)


def _adamw8bit(groups, weight_decay):
    import bitsandbytes
    return bitsandbytes.optim.AdamW8bit(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _lion8bit(groups, weight_decay):
    import bitsandbytes
    return bitsandbytes.optim.Lion8bit(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _prodigy(groups, weight_decay):
    import prodigyopt
    return prodigyopt.Prodigy(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _adafactor(groups, weight_decay):
    # Fixed rates (no relative step) so our schedule drives the rate, as kohya does with an explicit lr.
    from transformers.optimization import Adafactor
    return Adafactor(groups, lr=groups[0]["lr"], weight_decay=weight_decay, relative_step=False,
                     scale_parameter=False, warmup_init=False)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "AdamW": OptimizerSpec("torch", "", False, _adamw),
    "AdamW8bit": OptimizerSpec("bitsandbytes", "pip install bitsandbytes", True, _adamw8bit),
    "Lion8bit": OptimizerSpec("bitsandbytes", "pip install bitsandbytes", True, _lion8bit),
    "Prodigy": OptimizerSpec("prodigyopt", "pip install prodigyopt", False, _prodigy),
    "Adafactor": OptimizerSpec("transformers", "pip install transformers", False, _adafactor),
    "SGD": OptimizerSpec("torch", "", False, _sgd),
}


def check_optimizer(name: str, device_type: str) -> None:
    """Raise ValueError when `name` cannot run here (unknown, package missing, no CUDA)."""
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(f"Train LoRA: optimizer = {name!r} is unknown. Pick one of: {', '.join(OPTIMIZERS)}.")
    if importlib.util.find_spec(spec.module) is None:
        raise ValueError(f"Train LoRA: optimizer = {name!r} needs the package '{spec.module}', which is not "
                         f"installed in ComfyUI's Python. Run `{spec.install_hint}` with ComfyUI's Python and "
                         "restart ComfyUI, or pick AdamW.")
    if spec.needs_cuda and device_type != "cuda":
        raise ValueError(f"Train LoRA: optimizer = {name!r} runs on NVIDIA GPUs only and this ComfyUI runs "
                         f"on {device_type}. Pick AdamW (or Adafactor to save memory).")


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name].build(groups, weight_decay)


def applied_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Rate per trained part read back from the optimizer: its A-matrix groups' rate (with UNet block
    weights, the largest block rate, which is the UNet rate itself when no block is up-weighted)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        if group.get("matrix") == "A":
            rates[group["part"]] = max(rates.get(group["part"], 0.0), float(group["lr"]))
    return rates
