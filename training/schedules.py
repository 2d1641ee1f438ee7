"""Learning-rate schedules: option name -> pure multiplier function of (step, total_steps, settings).

One code path drives the optimizer during training, the LR Schedule node's chart and the
graph editor's live preview (POST /lora_lab/schedule_preview), so what users see is what trains.

A step is one optimizer update, numbered from 0; a schedule of T steps is evaluated at 0..T-1.
Where diffusers (`diffusers.optimization`) or transformers (`transformers.optimization`) define a
schedule, we evaluate *their* lambda (taken from the LambdaLR they build around a one-parameter
dummy optimizer) so our curves cannot drift from theirs; REX and the min-LR floor are ours.

min_lr_ratio = r > 0 turns the decaying part m(s) into r + (1 - r) * m(s), so the rate never
falls below r x base; warmup always ramps linearly from 0 to 1 and is not affected.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

SCHEDULER_NAMES = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    "cosine_with_min_lr", "warmup_stable_decay", "inverse_sqrt", "rex", "piecewise_constant",
)
WARMUP_UNITS = ("steps", "percent")

# Which settings each scheduler reads (the chart and tooltips name the ones it ignores).
SETTINGS_USED: dict[str, tuple[str, ...]] = {
    "constant": (),
    "constant_with_warmup": ("warmup",),
    "linear": ("warmup", "min_lr_ratio"),
    "cosine": ("warmup", "min_lr_ratio"),
    "cosine_with_restarts": ("warmup", "num_cycles", "min_lr_ratio"),
    "polynomial": ("warmup", "power", "min_lr_ratio"),
    "cosine_with_min_lr": ("warmup", "min_lr_ratio"),
    "warmup_stable_decay": ("warmup", "decay_ratio", "min_lr_ratio"),
    "inverse_sqrt": ("warmup",),
    "rex": ("warmup", "min_lr_ratio"),
    "piecewise_constant": ("step_rules",),
}

DEFAULTS = {
    "scheduler": "cosine", "warmup": 5.0, "warmup_unit": "percent", "num_cycles": 1, "power": 1.0,
    "min_lr_ratio": 0.0, "decay_ratio": 0.2, "step_rules": "", "preview_steps": 1000,
}


def parse_step_rules(step_rules: str) -> tuple[list[tuple[float, int]], float]:
    """Parse diffusers' piecewise rule string "1:10,0.1:20,0.01" -> ([(1.0, 10), (0.1, 20)], 0.01).

    Means: x1 until step 10, x0.1 until step 20, then x0.01. Raises ValueError naming the bad part.
    """
    fix = ('Write "multiplier:until_step,...,final_multiplier", e.g. "1:100,0.1:200,0.01" '
           "(x1 until step 100, x0.1 until 200, then x0.01).")
    text = step_rules.strip()
    if not text:
        raise ValueError(f"LR Schedule: step_rules is empty but scheduler is piecewise_constant. {fix}")
    parts = [part.strip() for part in text.split(",")]
    rules: list[tuple[float, int]] = []
    previous_step = 0
    for part in parts[:-1]:
        pieces = part.split(":")
        try:
            if len(pieces) != 2:
                raise ValueError
            multiplier, until_step = float(pieces[0]), int(pieces[1])
        except ValueError:
            raise ValueError(f"LR Schedule: step_rules = {step_rules!r}: {part!r} is not "
                             f"'multiplier:step'. {fix}") from None
        if until_step <= previous_step:
            raise ValueError(f"LR Schedule: step_rules = {step_rules!r}: steps must increase and be "
                             f"positive ({until_step} after {previous_step}). {fix}")
        if not math.isfinite(multiplier) or multiplier < 0:
            raise ValueError(f"LR Schedule: step_rules = {step_rules!r}: multiplier {pieces[0]!r} "
                             f"must be a number >= 0. {fix}")
        rules.append((multiplier, until_step))
        previous_step = until_step
    try:
        final = float(parts[-1])
    except ValueError:
        raise ValueError(f"LR Schedule: step_rules = {step_rules!r}: the last item {parts[-1]!r} must be "
                         f"a plain multiplier (no ':step'). {fix}") from None
    if not math.isfinite(final) or final < 0:
        raise ValueError(f"LR Schedule: step_rules = {step_rules!r}: final multiplier must be >= 0. {fix}")
    return rules, final


@dataclass(frozen=True)
class ScheduleSettings:
    """The LR_SCHEDULE socket value: how the base rate is scaled over training."""

    scheduler: str = "cosine"     # a key of SCHEDULES
    warmup: float = 5.0           # warmup length, in `warmup_unit`
    warmup_unit: str = "percent"  # "steps", or "percent" of total steps (rounded half up)
    num_cycles: int = 1           # hard restarts of cosine_with_restarts (cosine periods)
    power: float = 1.0            # exponent of polynomial decay (1 = linear)
    min_lr_ratio: float = 0.0     # floor of the decaying part, as a fraction of the base rate
    decay_ratio: float = 0.2      # warmup_stable_decay: fraction of all steps spent decaying
    step_rules: str = ""          # piecewise_constant rules, diffusers syntax "1:10,0.1:20,0.01"
    preview_steps: int = 1000     # total steps drawn when no trainer supplies the real total

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULES:
            raise ValueError(f"LR Schedule: scheduler = {self.scheduler!r} is unknown. "
                             f"Pick one of: {', '.join(SCHEDULER_NAMES)}.")
        if self.warmup_unit not in WARMUP_UNITS:
            raise ValueError(f"LR Schedule: warmup_unit = {self.warmup_unit!r} is unknown. Use 'steps' or 'percent'.")
        if not math.isfinite(self.warmup) or self.warmup < 0:
            raise ValueError(f"LR Schedule: warmup = {self.warmup} is negative. Use 0 for no warmup.")
        if self.warmup_unit == "percent" and self.warmup > 100:
            raise ValueError(f"LR Schedule: warmup = {self.warmup}% is longer than training (100%). "
                             "Use a value between 0 and 100 (5-10% is typical).")
        if self.warmup_unit == "steps" and self.warmup != int(self.warmup):
            raise ValueError(f"LR Schedule: warmup = {self.warmup} steps is not a whole number of steps. "
                             f"Use {round(self.warmup)}, or warmup_unit = percent.")
        if self.num_cycles < 1:
            raise ValueError(f"LR Schedule: num_cycles = {self.num_cycles} must be at least 1 "
                             "(1 = a single cosine decay with no restart).")
        if not math.isfinite(self.power) or self.power <= 0:
            raise ValueError(f"LR Schedule: power = {self.power} must be > 0 (1 = linear decay, 2 = quadratic).")
        if not math.isfinite(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"LR Schedule: min_lr_ratio = {self.min_lr_ratio} is outside [0, 1]. Use 0 to "
                             "decay to zero, 0.1 to stop at 10% of the base rate, 1 for no decay.")
        if not math.isfinite(self.decay_ratio) or not 0.0 <= self.decay_ratio <= 1.0:
            raise ValueError(f"LR Schedule: decay_ratio = {self.decay_ratio} is outside [0, 1]. It is the "
                             "fraction of steps spent decaying (0.2 = the last 20%).")
        if self.preview_steps < 1:
            raise ValueError(f"LR Schedule: preview_steps = {self.preview_steps} must be at least 1.")
        if self.scheduler == "piecewise_constant":
            parse_step_rules(self.step_rules)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `total_steps` (0 when unused)."""
        if "warmup" not in SETTINGS_USED[self.scheduler]:
            return 0
        if self.warmup_unit == "percent":
            return int(math.floor(self.warmup / 100.0 * total_steps + 0.5))
        return int(self.warmup)

    def check_total(self, total_steps: int) -> None:
        """Raise ValueError when these settings cannot run for `total_steps` steps."""
        if total_steps < 1:
            raise ValueError(f"LR Schedule: total steps = {total_steps} must be at least 1.")
        warmup = self.warmup_steps(total_steps)
        if warmup > total_steps:
            raise ValueError(f"LR Schedule: warmup = {warmup} steps is longer than training ({total_steps} "
                             f"steps). Lower warmup to at most {total_steps} steps, or give it in percent.")

    def multiplier(self, step: int, total_steps: int) -> float:
        """Factor of the base learning rate applied at optimizer step `step` (0-based) of `total_steps`."""
        return multipliers_for(self, total_steps)[min(max(step, 0), total_steps - 1)]

    def multipliers(self, total_steps: int) -> list[float]:
        """The factor for every step 0..total_steps-1."""
        return list(multipliers_for(self, total_steps))

    def describe(self) -> str:
        """One line naming the schedule and the settings it uses (chart titles, summaries)."""
        used = SETTINGS_USED[self.scheduler]
        parts = []
        if "warmup" in used:
            unit = "%" if self.warmup_unit == "percent" else " steps"
            parts.append(f"warmup {self.warmup:g}{unit}")
        if "num_cycles" in used:
            parts.append(f"cycles {self.num_cycles}")
        if "power" in used:
            parts.append(f"power {self.power:g}")
        if "decay_ratio" in used:
            parts.append(f"decay {self.decay_ratio:g}")
        if "min_lr_ratio" in used and self.min_lr_ratio > 0:
            parts.append(f"min ratio {self.min_lr_ratio:g}")
        if "step_rules" in used:
            parts.append(f"rules {self.step_rules.strip()}")
        return self.scheduler + (" (" + ", ".join(parts) + ")" if parts else "")

    def ignored_note(self) -> str:
        """Why warmup has no effect for this scheduler, or "" when it has."""
        if self.scheduler in ("constant", "piecewise_constant") and self.warmup > 0:
            alternative = "constant_with_warmup" if self.scheduler == "constant" else "another scheduler"
            return f"warmup is not used by {self.scheduler}; choose {alternative} to warm up"
        return ""


# ---------------------------------------------------------------------------------------------
# Reference lambdas from diffusers / transformers (each maps step -> multiplier of lr = 1).

def _library_lambda(build: Callable) -> Callable[[int], float]:
    """Build the library's LambdaLR around a dummy optimizer with lr = 1 and return its lambda."""
    import torch

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    return build(optimizer).lr_lambdas[0]


def _diffusers(name: str, **options) -> Callable[[int], float]:
    from diffusers.optimization import get_scheduler

    return _library_lambda(lambda optimizer: get_scheduler(name, optimizer, **options))


def _with_floor(settings: ScheduleSettings, warmup: int, decay: Callable[[int], float]) -> Callable[[int], float]:
    """Warmup untouched; after it, r + (1 - r) * m(step) (the min_lr_ratio floor)."""
    floor = settings.min_lr_ratio

    def multiplier(step: int) -> float:
        value = decay(step)
        if step < warmup or floor == 0.0:
            return value
        return floor + (1.0 - floor) * value

    return multiplier


def _linear_warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def schedule_constant(settings: ScheduleSettings, total: int, warmup: int) -> Callable[[int], float]:
    return lambda step: 1.0


def schedule_constant_with_warmup(settings, total, warmup):
    return _diffusers("constant_with_warmup", num_warmup_steps=warmup)


def schedule_linear(settings, total, warmup):
    return _with_floor(settings, warmup, _diffusers("linear", num_warmup_steps=warmup, num_training_steps=total))


def schedule_cosine(settings, total, warmup):
    return _with_floor(settings, warmup, _diffusers("cosine", num_warmup_steps=warmup, num_training_steps=total))


def schedule_cosine_with_restarts(settings, total, warmup):
    reference = _diffusers("cosine_with_restarts", num_warmup_steps=warmup, num_training_steps=total,
                           num_cycles=settings.num_cycles)
    return _with_floor(settings, warmup, reference)


def schedule_polynomial(settings, total, warmup):
    reference = _diffusers("polynomial", num_warmup_steps=warmup, num_training_steps=total, power=settings.power)
    return _with_floor(settings, warmup, reference)


def schedule_cosine_with_min_lr(settings, total, warmup):
    # transformers applies min_lr_rate to the decay only, exactly our floor rule.
    from transformers.optimization import get_cosine_with_min_lr_schedule_with_warmup

    return _library_lambda(lambda optimizer: get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=settings.min_lr_ratio))


def decay_steps(settings: ScheduleSettings, total: int, warmup: int) -> int:
    """warmup_stable_decay: steps in the final decay, at most what warmup leaves."""
    return min(int(math.floor(settings.decay_ratio * total + 0.5)), total - warmup)


def schedule_warmup_stable_decay(settings, total, warmup):
    # transformers' WSD also lifts the warmup by min_lr_ratio; we keep warmup 0 -> 1 like every
    # other schedule here and apply the floor to the decay ourselves.
    from transformers.optimization import get_wsd_schedule

    decay = decay_steps(settings, total, warmup)
    reference = _library_lambda(lambda optimizer: get_wsd_schedule(
        optimizer, num_warmup_steps=warmup, num_decay_steps=decay, num_training_steps=total, min_lr_ratio=0.0))
    return _with_floor(settings, warmup, reference)


def schedule_inverse_sqrt(settings, total, warmup):
    from transformers.optimization import get_inverse_sqrt_schedule

    return _library_lambda(lambda optimizer: get_inverse_sqrt_schedule(optimizer, num_warmup_steps=warmup))


def schedule_rex(settings, total, warmup):
    """REX (Chen et al. 2022, "REX: Revisiting Budgeted Training with an Improved Schedule"):
    m(z) = (1 - z) / (1 - z / 2) with z the post-warmup progress in [0, 1]."""
    span = max(1, total - warmup)

    def decay(step: int) -> float:
        if step < warmup:
            return _linear_warmup(step, warmup)
        progress = min(1.0, (step - warmup) / span)
        return (1.0 - progress) / (1.0 - progress / 2.0)

    return _with_floor(settings, warmup, decay)


def schedule_piecewise_constant(settings, total, warmup):
    parse_step_rules(settings.step_rules)  # our clear errors first; the values are diffusers'
    return _diffusers("piecewise_constant", step_rules=settings.step_rules.strip().replace(" ", ""))


SCHEDULES: dict[str, Callable[[ScheduleSettings, int, int], Callable[[int], float]]] = {
    "constant": schedule_constant,
    "constant_with_warmup": schedule_constant_with_warmup,
    "linear": schedule_linear,
    "cosine": schedule_cosine,
    "cosine_with_restarts": schedule_cosine_with_restarts,
    "polynomial": schedule_polynomial,
    "cosine_with_min_lr": schedule_cosine_with_min_lr,
    "warmup_stable_decay": schedule_warmup_stable_decay,
    "inverse_sqrt": schedule_inverse_sqrt,
    "rex": schedule_rex,
    "piecewise_constant": schedule_piecewise_constant,
}
assert tuple(SCHEDULES) == SCHEDULER_NAMES


@functools.lru_cache(maxsize=64)
def multipliers_for(settings: ScheduleSettings, total_steps: int) -> tuple[float, ...]:
    """All multipliers of a run, computed once per (settings, total) and shared by chart and optimizer."""
    settings.check_total(total_steps)
    warmup = settings.warmup_steps(total_steps)
    function = SCHEDULES[settings.scheduler](settings, total_steps, warmup)
    return tuple(float(function(step)) for step in range(total_steps))


def settings_from_values(values: dict) -> ScheduleSettings:
    """Build settings from widget values (missing keys take the node's defaults); types coerced."""
    merged = {**DEFAULTS, **{key: value for key, value in values.items() if key in DEFAULTS}}
    try:
        return ScheduleSettings(
            scheduler=str(merged["scheduler"]), warmup=float(merged["warmup"]),
            warmup_unit=str(merged["warmup_unit"]), num_cycles=int(merged["num_cycles"]),
            power=float(merged["power"]), min_lr_ratio=float(merged["min_lr_ratio"]),
            decay_ratio=float(merged["decay_ratio"]), step_rules=str(merged["step_rules"]),
            preview_steps=int(merged["preview_steps"]))
    except (TypeError, ValueError) as error:
        if str(error).startswith("LR Schedule"):
            raise
        raise ValueError(f"LR Schedule: a setting has the wrong type ({error}). Values: {values}") from None
