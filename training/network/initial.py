"""initial_lora: a LoRA file whose weights start the training (sd-scripts' --network_weights, the built-in
trainer's existing_lora).

The file is read back through the inverse of the export (training/run/trainer.py `_export`, kohya.py; kohya
and ComfyUI key names, not yet SD3's diffusers names): for every injected layer, the tensors the export
would write under that layer's key stem are the ones the layer starts from. So the file must be one this node could have written for this model: the same network
(lora / lokr / loha, DoRA or not), the same layers (target and trained parts), the same rank and alpha;
every mismatch is an error naming the file, what it has and what the node has. Keys of the file that no
trained layer takes (layers the model lacks, or parts that do not train now) are reported, not loaded.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

import torch

from .lora import ADAPTER_NAME, InjectedLora, LoraModule, readable_weight
from .lycoris import FACTOR_NAMES

LORA_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha",
                 ".dora_scale")


class InitialLoraError(ValueError):
    """A file that cannot start this training; the message names the file, what it has and the fix."""


def file_network(tensors: dict[str, torch.Tensor]) -> str:
    """lora, lokr or loha, from the file's tensor names."""
    keys = list(tensors)
    for network, names in FACTOR_NAMES.items():
        if any(key.rsplit(".", 1)[-1] in names for key in keys):
            return network
    return "lora"


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes (the trained file records its parent by it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_initial_lora(injected: list[InjectedLora], names_of: Callable[[str, list[str]], dict], tensors: dict,
                      label: str, network: str, use_dora: bool, alpha: float, dora_norm: str) -> list[str]:
    """Copy the file's tensors (`tensors`, the file `label`) into the injected layers; return the file's keys
    that no trained layer took. names_of(part, module paths) -> {path: key stem, or [(stem, rows, transform)]
    for a fused layer the file splits} (the export's names). InitialLoraError on any mismatch."""
    has = file_network(tensors)
    if has != network:
        raise InitialLoraError(f"Train LoRA: initial_lora {label!r} is a {has} file but network = {network!r}. Set "
                               f"network to {has!r}, or pick a {network} file.")
    has_dora = any(key.endswith(".dora_scale") for key in tensors)
    if has_dora != use_dora:
        raise InitialLoraError(f"Train LoRA: initial_lora {label!r} {'holds' if has_dora else 'has no'} DoRA scales "
                               f"but use_dora = {use_dora}. Set use_dora to {has_dora}.")
    used: set[str] = set()
    for lora in injected:
        names = names_of(lora.part, [module.path for module in lora.modules])
        for module in lora.modules:
            used |= _load_module(module, names[module.path], tensors, label, alpha, dora_norm, lora.part)
    return sorted(set(tensors) - used)


def _take(tensors: dict, key: str, label: str, part: str, path: str) -> torch.Tensor:
    if key not in tensors:
        raise InitialLoraError(f"Train LoRA: initial_lora {label!r} has no {key}: the node trains {part} layer {path}, "
                               "which the file did not train. The targets must match the file's: set target (and "
                               "which parts train, by their rates) to what the file was trained with.")
    return tensors[key]


def _copy(target: torch.Tensor, value: torch.Tensor, key: str, label: str, what: str) -> None:
    if value.numel() != target.numel():
        raise InitialLoraError(f"Train LoRA: initial_lora {label!r}: {key} has shape {list(value.shape)} but the node's "
                               f"layer needs {list(target.shape)}: {what}")
    with torch.no_grad():
        target.copy_(value.reshape(target.shape).to(target.dtype))


def _check_alpha(tensors: dict, stem: str, alpha: float, label: str, name: str = "alpha") -> None:
    key = f"{stem}.alpha"
    if key in tensors and abs(float(tensors[key]) - alpha) > 1e-3 * max(1.0, abs(alpha)):
        raise InitialLoraError(f"Train LoRA: initial_lora {label!r} has alpha {float(tensors[key]):g} ({key}) but the "
                               f"node's {name} is {alpha:g}. Set {name} to {float(tensors[key]):g}.")


def _load_module(module: LoraModule, name, tensors: dict, label: str, alpha: float, dora_norm: str,
                 part: str) -> set[str]:
    used: set[str] = set()
    if module.network != "lora":
        stem = name
        if not isinstance(stem, str):
            raise InitialLoraError(f"Train LoRA: initial_lora {label!r}: a {module.network} layer has no split key names")
        for factor, tensor in module.factors.items():
            key = f"{stem}.{factor}"
            _copy(tensor, _take(tensors, key, label, part, module.path), key, label,
                  "its factor shapes differ (rank, lokr_factor or lokr_decompose_both / loha_rank must match the file's)")
            used.add(key)
        both_full = {"lokr_w1", "lokr_w2"} <= set(module.factors)   # trains unscaled: its file alpha is its rank
        if not both_full:
            _check_alpha(tensors, stem, alpha, label, "loha_alpha" if module.network == "loha" else "alpha")
        used.add(f"{stem}.alpha")
        return used
    rank = module.down.shape[0]
    rank_hint = f"the ranks differ (the node's rank is {rank}): set rank to the file's"
    if not isinstance(name, str) or f"{name}.lora_A.weight" in tensors:
        # diffusers names (SD3 / SD3.5 LoRA files): alpha folded into B, fused layers split into row slices
        raise InitialLoraError(f"Train LoRA: initial_lora {label!r}: starting from a file with diffusers key names "
                               "(SD3 / SD3.5 LoRA files: lora_A / lora_B) is not supported yet; start without it.")
    _check_alpha(tensors, name, alpha, label)
    for suffix, tensor in ((".lora_down.weight", module.down), (".lora_up.weight", module.up)):
        key = name + suffix
        _copy(tensor, _take(tensors, key, label, part, module.path), key, label, rank_hint)
        used.add(key)
    used.add(f"{name}.alpha")
    stems = [name]
    if module.magnitude is not None:
        scales = torch.cat([_take(tensors, f"{stem}.dora_scale", label, part, module.path).reshape(-1).float()
                            for stem in stems])
        used |= {f"{stem}.dora_scale" for stem in stems}
        if dora_norm == "original":   # the file's scale divides by the original weight's norm (ComfyUI's rule)
            base = readable_weight(module.layer.get_base_layer().weight).float()
            delta = (module.up.float().flatten(1) @ module.down.float().flatten(1)).reshape(base.shape)
            delta = delta * module.layer.scaling[ADAPTER_NAME]
            scales = scales * (base + delta).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
        _copy(module.magnitude, scales, f"{stems[0]}.dora_scale", label, rank_hint)
    return used


def read_lora_file(path: Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except Exception as error:   # a broken or non-safetensors file
        raise InitialLoraError(f"Train LoRA: initial_lora {path.name!r} cannot be read: {error}") from error
