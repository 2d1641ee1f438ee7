"""The step loop (ComfyUI-agnostic): diffusion loss, divergence checks, precision, the loop and its log.

The loss follows ComfyUI's model_sampling parametrisation (x_t = x0 + sigma * noise for the
discrete VP schedule, sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)); the model returns the
denoised x0 estimate, from which the epsilon or v prediction is recovered.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..lr.optimizers import applied_rates, effective_rates
from .distributed import current as current_shard

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


def flow_from_denoised(xt: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                       sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prediction, target) for flow matching (ComfyUI's CONST: x_t = (1 - sigma) x0 + sigma eps, the model
    predicts the velocity eps - x0 and denoised = x_t - sigma v): v_hat = (x_t - x0_hat) / sigma vs eps - x0."""
    return (xt - denoised) / _per_sample(sigma, xt.ndim), noise - x0


PREDICTIONS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "epsilon": epsilon_from_denoised,
    "v_prediction": velocity_from_denoised,
    "flow": flow_from_denoised,
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


def validation_timesteps(schedule_length: int, count: int) -> list[int]:
    """`count` timesteps at the centres of `count` equal slices of 0..schedule_length-1."""
    return [min(schedule_length - 1, int((index + 0.5) * schedule_length / count)) for index in range(count)]


@dataclass
class DiffusionObjective:
    """What the loss needs from a diffusion model (supplied by the ComfyUI bridge)."""

    sigmas: torch.Tensor                                     # sigma per discrete timestep (ascending)
    prediction_type: str                                     # a key of PREDICTIONS
    denoise: Callable[[torch.Tensor, torch.Tensor, dict], torch.Tensor]   # (x_t, sigma, cond) -> x0_hat
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (sigma, noise, x0) -> x_t
    # Flow matching: (batch, latent shape, generator) -> continuous sigmas in (0, 1]. None: a timestep drawn
    # uniformly from the discrete schedule `sigmas` (SD1.x/2.x/SDXL).
    sigma_sampler: Callable[[int, tuple, torch.Generator], torch.Tensor] | None = None
    # The flow sigmas this run trains (all, or a Wan 2.2 expert's side of the boundary): the sampler draws
    # only these, and the validation sigmas spread over them.
    sigma_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTIONS:
            raise ValueError(f"prediction_type = {self.prediction_type!r} is not supported; "
                             f"supported: {', '.join(PREDICTIONS)}")

    def draw_sigmas(self, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One training sigma per sample (fp32, on x0's device)."""
        if self.sigma_sampler is not None:
            return self.sigma_sampler(x0.shape[0], tuple(x0.shape), generator).to(x0.device, torch.float32)
        timesteps = torch.randint(0, len(self.sigmas), (x0.shape[0],), generator=generator, device=generator.device)
        return self.sigma_at(timesteps).to(x0.device)

    def sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The discrete schedule's sigma at these timestep indices (fp32)."""
        return self.sigmas[timesteps.to(self.sigmas.device)].to(torch.float32)

    def validation_sigmas(self, count: int) -> torch.Tensor:
        """`count` fixed sigmas spread over the noise levels (the stable validation loss): the discrete
        schedule's sigma at the centres of `count` equal slices of its timesteps, or, for flow
        matching, the centres of `count` equal slices of the trained sigma range ((0, 1) unless an expert's)."""
        if self.sigma_sampler is not None:
            low, high = self.sigma_range
            return torch.tensor([low + (high - low) * (index + 0.5) / count for index in range(count)],
                                dtype=torch.float32)
        return self.sigma_at(torch.tensor(validation_timesteps(len(self.sigmas), count))).cpu()


def draw_noise(x0: torch.Tensor, generator: torch.Generator, noise_offset: float) -> torch.Tensor:
    """Gaussian noise plus kohya's noise offset: offset * N(0,1) per sample and channel (broadcast)."""
    noise = torch.randn(x0.shape, generator=generator, device=generator.device, dtype=torch.float32)
    if noise_offset > 0:
        noise = noise + noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=generator,
                                                   device=generator.device, dtype=torch.float32)
    return noise.to(x0.device)


def diffusion_loss(objective: DiffusionObjective, x0: torch.Tensor, cond: dict, noise: torch.Tensor,
                   timesteps: torch.Tensor, min_snr_gamma: float = 0.0) -> torch.Tensor:
    """Mean squared error of the model's prediction at the given noise and discrete timesteps."""
    return loss_at_sigma(objective, x0, cond, noise, objective.sigma_at(timesteps).to(x0.device), min_snr_gamma)


@dataclass(frozen=True)
class LossSettings:
    """The training loss (Train LoRA's loss, huber_c, huber_schedule), as sd-scripts' --loss_type,
    --huber_c and --huber_schedule define them (library/train_util.py conditional_loss and
    get_huber_threshold_if_needed, huber_scale 1): per element e = prediction - target,
    mse e^2; l1 |e|; huber 2c(sqrt(e^2 + c^2) - c); smooth_l1 2(sqrt(e^2 + c^2) - c); c per sample from
    the schedule (huber_threshold)."""

    kind: str = "mse"
    huber_c: float = 0.1
    huber_schedule: str = "snr"

    def elementwise(self, error: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        if self.kind == "l1":
            return error.abs()
        c = threshold.reshape(threshold.shape[:1] + (1,) * (error.ndim - 1))
        soft = torch.sqrt(error ** 2 + c ** 2) - c
        if self.kind == "huber":
            return 2 * c * soft
        if self.kind == "smooth_l1":
            return 2 * soft
        raise ValueError(f"Train LoRA: loss = {self.kind!r} is unknown; use mse, huber, smooth_l1 or l1.")


def noise_fraction(objective: DiffusionObjective, sigma: torch.Tensor) -> torch.Tensor:
    """Each sigma's place among the model's noise levels, 0 (clean) to 1 (pure noise): a flow model's sigma
    itself (its timestep / 1000), a discrete model's timestep index / its count."""
    if objective.prediction_type == "flow":
        return sigma.float()
    table = objective.sigmas.to(sigma.device, torch.float32)
    return torch.searchsorted(table, sigma.float().contiguous()).clamp(max=len(table) - 1).float() / len(table)


def huber_threshold(objective: DiffusionObjective, sigma: torch.Tensor, loss: LossSettings) -> torch.Tensor:
    """c per sample: constant c; exponential c^(t) (t = noise_fraction: 1 at clean, c at pure noise, sd-scripts'
    exp(-alpha timestep) with alpha = -ln c / 1000); snr (1 - c) / (1 + s)^2 + c, where s = sqrt(1 / SNR):
    the discrete schedule's sigma itself (sd-scripts' ((1 - alphas_cumprod) / alphas_cumprod)^0.5), and for
    flow matching (x_t = (1 - sigma) x0 + sigma noise) sigma / (1 - sigma), the same signal-to-noise ratio
    (sd-scripts has no snr schedule for flow models)."""
    sigma = sigma.float()
    c = loss.huber_c
    if loss.huber_schedule == "constant":
        return torch.full_like(sigma, c)
    if loss.huber_schedule == "exponential":
        return torch.exp(math.log(c) * noise_fraction(objective, sigma))
    if loss.huber_schedule == "snr":
        noise_ratio = sigma / (1.0 - sigma).clamp(min=1e-6) if objective.prediction_type == "flow" else sigma
        return (1.0 - c) / (1.0 + noise_ratio) ** 2 + c
    raise ValueError(f"Train LoRA: huber_schedule = {loss.huber_schedule!r} is unknown; use constant, exponential "
                     "or snr.")


def loss_at_sigma(objective: DiffusionObjective, x0: torch.Tensor, cond: dict, noise: torch.Tensor,
                  sigma: torch.Tensor, min_snr_gamma: float = 0.0, loss: LossSettings | None = None) -> torch.Tensor:
    """The loss of the model's epsilon / v / flow prediction at the given noise and sigmas: mean squared error,
    or `loss` (LossSettings: huber, smooth_l1, l1) where the run sets one."""
    sigma = sigma.to(x0.device, torch.float32)
    xt = objective.noise_scaling(sigma, noise, x0)
    denoised = objective.denoise(xt, sigma, cond).float()
    prediction, target = PREDICTIONS[objective.prediction_type](xt, denoised, x0, noise, sigma)
    error = prediction.float() - target.float()
    if loss is None or loss.kind == "mse":
        elementwise = error ** 2
    else:
        elementwise = loss.elementwise(error, huber_threshold(objective, sigma, loss))
    per_sample = elementwise.mean(dim=tuple(range(1, x0.ndim)))
    if min_snr_gamma > 0:
        per_sample = per_sample * min_snr_weight(sigma, min_snr_gamma, objective.prediction_type)
    return per_sample.mean()


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
    loss: LossSettings = LossSettings()   # the training loss (the validation loss stays MSE)

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
    val_loss: float | None = None   # the stable validation loss after this step, on the steps it ran
    memory: dict | None = None      # the run's memory plan, on the first step's record only
    sigmas: list[float] | None = None   # the noise levels this step trained (one per sample, every micro-batch)
    # An adaptive optimizer's step size really applied per part (d x lr; lr is the rate set): None for others
    effective_lr: dict[str, float] | None = None

    def as_json(self) -> str:
        record = {"step": self.step, "loss": self.loss, "lr": self.lr}
        if self.effective_lr is not None:
            record["effective_lr"] = self.effective_lr
        if self.sigmas is not None:
            record["sigmas"] = [round(sigma, 5) for sigma in self.sigmas]
        if self.val_loss is not None:
            record["val_loss"] = self.val_loss
        if self.memory is not None:
            record["memory"] = self.memory
        return json.dumps(record)


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
             on_step: Callable[[StepRecord, int], None] | None = None,
             check_cancel: Callable[[], None] | None = None,
             scaler: torch.amp.GradScaler | None = None,
             validate: Callable[[int], float | None] | None = None,
             memory: dict | None = None) -> list[StepRecord]:
    """Train steps settings.start_step .. total_steps - 1; returns one record per step run (also
    appended to log_path). `on_step(record, total steps)` is called after each update and
    `check_cancel()` before each micro-batch (it raises to stop the run). With fp16, `scaler` is the
    loss scaler to use (one is made when None). `validate(step)`, after each update, returns that
    step's validation loss or None. `memory` (the memory plan) goes into step 0's record, so a log
    holds it once, in its first line.

    Each step: every group's lr = its base_lr x multiplier(step) (set explicitly), then
    `gradient_accumulation` micro-batches, gradient clipping, the update; the rates are read back from
    ``optimizer.param_groups`` and logged with the step's mean loss.
    """
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    shard = current_shard()
    if settings.precision == "fp16" and scaler is None:
        scaler = make_grad_scaler(settings)
    records: list[StepRecord] = []
    log_file = open(log_path, "a", encoding="utf-8") if log_path is not None else None
    try:
        for step in range(settings.start_step, settings.total_steps):
            factor = multiplier(step)
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor
            step_loss: torch.Tensor | None = None   # stays on the device: no host sync per micro-batch
            step_sigmas: list[torch.Tensor] = []
            for _ in range(settings.gradient_accumulation):
                if check_cancel is not None:
                    check_cancel()
                x0, cond = next_batch()
                # Data parallel: noise and sigmas drawn for the whole global batch on every rank (the same
                # draws as one process), each rank keeping its slice (training/run/distributed.py)
                whole = x0.new_empty((x0.shape[0] * shard.world, *x0.shape[1:])) if shard.parallel else x0
                noise = draw_noise(whole, generator, settings.noise_offset)[shard.part(whole.shape[0])]
                all_sigmas = objective.draw_sigmas(whole, generator)
                sigma = all_sigmas[shard.part(whole.shape[0])]
                step_sigmas.append(all_sigmas.detach())
                with autocast_context(settings):
                    loss = loss_at_sigma(objective, x0, cond, noise, sigma, settings.min_snr_gamma, settings.loss)
                scaled = loss / settings.gradient_accumulation
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
                share = scaled.detach().float()
                step_loss = share if step_loss is None else step_loss + share
            shard.average_gradients(parameters)   # data parallel: the global batch's gradient on every rank
            step_loss = shard.mean(step_loss)
            if scaler is not None:
                scaler.unscale_(optimizer)
            # The norm is computed even without clipping: a non-finite gradient must never reach the
            # weights (fp16's scaler skips such steps itself), so the LoRA always holds good weights.
            norm = torch.nn.utils.clip_grad_norm_(parameters, settings.max_grad_norm or float("inf"))
            # One device -> host transfer per step for both checks and the logged sigmas (each sync stalls
            # the kernel queue).
            loss_value, norm_value, *sigmas = torch.cat([
                step_loss.reshape(1), norm.detach().float().to(step_loss.device).reshape(1),
                torch.cat(step_sigmas).float().to(step_loss.device)]).tolist()
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
            record = StepRecord(step=step, loss=loss_value, lr=applied_rates(optimizer),
                                effective_lr=effective_rates(optimizer),
                                val_loss=validate(step) if validate is not None else None,
                                memory=memory if step == 0 else None, sigmas=sigmas)
            records.append(record)
            if log_file is not None:
                log_file.write(record.as_json() + "\n")
                log_file.flush()
            if on_step is not None:
                on_step(record, settings.total_steps)
    finally:
        if log_file is not None:
            log_file.close()
    return records
