"""Which layers a `target` option trains, and how they group for block weights (ComfyUI-agnostic).

A UNet family (SD1.x/2.x/SDXL) uses TARGETS; a DiT family carries its own rules in its table entry
(training/families/table.py `Family.dit`, a DitTargets). Every function takes the family entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TargetSpec:
    """Which layers a `target` option trains. Suffixes match the end of ComfyUI module paths."""

    unet_suffixes: tuple[str, ...]
    text_suffixes: tuple[str, ...]
    unet_all_linear_conv: bool = False  # every Linear/Conv2d inside the UNet's blocks (LoCon-like)
    # Every Linear and 1x1 Conv2d inside the UNet's transformers (SpatialTransformer = diffusers'
    # Transformer2DModel): kohya sd-scripts' default LoRA (networks/lora.py UNET_TARGET_REPLACE_MODULE),
    # i.e. attention + feed-forward + proj_in/proj_out.
    unet_transformer_linear: bool = False


_ATTENTION_UNET = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                   "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0")
_FEED_FORWARD_UNET = ("ff.net.0.proj", "ff.net.2")
_ATTENTION_TEXT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj")
_MLP_TEXT = ("mlp.fc1", "mlp.fc2")

TARGETS: dict[str, TargetSpec] = {
    "attention": TargetSpec(_ATTENTION_UNET, _ATTENTION_TEXT),
    "attention_ff": TargetSpec(_ATTENTION_UNET + _FEED_FORWARD_UNET, _ATTENTION_TEXT + _MLP_TEXT),
    "all_linear_conv": TargetSpec(_ATTENTION_UNET + _FEED_FORWARD_UNET, _ATTENTION_TEXT + _MLP_TEXT,
                                  unet_all_linear_conv=True),
    # Appended (the option list is a public API): exactly kohya's default module set; its text-encoder
    # set (CLIPAttention + CLIPMLP) is attention_ff's.
    "kohya_default": TargetSpec((), _ATTENTION_TEXT + _MLP_TEXT, unet_transformer_linear=True),
}
_TRANSFORMER_CLASS = "SpatialTransformer"

# UNet containers whose layers all_linear_conv trains; conv_in (input_blocks.0), the time embedding
# and the output head are left out, as kohya's LoCon does.
_UNET_BLOCK_PREFIXES = ("input_blocks.", "middle_block.", "output_blocks.")
_UNET_EXCLUDED_PREFIXES = ("input_blocks.0.",)


def unet_target_paths(unet: torch.nn.Module, target: str, entry) -> list[str]:
    """Module paths (relative to ComfyUI's ``diffusion_model``) that get LoRA layers: for a DiT family
    its entry's rules (`entry.dit`), for a UNet the TARGETS specs."""
    if entry.dit is not None:
        return dit_target_paths(unet, entry.dit, target)
    spec = TARGETS[target]
    transformers = tuple(f"{path}." for path, module in unet.named_modules()
                         if type(module).__name__ == _TRANSFORMER_CLASS) if spec.unet_transformer_linear else ()
    paths = []
    for path, module in unet.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if transformers and path.startswith(transformers) and (
                isinstance(module, torch.nn.Linear) or tuple(module.kernel_size) == (1, 1)):
            paths.append(path)
        elif spec.unet_suffixes and path.endswith(spec.unet_suffixes):
            paths.append(path)
        elif (spec.unet_all_linear_conv and path.startswith(_UNET_BLOCK_PREFIXES)
              and not path.startswith(_UNET_EXCLUDED_PREFIXES)):
            paths.append(path)
    return paths


def text_target_paths(text_model: torch.nn.Module, target: str) -> list[str]:
    """Module paths (relative to a ComfyUI CLIP text model, e.g. ``clip_l``) that get LoRA layers."""
    spec = TARGETS[target]
    return [path for path, module in text_model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".encoder.layers." in f".{path}"
            and path.endswith(spec.text_suffixes)]


def unet_blocks(paths: list[str], entry) -> dict[str, str]:
    """Module path -> "down" | "mid" | "up" (block weights) for this family entry's diffusion model."""
    if entry.dit is not None:
        return dit_block_of(entry.dit, paths)
    return {path: unet_block_of(path) for path in paths}


def unet_block_of(path: str) -> str:
    """"down" | "mid" | "up": which UNet block group a module path belongs to (for block weights)."""
    if path.startswith("middle_block."):
        return "mid"
    if path.startswith("output_blocks."):
        return "up"
    return "down"


@dataclass(frozen=True)
class DitTargets:
    """LoRA targets of a DiT family, as module-path rules relative to ComfyUI's diffusion_model.

    blocks: path prefixes of the transformer blocks, in depth order (block weights group by depth).
    call_order: the containers of those blocks in the order the model's forward calls them (each
    block is a checkpointed, streamable unit).
    Per `target` option, the Linear layers whose path (inside a block) ends with one of the suffixes;
    "all" = every Linear in the blocks.
    """

    blocks: tuple[str, ...]
    attention: tuple[str, ...]
    feed_forward: tuple[str, ...]
    kohya_default: tuple[str, ...] | str   # suffixes, or "all"
    call_order: tuple[str, ...] = ()
    kohya_default_source: str = ""

    def __post_init__(self) -> None:
        if sorted(f"{name}." for name in self.call_order) != sorted(self.blocks):
            raise ValueError(f"DitTargets: call_order {self.call_order} must name the containers of blocks {self.blocks}")

    def suffixes(self, target: str) -> tuple[str, ...] | str:
        return {"attention": self.attention, "attention_ff": self.attention + self.feed_forward,
                "all_linear_conv": "all", "kohya_default": self.kohya_default}[target]


def dit_target_paths(diffusion_model: torch.nn.Module, targets: DitTargets, target: str) -> list[str]:
    """Module paths of the Linear layers `target` trains in a DiT (relative to diffusion_model)."""
    rule = targets.suffixes(target)
    paths = []
    for path, module in diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not path.startswith(targets.blocks):
            continue
        if rule == "all" or path.endswith(tuple(rule)):
            paths.append(path)
    return paths


def dit_block_of(targets: DitTargets, paths: list[str]) -> dict[str, str]:
    """Block weights on a DiT: "down" / "mid" / "up" = the first, middle and last third of its
    transformer blocks in depth order (Flux: the double blocks, then the single blocks)."""
    blocks: list[str] = []
    for path in paths:
        for prefix in targets.blocks:
            if path.startswith(prefix):
                index = path[len(prefix):].split(".")[0]
                block = f"{prefix}{index}"
                if block not in blocks:
                    blocks.append(block)
    order = sorted(blocks, key=lambda block: (next(i for i, prefix in enumerate(targets.blocks)
                                                    if block.startswith(prefix)), int(block.rsplit(".", 1)[-1])))
    thirds = {}
    for position, block in enumerate(order):
        thirds[block] = ("down", "mid", "up")[min(2, position * 3 // max(1, len(order)))]
    result = {}
    for path in paths:
        for block, group in thirds.items():
            if path.startswith(block + "."):
                result[path] = group
    return result


# The generic path (a model with no table entry): targets found by the model's structure ----------------

# A Linear whose path inside its block has a part containing one of these words is attention / feed-forward.
ATTENTION_WORDS = ("attn", "attention")
FEED_FORWARD_WORDS = ("mlp", "ff", "ffn", "feed_forward", "feedforward")
# A container of blocks counts when its blocks are at least this share of the largest container's
# (by parameters per block): Flux-like single-stream blocks (~40% of a double block) and refiner stacks
# of the main block's class count; small repeated helpers (Chroma's guidance MLPs, ~13%) do not.
_BLOCK_SIZE_SHARE = 0.25


def _parameter_count(module: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in module.parameters())


def _block_containers(diffusion_model: torch.nn.Module) -> list[tuple[str, int, int]]:
    """(path, parameters, blocks) of every ModuleList whose items share one class and hold a Linear,
    outermost only (a list inside a counted block is part of that block), in definition order. A list of
    bare Linear layers (per-input projections) is not a list of blocks."""
    found: list[tuple[str, int, int]] = []
    for path, module in diffusion_model.named_modules():
        if not path or not isinstance(module, torch.nn.ModuleList) or len(module) == 0:
            continue
        if any(path.startswith(f"{outer}.") for outer, _, _ in found):
            continue
        if len({type(block) for block in module}) != 1 or isinstance(module[0], torch.nn.Linear):
            continue
        if not any(isinstance(layer, torch.nn.Linear) for layer in module.modules()):
            continue
        found.append((path, _parameter_count(module), len(module)))
    return found


def _is_attention(relative_path: str) -> bool:
    return any(word in part for part in relative_path.lower().split(".") for word in ATTENTION_WORDS)


def _is_feed_forward(relative_path: str) -> bool:
    """A part named like a feed-forward: mlp, ff, ffn or feed_forward, alone or as a word of it (img_mlp, ff_i)."""
    return any({part, *part.split("_")} & set(FEED_FORWARD_WORDS) for part in relative_path.lower().split("."))


def dit_targets_by_structure(diffusion_model: torch.nn.Module) -> DitTargets:
    """The generic path's DitTargets, read off the model (no family knowledge):

    blocks: the ModuleLists of identical-class blocks that hold the model's weight: the container with
    the most parameters, plus every other one whose blocks are at least a quarter of its blocks' size
    (Flux-like double + single blocks, Lumina's refiners + layers, PixArt's blocks, a UNet's
    input/middle/output blocks). call_order: those containers in the model's definition order (how
    DiTs call them; block streaming learns the real order while it runs).
    attention: the Linear layers whose path inside the block has a part containing "attn" or
    "attention"; in a container whose blocks name no attention (a fused single-stream block), all its
    Linear layers. feed_forward: parts named mlp / ff* / ffn / feed_forward. kohya_default and
    all_linear_conv: every Linear in the blocks (sd-scripts' DiT default)."""
    containers = _block_containers(diffusion_model)
    if not containers:
        raise ValueError(f"{type(diffusion_model).__name__} has no list of repeated blocks holding Linear "
                         "layers, so the generic path finds nothing to train")
    largest = max(containers, key=lambda container: container[1])
    per_block = largest[1] / largest[2]
    chosen = [path for path, count, blocks in containers if count / blocks >= _BLOCK_SIZE_SHARE * per_block]
    attention: dict[str, None] = {}
    feed_forward: dict[str, None] = {}
    for container in chosen:
        relative = [(name.split(".", 1)[1])
                    for name, layer in diffusion_model.get_submodule(container).named_modules()
                    if isinstance(layer, torch.nn.Linear) and "." in name]
        named_attention = [path for path in relative if _is_attention(path)]
        attention.update(dict.fromkeys(named_attention or relative))
        feed_forward.update(dict.fromkeys(path for path in relative if _is_feed_forward(path) and path not in attention))
    return DitTargets(blocks=tuple(f"{path}." for path in chosen),
                      attention=tuple(f".{path}" for path in attention),
                      feed_forward=tuple(f".{path}" for path in feed_forward),
                      kohya_default="all", call_order=tuple(chosen),
                      kohya_default_source="the generic path: every Linear of the repeated blocks, as sd-scripts' "
                                           "DiT networks (lora_flux, lora_sd3) train every Linear of their blocks")
