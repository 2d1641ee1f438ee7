"""One LoRA training run, start to file (ComfyUI-agnostic).

The ComfyUI bridge hands over a :class:`ModelAccess` (plain torch modules plus callables); this
module injects LoRA layers, feeds batches, runs the loop, exports the kohya file and removes every
change in ``finally``. Phase 1 (the checks and the plan) is training/run/plan.py; :func:`execute` is
the sequence every run goes through, Train LoRA's and the LR Finder's alike.
"""
from __future__ import annotations

import contextlib
import json
import logging
import time
import traceback
from pathlib import Path
from typing import Callable, TypeVar

import torch

from ..data.feeder import BatchFeeder
from ..families.sigmas import noise_range_sigmas
from ..families.table import FAMILIES, check_family_settings
from ..lr.optimizers import TrainedLayer, build_optimizer, build_param_groups, eval_weights
from ..network import kohya, lycoris
from ..network.initial import file_digest, load_initial_lora, read_lora_file
from ..network.lora import (InjectedLora, checkpointed_forward, inject_lora, lora_weights,
                            out_of_place_clip_layer_forward, out_of_place_forward, patched_forwards,
                            trainable_copies)
from ..network.targets import text_target_paths, unet_blocks, unet_target_paths
from . import resume
from .recast import frozen_layers, recast_saved_weights
from .base_weights import BASE_WEIGHTS, check_base_weights, float8_layers, quantized_weights
from .checkpoints import capture_progress, restore_run, resume_weights, seeded_global_rng
from .host import ModelAccess, TrainCallbacks, TrainingResult
from .loop import LossSettings, LoopSettings, StepRecord, TrainingDiverged, TrainingOutOfMemory, make_grad_scaler, run_loop
from .memory import out_of_memory_message, release_device_memory
from .memory_plan import MemoryPlan
from .metadata import file_metadata, generic_path_note, kohya_fields
from .plan import RunInputs, RunPlan, check_run, loaded_for, plan_memory_of, plan_run
from .streaming import BlockStreamer, DeviceLedger, frozen_bytes
from .train_settings import SAVE_DTYPES, TrainSettings
from .validation import VALIDATION_IMAGES, VALIDATION_TIMESTEPS, ValidationSet

logger = logging.getLogger("lora_lab")

LATENT_CACHE_FOLDER = ".latent_cache"  # under <output>/lora_lab/; lora names cannot start with "."
Outcome = TypeVar("Outcome")


def text_layer_forward(layer: torch.nn.Module, gradient_checkpointing: bool) -> Callable:
    """A trained CLIP layer's forward: out of place (ComfyUI's adds in place), and checkpointed like
    the UNet blocks when gradient checkpointing is on."""
    forward = out_of_place_clip_layer_forward(layer)
    return checkpointed_forward(layer, forward) if gradient_checkpointing else forward


def train_lora(settings: TrainSettings, access: ModelAccess, dataset, rates, schedule, loras_dir: Path,
               output_dir: Path, callbacks: TrainCallbacks | None = None, resume_from: str | Path = ""
               ) -> TrainingResult:
    """Check the inputs against the models in `access` (:func:`check_run`), then :func:`train_checked`."""
    inputs = check_run(settings, dataset, rates, schedule, access.family, access.device.type,
                       access.text_encoders, resume_from, output_dir)
    return train_checked(inputs, access, loras_dir, output_dir, callbacks)


def train_checked(inputs: RunInputs, access: ModelAccess, loras_dir: Path, output_dir: Path,
                  callbacks: TrainCallbacks | None = None) -> TrainingResult:
    """Train, save the LoRA into `loras_dir` and return where it went. The modules in `access` are
    restored exactly (originals put back) whatever happens.

    inputs: from :func:`check_run` (a node calls it before loading any model); with a resume_from, the
    run must have had the same model, dataset and settings (checked before anything is trained).
    """
    def train(run: Run) -> tuple[list[StepRecord], Path]:
        try:
            records = run.run()
        except BaseException as error:
            run.interrupted(error)
            raise
        return records, run.export(run.plan.base_name, inputs.settings.steps)

    run, (records, path) = execute(
        inputs, access, lambda access, memory: plan_run(inputs, access, loras_dir, output_dir, memory),
        callbacks or TrainCallbacks(), train)
    plan = run.plan
    if plan.resumed is not None:
        records = [StepRecord(**json.loads(line)) for line in plan.previous_lines] + records
    return TrainingResult(path=path, records=records, run_dir=plan.run_dir, seconds=time.time() - plan.started,
                          cache_bytes=run.feeder.cached_bytes(), memory=plan.memory.summary(),
                          device_peak=run.ledger.peak, model_note=generic_path_note(access) or "")


def execute(inputs: RunInputs, access: ModelAccess, make_plan: Callable[[ModelAccess, MemoryPlan], RunPlan],
            callbacks: TrainCallbacks, train: Callable[[Run], Outcome],
            validation_shape: tuple[int, int] | None = None) -> tuple[Run, Outcome]:
    """The sequence of every run: the run's sigma sampler, the memory plan, the weights loaded as
    planned, the plan (`make_plan(access, memory)`, phase 1's rest: folders, log, resumed state), attach
    the LoRA (phase 2), prepare (phase 3), `train(run)` (phase 4, the caller's: the step loop and what
    follows it); detach always, whatever `train` raises. Returns the run and what `train` returned."""
    settings = inputs.settings
    if access.entry is not FAMILIES[inputs.family]:
        # An entry resolved from the model (the generic path): its objective is known only now, before
        # anything loads; a first-class family's settings were checked in check_run.
        check_family_settings(access.entry, settings.noise_offset, settings.min_snr_gamma, settings.timestep_sampling)
    access = access.with_sampling(settings.timestep_sampling, settings.timestep_shift,
                                  noise_range_sigmas(access.entry, settings.noise_range, settings.noise_boundary))
    check_base_weights(settings, access)
    memory = plan_memory_of(inputs, access)
    with loaded_for(access, memory):
        run = Run(make_plan(access, memory), callbacks, validation_shape)
        with torch.inference_mode(False), contextlib.ExitStack() as stack:
            try:
                run.attach(stack)
                run.prepare(stack)
                outcome = train(run)
            finally:
                run.detach()
    return run, outcome


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
        self.fp8_base = False                 # the diffusion model trained over fp8 weights (as loaded or quantized)

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
        dtype = BASE_WEIGHTS[settings.base_weights]
        if dtype is not None:   # fp8 copies made in host memory, before anything is copied to the device
            layers = access.quantizable_layers()
            count = stack.enter_context(quantized_weights(layers, dtype))
            stack.enter_context(access.cast_per_forward(layers))
            logger.info("LoRA Lab: base_weights %s: %d Linear/Conv weights of the diffusion model quantized for the run",
                        settings.base_weights, count)
        self.fp8_base = bool(float8_layers(access.unet.modules()))
        streamed_modules = frozenset(id(module) for block in streamed for module in block.modules())
        if plan.memory is not None and plan.memory.host_loaded:   # the rest becomes resident on the device
            stack.enter_context(trainable_copies(*roots, device=access.device, streamed=streamed_modules))
        else:
            stack.enter_context(trainable_copies(*roots, offload_device=access.offload_device))
        stack.enter_context(patched_forwards(forward_patches))
        unet_paths = unet_target_paths(access.unet, settings.target, access.entry)
        rank, alpha = lycoris.rank_and_alpha(settings)   # the network was checked in check_run
        network = dict(network=settings.network, lokr_factor=settings.lokr_factor,
                       lokr_decompose_both=settings.lokr_decompose_both)
        if plan.part_rates["unet"] > 0:
            self.injected.append(inject_lora(access.unet, "unet", unet_paths, rank, alpha,
                                             settings.use_dora, settings.training_seed, **network))
        for offset, part in enumerate(plan.trained_text, start=1):
            paths = text_target_paths(access.text_encoders[part], settings.target)
            self.injected.append(inject_lora(access.text_encoders[part], part, paths, rank, alpha,
                                             settings.use_dora, settings.training_seed + offset, **network))
        if plan.inputs.initial_lora is not None and plan.resumed is None:   # a resumed run has its own weights
            self.start_from(plan.inputs.initial_lora)
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
        # Backward casts frozen weights again rather than keeping each forward's copy (training/run/recast.py).
        stack.enter_context(recast_saved_weights(frozen_layers(roots, skip=streamed_modules)))

    # Phase 3 ------------------------------------------------------------------------------------
    def prepare(self, stack: contextlib.ExitStack) -> None:
        """Optimizer, the feeder with everything static encoded up front (then the encoders may leave
        the GPU), the generators, and a resumed run's state."""
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        blocks = unet_blocks([module.path for lora in self.injected if lora.part == "unet" for module in lora.modules],
                             access.entry)
        layers = [TrainedLayer(part=module.part, block=blocks[module.path] if module.part == "unet" else "",
                               down=module.down, up=module.up, magnitude=module.magnitude,
                               factors=tuple(module.factors.values()))
                  for lora in self.injected for module in lora.modules]
        groups = build_param_groups(layers, plan.part_rates, plan.rates.lora_plus_ratio, plan.rates.block_weight)
        self.optimizer = build_optimizer(settings.optimizer, groups, settings.weight_decay, settings.max_effective_lr)
        self.feeder = BatchFeeder(plan.dataset, access, bool(plan.trained_text), settings,
                                  plan.output_dir / "lora_lab" / LATENT_CACHE_FOLDER)
        latents_ready, captions_ready = self.feeder.prepare(self.callbacks.check_cancel)
        if self.validation_shape is not None:   # encoded now, before the encoders may leave the device
            images, timesteps = self.validation_shape
            self.validation = ValidationSet(self.feeder, access.objective, settings.precision, access.device,
                                            images=images, timesteps=timesteps)
            self.validation.weights = lambda: eval_weights(self.optimizer)   # schedule-free: measured at x
        if access.release_encoders is not None:
            access.release_encoders(latents_ready, captions_ready)
        self.generator = torch.Generator(device=access.device).manual_seed(settings.training_seed)
        self.loop_settings = LoopSettings(
            total_steps=settings.steps, gradient_accumulation=settings.gradient_accumulation,
            max_grad_norm=settings.max_grad_norm, noise_offset=settings.noise_offset,
            min_snr_gamma=settings.min_snr_gamma, precision=settings.precision, device_type=access.device.type,
            start_step=plan.resumed.step if plan.resumed else 0,
            loss=LossSettings(settings.loss, settings.huber_c, settings.huber_schedule))
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
                        check_cancel=self.callbacks.check_cancel, scaler=self.scaler, validate=validate,
                        memory=plan.memory.as_record() if plan.memory is not None else None)

    def _after_step(self, record: StepRecord, total: int) -> None:
        settings = self.plan.settings
        done = record.step + 1
        self.progress = self._capture(done)
        if settings.save_every_n_steps and done % settings.save_every_n_steps == 0 and done < settings.steps:
            self.export(f"{self.plan.base_name}_step{done:05d}", done)
            self.checkpoint()
        if self.callbacks.on_step is not None:
            self.callbacks.on_step(record, total)
        if self.callbacks.on_sample is not None:   # previews of the weights that are saved, when it samples
            self.callbacks.on_sample(done, self.plan.run_dir, lambda: eval_weights(self.optimizer))

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
        """Write the LoRA as it is now into models/loras under `name` (kohya keys and metadata): a
        schedule-free optimizer's evaluation weights x (its averaged iterate), the training point y kept
        for the run and its resume checkpoints."""
        with eval_weights(self.optimizer):
            return self._export(name, steps_done)

    def _export(self, name: str, steps_done: int) -> Path:
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        entries = []
        key_style = kohya.network_key_style(access.entry.key_style, settings.network)
        for lora in self.injected:
            names = self.file_names(lora.part, [module.path for module in lora.modules])
            for module in lora.modules:
                entries += kohya.file_entries(names[module.path],
                                              lora_weights(module, torch.float32, access.dora_norm))
        tensors = kohya.lora_state_dict(entries, settings.alpha, SAVE_DTYPES[settings.save_precision], key_style)
        conv_trained = any(isinstance(module.layer.get_base_layer(), torch.nn.Conv2d)
                           and tuple(module.layer.get_base_layer().kernel_size) != (1, 1)
                           for lora in self.injected for module in lora.modules)
        fields = kohya_fields(settings, plan.rates, plan.schedule, plan.dataset, access, plan.started,
                               plan.part_rates, steps_done, conv_trained, name, self.fp8_base)
        metadata = file_metadata(fields, plan.lora_settings, tensors, access, name, plan.dataset.options.resolution,
                                 plan.started)
        return kohya.save_lora(tensors, metadata, plan.loras_dir, name)

    def file_names(self, part: str, paths: list[str]) -> dict:
        """The key stems the file gives these layers of `part` (a fused layer split by rows: [(stem, rows,
        transform)]), in the run's key style."""
        access, settings = self.plan.access, self.plan.settings
        key_style = kohya.network_key_style(access.entry.key_style, settings.network)
        if key_style != access.entry.key_style:   # LoKr / LoHa on a diffusers-style family: kohya names
            return (access.unet_kohya_names(paths, key_style) if part == "unet"
                    else access.text_kohya_names(part, paths, key_style))
        return access.unet_kohya_names(paths) if part == "unet" else access.text_kohya_names(part, paths)

    def start_from(self, path: Path) -> None:
        """initial_lora: the injected layers start from the file's weights (training/network/initial.py); the
        file's keys no trained layer takes are logged and listed in the run's settings, with the file's hash."""
        settings = self.plan.settings
        tensors = read_lora_file(path)
        _, alpha = lycoris.rank_and_alpha(settings)
        extra = load_initial_lora(self.injected, self.file_names, tensors, path.name, settings.network,
                                  settings.use_dora, alpha, self.plan.access.dora_norm)
        if extra:
            logger.warning("LoRA Lab: initial_lora %s has %d key(s) no trained layer takes (layers this model lacks, "
                           "or parts that do not train now), left out: %s", path.name, len(extra),
                           ", ".join(extra[:8]) + (" ..." if len(extra) > 8 else ""))
        self.plan.lora_settings["initial_lora"] = {"file": path.name, "sha256": file_digest(path),
                                                   "keys_left_out": extra}

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
