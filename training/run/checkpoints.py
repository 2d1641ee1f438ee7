"""The run's side of resuming: what a resumed run must share with the saved one, loading and checking
a checkpoint, and capturing / restoring the weights, data position and random states."""
from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from ..data.feeder import BatchFeeder
from ..network.lora import InjectedLora
from . import resume
from .host import ModelAccess
from .train_settings import LATER_DEFAULTS, TrainSettings

logger = logging.getLogger("lora_lab")


def run_identity(settings: TrainSettings, rates, schedule, dataset, access: ModelAccess) -> dict[str, Any]:
    """What a resumed run must share with the saved one (JSON-ready)."""
    model = {"family": access.family, "latents": access.latent_key,
             "weights": access.weights_key() if access.weights_key is not None else ""}
    data = {"fingerprint": getattr(dataset, "fingerprint", ""), "resolution": dataset.options.resolution,
            "images": len(dataset.samples), "images_per_epoch": dataset.effective_count}
    schedule_values = {key: value for key, value in asdict(schedule).items() if key != "preview_steps"}  # display only
    settings_values = {key: value for key, value in asdict(settings).items()
                       if not (key in LATER_DEFAULTS and value == LATER_DEFAULTS[key])}
    identity = resume.run_identity(settings_values, asdict(rates), schedule_values, data, model)
    return json.loads(json.dumps(identity, default=str))


def load_resume_state(resume_from: str | Path, state_path: Path, identity: dict[str, Any],
                      settings: TrainSettings) -> resume.ResumeState:
    """Load and check the checkpoint at `state_path` (what `resume_from` names); ValueError naming what
    differs and how to fix it."""
    state = resume.load_state(state_path)
    differences = resume.identity_differences(state.identity, identity)
    if differences:
        raise ValueError(f"Train LoRA: resume_from = {str(resume_from)!r} was saved by a run with a different "
                         f"{'; '.join(differences)}. Resuming continues the same computation, so the model, dataset, "
                         "learning rates, schedule and Train LoRA settings must match the saved run (only "
                         f"{', '.join(resume.FREE_SETTINGS)} may change). Set them back, or clear resume_from to "
                         "start a new run.")
    if state.step >= settings.steps:
        raise ValueError(f"Train LoRA: resume_from = {str(resume_from)!r} is at step {state.step} of {settings.steps}: "
                         "that run has nothing left to train. Clear resume_from to start a new run.")
    logger.info("LoRA Lab: resuming %s at step %d of %d", state.path, state.step, settings.steps)
    return state


def previous_log_lines(state: resume.ResumeState) -> list[str]:
    """The saved run's log.jsonl lines for the steps the checkpoint covers."""
    log_path = state.path.parent / "log.jsonl"
    lines = log_path.read_text(encoding="utf-8").splitlines() if log_path.is_file() else []
    kept = [line + "\n" for line in lines if line.strip() and json.loads(line)["step"] < state.step]
    if len(kept) != state.step:
        logger.warning("LoRA Lab: %s has %d of the %d steps before the checkpoint; the chart will miss some",
                       log_path, len(kept), state.step)
    return kept


def resume_weights(injected: list[InjectedLora]) -> dict[str, torch.Tensor]:
    """"<part>/<module path>/<tensor name>" -> the trainable tensor (fp32, as trained): LoRA's down / up /
    magnitude, LoKr's and LoHa's factors."""
    weights = {}
    for lora in injected:
        for module in lora.modules:
            for name, tensor in module.tensors().items():
                weights[f"{lora.part}/{module.path}/{name}"] = tensor
    return weights


@contextlib.contextmanager
def seeded_global_rng(seed: int, device: torch.device):
    """torch's global generators forked and seeded for the run: anything in the model that draws from
    them is reproducible (and resumable), and the host's own random state is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.random.default_generator.manual_seed(seed)
        if devices:   # only the training device: other cards' states are not forked, so not touched
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        yield


def capture_progress(step: int, feeder: BatchFeeder, generator: torch.Generator,
                     scaler: torch.amp.GradScaler | None, device: torch.device) -> resume.Progress:
    generators = {"noise": generator.get_state(), "global_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        generators["global_cuda"] = torch.cuda.get_rng_state(device)
    return resume.Progress(step=step, data=feeder.state(), generators=generators,
                           scaler=scaler.state_dict() if scaler is not None else None)


def restore_run(state: resume.ResumeState, injected: list[InjectedLora], optimizer: torch.optim.Optimizer,
                feeder: BatchFeeder, generator: torch.Generator, scaler: torch.amp.GradScaler | None,
                device: torch.device) -> None:
    """Put a checkpoint's weights, optimizer, data position and rng states in place."""
    weights = resume_weights(injected)
    if set(weights) != set(state.weights) or any(weights[name].shape != state.weights[name].shape
                                                  for name in weights):
        raise ValueError(f"Train LoRA: resume_from: {state.path} holds LoRA layers that do not fit this model "
                         "(different layers or shapes). Clear resume_from to start a new run.")
    with torch.no_grad():
        for name, tensor in weights.items():
            tensor.copy_(state.weights[name])
    optimizer.load_state_dict(state.optimizer)
    feeder.load_state(state.data)
    generator.set_state(state.generators["noise"])
    torch.set_rng_state(state.generators["global_cpu"])
    if device.type == "cuda" and "global_cuda" in state.generators:
        torch.cuda.set_rng_state(state.generators["global_cuda"], device)
    if scaler is not None and state.scaler:
        scaler.load_state_dict(state.scaler)
