"""ComfyUI widget declarations generated from settings dataclasses (training/settings.py): the
field's default, range, choices and help are the one source; this module only spells them the way
ComfyUI's INPUT_TYPES wants them."""
from __future__ import annotations

from typing import Any, Iterable

from ..training.settings import specs

# The sockets every node that trains takes first (Train LoRA, LR Finder), in this order.
TRAINING_SOCKETS = {
    "model": ("MODEL", {"tooltip": "The model to train on (from Load Checkpoint). It is not changed."}),
    "clip": ("CLIP", {"tooltip": "The CLIP of the same checkpoint. It is not changed."}),
    "vae": ("VAE", {"tooltip": "The VAE of the same checkpoint; encodes the training images."}),
    "dataset": ("LORA_DATASET", {"tooltip": "Images and captions, from the LoRA Dataset node."}),
}


def widgets(cls, names: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> dict[str, tuple]:
    """{input name: ComfyUI input spec} for the setting fields of `cls` (all, in declaration order,
    or exactly `names` in that order), minus `exclude`."""
    declared = specs(cls)
    chosen = list(names) if names is not None else [name for name in declared if name not in set(exclude)]
    return {name: widget(*declared[name]) for name in chosen}


def widget(default: Any, spec) -> tuple:
    options: dict[str, Any] = {"default": default}
    if spec.choices is not None:
        kind: Any = list(spec.choices)
    elif isinstance(default, bool):
        kind = "BOOLEAN"
    elif isinstance(default, int):
        kind = "INT"
    elif isinstance(default, float):
        kind = "FLOAT"
    else:
        kind = "STRING"
    if kind in ("INT", "FLOAT"):
        for key in ("min", "max", "step", "round"):
            value = getattr(spec, key)
            if value is not None:
                options[key] = value
    if spec.multiline:
        options["multiline"] = True
    options["tooltip"] = spec.help
    return (kind, options)
