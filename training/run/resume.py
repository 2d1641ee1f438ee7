"""Resume state of a training run (ComfyUI-agnostic): what a run needs to continue bit for bit.

A checkpoint lives in the run folder (``<output>/lora_lab/<lora file stem>/``), never in models/loras:

    resume_state.json                  small: step, what the run was (settings, dataset, model), the
                                       data order, python rng states, optimizer values that are not
                                       tensors, and the name of the tensor file below
    resume_state_stepNNNNN.safetensors LoRA weights in fp32, optimizer tensors, torch generator states

The tensor file is written first, then the JSON (each atomically: temp file + rename), then older
tensor files are removed, so the JSON always points at a complete tensor file.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..network import kohya

logger = logging.getLogger("lora_lab")

STATE_FILE = "resume_state.json"
FORMAT_VERSION = 1
TENSOR_MARK = "__tensor__"   # JSON placeholder for a value stored in the tensor file
TUPLE_MARK = "__tuple__"     # JSON placeholder keeping tuples tuples (optimizer betas, ...)

# TrainSettings fields that may differ on resume: they change where files go or how much memory is
# used, not the numbers the run computes.
FREE_SETTINGS = ("lora_name", "save_every_n_steps", "cache_latents_to_disk", "gradient_checkpointing", "save_precision",
                 "validate_every_n_steps", "memory", "vram_budget_gb")


@dataclass
class Progress:
    """Everything that moves between steps except weights and optimizer: taken after each step."""

    step: int                                        # optimizer steps done
    data: dict[str, Any]                             # the feeder's data order and rng states (JSON)
    generators: dict[str, torch.Tensor]              # torch generator states (noise/timesteps, global)
    scaler: dict[str, Any] | None = None             # fp16 loss scaler state


@dataclass
class ResumeState:
    """A loaded checkpoint."""

    path: Path                                       # the resume_state.json it came from
    step: int                                        # optimizer steps done
    identity: dict[str, Any]                         # what the run was (compared before resuming)
    data: dict[str, Any]
    generators: dict[str, torch.Tensor]
    scaler: dict[str, Any] | None
    weights: dict[str, torch.Tensor]                 # "<part>/<module path>/<down|up|magnitude>" -> fp32
    optimizer: dict[str, Any]                        # torch optimizer state_dict
    extra: dict[str, Any] = field(default_factory=dict)


def run_identity(settings: dict[str, Any], learning_rates: dict[str, Any], schedule: dict[str, Any],
                 dataset: dict[str, Any], model: dict[str, Any]) -> dict[str, Any]:
    """What must be equal for a resumed run to continue the same computation."""
    return {"settings": {key: value for key, value in settings.items() if key not in FREE_SETTINGS},
            "learning_rates": learning_rates, "lr_schedule": schedule, "dataset": dataset, "model": model}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def identity_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human-readable differences, e.g. "settings.rank: saved 4, now 8"."""
    saved_flat, current_flat = _flatten(json.loads(json.dumps(saved))), _flatten(json.loads(json.dumps(current)))
    differences = []
    for key in sorted(set(saved_flat) | set(current_flat)):
        old, new = saved_flat.get(key, "(not set)"), current_flat.get(key, "(not set)")
        if old != new:
            differences.append(f"{key}: saved {old!r}, now {new!r}")
    return differences


def resolve_state_path(resume_from: str | os.PathLike, runs_dir: Path) -> Path:
    """The resume_state.json meant by `resume_from`: a run folder, its resume_state.json or one of its
    tensor files; a relative path is taken inside `runs_dir` (``<output>/lora_lab``) first."""
    text = str(resume_from).strip().strip('"')
    given = Path(text).expanduser()
    candidates = [given] if given.is_absolute() else [runs_dir / given, given]
    for candidate in candidates:
        if candidate.is_dir():
            candidate = candidate / STATE_FILE
        elif candidate.suffix == ".safetensors":
            candidate = candidate.parent / STATE_FILE
        if candidate.is_file():
            return candidate
    raise ValueError(f"Train LoRA: resume_from = {text!r}: no {STATE_FILE} there (looked in "
                     f"{', '.join(str(candidate) for candidate in candidates)}). Give the run folder "
                     f"(output/lora_lab/<name>, or just <name>) of a run that saved a checkpoint: "
                     "save_every_n_steps above 0, or a cancelled run. Leave it empty to start a new run.")


# --------------------------------------------------------------------------------------------
# Tensors <-> JSON
# --------------------------------------------------------------------------------------------

def _split(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-ready copy of `value`; tensors go to `tensors` under `key`-derived names."""
    if torch.is_tensor(value):
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {TENSOR_MARK: key}
    if isinstance(value, dict):
        return {str(name): _split(item, f"{key}/{name}", tensors) for name, item in value.items()}
    if isinstance(value, tuple):
        return {TUPLE_MARK: [_split(item, f"{key}/{index}", tensors) for index, item in enumerate(value)]}
    if isinstance(value, list):
        return [_split(item, f"{key}/{index}", tensors) for index, item in enumerate(value)]
    return value


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {TENSOR_MARK}:
            return tensors[value[TENSOR_MARK]]
        if set(value) == {TUPLE_MARK}:
            return tuple(_join(item, tensors) for item in value[TUPLE_MARK])
        return {name: _join(item, tensors) for name, item in value.items()}
    if isinstance(value, list):
        return [_join(item, tensors) for item in value]
    return value


def _optimizer_from_json(state: dict[str, Any]) -> dict[str, Any]:
    """JSON turned the per-parameter state's integer keys into strings; torch wants ints."""
    return {"state": {int(index): values for index, values in state["state"].items()},
            "param_groups": state["param_groups"]}


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------

def write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temp file in the same folder, then rename over `path` (our own file)."""
    with kohya.temporary_file(path.parent) as temporary:
        write(temporary)
        os.replace(temporary, path)


def save_state(run_dir: Path, identity: dict[str, Any], progress: Progress, weights: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    """Write a checkpoint at `progress.step` into `run_dir`; returns the JSON path."""
    import safetensors.torch

    tensors: dict[str, torch.Tensor] = {}
    document = {
        "format": FORMAT_VERSION, "step": progress.step, "identity": identity, "data": progress.data,
        "scaler": progress.scaler, "extra": extra or {},
        "generators": _split(progress.generators, "generator", tensors),
        "optimizer": _split(optimizer_state, "optimizer", tensors),
        "weights": sorted(weights),
    }
    for name, tensor in weights.items():
        tensors[f"weight/{name}"] = tensor.detach().to("cpu", torch.float32).contiguous().clone()
    tensor_name = f"resume_state_step{progress.step:05d}.safetensors"
    document["tensor_file"] = tensor_name
    text = json.dumps(document, indent=1)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(run_dir / tensor_name, lambda temporary: safetensors.torch.save_file(tensors, temporary))
        write_atomically(run_dir / STATE_FILE, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    except OSError as error:
        raise kohya.write_error(run_dir / tensor_name, error) from None
    for old in run_dir.glob("resume_state_step*.safetensors"):
        if old.name != tensor_name:
            old.unlink(missing_ok=True)
    logger.info("LoRA Lab: resume checkpoint at step %d in %s", progress.step, run_dir)
    return run_dir / STATE_FILE


def load_state(path: Path) -> ResumeState:
    """Read a checkpoint written by :func:`save_state`; ValueError naming the file when it is not one."""
    import safetensors.torch

    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document.get("format") != FORMAT_VERSION:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT_VERSION}")
        # ComfyUI runs nodes in inference mode; tensors made there cannot be updated by the optimizer.
        with torch.inference_mode(False):
            tensors = safetensors.torch.load_file(str(path.parent / document["tensor_file"]))
    except Exception as error:   # unreadable JSON, missing keys, a damaged tensor file (SafetensorError)
        raise ValueError(f"Train LoRA: resume_from: {path} is not a readable LoRA Lab resume checkpoint "
                         f"({error}). Point resume_from at another run folder, or leave it empty.") from None
    return ResumeState(
        path=path, step=int(document["step"]), identity=document["identity"], data=document["data"],
        generators=_join(document["generators"], tensors), scaler=document.get("scaler"),
        weights={name: tensors[f"weight/{name}"] for name in document["weights"]},
        optimizer=_optimizer_from_json(_join(document["optimizer"], tensors)), extra=document.get("extra", {}))
