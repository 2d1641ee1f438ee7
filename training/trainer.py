"""One LoRA training run, start to file (ComfyUI-agnostic).

The ComfyUI bridge hands over a :class:`ModelAccess` (plain torch modules plus callables); this
module injects LoRA layers, feeds batches, runs the loop, exports the kohya file and removes every
change in ``finally``.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import math
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from . import kohya, resume
from .families import FAMILIES, TIMESTEP_SAMPLINGS, check_family_settings
from .feeder import BatchFeeder, batches_per_epoch_of, largest_bucket_size
from .host import ModelAccess, TrainCallbacks, TrainingResult
from .lora import (InjectedLora, checkpointed_forward, inject_lora, lora_weights, out_of_place_clip_layer_forward,
                   out_of_place_forward,
                   patched_forwards, text_target_paths, trainable_copies, unet_blocks, unet_target_paths, TARGETS)
from .loop import LoopSettings, StepRecord, TrainingDiverged, TrainingOutOfMemory, make_grad_scaler, run_loop
from .optimizers import OPTIMIZERS, TrainedLayer, build_optimizer, build_param_groups, check_optimizer
from .settings import setting, validate
from .validation import VALIDATION_IMAGES, VALIDATION_TIMESTEPS, ValidationSet

logger = logging.getLogger("lora_lab")

TEXT_PARTS = ("text_encoder", "text_encoder_2")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LATENT_CACHE_FOLDER = ".latent_cache"  # under <output>/lora_lab/; lora names cannot start with "."


PRECISIONS = ("bf16", "fp16", "fp32")
# TrainSettings fields that came after the node's first release: they sit in its "optional" section.
OPTIONAL_SETTINGS = ("save_precision", "validate_every_n_steps", "timestep_sampling", "timestep_shift")
# Appended settings a run made before them is identical without, at their default (resume checks).
LATER_DEFAULTS = {"timestep_sampling": "auto", "timestep_shift": 3.0}


def _lora_name_problem(name: str) -> None:
    kohya.sanitize_lora_name(name)   # raises naming the problem and the fix


@dataclass(frozen=True)
class TrainSettings:
    """The Train LoRA node's widgets: each field is the one source of its default, range and help
    (the node's INPUT_TYPES and the README's reference are generated from it)."""

    steps: int = setting(1000, "Optimizer updates. One step = batch_size x gradient_accumulation images.",
                         min=1, max=1_000_000)
    batch_size: int = setting(1, "Images per forward pass (all from one aspect-ratio bucket).", min=1, max=256)
    gradient_accumulation: int = setting(1, "Forward passes summed into one update (bigger effective batch, "
                                            "same memory).", min=1, max=1024)
    rank: int = setting(16, "LoRA rank (network_dim): capacity and file size.", min=1, max=1024)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / rank.", min=0.01, max=1024.0,
                           step=0.5, hint="(alpha = rank gives scale 1)")
    target: str = setting("attention_ff", "Which layers get LoRA: attention only, attention + feed-forward, every "
                                          "linear and conv layer of the UNet blocks, or kohya_default: exactly "
                                          "sd-scripts' default LoRA (every linear / 1x1 conv of the UNet's "
                                          "transformers, proj_in/proj_out included; 192 modules on SD1.5, 722 on SDXL).",
                          choices=tuple(TARGETS))
    use_dora: bool = setting(False, "Weight-decomposed LoRA (DoRA).")
    optimizer: str = setting("AdamW", "AdamW is the safe choice. 8-bit ones need bitsandbytes and an NVIDIA "
                                      "GPU; Prodigy needs prodigyopt (use rates near 1.0).", choices=tuple(OPTIMIZERS))
    weight_decay: float = setting(0.01, "Decoupled weight decay of the LoRA matrices. The DoRA magnitude gets "
                                        "none: it is a per-row norm, and decay would shrink every layer.",
                                  min=0.0, max=10.0, step=0.001)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0 = off.", min=0.0, max=1000.0, step=0.1)
    precision: str = setting("bf16", "Compute precision. bf16 on modern GPUs; fp16 uses loss scaling; fp32 on "
                                     "CPU (bf16 is very slow there). The file's dtype is save_precision.",
                             choices=PRECISIONS)
    gradient_checkpointing: bool = setting(True, "Recompute activations in backward: much less memory, "
                                                 "~20-30% slower.")
    training_seed: int = setting(0, "Drives data order, caption shuffle/dropout, flips, crops, noise, "
                                    "timesteps and LoRA init. Same seed + settings = same LoRA.",
                                 min=0, max=0xFFFFFFFF)
    noise_offset: float = setting(0.0, "kohya noise offset (0.05-0.1 helps very dark/bright images); 0 = off.",
                                  min=0.0, max=1.0, step=0.01)
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting (5 is typical); 0 = off.", min=0.0, max=100.0,
                                   step=0.5)
    lora_name: str = setting("lora_lab", "File name in models/loras (sub-folders allowed). A taken name gets "
                                         "_2, _3...", check=_lora_name_problem)
    save_every_n_steps: int = setting(0, "Also save <lora_name>_stepNNNNN every N steps; 0 = off.", min=0,
                                      max=1_000_000)
    cache_latents_to_disk: bool = setting(False, "Keep encoded latents in the run folder (output/lora_lab/<name>) "
                                                 "so re-runs skip the VAE. Not possible with random crop.")
    save_precision: str = setting("fp16", "Dtype of the weights in the saved file (kohya's --save_precision): fp16 "
                                          "is what most LoRAs ship in and every loader takes; fp32 keeps the "
                                          "trained values exactly (twice the size); bf16 keeps fp32's range at "
                                          "fp16's size. Weights beyond fp16's range (a diverging run) are saved in "
                                          "fp32 rather than as inf.", choices=tuple(SAVE_DTYPES))
    validate_every_n_steps: int = setting(0, (
        "Every N steps (and at the last), measure the stable validation loss: up to 4 dataset images, each "
        "with fixed noise at 8 fixed timesteps, no gradient. Unlike the training loss it only moves when the "
        "weights do; it is drawn on the chart and logged as val_loss. Costs about 32 forward passes each "
        "time; training is the same with or without it. 0 = off."), min=0, max=1_000_000)
    timestep_sampling: str = setting("auto", (
        "Which noise levels train (flow-matching models: Flux, SD3, Z-Image). auto = the family's usual "
        "default: Flux = its resolution-dependent shift, SD3 = logit_normal, Z-Image = shift 3.0. uniform = "
        "every level alike; logit_normal = more weight on the middle levels (SD3 paper); shift = logit_normal "
        "moved toward high noise by timestep_shift. SD1.x/2.x/SDXL: auto or uniform (their 1000 timesteps "
        "uniformly)."), choices=tuple(TIMESTEP_SAMPLINGS))
    timestep_shift: float = setting(3.0, "The shift of timestep_sampling = shift (sigma = s*t / (1 + (s-1)*t)); "
                                         "> 1 trains more at high noise (composition), < 1 at low noise (detail).",
                                    min=0.1, max=20.0, step=0.05)

    def __post_init__(self) -> None:
        validate(self, "Train LoRA")


@dataclass(frozen=True)
class RunOptions:
    """Train LoRA's optional inputs that are not training settings: previews and resume."""

    sample_prompt: str = setting("", (
        "Preview prompts drawn with the model being trained, one per line, kohya options allowed: "
        "'a photo of sks --n blurry --w 512 --h 512 --d 42 --l 7 --s 20' (negative, size, seed, cfg, "
        "steps; Euler sampler). Saved in output/lora_lab/<name>/samples/ and shown on this node."), multiline=True)
    sample_every_n_steps: int = setting(0, "Draw the sample prompts every N optimizer steps; 0 = off.", min=0,
                                        max=1_000_000)
    resume_from: str = setting("", (
        "Continue a stopped run from its last checkpoint: the run folder (output/lora_lab/<name>, or "
        "just <name>) or its resume_state.json. Checkpoints are written every save_every_n_steps and on "
        "Cancel. The model, dataset, rates, schedule and settings must match the saved run (lora_name, "
        "save_every_n_steps, cache_latents_to_disk, gradient_checkpointing and save_precision may "
        "change); the result equals an uninterrupted run. Empty = start a new run."))

    def __post_init__(self) -> None:
        validate(self, "Train LoRA")


def part_rates_for(rates, family: str, text_parts: Iterable[str] | None = None) -> dict[str, float]:
    """Base rate per part for this model family (0 = frozen): a text encoder the family cannot train
    (TE2 outside SDXL/SD3; Flux's and Z-Image's encoders, which stay frozen) and one the model lacks
    (when `text_parts` is given) are frozen."""
    part_rates = dict(rates.resolved())
    for part in TEXT_PARTS:
        if part not in FAMILIES[family].text_parts:
            part_rates[part] = 0.0
    if text_parts is not None:
        for part in TEXT_PARTS:
            if part not in text_parts:
                part_rates[part] = 0.0
    return part_rates


def check_inputs(settings: TrainSettings, dataset, part_rates: dict[str, float], schedule, access_family: str,
                 device_type: str) -> None:
    """Every check that needs no heavy work; raises ValueError naming input, value and fix."""
    if dataset is None or not getattr(dataset, "samples", None):
        raise ValueError("Train LoRA: dataset has no images. Point the LoRA Dataset node at a folder with "
                         "images (or feed it an IMAGE batch).")
    largest = largest_bucket_size(dataset)
    if settings.batch_size > largest:
        raise ValueError(f"Train LoRA: batch_size = {settings.batch_size} is larger than the dataset's "
                         f"largest bucket ({largest} images per epoch, repeats counted, "
                         f"{len(dataset.samples)} images in {len(dataset.buckets())} bucket(s)). Lower "
                         f"batch_size to at most {largest}, add images or repeats, or turn bucketing off.")
    if not any(rate > 0 for part, rate in part_rates.items()):
        frozen = FAMILIES[access_family].frozen_text
        raise ValueError("Train LoRA: every learning rate resolves to 0, so nothing would train. Set "
                         "learning_rate (or unet_lr / text_encoder_lr) above 0 in UNet/TE Learning Rates."
                         + (f" ({FAMILIES[access_family].label}'s text encoders, {frozen}, always stay frozen: "
                            "set unet_lr.)" if frozen and not FAMILIES[access_family].text_parts else ""))
    check_family_settings(access_family, settings.noise_offset, settings.min_snr_gamma, settings.timestep_sampling)
    schedule.check_total(settings.steps)
    check_optimizer(settings.optimizer, device_type)


def text_layer_forward(layer: torch.nn.Module, gradient_checkpointing: bool) -> Callable:
    """A trained CLIP layer's forward: out of place (ComfyUI's adds in place), and checkpointed like
    the UNet blocks when gradient checkpointing is on."""
    forward = out_of_place_clip_layer_forward(layer)
    return checkpointed_forward(layer, forward) if gradient_checkpointing else forward


# lora_lab_dora_scale: what a DoRA file's dora_scale holds (lora.lora_weights), for tools and people.
DORA_SCALE_RULES = {
    "original": "m*|W|/|W+dW| per output row: ComfyUI's loader (<=0.33) divides by |W|; "
                "DoRA-paper loaders (LyCORIS, diffusers) divide by |W+dW|",
    "updated": "m per output row: the DoRA magnitude; the loader divides by |W+dW|",
}


def _kohya_fields(settings: TrainSettings, rates, schedule, dataset, access: ModelAccess, started: float,
                  part_rates: dict[str, float], steps_done: int, conv_trained: bool, name: str) -> dict[str, Any]:
    """sd-scripts' ss_* training metadata for this run, as train_network.py names and fills it
    (tests/comfy/test_kohya_metadata.py lists every key and each deliberate difference)."""
    family = access.family
    network_args: dict[str, str] = {}
    if conv_trained:   # 3x3 convolutions trained (LoCon): kohya records their rank/alpha this way
        network_args.update({"conv_dim": str(settings.rank), "conv_alpha": str(settings.alpha)})
    if settings.use_dora:
        # What sd-scripts writes for a LyCORIS DoRA run (--network_module lycoris.kohya
        # --network_args algo=lora dora_wd=True): sd-scripts' networks.lora would drop dora_scale
        # without a word; lycoris.kohya reads it. Which norm the scale assumes: lora_lab_dora_scale.
        network_args.update({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    batches_per_epoch = max(1, batches_per_epoch_of(dataset, settings.batch_size))
    micro_batches = steps_done * settings.gradient_accumulation
    return {
        "ss_output_name": name,
        "ss_network_module": "lycoris.kohya" if settings.use_dora else "networks.lora",
        "lora_lab_dora_scale": DORA_SCALE_RULES[access.dora_norm] if settings.use_dora else None,
        "ss_network_dim": settings.rank,
        "ss_network_alpha": settings.alpha,
        "ss_network_args": network_args or None,
        "ss_learning_rate": rates.learning_rate,
        "ss_unet_lr": part_rates["unet"],
        "ss_text_encoder_lr": part_rates["text_encoder"],
        # sd-scripts keeps only the first text encoder's rate in ss_text_encoder_lr; SDXL's second one:
        "ss_text_encoder_2_lr": part_rates["text_encoder_2"] if "text_encoder_2" in FAMILIES[family].text_parts else None,
        "ss_lr_scheduler": schedule.scheduler,
        "ss_lr_warmup_steps": schedule.warmup_steps(settings.steps),
        "ss_max_train_steps": settings.steps,
        "ss_steps": steps_done,
        "ss_epoch": math.ceil(micro_batches / batches_per_epoch),
        "ss_num_epochs": math.ceil(settings.steps * settings.gradient_accumulation / batches_per_epoch),
        "ss_num_train_images": dataset.effective_count,
        "ss_num_reg_images": 0,
        "ss_num_batches_per_epoch": batches_per_epoch,
        "ss_resolution": f"({dataset.options.resolution}, {dataset.options.resolution})",
        "ss_base_model_version": FAMILIES[family].base_model_version,
        "ss_v2": family == "sd2",
        "ss_clip_skip": access.clip_skip,
        "ss_optimizer": settings.optimizer,
        "ss_seed": settings.training_seed,
        "ss_tag_frequency": dataset.tag_frequency,
        "ss_training_started_at": started,
        "ss_training_finished_at": time.time(),
        "ss_mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[settings.precision],
        "ss_full_fp16": False,
        "ss_min_snr_gamma": settings.min_snr_gamma,
        "ss_noise_offset": settings.noise_offset,
        "ss_batch_size_per_device": settings.batch_size,
        "ss_total_batch_size": settings.batch_size * settings.gradient_accumulation,
        "ss_gradient_accumulation_steps": settings.gradient_accumulation,
        "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_max_grad_norm": settings.max_grad_norm,
        "ss_cache_latents": dataset.caching_possible,
        "ss_flip_aug": dataset.options.flip,
        "ss_random_crop": dataset.options.crop == "random",
        "ss_shuffle_caption": dataset.options.shuffle_captions,
        "ss_keep_tokens": dataset.options.keep_tokens,
        "ss_caption_dropout_rate": dataset.options.caption_dropout,
        "ss_enable_bucket": dataset.options.bucketing,
        "ss_zero_terminal_snr": False,
        # Flow-matching runs: how sigmas were drawn (sd-scripts' names) and the guidance trained with.
        "ss_timestep_sampling": access.sampling[0] if FAMILIES[family].flow else None,
        "ss_discrete_flow_shift": access.sampling[1] if FAMILIES[family].flow and access.sampling[0] == "shift" else None,
        "ss_guidance_scale": access.training_guidance,
    }


def file_metadata(fields: dict[str, Any], lora_settings: dict[str, Any], tensors: dict[str, torch.Tensor],
                  access: ModelAccess, title: str, resolution: int, started: float) -> dict[str, str]:
    """Everything the file's header holds: ss_* fields, our settings, the modelspec.* keys and the
    sshs_* hashes (computed last, over the tensors and ss_* fields, as sd-scripts does)."""
    metadata = kohya.kohya_metadata(fields, lora_settings)
    metadata.update(kohya.modelspec_metadata(FAMILIES[access.family], access.objective.prediction_type, title,
                                             resolution, started, access.clip_skip, access.architecture))
    metadata.update(kohya.safetensors_hashes(tensors, metadata))
    return metadata


def train_lora(settings: TrainSettings, access: ModelAccess, dataset, rates, schedule, loras_dir: Path,
               output_dir: Path, callbacks: TrainCallbacks | None = None, resume_from: str | Path = ""
               ) -> TrainingResult:
    """Train, save the LoRA into `loras_dir` and return where it went. The modules in `access` are
    restored exactly (originals put back) whatever happens.

    resume_from: a run folder or resume_state.json (see training/resume.py) to continue from; the run
    must have had the same model, dataset and settings (checked before anything is trained).

    The phases, in order: plan (every check and path, no heavy work), attach (trainable copies and
    LoRA layers), prepare (optimizer, cached latents/captions, generators, a resumed state), run (the
    step loop, with periodic saves), and on an exception the interruption policy; detach always.
    """
    plan = plan_run(settings, access, dataset, rates, schedule, loras_dir, output_dir, resume_from)
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
                          cache_bytes=run.feeder.cached_bytes())


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


def plan_run(settings: TrainSettings, access: ModelAccess, dataset, rates, schedule, loras_dir: Path,
             output_dir: Path, resume_from: str | Path) -> RunPlan:
    """Phase 1: every check that needs no heavy work, then the run folder and its log."""
    started = time.time()
    part_rates = part_rates_for(rates, access.family, access.text_encoders)
    check_inputs(settings, dataset, part_rates, schedule, access.family, access.device.type)
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
    return RunPlan(settings=settings, access=access, dataset=dataset, rates=rates, schedule=schedule,
                   loras_dir=loras_dir, output_dir=output_dir, started=started, part_rates=part_rates,
                   trained_text=[part for part in TEXT_PARTS if part_rates[part] > 0], identity=identity,
                   resumed=resumed, run_dir=run_dir, log_path=log_path, previous_lines=previous_lines,
                   base_name=kohya.sanitize_lora_name(settings.lora_name),   # no extension: suffixes go before it
                   lora_settings=lora_settings)


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

    # Phase 2 ------------------------------------------------------------------------------------
    def attach(self, stack: contextlib.ExitStack) -> None:
        """Trainable copies of the trained parts, their patched forwards, then the LoRA layers."""
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        roots = [access.unet] + [access.text_encoders[part] for part in plan.trained_text]
        forward_patches = [(layer, text_layer_forward(layer, settings.gradient_checkpointing))
                           for part in plan.trained_text for layer in access.text_layers.get(part, [])]
        for block in access.unet_blocks:
            forward = out_of_place_forward(block) if access.in_place_blocks else None
            if settings.gradient_checkpointing:
                forward = checkpointed_forward(block, forward)
            if forward is not None:
                forward_patches.append((block, forward))
        if access.training_mode is not None:
            stack.enter_context(access.training_mode())
        stack.enter_context(trainable_copies(*roots, offload_device=access.offload_device))
        stack.enter_context(patched_forwards(forward_patches))
        unet_paths = unet_target_paths(access.unet, settings.target, access.family)
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

    # Phase 3 ------------------------------------------------------------------------------------
    def prepare(self, stack: contextlib.ExitStack) -> None:
        """Optimizer, the feeder with everything static encoded up front (then the encoders may leave
        the GPU), the generators, and a resumed run's state."""
        plan, settings, access = self.plan, self.plan.settings, self.plan.access
        blocks = unet_blocks([module.path for lora in self.injected if lora.part == "unet" for module in lora.modules],
                             access.family)
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
                        self.generator, plan.log_path,
                        TrainCallbacks(on_step=self._after_step, check_cancel=self.callbacks.check_cancel),
                        self.scaler, validate)

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
                                        FAMILIES[access.family].key_style)
        conv_trained = any(isinstance(module.layer.get_base_layer(), torch.nn.Conv2d)
                           and tuple(module.layer.get_base_layer().kernel_size) != (1, 1)
                           for lora in self.injected for module in lora.modules)
        fields = _kohya_fields(settings, plan.rates, plan.schedule, plan.dataset, access, plan.started,
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


# --------------------------------------------------------------------------------------------
# Resume, memory
# --------------------------------------------------------------------------------------------

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


def load_resume_state(resume_from: str | Path, runs_dir: Path, identity: dict[str, Any],
                      settings: TrainSettings) -> resume.ResumeState:
    """Load and check a checkpoint; ValueError naming what differs and how to fix it."""
    state = resume.load_state(resume.resolve_state_path(resume_from, runs_dir))
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
    """"<part>/<module path>/<down|up|magnitude>" -> the trainable tensor (fp32, as trained)."""
    weights = {}
    for lora in injected:
        for module in lora.modules:
            for name, tensor in (("down", module.down), ("up", module.up), ("magnitude", module.magnitude)):
                if tensor is not None:
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


GIB = 1024 ** 3


def check_fits(model_bytes: dict[str, int], reserve_bytes: int, free_bytes: int, device: str) -> None:
    """Refuse, before anything loads, a model whose weights cannot be made resident on the device.

    model_bytes: weights to load per model (name -> bytes); reserve_bytes: what must stay free for
    activations (ComfyUI's minimum inference memory); free_bytes: free memory after ComfyUI unloaded
    what it could.
    """
    needed = sum(model_bytes.values()) + reserve_bytes
    if needed <= free_bytes:
        return
    parts = ", ".join(f"{name} {size / GIB:.2f} GiB" for name, size in model_bytes.items())
    raise ValueError(f"Train LoRA: the model does not fit on {device} for training: it needs {needed / GIB:.2f} GiB "
                     f"({parts}, plus {reserve_bytes / GIB:.2f} GiB working memory) but only {free_bytes / GIB:.2f} GiB "
                     "is free after ComfyUI unloaded the other models. Set the text-encoder rates to 0 (a frozen "
                     "text encoder is not loaded for training), close other programs that use the GPU, or load the "
                     "checkpoint with a smaller weight dtype (fp16).")


def release_device_memory(device: torch.device) -> None:
    """Collect garbage and hand cached blocks back to the driver (after an out-of-memory error)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def out_of_memory_message(settings: TrainSettings, dataset, step: int, saved_name: str,
                          checkpoint_dir: Path | None) -> str:
    """What ran out, what to lower (with the current values), and what was kept."""
    checkpointing = ("gradient_checkpointing is already on" if settings.gradient_checkpointing
                     else "turn gradient_checkpointing on")
    kept = (f" What was trained so far was saved as {saved_name}." if saved_name
            else " No step had finished, so nothing was saved.")
    if checkpoint_dir is not None:
        kept += (f" To continue from the last checkpoint, set resume_from to {checkpoint_dir} (gradient_checkpointing "
                 "may change on resume).")
    return (f"Train LoRA: the GPU ran out of memory at step {step}. Lower batch_size (now {settings.batch_size}; "
            f"raise gradient_accumulation to keep the effective batch), lower the LoRA Dataset resolution (now "
            f"{dataset.options.resolution}), {checkpointing}, or lower rank (now {settings.rank}); closing other programs "
            f"that use the GPU also helps.{kept}")
