"""ComfyUI's folders, and the saved file applied through ComfyUI's own LoRA loading."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def device_type(model) -> str:
    return torch.device(model.load_device).type


def loras_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0])


def lora_names() -> list[str]:
    """The files LoraLoader lists (models/loras and the extra LoRA folders)."""
    import folder_paths
    return list(folder_paths.get_filename_list("loras"))


def lora_path(name: str) -> Path:
    """A LoraLoader name's file; a name no LoRA folder holds gives a path that does not exist (refused by the
    run's checks, naming it)."""
    import folder_paths
    found = folder_paths.get_full_path("loras", name)
    return Path(found) if found else loras_dir() / name


def output_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_output_directory())


def input_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_input_directory())


def apply_lora_file(model, clip, path: Path) -> tuple[Any, Any]:
    """MODEL and CLIP with the saved file applied through ComfyUI's own LoRA loading."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)


def dora_norm_of_loader() -> str:
    """Which norm this ComfyUI's LoRA loader divides a per-output-row ``dora_scale`` by: "original"
    (|W|: ComfyUI up to at least 0.33) or "updated" (|W + dW|: the DoRA paper, peft, LyCORIS,
    diffusers; what ComfyUI PR #15458 proposes). Asked of the loader itself on a 2x2 weight, so a
    ComfyUI that changes the rule gets files written for the new rule."""
    from comfy.weight_adapter.base import weight_decompose

    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.0]])     # row 0: |W| = 5, |W + dW| = 10
    result = weight_decompose(torch.ones(2, 1), weight.clone(), diff.clone(), 1.0, 1.0, torch.float32,
                              lambda tensor: tensor)
    row = float(result[0].norm())
    if abs(row - 2.0) < 1e-4:
        return "original"
    if abs(row - 1.0) < 1e-4:
        return "updated"
    raise RuntimeError(f"LoRA Lab: this ComfyUI's DoRA loader gives a row norm of {row} on a probe "
                       "(expected 2 or 1); DoRA files could not be written to load as trained. "
                       "Please report your ComfyUI version.")


def run_loaders(loaders: dict[str, dict], wanted: list) -> tuple:
    """Outputs of a small API-format graph of loader nodes ({id: {"class_type", "inputs"}}, links as [id, slot]),
    each node called as ComfyUI's executor calls it (its own function, in inference mode), in dependency order:
    the outputs `wanted` ([id, slot] each). KeyError naming a node class this ComfyUI lacks."""
    import nodes as comfy_nodes   # ComfyUI's nodes.py

    made: dict[str, tuple] = {}

    def output(link) -> Any:
        source = str(link[0])
        if source not in made:
            entry = loaders[source]
            node_class = comfy_nodes.NODE_CLASS_MAPPINGS.get(entry["class_type"])
            if node_class is None:
                raise KeyError(entry["class_type"])
            arguments = {name: (output(value) if isinstance(value, list) else value)
                         for name, value in entry["inputs"].items()}
            if hasattr(node_class, "define_schema"):   # a V3 node
                made[source] = tuple(node_class.execute(**arguments).result)
            else:
                made[source] = tuple(getattr(node_class(), node_class.FUNCTION)(**arguments))
        return made[source][int(link[1])]

    with torch.inference_mode():
        return tuple(output(link) for link in wanted)
