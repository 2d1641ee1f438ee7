"""The step loop (ComfyUI-agnostic): diffusion loss, parameter groups, optimizers, rates, log.

The loss follows ComfyUI's model_sampling parametrisation (x_t = x0 + sigma * noise for the
discrete VP schedule, sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)); the model returns the
denoised x0 estimate, from which the epsilon or v prediction is recovered.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

logger = logging.getLogger("lora_lab")


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------

def _per_sample(sigma: torch.Tensor, ndim: int) -> torch.Tensor:
    return sigma.reshape(sigma.shape[:1] + (1,) * (ndim - 1))


def epsilon_from_denoised(xt: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                          sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) for epsilon models: eps_hat = (x_t - x0_hat) / sigma vs the noise."""
    return (xt - denoised) / _per_sample(sigma, xt.ndim), noise


def velocity_from_denoised(xt: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                           sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) for v-prediction (Salimans & Ho 2022): v = alpha_t * eps - sigma_t * x0 with
    alpha_t = 1/sqrt(1+sigma^2), sigma_t = sigma/sqrt(1+sigma^2). Inverting ComfyUI's
    V_PREDICTION.calculate_denoised: v_hat = (x_t / (1+sigma^2) - x0_hat) * sqrt(1+sigma^2) / sigma."""
    sigma = _per_sample(sigma, xt.ndim)
    norm = torch.sqrt(1.0 + sigma ** 2)
    prediction = (xt / (1.0 + sigma ** 2) - denoised) * norm / sigma
    target = (noise - sigma * x0) / norm
    return prediction, target


PREDICTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "epsilon": epsilon_from_denoised,
    "v_prediction": velocity_from_denoised,
}


def min_snr_weight(sigma: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023), as in diffusers' train_text_to_image.

    SNR = alphas_cumprod / (1 - alphas_cumprod) = 1 / sigma^2 in ComfyUI's parametrisation: the same
    number diffusers' ``compute_snr`` returns for timestep t. Weight min(SNR, gamma) / SNR for epsilon,
    min(SNR, gamma) / (SNR + 1) for v-prediction.
    """
    snr = 1.0 / sigma.float() ** 2
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1.0) if prediction_type == "v_prediction" else clipped / snr


@dataclass
class DiffusionObjective:
    """What the loss needs from a diffusion model (supplied by the ComfyUI bridge)."""

    sigmas: torch.Tensor                                     # sigma per discrete timestep (ascending)
    prediction_type: str                                     # a key of PREDICTIONS
    denoise: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]   # (x_t, sigma, cond) -> x0_hat
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, noise, x0) -> x_t

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type = {self.prediction_type!r} is not supported; "
                             f"supported: {', '.join(PREDICTIONS)}")


def draw_noise(x0: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise plus kohya's noise offset: offset * N(0,1) per sample and channel (broadcast)."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator,
                                                   device=generator.device, dtype=torch.float32)
    return noise.to(x0.device)


def diffusion_loss(objective: DiffusionObjective, x0: torch.Tensor, cond: dict, noise: torch.Tensor,
                   timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean squared error of the model's epsilon/v prediction at the given noise and timesteps."""
    sigma = objective.sigmas[timesteps.to(objective.sigmas.device)].to(x0.device, torch.float32)
    xt = objective.noise_scaling(sigma, noise, x0)
    denoised = objective.denoise(xt, sigma, cond).float()
    prediction, target = PREDICTIONS[objective.prediction_type](xt, denoised, x0, noise, sigma)
    per_sample = ((prediction.float() - target.float()) ** 2).mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(sigma, min_snr_gamma, objective.prediction_type)
    return per_sample.mean()


# --------------------------------------------------------------------------------------------
# Parameter groups and optimizers
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainedLayer:
    """One LoRA layer's trainable tensors and where it sits (for grouping)."""

    part: str                          # "unet" | "text_encoder" | "text_encoder_2"
    block: str                         # "down" | "mid" | "up" for the UNet, "" for encoders
    down: torch.nn.Parameter           # A
    up: torch.nn.Parameter             # B
    magnitude: torch.nn.Parameter | None = None   # DoRA magnitude (A rate, no weight decay)


def build_param_groups(layers: list[TrainedLayer], part_rates: dict[str, float], lora_plus_ratio: float,
                       block_weight: Callable[[str], float]) -> list[dict[str, Any]]:
    """One group per (part, UNet block, A/B/M). Base rate = part rate x block weight (x LoRA+ ratio for B).

    "M" holds the DoRA magnitudes: trained at the A rate, with no weight decay (a per-row norm, like
    a normalisation scale: decay would pull every layer's norm toward zero, not the update toward 0).
    Every group carries "base_lr" (rate before the schedule) and "part"/"block"/"matrix" tags.
    """
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for layer in layers:
        rate = part_rates[layer.part] * (block_weight(layer.block) if layer.part == "unet" else 1.0)
        magnitudes = [layer.magnitude] if layer.magnitude is not None else []
        for matrix, tensors in (("A", [layer.down]), ("B", [layer.up]), ("M", magnitudes)):
            if not tensors:
                continue
            base = rate * (lora_plus_ratio if matrix == "B" else 1.0)
            key = (layer.part, layer.block, matrix)
            group = groups.setdefault(key, {"params": [], "lr": base, "base_lr": base, "part": layer.part,
                                            "block": layer.block, "matrix": matrix,
                                            "name": "/".join(filter(None, key))})
            if matrix == "M":
                group["weight_decay"] = 0.0
            group["params"].extend(tensors)
    return list(groups.values())


@dataclass(frozen=True)
class OptimizerSpec:
    module: str                 # importable module that must exist
    install_hint: str           # what to tell the user when it does not
    needs_cuda: bool            # bitsandbytes 8-bit optimizers run on CUDA only
    build: Callable[[list[dict], float], torch.optim.Optimizer]


def _adamw(groups, weight_decay):
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _sgd(groups, weight_decay):
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=weight_decay)


def _adamw8bit(groups, weight_decay):
    import bitsandbytes
    return bitsandbytes.optim.AdamW8bit(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _lion8bit(groups, weight_decay):
    import bitsandbytes
    return bitsandbytes.optim.Lion8bit(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _prodigy(groups, weight_decay):
    import prodigyopt
    return prodigyopt.Prodigy(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _adafactor(groups, weight_decay):
    # Fixed rates (no relative step) so our schedule drives the rate, as kohya does with an explicit lr.
    from transformers.optimization import Adafactor
    return Adafactor(groups, lr=groups[0]["lr"], weight_decay=weight_decay, relative_step=False,
                     scale_parameter=False, warmup_init=False)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "AdamW": OptimizerSpec("torch", "", False, _adamw),
    "AdamW8bit": OptimizerSpec("bitsandbytes", "pip install bitsandbytes", True, _adamw8bit),
    "Lion8bit": OptimizerSpec("bitsandbytes", "pip install bitsandbytes", True, _lion8bit),
    "Prodigy": OptimizerSpec("prodigyopt", "pip install prodigyopt", False, _prodigy),
    "Adafactor": OptimizerSpec("transformers", "pip install transformers", False, _adafactor),
    "SGD": OptimizerSpec("torch", "", False, _sgd),
}


def check_optimizer(name: str, device_type: str) -> None:
    """Raise ValueError when `name` cannot run here (unknown, package missing, no CUDA)."""
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(f"Train LoRA: optimizer = {name!r} is unknown. Pick one of: {', '.join(OPTIMIZERS)}.")
    if importlib.util.find_spec(spec.module) is None:
        raise ValueError(f"Train LoRA: optimizer = {name!r} needs the package '{spec.module}', which is not "
                         f"installed in ComfyUI's Python. Run `{spec.install_hint}` with ComfyUI's Python and "
                         "restart ComfyUI, or pick AdamW.")
    if spec.needs_cuda and device_type != "cuda":
        raise ValueError(f"Train LoRA: optimizer = {name!r} runs on NVIDIA GPUs only and this ComfyUI runs "
                         f"on {device_type}. Pick AdamW (or Adafactor to save memory).")


def build_optimizer(name: str, groups: list[dict], weight_decay: float) -> torch.optim.Optimizer:
    return OPTIMIZERS[name].build(groups, weight_decay)


def applied_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Rate per trained part read back from the optimizer: its A-matrix groups' rate (with UNet block
    weights, the largest block rate, which is the UNet rate itself when no block is up-weighted)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        if group.get("matrix") == "A":
            rates[group["part"]] = max(rates.get(group["part"], 0.0), float(group["lr"]))
    return rates


# --------------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------------

def largest_bucket_size(dataset) -> int:
    """Images per epoch (repeats counted) in the fullest bucket: the largest possible batch."""
    return max((sum(dataset.samples[index].repeats for index in indices)
                for indices in dataset.buckets().values()), default=0)


def batches_per_epoch_of(dataset, batch_size: int) -> int:
    """Batches in one epoch: per bucket, its images (repeats counted) in whole batches (a bucket's
    leftover images wait for the next epoch's draw, as BucketBatches deals them)."""
    return sum(sum(dataset.samples[index].repeats for index in indices) // batch_size
               for indices in dataset.buckets().values())


class BucketBatches:
    """Endless batches of sample indices, each from one bucket, epoch after epoch; an iterator whose
    position can be saved and restored exactly (resume).

    Each epoch is ``dataset.epoch_indices(rng)`` (shuffled, repeats expanded); a batch is emitted when
    a bucket has `batch_size` pending samples. A bucket's leftover at the end of an epoch is dropped
    (it comes again, reshuffled, in the next epoch).
    """

    def __init__(self, dataset, batch_size: int, rng: random.Random) -> None:
        if batch_size > largest_bucket_size(dataset):
            raise ValueError(f"batch_size {batch_size} exceeds the largest bucket")
        self.dataset = dataset
        self.batch_size = batch_size
        self.rng = rng
        self.epoch: list[int] = []                          # this epoch's shuffled sample indices
        self.position = 0                                   # next index of `epoch` to place
        self.pending: dict[tuple[int, int], list[int]] = {}  # bucket -> indices waiting for a full batch

    def __iter__(self) -> "BucketBatches":
        return self

    def __next__(self) -> list[int]:
        while True:
            if self.position >= len(self.epoch):
                self.epoch, self.position, self.pending = self.dataset.epoch_indices(self.rng), 0, {}
            index = self.epoch[self.position]
            self.position += 1
            bucket = self.pending.setdefault(tuple(self.dataset.samples[index].bucket), [])
            bucket.append(index)
            if len(bucket) == self.batch_size:
                batch = list(bucket)
                bucket.clear()
                return batch

    def state(self) -> dict[str, Any]:
        """JSON-ready position: the epoch's order, where it stands, pending buckets and the rng."""
        return {"epoch": list(self.epoch), "position": self.position,
                "pending": [[list(bucket), list(indices)] for bucket, indices in self.pending.items()],
                "rng": random_state_to_json(self.rng)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = list(state["epoch"]), int(state["position"])
        self.pending = {tuple(bucket): list(indices) for bucket, indices in state["pending"]}
        self.rng.setstate(random_state_from_json(state["rng"]))


def bucket_batches(dataset, batch_size: int, rng: random.Random) -> BucketBatches:
    """Endless one-bucket batches (see :class:`BucketBatches`)."""
    return BucketBatches(dataset, batch_size, rng)


def random_state_to_json(rng: random.Random) -> list:
    """``random.Random.getstate()`` as JSON-ready lists."""
    version, internal, gauss_next = rng.getstate()
    return [version, list(internal), gauss_next]


def random_state_from_json(state: list) -> tuple:
    version, internal, gauss_next = state
    return version, tuple(internal), gauss_next


# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------

class TrainingDiverged(RuntimeError):
    """The loss became NaN/inf; the LoRA still holds the last good weights.

    The message blames the learning rate only where the losses before the break make it plausible
    (they rose to over twice their minimum); a loss that breaks at the first step, or without rising,
    points at a numerical problem (precision, DoRA) that a lower rate would not fix.
    """

    def __init__(self, step: int, loss: float, precision: str, saved: str = "", what: str = "loss",
                 history: list[float] | None = None) -> None:
        history = [value for value in (history or []) if math.isfinite(value)]
        if history and history[-1] > 2 * min(history):
            cause = (f"the learning rate is probably too high (the loss rose from {min(history):.4g} to "
                     f"{history[-1]:.4g} before it broke): lower it, or use warmup")
        elif precision == "fp16":
            cause = ("fp16 overflow (use bf16 or fp32); the loss had not risen before it broke, so a lower "
                     "learning rate is unlikely to help")
        else:
            before = "at the first step, before any update" if not history else "without rising first"
            cause = (f"a numerical problem, not the learning rate (it broke {before}): try precision fp32, or turn "
                     "use_dora off, and please report it with your settings")
        kept = f" The last good weights were saved as {saved}." if saved else ""
        super().__init__(f"Train LoRA: the {what} became {loss} at step {step}. Likely cause: {cause}.{kept}")
        self.step, self.loss, self.precision, self.what, self.history = step, loss, precision, what, history


class TrainingOutOfMemory(torch.OutOfMemoryError):
    """The device ran out of memory mid-run. A subclass of torch's own error, so ComfyUI's executor
    still unloads its models; the message names the inputs to lower."""


@dataclass(frozen=True)
class LoopSettings:
    total_steps: int                 # optimizer steps
    gradient_accumulation: int = 1   # micro-batches per optimizer step
    max_grad_norm: float = 1.0       # gradient clipping threshold (0 = off)
    noise_offset: float = 0.0        # kohya noise offset strength
    min_snr_gamma: float = 0.0       # 0 = off
    precision: str = "fp32"          # "bf16" | "fp16" | "fp32": autocast dtype for the forward pass
    device_type: str = "cpu"         # "cpu" | "cuda" | ...
    start_step: int = 0              # first step to run (> 0 when resuming a saved run)

    def __post_init__(self) -> None:
        # The values come from TrainSettings, which validated them; this is the loop's own invariant.
        if not 0 <= self.start_step < self.total_steps:
            raise ValueError(f"Train LoRA: the run would start at step {self.start_step} of {self.total_steps}: "
                             "nothing is left to train.")


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass(frozen=True)
class StepRecord:
    step: int
    loss: float
    lr: dict[str, float]

    def as_json(self) -> str:
        return json.dumps({"step": self.step, "loss": self.loss, "lr": self.lr})


@dataclass
class LoopCallbacks:
    on_step: Callable[[StepRecord], None] | None = None   # after each optimizer step
    check_cancel: Callable[[], None] | None = None         # raises to stop (called before each micro-batch)


def make_grad_scaler(settings: LoopSettings) -> torch.amp.GradScaler | None:
    """fp16's loss scaler (None for bf16/fp32, which need none)."""
    return torch.amp.GradScaler(settings.device_type) if settings.precision == "fp16" else None


def autocast_context(settings: LoopSettings):
    dtype = AUTOCAST_DTYPES[settings.precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=settings.device_type, dtype=dtype)


def run_loop(settings: LoopSettings, optimizer: torch.optim.Optimizer, objective: DiffusionObjective,
             next_batch: Callable[[], tuple[torch.Tensor, dict]], multiplier: Callable[[int], float],
             generator: torch.Generator, log_path: Path | None = None,
             callbacks: LoopCallbacks | None = None,
             scaler: torch.amp.GradScaler | None = None) -> list[StepRecord]:
    """Train steps settings.start_step .. total_steps - 1; returns one record per step run (also
    appended to log_path). With fp16, `scaler` is the loss scaler to use (one is made when None).

    Each step: every group's lr = its base_lr x multiplier(step) (set explicitly), then
    `gradient_accumulation` micro-batches, gradient clipping, the update; the rates are read back from
    ``optimizer.param_groups`` and logged with the step's mean loss.
    """
    callbacks = callbacks or LoopCallbacks()
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    if settings.precision == "fp16" and scaler is None:
        scaler = make_grad_scaler(settings)
    sigma_count = len(objective.sigmas)
    records: list[StepRecord] = []
    log_file = open(log_path, "a", encoding="utf-8") if log_path is not None else None
    try:
        for step in range(settings.start_step, settings.total_steps):
            factor = multiplier(step)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            step_loss: torch.Tensor | None = None   # stays on the device: no host sync per micro-batch
            for _ in range(settings.gradient_accumulation):
                if callbacks.check_cancel is not None:
                    callbacks.check_cancel()
                x0, cond = next_batch()
                noise = draw_noise(x0, generator, settings.noise_offset)
                timesteps = torch.randint(0, sigma_count, (x0.shape[0],), generator=generator,
                                          device=generator.device)
                with autocast_context(settings):
                    loss = diffusion_loss(objective, x0, cond, noise, timesteps, settings.min_snr_gamma)
                scaled = loss / settings.gradient_accumulation
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                share = scaled.detach().float()
                step_loss = share if step_loss is None else step_loss + share
            if scaler is not None:
                scaler.unscale_(optimizer)
            # The norm is computed even without clipping: a non-finite gradient must never reach the
            # weights (fp16's scaler skips such steps itself), so the LoRA always holds good weights.
            norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm or float("inf"))
            # One device -> host transfer per step for both checks (each sync stalls the kernel queue).
            loss_value, norm_value = torch.stack([step_loss, norm.detach().float().to(step_loss.device)]).tolist()
            if not math.isfinite(loss_value):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(step, loss_value, settings.precision,
                                       history=[record.loss for record in records])
            if scaler is None and not math.isfinite(norm_value):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingDiverged(step, norm_value, settings.precision, what="gradient norm",
                                       history=[record.loss for record in records])
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            record = StepRecord(step=step, loss=loss_value, lr=applied_rates(optimizer))
            records.append(record)
            if log_file is not None:
                log_file.write(record.as_json() + "\n")
                log_file.flush()
            if callbacks.on_step is not None:
                callbacks.on_step(record)
    finally:
        if log_file is not None:
            log_file.close()
    return records
