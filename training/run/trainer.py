"""One LoRA training run, start to file (ComfyUI-agnostic).

The ComfyUI bridge hands over a :class:`ModelAccess` (plain torch modules plus callables); this
module injects LoRA layers, feeds batches, runs the loop, exports the kohya file and removes every
change in ``finally``.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ..data.feeder import BatchFeeder
from ..lr.optimizers import TrainedLayer, build_optimizer, build_param_groups
from ..network import kohya
from ..network.lora import (InjectedLora, checkpointed_forward, inject_lora, lora_weights,
                            out_of_place_clip_layer_forward, out_of_place_forward, patched_forwards,
                            trainable_copies)
from ..network.targets import text_target_paths, unet_blocks, unet_target_paths
from . import resume
from .checkpoints import (capture_progress, load_resume_state, previous_log_lines, restore_run, resume_weights,
                          run_identity, seeded_global_rng)
from .host import ModelAccess, TrainCallbacks, TrainingResult
from .loop import LoopSettings, StepRecord, TrainingDiverged, TrainingOutOfMemory, make_grad_scaler, run_loop
from .memory import out_of_memory_message, release_device_memory
from .memory_plan import MemoryPlan, plan_for_run
from .streaming import BlockStreamer, DeviceLedger, frozen_bytes
from .metadata import kohya_fields, file_metadata
from .train_settings import SAVE_DTYPES, TEXT_PARTS, TrainSettings, check_inputs, part_rates_for
from .validation import VALIDATION_IMAGES, VALIDATION_TIMESTEPS, ValidationSet

logger = logging.getLogger("lora_lab")

LATENT_CACHE_FOLDER = ".latent_cache"  # under <output>/lora_lab/; lora names cannot start with "."


def text_layer_forward(layer: torch.nn.Module, gradient_checkpointing: bool) -> Callable:
    """A trained CLIP layer's forward: out of place (ComfyUI's adds in place), and checkpointed like
    the UNet blocks when gradient checkpointing is on."""
    forward = out_of_place_clip_layer_forward(layer)
    return checkpointed_forward(layer, forward) if gradient_checkpointing else forward


def train_lora(settings: TrainSettings, access: ModelAccess, dataset, rates, schedule, loras_dir: Path,
               output_dir: Path, callbacks: TrainCallbacks | None = None, resume_from: str | Path = ""
               ) -> TrainingResult:
    """Train, save the LoRA into `loras_dir` and return where it went. The modules in `access` are
    restored exactly (originals put back) whatever happens.

    resume_from: a run folder or resume_state.json (see training/run/resume.py) to continue from; the run
    must have had the same model, dataset and settings (checked before anything is trained).

    The phases, in order: plan (every check and path, no heavy work), attach (trainable copies and
    LoRA layers), prepare (optimizer, cached latents/captions, generators, a resumed state), run (the
    step loop, with periodic saves), and on an exception the interruption policy; detach always.
    """
    access = access.with_sampling(settings.timestep_sampling, settings.timestep_shift)
    memory = plan_memory_of(settings, access, rates)
    with loaded_for(access, memory):
        plan = plan_run(settings, access, dataset, rates, schedule, loras_dir, output_dir, resume_from, memory)
        run = Run(plan, callbacks or TrainCallbacks())
        with torch.inference_mode(False), contextlib.ExitStack() as stack:
            try:
                run.attach(stack)
                run.prepare(stack)
                try:
                    records = run.run()
                except BaseException as error:
                    run.interrupted(error)
                    raise
                path = run.export(plan.base_name, settings.steps)
            finally:
                run.detach()
    if plan.resumed is not None:
        records = [StepRecord(**json.loads(line)) for line in plan.previous_lines] + records
    return TrainingResult(path=path, records=records, run_dir=plan.run_dir, seconds=time.time() - plan.started,
                          cache_bytes=run.feeder.cached_bytes(), memory=memory.summary(), device_peak=run.ledger.peak)


def plan_memory_of(settings: TrainSettings, access: ModelAccess, rates) -> MemoryPlan:
    """The memory plan (training/run/memory_plan.py), before anything loads; logged."""
    part_rates = part_rates_for(rates, access.family, access.text_encoders)
    memory = plan_for_run(settings, access, [part for part in TEXT_PARTS if part_rates[part] > 0])
    logger.info("LoRA Lab: %s", memory.summary())
    return memory


def loaded_for(access: ModelAccess, memory: MemoryPlan) -> ContextManager:
    """The host loads the weights as the plan says: resident on the device, or into host memory to stream."""
    return access.load(memory.mode == "stream") if access.load is not None else contextlib.nullcontext()


@dataclass
class RunPlan:
    """Everything decided before training starts: checked inputs, rates per part, the file and run
    folder, a resumed state (checked against this run), and the settings recorded in the file."""

    settings: TrainSettings
    access: ModelAccess
    dataset: Any
    rates: Any
    schedule: Any
    loras_dir: Path
    output_dir: Path
    started: float
    part_rates: dict[str, float]
    trained_text: list[str]
    identity: dict[str, Any]
    resumed: resume.ResumeState | None
    run_dir: Path
    log_path: Path
    previous_lines: list[str]
    base_name: str
    lora_settings: dict[str, Any]
    memory: MemoryPlan | None = None        # None: everything resident, as loaded


def plan_run(settings: TrainSettings, access: ModelAccess, dataset, rates, schedule, loras_dir: Path,
             output_dir: Path, resume_from: str | Path, memory: MemoryPlan | None = None) -> RunPlan:
    """Phase 1: every check that needs no heavy work, then the run folder and its log."""
    started = time.time()
    part_rates = part_rates_for(rates, access.family, access.text_encoders)
    check_inputs(settings, dataset, part_rates, schedule, access.entry, access.device.type)
    identity = run_identity(settings, rates, schedule, dataset, access)
    resumed = load_resume_state(resume_from, output_dir / "lora_lab", identity, settings) if resume_from else None
    # The run folder mirrors the file's name inside models/loras ("styles/alice_2" -> lora_lab/styles/alice_2).
    planned = kohya.free_lora_path(loras_dir, settings.lora_name)
    run_dir = output_dir / "lora_lab" / Path(kohya.lora_name_for(planned, loras_dir)).with_suffix("")
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
        # log.jsonl stays one line per optimizer step (its readers count them): the plan sits beside it.
        text = json.dumps(memory.as_dict(), indent=1)
        resume.write_atomically(run_dir / "memory_plan.json",
                                lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    return RunPlan(settings=settings, access=access, dataset=dataset, rates=rates, schedule=schedule,
                   loras_dir=loras_dir, output_dir=output_dir, started=started, part_rates=part_rates,
                   trained_text=[part for part in TEXT_PARTS if part_rates[part] > 0], identity=identity,
                   resumed=resumed, run_dir=run_dir, log_path=log_path, previous_lines=previous_lines,
                   base_name=kohya.sanitize_lora_name(settings.lora_name),   # no extension: suffixes go before it
                   lora_settings=lora_settings, memory=memory)


class Run:
    """One run's moving parts (LoRA layers, optimizer, feeder, generators) and its progress: what a
    checkpoint or an interrupted save must hold."""

    def __init__(self, plan: RunPlan, callbacks: TrainCallbacks,
                 validation_shape: tuple[int, int] | None = None) -> None:
        """validation_shape: (images, timesteps) of a validation set to build in prepare(); by default
        Train LoRA's, when validate_every_n_steps is on."""
        self.plan = plan
        self.callbacks = callbacks
        if validation_shape is None and plan.settings.validate_every_n_steps > 0:
            validation_shape = (VALIDATION_IMAGES, VALIDATION_TIMESTEPS)
        self.validation_shape = validation_shape
        self.injected: list[InjectedLora] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.feeder: BatchFeeder | None = None
        self.generator: torch.Generator | None = None
        self.scaler: torch.amp.GradScaler | None = None
        self.loop_settings: LoopSettings | None = None
        self.validation: ValidationSet | None = None
        self.progress: resume.Progress | None = None          # after the last finished step
        self.checkpoint_steps: list[int] = [plan.resumed.step] if plan.resumed else []
        self.checkpoint_dirs: list[Path] = [plan.resumed.path.parent] if plan.resumed else []   # latest last
        self.out_of_memory = False
        self.streamer: BlockStreamer | None = None
        self.ledger = DeviceLedger()          # base weights on the compute device (resident + streamed copies)

    # Phase 2 ------------------------------------------------------------------------------------
    def attach(self, stack: contextlib.ExitStack) -> None:
        """Trainable copies of the trained parts, their patched forwards, then the LoRA layers."""
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        roots = [access.unet] + [access.text_encoders[part] for part in plan.trained_text]
        forward_patches = [(layer, text_layer_forward(layer, settings.gradient_checkpointing))
                           for part in plan.trained_text for layer in access.text_layers.get(part, [])]
        streamed = ([access.unet_blocks[index] for index in plan.memory.streamed]
                    if plan.memory is not None else [])
        self.streamer = BlockStreamer(streamed, access.device, ledger=self.ledger) if streamed else None
        for block in access.unet_blocks:
            forward = out_of_place_forward(block) if access.in_place_blocks else None
            if self.streamer is not None and block in streamed:
                # Inside the checkpoint, so backward's recompute borrows the weights again instead of
                # autograd keeping the forward's copies.
                forward = checkpointed_forward(block, self.streamer.forward(block, forward))
            elif settings.gradient_checkpointing:
                forward = checkpointed_forward(block, forward)
            if forward is not None:
                forward_patches.append((block, forward))
        if access.training_mode is not None:
            stack.enter_context(access.training_mode())
        streamed_modules = frozenset(id(module) for block in streamed for module in block.modules())
        if self.streamer is not None:   # loaded into host memory: the rest becomes resident on the device
            stack.enter_context(trainable_copies(*roots, device=access.device, streamed=streamed_modules))
        else:
            stack.enter_context(trainable_copies(*roots, offload_device=access.offload_device))
        stack.enter_context(patched_forwards(forward_patches))
        unet_paths = unet_target_paths(access.unet, settings.target, access.entry)
        if plan.part_rates["unet"] > 0:
            self.injected.append(inject_lora(access.unet, "unet", unet_paths, settings.rank, settings.alpha,
                                             settings.use_dora, settings.training_seed))
        for offset, part in enumerate(plan.trained_text, start=1):
            paths = text_target_paths(access.text_encoders[part], settings.target)
            self.injected.append(inject_lora(access.text_encoders[part], part, paths, settings.rank, settings.alpha,
                                             settings.use_dora, settings.training_seed + offset))
        for lora in self.injected:
            for parameter in lora.parameters():
                parameter.data = parameter.data.to(access.device)
        trained = frozenset(id(parameter) for lora in self.injected for parameter in lora.parameters())
        self.ledger.resident = (sum(frozen_bytes(root, trained) for root in roots)
                                - sum(frozen_bytes(block, trained) for block in streamed))
        self.ledger.peak = max(self.ledger.peak, self.ledger.resident)
        if self.streamer is not None:
            stack.enter_context(self.streamer.active(
                parameter for lora in self.injected for parameter in lora.parameters()))

    # Phase 3 ------------------------------------------------------------------------------------
    def prepare(self, stack: contextlib.ExitStack) -> None:
        """Optimizer, the feeder with everything static encoded up front (then the encoders may leave
        the GPU), the generators, and a resumed run's state."""
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        blocks = unet_blocks([module.path for lora in self.injected if lora.part == "unet" for module in lora.modules],
                             access.entry)
        layers = [TrainedLayer(part=module.part, block=blocks[module.path] if module.part == "unet" else "",
                               down=module.down, up=module.up, magnitude=module.magnitude)
                  for lora in self.injected for module in lora.modules]
        groups = build_param_groups(layers, plan.part_rates, plan.rates.lora_plus_ratio, plan.rates.block_weight)
        self.optimizer = build_optimizer(settings.optimizer, groups, settings.weight_decay)
        self.feeder = BatchFeeder(plan.dataset, access, bool(plan.trained_text), settings,
                                  plan.output_dir / "lora_lab" / LATENT_CACHE_FOLDER)
        latents_ready, captions_ready = self.feeder.prepare(self.callbacks.check_cancel)
        if self.validation_shape is not None:   # encoded now, before the encoders may leave the device
            images, timesteps = self.validation_shape
            self.validation = ValidationSet(self.feeder, access.objective, settings.precision, access.device,
                                            images=images, timesteps=timesteps)
        if access.release_encoders is not None:
            access.release_encoders(latents_ready, captions_ready)
        self.generator = torch.Generator(device=access.device).manual_seed(settings.training_seed)
        self.loop_settings = LoopSettings(
            total_steps=settings.steps, gradient_accumulation=settings.gradient_accumulation,
            max_grad_norm=settings.max_grad_norm, noise_offset=settings.noise_offset,
            min_snr_gamma=settings.min_snr_gamma, precision=settings.precision, device_type=access.device.type,
            start_step=plan.resumed.step if plan.resumed else 0)
        self.scaler = make_grad_scaler(self.loop_settings)
        stack.enter_context(seeded_global_rng(settings.training_seed, access.device))
        if plan.resumed is not None:
            restore_run(plan.resumed, self.injected, self.optimizer, self.feeder, self.generator, self.scaler,
                        access.device)
        self.progress = self._capture(self.loop_settings.start_step)

    # Phase 4 ------------------------------------------------------------------------------------
    def run(self, multiplier: Callable[[int], float] | None = None,
            validate: Callable[[int], float | None] | None = None) -> list[StepRecord]:
        """The step loop. By default the rates follow the plan's schedule and the validation loss is
        measured every validate_every_n_steps steps and at the last; the LR Finder passes its own."""
        plan, settings = self.plan, self.plan.settings
        if multiplier is None:
            multiplier = lambda step: plan.schedule.multiplier(step, settings.steps)  # noqa: E731
        if validate is None and self.validation is not None and settings.validate_every_n_steps > 0:
            validate = self.validation.every(settings.validate_every_n_steps, settings.steps)
        return run_loop(self.loop_settings, self.optimizer, plan.access.objective, self.feeder, multiplier,
                        self.generator, plan.log_path, on_step=self._after_step,
                        check_cancel=self.callbacks.check_cancel, scaler=self.scaler, validate=validate)

    def _after_step(self, record: StepRecord, total: int) -> None:
        settings = self.plan.settings
        done = record.step + 1
        self.progress = self._capture(done)
        if settings.save_every_n_steps and done % settings.save_every_n_steps == 0 and done < settings.steps:
            self.export(f"{self.plan.base_name}_step{done:05d}", done)
            self.checkpoint()
        if self.callbacks.on_step is not None:
            self.callbacks.on_step(record, total)
        if self.callbacks.on_sample is not None:
            self.callbacks.on_sample(done, self.plan.run_dir)

    def _capture(self, step: int) -> resume.Progress:
        return capture_progress(step, self.feeder, self.generator, self.scaler, self.plan.access.device)

    # Phase 5: the interruption policy -------------------------------------------------------------
    def interrupted(self, error: BaseException) -> None:
        """Cancel, divergence or out of memory: keep what was trained so far (the last good weights)
        when at least one step was trained, and a checkpoint on Cancel; re-raise with what was saved.
        Returns only for other errors (the caller re-raises them unchanged)."""
        plan, settings = self.plan, self.plan.settings
        cancelled = self.callbacks.is_cancel(error)
        self.out_of_memory = isinstance(error, torch.OutOfMemoryError)
        if self.out_of_memory:
            # The failed step's activations hang off the traceback's finished frames: free them
            # before anything else needs memory.
            traceback.clear_frames(error.__traceback__)
            release_device_memory(plan.access.device)
        step = self.progress.step if self.progress is not None else 0
        saved_name = ""
        if self.injected and step > 0 and (cancelled or self.out_of_memory or isinstance(error, TrainingDiverged)):
            saved_name = kohya.lora_name_for(self.export(f"{plan.base_name}_interrupted", step), plan.loras_dir)
            logger.warning("LoRA Lab: training stopped (%s); saved what was trained so far to %s",
                           type(error).__name__, saved_name)
            if cancelled and step not in self.checkpoint_steps and step < settings.steps:
                self.checkpoint()   # cancel comes between steps: weights and progress agree
        if isinstance(error, TrainingDiverged):
            raise TrainingDiverged(error.step, error.loss, settings.precision, saved=saved_name,
                                   what=error.what, history=error.history) from None
        if self.out_of_memory:
            raise TrainingOutOfMemory(out_of_memory_message(
                settings, plan.dataset, step, saved_name,
                self.checkpoint_dirs[-1] if self.checkpoint_dirs else None)) from None

    # Saving -------------------------------------------------------------------------------------
    def export(self, name: str, steps_done: int) -> Path:
        """Write the LoRA as it is now into models/loras under `name` (kohya keys and metadata)."""
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        entries = []
        for lora in self.injected:
            paths = [module.path for module in lora.modules]
            names = (access.unet_kohya_names(paths) if lora.part == "unet"
                     else access.text_kohya_names(lora.part, paths))
            for module in lora.modules:
                entries += kohya.file_entries(names[module.path],
                                              lora_weights(module, torch.float32, access.dora_norm))
        tensors = kohya.lora_state_dict(entries, settings.alpha, SAVE_DTYPES[settings.save_precision],
                                        access.entry.key_style)
        conv_trained = any(isinstance(module.layer.get_base_layer(), torch.nn.Conv2d)
                           and tuple(module.layer.get_base_layer().kernel_size) != (1, 1)
                           for lora in self.injected for module in lora.modules)
        fields = kohya_fields(settings, plan.rates, plan.schedule, plan.dataset, access, plan.started,
                               plan.part_rates, steps_done, conv_trained, name)
        metadata = file_metadata(fields, plan.lora_settings, tensors, access, name, plan.dataset.options.resolution,
                                 plan.started)
        return kohya.save_lora(tensors, metadata, plan.loras_dir, name)

    def checkpoint(self) -> None:
        """A resume checkpoint of the last finished step (output/lora_lab/<run>/)."""
        plan = self.plan
        resume.save_state(plan.run_dir, plan.identity, self.progress, resume_weights(self.injected),
                          self.optimizer.state_dict(),
                          extra={"lora_name": plan.base_name, "steps": plan.settings.steps})
        self.checkpoint_steps.append(self.progress.step)
        self.checkpoint_dirs.append(plan.run_dir)

    # Always -------------------------------------------------------------------------------------
    def detach(self) -> None:
        """Remove the LoRA layers (the ExitStack then restores forwards and the original tensors)."""
        for lora in reversed(self.injected):
            lora.remove()
        if self.optimizer is not None:
            self.optimizer.state.clear()   # optimizer moments live on the device: release them now
        if self.out_of_memory:
            release_device_memory(self.plan.access.device)
