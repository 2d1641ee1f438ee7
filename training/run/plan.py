"""Phase 1 of a run, before any heavy work: the checks (once, here) and the plan (ComfyUI-agnostic).

:func:`check_run` checks a run's inputs and resolves the rate of each part; it needs only the model's
family and device type, so a node calls it before any model loads and shows its ValueError, which
names the input, the value and the fix. :func:`plan_run` (Train LoRA) and :func:`plan_sweep` (LR
Finder) then turn the checked inputs and the loaded models into a :class:`RunPlan`: the folders,
the log, a resumed state and the memory plan.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Iterable

from ..families.table import FAMILIES
from ..network import kohya
from ..network.lycoris import check_network
from . import resume
from .checkpoints import load_resume_state, previous_log_lines, run_identity
from .host import ModelAccess
from .memory_plan import MemoryPlan, plan_for_run
from .train_settings import TEXT_PARTS, TrainSettings, check_inputs, part_rates_for

logger = logging.getLogger("lora_lab")


@dataclass(frozen=True)
class RunInputs:
    """A run's inputs once checked: the settings, dataset, rates and schedule it trains with, and the
    base rate of each part for the model's family (0 = frozen), resolved once."""

    settings: TrainSettings
    dataset: Any
    rates: Any
    schedule: Any
    family: str
    part_rates: dict[str, float]
    resume_state: Path | None = None     # the checkpoint file resume_from names (what it holds: plan_run)
    resume_from: str = ""                # as the user typed it (for messages)
    initial_lora: Path | None = None     # the file initial_lora names: the weights the run starts from

    @property
    def trained_text(self) -> list[str]:
        """The text encoders that train, in TEXT_PARTS order."""
        return [part for part in TEXT_PARTS if self.part_rates[part] > 0]


def check_run(settings: TrainSettings, dataset, rates, schedule, family: str, device_type: str,
              text_parts: Iterable[str] | None = None, resume_from: str | Path = "",
              output_dir: Path | None = None, initial_lora: Path | None = None) -> RunInputs:
    """Every check of a run that needs no model loaded; raises ValueError naming input, value and fix.

    text_parts: the text encoders the model has (None: all of its family's). resume_from: a run folder
    or resume_state.json under output_dir/lora_lab; a wrong path fails here, what the checkpoint holds
    is checked against the loaded models in plan_run."""
    part_rates = part_rates_for(rates, family, text_parts)
    entry = FAMILIES[family]
    if entry.frozen_text and any(rate > 0 for part, rate in rates.resolved().items()
                                 if part != "unet" and part not in entry.text_parts):
        logger.info("LoRA Lab: %s's text encoders (%s) stay frozen%s; their rates are not used.", entry.label,
                    entry.frozen_text, " (CLIP-L and CLIP-G train at the TE rates)" if entry.text_parts else "")
    check_inputs(settings, dataset, part_rates, schedule, family, device_type)
    check_network(settings.network, settings.use_dora, rates.lora_plus_ratio)   # before anything loads
    if getattr(dataset, "has_controls", False) and not entry.reference_images:
        editing = " or ".join(other.label for other in FAMILIES.values() if other.reference_images)
        raise ValueError(f"Train LoRA: dataset has control images (LoRA Dataset's control_folder) but model is "
                         f"{entry.label}, which takes no reference image. Control images train edit models "
                         f"({editing}): clear control_folder, or connect such a model.")
    resume_from = str(resume_from).strip()
    state = resume.resolve_state_path(resume_from, Path(output_dir) / "lora_lab") if resume_from else None
    if initial_lora is not None and not Path(initial_lora).is_file():
        raise ValueError(f"Train LoRA: initial_lora = {settings.initial_lora!r} is not a file in models/loras. Pick one "
                         "LoraLoader lists, or [None].")
    return RunInputs(settings=settings, dataset=dataset, rates=rates, schedule=schedule, family=family,
                     part_rates=part_rates, resume_state=state, resume_from=resume_from,
                     initial_lora=Path(initial_lora) if initial_lora is not None else None)


@dataclass
class RunPlan:
    """Everything decided before training starts: the checked inputs, the models, where the run writes,
    and for Train LoRA the log, a resumed state (checked against this run) and the settings recorded
    in the file."""

    inputs: RunInputs
    access: ModelAccess
    loras_dir: Path
    output_dir: Path
    run_dir: Path
    base_name: str                          # the file's name without extension (suffixes go before it)
    memory: MemoryPlan | None = None        # None: everything resident, as loaded
    started: float = 0.0
    identity: dict[str, Any] = field(default_factory=dict)
    resumed: resume.ResumeState | None = None
    log_path: Path | None = None            # None: no log.jsonl (the LR Finder writes its own)
    previous_lines: list[str] = field(default_factory=list)
    lora_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def settings(self) -> TrainSettings:
        return self.inputs.settings

    @property
    def dataset(self):
        return self.inputs.dataset

    @property
    def rates(self):
        return self.inputs.rates

    @property
    def schedule(self):
        return self.inputs.schedule

    @property
    def part_rates(self) -> dict[str, float]:
        return self.inputs.part_rates

    @property
    def trained_text(self) -> list[str]:
        return self.inputs.trained_text


def plan_memory_of(inputs: RunInputs, access: ModelAccess) -> MemoryPlan:
    """The memory plan (training/run/memory_plan.py), before anything loads; logged."""
    memory = plan_for_run(inputs.settings, access, inputs.trained_text)
    logger.info("LoRA Lab: %s", memory.summary())
    return memory


def loaded_for(access: ModelAccess, memory: MemoryPlan) -> ContextManager:
    """The host loads the weights as the plan says: resident on the device, or into host memory to stream
    or to quantize there."""
    return access.load(memory.host_loaded) if access.load is not None else contextlib.nullcontext()


def run_folder(loras_dir: Path, output_dir: Path, lora_name: str) -> Path:
    """The folder a run of `lora_name` writes into: it mirrors the file's free name inside models/loras
    ("styles/alice_2" -> output/lora_lab/styles/alice_2)."""
    planned = kohya.free_lora_path(loras_dir, lora_name)
    return Path(output_dir) / "lora_lab" / Path(kohya.lora_name_for(planned, loras_dir)).with_suffix("")


def plan_run(inputs: RunInputs, access: ModelAccess, loras_dir: Path, output_dir: Path,
             memory: MemoryPlan | None = None) -> RunPlan:
    """Train LoRA's plan, with the models loaded: a resumed state checked against them, the run folder
    and its log, and the settings the file records."""
    settings, dataset, rates, schedule = inputs.settings, inputs.dataset, inputs.rates, inputs.schedule
    started = time.time()
    identity = run_identity(settings, rates, schedule, dataset, access)
    resumed = (load_resume_state(inputs.resume_from, inputs.resume_state, identity, settings)
               if inputs.resume_state is not None else None)
    planned = kohya.free_lora_path(loras_dir, settings.lora_name)
    run_dir = run_folder(loras_dir, output_dir, settings.lora_name)
    kohya.check_writable(planned.parent)
    kohya.check_writable(run_dir)
    log_path = run_dir / "log.jsonl"
    previous_lines = previous_log_lines(resumed) if resumed else []
    log_path.write_text("".join(previous_lines), encoding="utf-8")
    lora_settings = {"train": asdict(settings), "learning_rates": asdict(rates), "lr_schedule": asdict(schedule),
                     "dataset": {"source": getattr(dataset, "source", ""), "fingerprint": getattr(dataset, "fingerprint", ""),
                                 "resolution": dataset.options.resolution}}
    if resumed is not None:
        lora_settings["resumed_from"] = {"state": str(resumed.path), "step": resumed.step}
    if memory is not None:
        lora_settings["memory_plan"] = memory.as_dict()
        # The first step's line in log.jsonl carries the plan too (the loop adds it); the file beside it
        # holds the plan of the latest start, a resumed one included.
        text = json.dumps(memory.as_dict(), indent=1)
        resume.write_atomically(run_dir / "memory_plan.json",
                                lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    return RunPlan(inputs=inputs, access=access, loras_dir=loras_dir, output_dir=output_dir, run_dir=run_dir,
                   base_name=kohya.sanitize_lora_name(settings.lora_name), memory=memory, started=started,
                   identity=identity, resumed=resumed, log_path=log_path, previous_lines=previous_lines,
                   lora_settings=lora_settings)


def plan_sweep(inputs: RunInputs, access: ModelAccess, output_dir: Path, run_dir: Path,
               memory: MemoryPlan | None = None) -> RunPlan:
    """The LR Finder's plan: a throwaway LoRA in `run_dir` (made here), no file in models/loras, no log
    (the finder writes sweep.jsonl), nothing to resume."""
    run_dir.mkdir(parents=True)
    return RunPlan(inputs=inputs, access=access, loras_dir=run_dir, output_dir=output_dir, run_dir=run_dir,
                   base_name=kohya.sanitize_lora_name(inputs.settings.lora_name), memory=memory,
                   started=time.time())
