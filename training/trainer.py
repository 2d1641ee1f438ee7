"""One LoRA training run, start to file (ComfyUI-agnostic).

The ComfyUI bridge hands over a :class:`ModelAccess` (plain torch modules plus callables); this
module injects LoRA layers, feeds batches, runs the loop, exports the kohya file and removes every
change in ``finally``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy
import torch

from . import kohya
from .lora import (InjectedLora, checkpointed_forward, inject_lora, lora_weights, out_of_place_clip_layer_forward,
                   patched_forwards, text_target_paths, trainable_copies, unet_block_of, unet_target_paths, TARGETS)
from .loop import (AUTOCAST_DTYPES, DiffusionObjective, LoopCallbacks, LoopSettings, StepRecord, TrainedLayer,
                   TrainingDiverged, bucket_batches, build_optimizer, build_param_groups, check_optimizer,
                   largest_bucket_size, run_loop)

logger = logging.getLogger("lora_lab")

TEXT_PARTS = ("text_encoder", "text_encoder_2")
LATENT_CACHE_FOLDER = ".latent_cache"  # under <output>/lora_lab/; lora names cannot start with "."


@dataclass(frozen=True)
class TrainSettings:
    """The Train LoRA node's widgets (units in the comments)."""

    steps: int = 1000                    # optimizer updates
    batch_size: int = 1                  # images per micro-batch (one bucket per batch)
    gradient_accumulation: int = 1       # micro-batches per optimizer update
    rank: int = 16                       # LoRA rank (network_dim)
    alpha: float = 16.0                  # LoRA alpha: scale = alpha / rank
    target: str = "attention_ff"         # a key of lora.TARGETS
    use_dora: bool = False
    optimizer: str = "AdamW"             # a key of loop.OPTIMIZERS
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0           # 0 = no clipping
    precision: str = "bf16"              # "bf16" | "fp16" | "fp32"
    gradient_checkpointing: bool = True
    training_seed: int = 0               # drives data order, augmentation, noise, timesteps, LoRA init
    noise_offset: float = 0.0
    min_snr_gamma: float = 0.0           # 0 = off
    lora_name: str = "lora_lab"
    save_every_n_steps: int = 0          # 0 = off
    cache_latents_to_disk: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 1), ("batch_size", 1), ("gradient_accumulation", 1), ("rank", 1),
                              ("save_every_n_steps", 0)):
            value = getattr(self, name)
            if value < minimum:
                raise ValueError(f"Train LoRA: {name} = {value} must be at least {minimum}.")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"Train LoRA: alpha = {self.alpha} must be > 0 (alpha = rank gives scale 1).")
        if self.target not in TARGETS:
            raise ValueError(f"Train LoRA: target = {self.target!r} is unknown; use one of {', '.join(TARGETS)}.")
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"Train LoRA: precision = {self.precision!r}; use one of {', '.join(AUTOCAST_DTYPES)}.")
        if not math.isfinite(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"Train LoRA: weight_decay = {self.weight_decay} must be >= 0.")
        kohya.sanitize_lora_name(self.lora_name)


@dataclass
class ModelAccess:
    """What the trainer needs from the host application (built by nodes/comfy_bridge.py)."""

    family: str                                             # "sd1" | "sd2" | "sdxl"
    device: torch.device
    unet: torch.nn.Module                                   # the diffusion model (ldm layout)
    unet_blocks: list[torch.nn.Module]                      # blocks to checkpoint
    text_encoders: dict[str, torch.nn.Module]               # part -> CLIP root (e.g. clip_l)
    text_layers: dict[str, list[torch.nn.Module]]           # part -> CLIP layers (in-place forward fix)
    objective: DiffusionObjective
    encode_pixels: Callable[[torch.Tensor], torch.Tensor]   # IMAGE [B,H,W,3] 0..1 -> model latent x0
    encode_captions: Callable[[list[str]], dict]            # captions -> {"c_crossattn", "pooled"?}
    extra_conditioning: Callable[[dict, list[dict]], dict]  # (text cond, per-sample sizes) -> cond kwargs
    unet_kohya_names: Callable[[list[str]], dict[str, str]]
    text_kohya_names: Callable[[str, list[str]], dict[str, str]]
    latent_key: str = ""                                    # identifies VAE weights + latent format (disk cache)
    offload_device: torch.device | None = None              # where frozen originals wait while training (GPU runs)


@dataclass
class TrainingResult:
    path: Path                    # the final LoRA file
    records: list[StepRecord]
    run_dir: Path
    seconds: float


@dataclass
class TrainCallbacks:
    on_step: Callable[[StepRecord, int], None] | None = None   # (record, total steps)
    check_cancel: Callable[[], None] | None = None
    is_cancel: Callable[[BaseException], bool] = lambda error: False
    # Preview images: called after every optimizer step with (steps done, run folder), the LoRA in place.
    on_sample: Callable[[int, Path], None] | None = None


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
        raise ValueError("Train LoRA: every learning rate resolves to 0, so nothing would train. Set "
                         "learning_rate (or unet_lr / text_encoder_lr) above 0 in UNet/TE Learning Rates.")
    schedule.check_total(settings.steps)
    check_optimizer(settings.optimizer, device_type)


def _dataset_key(dataset) -> str:
    return getattr(dataset, "fingerprint", "") or "no-fingerprint"


class BatchFeeder:
    """Turns sample indices into (x0 latents, conditioning), caching what does not change."""

    def __init__(self, dataset, access: ModelAccess, train_text: bool, settings: TrainSettings, cache_dir: Path):
        self.dataset = dataset
        self.access = access
        self.train_text = train_text
        self.order_rng = random.Random(settings.training_seed)
        self.augment_rng = random.Random(settings.training_seed + 1)
        self.batches = bucket_batches(dataset, settings.batch_size, self.order_rng)
        self.latent_cache: dict[tuple, torch.Tensor] = {}
        self.text_cache: dict[str, dict] = {}
        # Shared by runs (a re-run gets a new run folder); keyed by dataset content + settings, the VAE
        # weights and the latent format, so a changed image, bucket or VAE never hits a stale entry.
        self.disk_dir = cache_dir if settings.cache_latents_to_disk and access.latent_key else None
        self.cache_latents = dataset.caching_possible

    def _pixels(self, image) -> torch.Tensor:
        return torch.from_numpy(numpy.asarray(image, dtype=numpy.float32) / 255.0).unsqueeze(0)

    def _latent(self, index: int, offset, flipped) -> torch.Tensor:
        key = (index, tuple(offset), bool(flipped))
        if self.cache_latents and key in self.latent_cache:
            return self.latent_cache[key]
        disk_path = None
        if self.cache_latents and self.disk_dir is not None:
            name = hashlib.sha256(repr((_dataset_key(self.dataset), self.access.latent_key, key)).encode()
                                  ).hexdigest()[:32]
            disk_path = self.disk_dir / f"{name}.pt"
            if disk_path.is_file():
                latent = torch.load(disk_path, map_location="cpu", weights_only=True)
                self.latent_cache[key] = latent
                return latent
        image = self.dataset.render(index, tuple(offset), bool(flipped))
        with torch.no_grad():
            latent = self.access.encode_pixels(self._pixels(image)).detach().clone().to("cpu", torch.float32)
        if self.cache_latents:
            self.latent_cache[key] = latent
            if disk_path is not None:
                disk_path.parent.mkdir(parents=True, exist_ok=True)
                torch.save(latent, disk_path)
        return latent

    def _text(self, captions: list[str]) -> dict:
        if self.train_text:
            return self.access.encode_captions(captions)
        missing = [caption for caption in dict.fromkeys(captions) if caption not in self.text_cache]
        for caption in missing:
            with torch.no_grad():
                encoded = self.access.encode_captions([caption])
            self.text_cache[caption] = {key: value.detach().clone() if torch.is_tensor(value) else value
                                        for key, value in encoded.items()}
        return concat_conditioning([self.text_cache[caption] for caption in captions])

    def __call__(self) -> tuple[torch.Tensor, dict]:
        indices = next(self.batches)
        latents, captions, sizes = [], [], []
        for index in indices:
            sample = self.dataset.samples[index]
            # The augmentation (crop offset, flip) is drawn first, so a cached latent is found
            # without decoding the image.
            offset, flipped = self.dataset.augmentation(index, self.augment_rng)
            latents.append(self._latent(index, offset, flipped))
            captions.append(self.dataset.caption_for_step(index, self.augment_rng))
            sizes.append({"original_size": tuple(sample.original_size), "crop_offset": tuple(offset),
                          "target_size": tuple(sample.bucket)})
        x0 = torch.cat(latents).to(self.access.device)
        cond = self._text(captions)
        return x0, self.access.extra_conditioning(cond, sizes)


def concat_conditioning(conds: list[dict]) -> dict:
    """Batch per-caption conditioning. Captions longer than 75 tokens give longer sequences: shorter
    ones are repeated to the least common multiple length, as ComfyUI batches conds."""
    if len(conds) == 1:
        return conds[0]
    lengths = [cond["c_crossattn"].shape[1] for cond in conds]
    target = math.lcm(*lengths)
    crossattn = torch.cat([cond["c_crossattn"].repeat(1, target // cond["c_crossattn"].shape[1], 1)
                           for cond in conds])
    merged = {"c_crossattn": crossattn}
    if conds[0].get("pooled") is not None:
        merged["pooled"] = torch.cat([cond["pooled"] for cond in conds])
    return merged


def _kohya_fields(settings: TrainSettings, rates, schedule, dataset, family: str, started: float,
                  part_rates: dict[str, float]) -> dict[str, Any]:
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": settings.rank,
        "ss_network_alpha": settings.alpha,
        "ss_network_args": {"algo": "lora", "dora": "True"} if settings.use_dora else None,
        "ss_learning_rate": rates.learning_rate,
        "ss_unet_lr": part_rates["unet"],
        "ss_text_encoder_lr": part_rates["text_encoder"],
        "ss_lr_scheduler": schedule.scheduler,
        "ss_lr_warmup_steps": schedule.warmup_steps(settings.steps),
        "ss_max_train_steps": settings.steps,
        "ss_num_train_images": sum(sample.repeats for sample in dataset.samples),
        "ss_resolution": f"({dataset.resolution}, {dataset.resolution})",
        "ss_base_model_version": kohya.BASE_MODEL_VERSIONS[family],
        "ss_optimizer": settings.optimizer,
        "ss_seed": settings.training_seed,
        "ss_tag_frequency": dataset.tag_frequency,
        "ss_training_started_at": started,
        "ss_training_finished_at": time.time(),
        "ss_mixed_precision": {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[settings.precision],
        "ss_min_snr_gamma": settings.min_snr_gamma,
        "ss_noise_offset": settings.noise_offset,
        "ss_batch_size_per_device": settings.batch_size,
        "ss_gradient_accumulation_steps": settings.gradient_accumulation,
        "ss_gradient_checkpointing": settings.gradient_checkpointing,
        "ss_max_grad_norm": settings.max_grad_norm,
        "ss_num_batches_per_epoch": None,
        "ss_v2": family == "sd2",
        "ss_flip_aug": dataset.flip,
        "ss_random_crop": dataset.crop == "random",
    }


def train_lora(settings: TrainSettings, access: ModelAccess, dataset, rates, schedule, loras_dir: Path,
               output_dir: Path, callbacks: TrainCallbacks | None = None) -> TrainingResult:
    """Train, save the LoRA into `loras_dir` and return where it went. The modules in `access` are
    restored exactly (originals put back) whatever happens."""
    callbacks = callbacks or TrainCallbacks()
    started = time.time()
    part_rates = dict(rates.resolved())
    if access.family != "sdxl":
        part_rates["text_encoder_2"] = 0.0
    trained_text = [part for part in TEXT_PARTS if part_rates[part] > 0 and part in access.text_encoders]
    for part in TEXT_PARTS:
        if part not in trained_text:
            part_rates[part] = 0.0
    # The run folder mirrors the file's name inside models/loras ("styles/alice_2" -> lora_lab/styles/alice_2).
    planned = kohya.free_lora_path(loras_dir, settings.lora_name)
    run_dir = output_dir / "lora_lab" / Path(kohya.lora_name_for(planned, loras_dir)).with_suffix("")
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "log.jsonl"
    log_path.write_text("", encoding="utf-8")
    save_dtype = torch.float32 if settings.precision == "fp32" else torch.float16
    base_name = kohya.sanitize_lora_name(settings.lora_name)   # no extension: suffixes go before it
    lora_settings = {"train": asdict(settings), "learning_rates": asdict(rates), "lr_schedule": asdict(schedule),
                     "dataset": {"source": getattr(dataset, "source", ""), "fingerprint": getattr(dataset, "fingerprint", ""),
                                 "resolution": dataset.resolution}}

    roots = [access.unet] + [access.text_encoders[part] for part in trained_text]
    injected: list[InjectedLora] = []
    forward_patches = [(layer, out_of_place_clip_layer_forward(layer))
                       for part in trained_text for layer in access.text_layers.get(part, [])]
    if settings.gradient_checkpointing:
        forward_patches += [(block, checkpointed_forward(block)) for block in access.unet_blocks]

    def export(name: str) -> Path:
        entries = []
        for lora in injected:
            paths = [module.path for module in lora.modules]
            names = (access.unet_kohya_names(paths) if lora.part == "unet"
                     else access.text_kohya_names(lora.part, paths))
            entries += [(names[module.path], lora_weights(module, torch.float32)) for module in lora.modules]
        tensors = kohya.kohya_state_dict(entries, settings.alpha, save_dtype)
        fields = _kohya_fields(settings, rates, schedule, dataset, access.family, started, part_rates)
        return kohya.save_lora(tensors, kohya.kohya_metadata(fields, lora_settings), loras_dir, name)

    with torch.inference_mode(False), contextlib.ExitStack() as stack:
        stack.enter_context(trainable_copies(*roots, offload_device=access.offload_device))
        stack.enter_context(patched_forwards(forward_patches))
        try:
            unet_paths = unet_target_paths(access.unet, settings.target)
            if part_rates["unet"] > 0:
                injected.append(inject_lora(access.unet, "unet", unet_paths, settings.rank, settings.alpha,
                                            settings.use_dora, settings.training_seed))
            for offset, part in enumerate(trained_text, start=1):
                paths = text_target_paths(access.text_encoders[part], settings.target)
                injected.append(inject_lora(access.text_encoders[part], part, paths, settings.rank, settings.alpha,
                                            settings.use_dora, settings.training_seed + offset))
            for lora in injected:
                for parameter in lora.parameters():
                    parameter.data = parameter.data.to(access.device)
            layers = [TrainedLayer(part=module.part, block=unet_block_of(module.path) if module.part == "unet" else "",
                                   down=module.down, up=module.up, magnitude=module.magnitude)
                      for lora in injected for module in lora.modules]
            groups = build_param_groups(layers, part_rates, rates.lora_plus_ratio, rates.block_weight)
            optimizer = build_optimizer(settings.optimizer, groups, settings.weight_decay)
            feeder = BatchFeeder(dataset, access, bool(trained_text), settings,
                                 output_dir / "lora_lab" / LATENT_CACHE_FOLDER)
            generator = torch.Generator(device=access.device).manual_seed(settings.training_seed)
            loop_settings = LoopSettings(total_steps=settings.steps, gradient_accumulation=settings.gradient_accumulation,
                                         max_grad_norm=settings.max_grad_norm, noise_offset=settings.noise_offset,
                                         min_snr_gamma=settings.min_snr_gamma, precision=settings.precision,
                                         device_type=access.device.type)

            def on_step(record: StepRecord) -> None:
                done = record.step + 1
                if settings.save_every_n_steps and done % settings.save_every_n_steps == 0 and done < settings.steps:
                    export(f"{base_name}_step{done:05d}")
                if callbacks.on_step is not None:
                    callbacks.on_step(record, settings.steps)
                if callbacks.on_sample is not None:
                    callbacks.on_sample(done, run_dir)

            try:
                records = run_loop(loop_settings, optimizer, access.objective, feeder,
                                   lambda step: schedule.multiplier(step, settings.steps), generator, log_path,
                                   LoopCallbacks(on_step=on_step, check_cancel=callbacks.check_cancel))
            except BaseException as error:
                # Cancel or divergence: keep what was trained so far (the last good weights).
                if injected and (callbacks.is_cancel(error) or isinstance(error, TrainingDiverged)):
                    saved = export(f"{base_name}_interrupted")
                    logger.warning("LoRA Lab: training stopped (%s); saved what was trained so far to %s",
                                   type(error).__name__, saved)
                    if isinstance(error, TrainingDiverged):
                        raise TrainingDiverged(error.step, error.loss, settings.precision,
                                               saved=kohya.lora_name_for(saved, loras_dir), what=error.what) from None
                raise
            path = export(base_name)
        finally:
            for lora in reversed(injected):
                lora.remove()
    return TrainingResult(path=path, records=records, run_dir=run_dir, seconds=time.time() - started)
