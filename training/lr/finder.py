"""LR Finder (ComfyUI-agnostic): a learning-rate range test for diffusion LoRAs, on the stable
validation loss (training/run/validation.py).

A throwaway LoRA trains for `steps` optimizer steps while the rate rises exponentially from min_lr
to max_lr; every k steps the validation loss (fixed images, noise and timesteps) is measured. A
diffusion model's *training* loss jumps with each step's random timesteps and noise far more than
with the rate, which is why the classic range test fails on it; the validation loss moves only with
the weights. The sweep stops early once that loss passes 4x its minimum, gives back 3/4 of its gain
over the model without the LoRA (see `gave_back`), or turns non-finite (or the training loss does).

The suggestion (README, "LR Finder", with the benchmark that chose it): the rate where the smoothed
validation curve falls fastest per decade, before its minimum. The minimum (and the classic
minimum / 10) are computed and drawn too.

With refine_runs > 0 the sweep is followed by that many short confirmation runs (refine_steps each,
the LR Schedule node's default schedule, the sweep's seed and so the same fresh LoRA init and the same
noise), at rates spread from the suggestion up to the curve's minimum (training/lr/refine.py); the
rate whose run ends with the lowest stable validation loss (Train LoRA's validation set) becomes the
suggestion. Each run goes through the same trainer sequence as the sweep; `refine.jsonl` holds them.
Nothing is written to models/loras; the input models are restored exactly (the sweep goes through the
trainer's own sequence, training/run/trainer.py `execute`), and
`output/lora_lab/lr_finder/<run>/sweep.jsonl` holds every step.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from ..run.host import ModelAccess, TrainCallbacks
from ..run.loop import StepRecord, TrainingDiverged
from ..run.memory import give_back_host_memory, release_device_memory
from ..run.plan import RunInputs, check_run, plan_sweep
from ..run.train_settings import TrainSettings
from ..run.trainer import Run, execute
from ..run.validation import VALIDATION_IMAGES, VALIDATION_TIMESTEPS
from ..settings import NodeSettings, SettingError, setting, setting_like, validate
from .optimizers import OPTIMIZERS
from .rates import INHERIT, LearningRates
from .refine import (REFINE_MIN_SPAN, REFINE_SCHEDULE, RefineRun, pick_refined, refine_candidates,  # noqa: F401
                     refine_lines, refine_runs_rule)
from .schedules import ScheduleSettings

STOP_FACTOR = 4.0                # the sweep stops once the validation loss passes this x its minimum,
GIVEN_BACK = 0.75                # or gives back this share of its gain over the model without the LoRA
MEANINGFUL_GAIN = 0.05           # (once the gain was at least this share of that model's loss)
VALIDATION_BUDGET = 0.5          # validation may cost at most this fraction of the sweep's training
FORWARDS_PER_TRAINING_IMAGE = 3  # forward + backward ~ 3 forward passes
FINDER_IMAGES = 2                # the finder's validation set: fewer images and timesteps than
FINDER_TIMESTEPS = 4             # Train LoRA's, so it can be measured often within the budget
SMOOTHING_WINDOW = 3             # points in the centred moving average of the validation curve


@dataclass(frozen=True)
class FinderSettings(NodeSettings):
    """The LR Finder node's widgets; the LoRA ones are Train LoRA's (same choices and defaults)."""

    TITLE = "LR Finder"

    min_lr: float = setting(1e-6, "Lowest rate of the sweep (the first step).", min=1e-9, max=10.0, step=1e-7,
                            round=False)
    max_lr: float = setting(1e-2, "Highest rate of the sweep (the last step, if it gets there).", min=1e-9,
                            max=10.0, step=1e-5, round=False)
    steps: int = setting(100, "Sweep length in optimizer steps; the rate rises exponentially from min_lr to "
                              "max_lr over them. The validation loss is measured every k steps, k chosen so it "
                              "costs at most half the training (see the summary).", min=10, max=100_000)
    rank: int = setting_like(TrainSettings, "rank")
    alpha: float = setting_like(TrainSettings, "alpha")
    target: str = setting_like(TrainSettings, "target")
    optimizer: str = setting_like(TrainSettings, "optimizer")
    batch_size: int = setting_like(TrainSettings, "batch_size")
    precision: str = setting_like(TrainSettings, "precision")
    training_seed: int = setting_like(TrainSettings, "training_seed")
    memory: str = setting_like(TrainSettings, "memory")                  # appended (the node's optional inputs)
    vram_budget_gb: float = setting_like(TrainSettings, "vram_budget_gb")
    base_weights: str = setting_like(TrainSettings, "base_weights")
    refine_runs: int = setting(0, (
        "After the sweep, train this many short confirmation runs at rates from the suggestion up to the "
        "smoothed curve's minimum (log-evenly spaced over at least half a decade), each from the "
        "same fresh LoRA with the same seed, and suggest the rate whose run ends with the lowest stable "
        "validation loss. Costs refine_runs x refine_steps training steps more (the summary says how much "
        "next to the sweep)."), min=0, max=9, hint="(0 = off: the sweep's suggestion; 3 is a good choice)",
        check=refine_runs_rule)
    refine_steps: int = setting(30, (
        "Optimizer steps of each confirmation run (refine_runs > 0), with the LR Schedule node's default "
        "schedule (cosine, 5% warmup), so each is a short Train LoRA run."), min=5, max=100_000)
    network: str = setting_like(TrainSettings, "network")               # appended: sweep the network you train
    lokr_factor: int = setting_like(TrainSettings, "lokr_factor")
    lokr_decompose_both: bool = setting_like(TrainSettings, "lokr_decompose_both")
    loha_rank: int = setting_like(TrainSettings, "loha_rank")
    loha_alpha: float = setting_like(TrainSettings, "loha_alpha")

    def __post_init__(self) -> None:
        validate(self, self.TITLE)
        if self.min_lr >= self.max_lr:
            raise SettingError(f"LR Finder: min_lr = {self.min_lr:g} must be below max_lr = {self.max_lr:g} "
                               "(e.g. 1e-6 and 1e-2).")

    def rate(self, step: int) -> float:
        """The sweep's rate at optimizer step `step` (0-based): exponential from min_lr to max_lr."""
        return self.min_lr * (self.max_lr / self.min_lr) ** (step / max(1, self.steps - 1))

    def train_settings(self, lora_name: str, steps: int | None = None) -> TrainSettings:
        """Train LoRA's settings of the sweep (or, with `steps`, of a confirmation run that long)."""
        return TrainSettings(steps=self.steps if steps is None else steps, batch_size=self.batch_size, rank=self.rank, alpha=self.alpha,
                             target=self.target, optimizer=self.optimizer, precision=self.precision,
                             training_seed=self.training_seed, lora_name=lora_name, memory=self.memory,
                             vram_budget_gb=self.vram_budget_gb, base_weights=self.base_weights,
                             network=self.network, lokr_factor=self.lokr_factor,
                             lokr_decompose_both=self.lokr_decompose_both, loha_rank=self.loha_rank,
                             loha_alpha=self.loha_alpha)


def sweep_line(record: StepRecord, rate: float) -> str:
    """A line of sweep.jsonl: the step, the swept rate, the training and the validation loss."""
    return json.dumps({"step": record.step, "lr": rate, "loss": record.loss, "val_loss": record.val_loss})


@dataclass
class FinderResult:
    records: list[StepRecord]          # the loop's records (the rate swept at a step: FinderSettings.rate)
    suggested_lr: float
    min_loss_lr: float | None          # the rate at the smoothed curve's minimum
    steepest_lr: float | None          # the rate where the smoothed curve falls fastest (per decade)
    baseline_val_loss: float           # before the first step (the model without the LoRA)
    stopped: str                       # why the sweep ended
    validate_every: int
    run_dir: Path
    learning_rates: LearningRates      # ready for Train LoRA: the suggestion as the base, ratios kept
    curve: list[tuple[float, float]] = field(default_factory=list)   # (lr, smoothed val loss)
    memory: str = ""                   # the memory plan, in words
    parameters: int = 0                # the swept network's trained parameters
    sweep_lr: float | None = None      # the sweep's own suggestion (suggested_lr before refine)
    refine: list[RefineRun] = field(default_factory=list)   # the confirmation runs, in rate order
    sweep_seconds: float = 0.0
    refine_seconds: float = 0.0


class SweepStop(Exception):
    """Raised from the step callback to end the sweep (the loss passed the stop rule)."""


def gave_back(loss: float, lowest: float, baseline: float) -> bool:
    """The stop rule a diffusion model needs besides "4x the minimum": a LoRA whose rate is far too high
    makes the model's predictions uncorrelated with the noise, and an epsilon model's loss then settles
    near 1, often below 4x the minimum. So the sweep also stops once the loss has given back GIVEN_BACK
    of what it had gained over the model without the LoRA (when that gain was meaningful)."""
    gain = baseline - lowest
    return gain > MEANINGFUL_GAIN * baseline and loss > lowest + GIVEN_BACK * gain


def validate_every(validation_size: int, settings: FinderSettings) -> int:
    """Steps between validations so they cost at most VALIDATION_BUDGET of the training's forward passes."""
    per_step = FORWARDS_PER_TRAINING_IMAGE * settings.batch_size
    return max(1, math.ceil(validation_size / (VALIDATION_BUDGET * per_step)))


def sweep_base(part_rates: dict[str, float]) -> float:
    """The rate the sweep moves: the UNet's base rate (or the first trained part's, UNet frozen)."""
    return next(rate for rate in part_rates.values() if rate > 0)


def scaled_rates(rates: LearningRates, factor: float) -> LearningRates:
    """Every explicit rate times `factor` (inherit and frozen stay): ratios between parts kept."""
    scale = lambda value: value * factor if value > 0 else value  # noqa: E731
    return replace(rates, learning_rate=rates.learning_rate * factor, unet_lr=scale(rates.unet_lr),
                   text_encoder_lr=scale(rates.text_encoder_lr), text_encoder_2_lr=scale(rates.text_encoder_2_lr))


def smoothed_curve(points: list[tuple[float, float]], window: int = SMOOTHING_WINDOW) -> list[tuple[float, float]]:
    """Centred moving average of the loss (window shrinks at the ends), at each point's rate."""
    half = window // 2
    result = []
    for index, (rate, _) in enumerate(points):
        chunk = [loss for _, loss in points[max(0, index - half): index + half + 1]]
        result.append((rate, sum(chunk) / len(chunk)))
    return result


def suggest(curve: list[tuple[float, float]], settings: FinderSettings) -> tuple[float, float | None, float | None]:
    """(suggestion, rate at the minimum, rate of the steepest descent) from the smoothed curve.

    The suggestion is the steepest descent (between two points, their geometric mean) before the
    minimum; a curve that never falls gives the minimum's rate / 10, clamped to [min_lr, max_lr]; with
    fewer than two points (the sweep diverged at once) it is min_lr."""
    if len(curve) < 2:
        return settings.min_lr, None, None
    low = min(range(len(curve)), key=lambda index: curve[index][1])
    min_rate = curve[low][0]
    steepest = None
    best_slope = 0.0
    for index in range(1, low + 1):
        (rate_a, loss_a), (rate_b, loss_b) = curve[index - 1], curve[index]
        slope = (loss_b - loss_a) / (math.log10(rate_b) - math.log10(rate_a))
        if slope < best_slope:
            best_slope, steepest = slope, math.sqrt(rate_a * rate_b)
    suggestion = steepest if steepest is not None else min_rate / 10.0
    return min(settings.max_lr, max(settings.min_lr, suggestion)), min_rate, steepest


def free_run_dir(root: Path) -> Path:
    """output/lora_lab/lr_finder/sweep_NNNN: the first free number (never an existing folder)."""
    number = 1
    while (root / f"sweep_{number:04d}").exists():
        number += 1
    return root / f"sweep_{number:04d}"


def check_sweep(settings: FinderSettings, dataset, rates: LearningRates | None, family: str, device_type: str,
                text_parts=None) -> RunInputs:
    """Train LoRA's checks (training/run/plan.py check_run) on the throwaway LoRA, before any model loads.

    rates: given, every part is swept by the same factor (their ratios kept); None, the UNet alone."""
    swept = rates if rates is not None else LearningRates(learning_rate=1.0, unet_lr=INHERIT, text_encoder_lr=0.0)
    return check_run(settings.train_settings("lr_finder"), dataset, swept,
                     ScheduleSettings(scheduler="constant", warmup=0.0), family, device_type, text_parts)


def find_lr(settings: FinderSettings, access: ModelAccess, dataset, rates: LearningRates | None, output_dir: Path,
            callbacks: TrainCallbacks | None = None,
            on_record: Callable[[StepRecord, int], None] | None = None,
            on_refine: Callable[[StepRecord, int], None] | None = None) -> FinderResult:
    """Check (:func:`check_sweep`) against the models in `access`, then :func:`sweep`."""
    inputs = check_sweep(settings, dataset, rates, access.family, access.device.type, access.text_encoders)
    return sweep(settings, inputs, access, output_dir, callbacks, on_record, on_refine)


def sweep(settings: FinderSettings, inputs: RunInputs, access: ModelAccess, output_dir: Path,
          callbacks: TrainCallbacks | None = None,
          on_record: Callable[[StepRecord, int], None] | None = None,
          on_refine: Callable[[StepRecord, int], None] | None = None) -> FinderResult:
    """Run the sweep on a throwaway LoRA (then, with refine_runs, the confirmation runs: :func:`refine`);
    the models in `access` are restored exactly whatever happens. `on_record(record, total steps)` sees
    every step's record of the sweep as the loop made it; `on_refine` those of the confirmation runs,
    numbered on across them (total: refine_runs x refine_steps)."""
    callbacks = callbacks or TrainCallbacks()
    started = time.monotonic()
    base = sweep_base(inputs.part_rates)
    run_dir = free_run_dir(output_dir / "lora_lab" / "lr_finder")
    records: list[StepRecord] = []
    state = {"min": math.inf, "baseline": math.inf}
    sweep_path = run_dir / "sweep.jsonl"

    def on_step(record: StepRecord, total: int) -> None:
        swept_rate = settings.rate(record.step)
        records.append(record)
        with open(sweep_path, "a", encoding="utf-8") as handle:
            handle.write(sweep_line(record, swept_rate) + "\n")
        if on_record is not None:
            on_record(record, total)
        if record.val_loss is not None:
            if not math.isfinite(record.val_loss):
                raise SweepStop(f"the validation loss became {record.val_loss} at {swept_rate:.3g}")
            state["min"] = min(state["min"], record.val_loss)
            if record.val_loss > STOP_FACTOR * state["min"]:
                raise SweepStop(f"the validation loss passed {STOP_FACTOR:g}x its minimum at {swept_rate:.3g}")
            if gave_back(record.val_loss, state["min"], state["baseline"]):
                raise SweepStop(f"the validation loss gave back {GIVEN_BACK:.0%} of its gain at {swept_rate:.3g}")

    def train(run: Run) -> tuple[int, str]:
        """(steps between validations, why the sweep ended)."""
        validation = run.validation
        every = validate_every(validation.size, settings)
        state["baseline"] = validation.loss()
        try:
            run.run(multiplier=lambda step: settings.rate(step) / base, validate=validation.every(every, settings.steps))
        except SweepStop as stop:
            return every, f"stopped early: {stop}"
        except TrainingDiverged as error:
            return every, (f"stopped early: the training {error.what} became {error.loss} at "
                           f"{settings.rate(error.step):.3g}")
        return every, f"reached max_lr after {settings.steps} steps"

    run, (every, stopped) = execute(
        inputs, access, lambda access, memory: plan_sweep(inputs, access, output_dir, run_dir, memory),
        TrainCallbacks(on_step=on_step, check_cancel=callbacks.check_cancel), train,
        validation_shape=(FINDER_IMAGES, FINDER_TIMESTEPS))
    baseline = state["baseline"]
    parameters = sum(parameter.numel() for lora in run.injected for parameter in lora.parameters())
    points = [(settings.rate(record.step), record.val_loss) for record in records
              if record.val_loss is not None and math.isfinite(record.val_loss)]
    if points:   # the point that tripped a stop rule is past the curve's useful end
        lowest = min(loss for _, loss in points)
        points = [(rate, loss) for rate, loss in points
                  if loss <= STOP_FACTOR * lowest and not gave_back(loss, lowest, baseline)]
    curve = smoothed_curve(points)
    suggestion, min_rate, steepest = suggest(curve, settings)
    result = FinderResult(memory=run.plan.memory.summary(), records=records, suggested_lr=suggestion,
                          min_loss_lr=min_rate, steepest_lr=steepest, baseline_val_loss=baseline, stopped=stopped,
                          validate_every=every, run_dir=run_dir,
                          learning_rates=scaled_rates(inputs.rates, suggestion / base), curve=curve,
                          sweep_lr=suggestion, sweep_seconds=time.monotonic() - started, parameters=parameters)
    del run   # the sweep's LoRA, optimizer and feeder: nothing of it is held past here
    candidates = refine_candidates(suggestion, min_rate, settings.refine_runs, settings)
    if candidates:
        started = time.monotonic()
        result.refine = refine(settings, inputs, access, output_dir, run_dir, candidates, callbacks, on_refine)
        result.refine_seconds = time.monotonic() - started
        chosen = pick_refined(result.refine)
        if chosen is not None:
            chosen.chosen = True
            result.suggested_lr = chosen.rate
            result.learning_rates = scaled_rates(inputs.rates, chosen.rate / base)
        with open(run_dir / "refine.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(item.line() + "\n" for item in result.refine)
    return result


def refine(settings: FinderSettings, inputs: RunInputs, access: ModelAccess, output_dir: Path, run_dir: Path,
           candidates: list[float], callbacks: TrainCallbacks,
           on_refine: Callable[[StepRecord, int], None] | None = None) -> list[RefineRun]:
    """One confirmation run per candidate rate: a short normal run (the trainer's :func:`execute` and
    :class:`Run`, REFINE_SCHEDULE, refine_steps steps, the sweep's seed: the same LoRA init and noise),
    its stable validation loss (Train LoRA's set) measured after the last step. Device and host memory
    are given back before each run; the models in `access` are restored after each."""
    steps = settings.refine_steps
    total = steps * len(candidates)
    base = sweep_base(inputs.part_rates)
    runs: list[RefineRun] = []
    for index, rate in enumerate(candidates):
        release_device_memory(access.device)
        give_back_host_memory()
        run_inputs = check_run(settings.train_settings("lr_finder", steps=steps), inputs.dataset,
                               scaled_rates(inputs.rates, rate / base), REFINE_SCHEDULE, inputs.family,
                               access.device.type, access.text_encoders)
        folder = run_dir / f"refine_{index + 1:02d}"
        offset = index * steps

        def on_step(record: StepRecord, _: int, offset: int = offset) -> None:
            if on_refine is not None:
                on_refine(replace(record, step=offset + record.step), total)

        def train(run: Run) -> tuple[float, int, str]:
            """(final validation loss, steps trained, why it ended early or "")."""
            validation = run.validation
            try:
                records = run.run(validate=lambda step: validation.loss() if step + 1 == steps else None)
            except TrainingDiverged as error:
                return math.inf, error.step, f"diverged: the training {error.what} became {error.loss} at step {error.step}"
            loss = records[-1].val_loss if records and records[-1].val_loss is not None else math.nan
            if not math.isfinite(loss):
                return math.inf, len(records), f"the validation loss became {loss}"
            return loss, len(records), ""

        started = time.monotonic()
        _, (loss, trained, stopped) = execute(
            run_inputs, access,
            lambda access, memory, folder=folder, run_inputs=run_inputs: replace(
                plan_sweep(run_inputs, access, output_dir, folder, memory), log_path=folder / "log.jsonl"),
            TrainCallbacks(on_step=on_step, check_cancel=callbacks.check_cancel), train,
            validation_shape=(VALIDATION_IMAGES, VALIDATION_TIMESTEPS))
        runs.append(RefineRun(rate=rate, val_loss=loss, steps=trained, seconds=time.monotonic() - started,
                              stopped=stopped))
    release_device_memory(access.device)
    give_back_host_memory()
    return runs


def summary(result: FinderResult, settings: FinderSettings) -> str:
    rule = ("where the smoothed validation loss falls fastest" if result.steepest_lr is not None
            else "the curve never fell: its minimum / 10")
    chosen = next((run for run in result.refine if run.chosen), None)
    if chosen is not None:
        lines = [f"Suggested rate: {result.suggested_lr:.3g} (refined: the lowest validation loss of "
                 f"{len(result.refine)} confirmation runs; the sweep's suggestion was {result.sweep_lr:.3g}, "
                 f"{rule})"]
    else:
        lines = [f"Suggested rate: {result.suggested_lr:.3g} ({rule})"]
    if result.min_loss_lr is not None:
        lines.append(f"Minimum of the smoothed validation loss at {result.min_loss_lr:.3g}")
    if result.steepest_lr is not None:
        lines.append(f"Steepest descent at {result.steepest_lr:.3g}")
    if len(result.curve) < 2:
        lines.append("Too few validation points to read a curve: lower min_lr or raise steps.")
    if OPTIMIZERS[settings.optimizer].adaptive:
        lines.append(f"{settings.optimizer} steps by d x the swept rate, so this suggests a multiplier of its own d. "
                     "To bound its step, sweep with AdamW and connect suggested_lr to Train LoRA's max_effective_lr.")
    lines += [f"Sweep: {settings.min_lr:g} -> {settings.max_lr:g} over {settings.steps} steps; {result.stopped}.",
              f"Network: {network_words(settings)}, {result.parameters:,} trained parameters.",
              f"Validation loss (fixed images, noise, timesteps) every {result.validate_every} steps; "
              f"{result.baseline_val_loss:.4f} before training."]
    if result.refine:
        lines += refine_lines(result, settings)
    if result.memory:
        lines.append(f"Memory: {result.memory}")
    if result.refine:
        lines.append(f"Confirmation runs: {result.run_dir / 'refine.jsonl'}")
    # The path stays the last line: it is what a reader of the summary opens.
    lines.append(f"Steps: {result.run_dir / 'sweep.jsonl'}")
    return "\n".join(lines)


def network_words(settings: FinderSettings) -> str:
    """The swept network as its settings name it (the rate is for that network: LoKr and LoHa want others)."""
    if settings.network == "lokr":
        factor = "as square as each layer allows" if settings.lokr_factor == -1 else settings.lokr_factor
        both = ", decompose_both" if settings.lokr_decompose_both else ""
        return f"LoKr (factor {factor}{both}), rank {settings.rank}, alpha {settings.alpha:g}"
    if settings.network == "loha":
        return f"LoHa, rank {settings.loha_rank}, alpha {settings.loha_alpha:g}"
    return f"LoRA, rank {settings.rank}, alpha {settings.alpha:g}"
