"""ComfyUI node inputs (the V3 schema, ``comfy_api.latest.io``) generated from settings dataclasses
(training/settings.py): the field's default, range, choices and help are the one source; this module
only spells them the way ComfyUI's schema wants them."""
from __future__ import annotations

from typing import Any, Iterable

from comfy_api.latest import io

from ..training.settings import specs

# Socket types ComfyUI declares, and the pack's own (io.Custom) by name.
_SOCKETS = {"MODEL": io.Model, "CLIP": io.Clip, "VAE": io.Vae, "IMAGE": io.Image, "STRING": io.String,
            "FLOAT": io.Float}


def socket_type(kind: str):
    return _SOCKETS.get(kind) or io.Custom(kind)


def socket(kind: str, name: str, tooltip: str, optional: bool = False) -> io.Input:
    return socket_type(kind).Input(name, tooltip=tooltip, optional=optional)


def output(kind: str, name: str, tooltip: str, output_id: str | None = None) -> io.Output:
    """An output shown as `name`; `output_id` where an input has that name (V3 ids are unique per node)."""
    return socket_type(kind).Output(output_id or name, display_name=name, tooltip=tooltip)


def training_sockets() -> list[io.Input]:
    """The sockets every node that trains takes first (Train LoRA, LR Finder), in this order."""
    return [socket("MODEL", "model", "The model to train on (from Load Checkpoint). It is not changed."),
            socket("CLIP", "clip", "The CLIP of the same checkpoint. It is not changed."),
            socket("VAE", "vae", "The VAE of the same checkpoint; encodes the training images."),
            socket("LORA_DATASET", "dataset", "Images and captions, from the LoRA Dataset node.")]


def inputs(cls, names: Iterable[str] | None = None, exclude: Iterable[str] = (), optional: bool = False
           ) -> list[io.Input]:
    """The widget inputs for the setting fields of `cls` (all, in declaration order, or exactly `names` in
    that order), minus `exclude`."""
    declared = specs(cls)
    chosen = list(names) if names is not None else [name for name in declared if name not in set(exclude)]
    return [widget(name, *declared[name], optional=optional) for name in chosen]


def widget(name: str, default: Any, spec, optional: bool = False) -> io.Input:
    common = {"default": default, "tooltip": spec.help, "optional": optional}
    if spec.choices is not None:
        return io.Combo.Input(name, options=list(spec.choices), **common)
    if isinstance(default, bool):
        return io.Boolean.Input(name, **common)
    numbers = {key: getattr(spec, key) for key in ("min", "max", "step") if getattr(spec, key) is not None}
    if isinstance(default, int):
        return io.Int.Input(name, **numbers, **common)
    if isinstance(default, float):
        return io.Float.Input(name, **numbers, **({"round": spec.round} if spec.round is not None else {}), **common)
    return io.String.Input(name, multiline=spec.multiline, **common)
