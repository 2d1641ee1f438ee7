"""Learning-rate schedules: option name -> pure multiplier function of (step, total_steps, settings).

One code path drives the optimizer during training, the LR Schedule node's chart and the
graph editor's live preview (POST /lora_lab/schedule_preview), so what users see is what trains.

A step is one optimizer update, numbered from 0; a schedule of T steps is evaluated at 0..T-1.
Each schedule is a few lines of plain math (no optimizer, no torch, no library scheduler). Where
diffusers (`diffusers.optimization`) or transformers (`transformers.optimization`) define a
schedule of the same name, ours does the same floating-point operations, so the curves are equal
to the last bit; tests/unit/test_schedules.py steps the real libraries' schedulers to keep it so.
REX and the min-LR floor are ours.

min_lr_ratio = r > 0 turns the decaying part m(s) into r + (1 - r) * m(s), so the rate never
falls below r x base; warmup always ramps linearly from 0 to 1 and is not affected.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

from ..settings import NodeSettings, SettingError, setting, validate

WARMUP_UNITS = ("steps", "percent")



def parse_step_rules(step_rules: str) -> tuple[list[tuple[float, int]], float]:
    """Parse diffusers' piecewise rule string "1:10,0.1:20,0.01" -> ([(1.0, 10), (0.1, 20)], 0.01).

    Means: x1 until step 10, x0.1 until step 20, then x0.01. Raises SettingError naming the bad part.
    """
    fix = ('Write "multiplier:until_step,...,final_multiplier", e.g. "1:100,0.1:200,0.01" '
           "(x1 until step 100, x0.1 until 200, then x0.01).")
    text = step_rules.strip()
    if not text:
        raise SettingError(f"LR Schedule: step_rules is empty but scheduler is piecewise_constant. {fix}")
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
            raise SettingError(f"LR Schedule: step_rules = {step_rules!r}: {part!r} is not "
                             f"'multiplier:step'. {fix}") from None
        if until_step <= previous_step:
            raise SettingError(f"LR Schedule: step_rules = {step_rules!r}: steps must increase and be "
                             f"positive ({until_step} after {previous_step}). {fix}")
        if not math.isfinite(multiplier) or multiplier < 0:
            raise SettingError(f"LR Schedule: step_rules = {step_rules!r}: multiplier {pieces[0]!r} "
                             f"must be a number >= 0. {fix}")
        rules.append((multiplier, until_step))
        previous_step = until_step
    try:
        final = float(parts[-1])
    except ValueError:
        raise SettingError(f"LR Schedule: step_rules = {step_rules!r}: the last item {parts[-1]!r} must be "
                         f"a plain multiplier (no ':step'). {fix}") from None
    if not math.isfinite(final) or final < 0:
        raise SettingError(f"LR Schedule: step_rules = {step_rules!r}: final multiplier must be >= 0. {fix}")
    return rules, final


# ---------------------------------------------------------------------------------------------
# The curves. Each is a pure function of (step, total, settings) -> multiplier of the base rate,
# for step in 0..total-1. Where diffusers or transformers define the schedule, the formula is
# written so that it rounds as theirs does, so the values are equal to the last bit (the tests step
# their schedulers to check); the min_lr_ratio floor and REX are ours.

def _warmup_ramp(step: int, warmup: int) -> float:
    """Linear warmup: 0 at step 0, (w-1)/w at the last warmup step; step w is the first at full rate."""
    return step / max(1, warmup)


def _floored(value: float, settings: ScheduleSettings) -> float:
    """The min_lr_ratio floor r: r + (1 - r) * value (with r = 0, exactly `value`)."""
    return settings.min_lr_ratio + (1.0 - settings.min_lr_ratio) * value


def _progress(step: int, total: int, warmup: int) -> float:
    """Share of the post-warmup steps already done: 0 at step `warmup`, 1 at step `total` (one past the end)."""
    return (step - warmup) / max(1, total - warmup)


def constant(step: int, total: int, settings: ScheduleSettings) -> float:
    """The base rate throughout."""
    return 1.0


def constant_with_warmup(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, then the base rate (diffusers' constant_with_warmup)."""
    warmup = settings.warmup_steps(total)
    return _warmup_ramp(step, warmup) if step < warmup else 1.0


def linear(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, then a straight line from 1 down to 0 at step `total` (diffusers' linear), floored."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    # The remaining share, computed as (total - step) / span rather than 1 - progress: diffusers' rounding.
    return _floored((total - step) / max(1, total - warmup), settings)


def cosine(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, then half a cosine period from 1 toward 0 at step `total`, floored: diffusers' cosine,
    and transformers' cosine_with_min_lr, whose min_lr_rate is this floor."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    return _floored(0.5 * (1.0 + math.cos(math.pi * _progress(step, total, warmup))), settings)


def cosine_with_restarts(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, then num_cycles half-cosine decays from 1 toward 0, each restarting at 1 (diffusers'
    cosine_with_restarts, i.e. hard restarts), floored."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    cycle_progress = (settings.num_cycles * _progress(step, total, warmup)) % 1.0
    return _floored(0.5 * (1.0 + math.cos(math.pi * cycle_progress)), settings)


# diffusers' polynomial decays toward its lr_end (default 1e-7 with lr = 1), not to 0; the curves
# users trained with have that end, so it stays.
POLYNOMIAL_END = 1e-7


def polynomial(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, then (1 - E) * remaining^power + E, remaining going from 1 toward 0 at step `total` and
    E = POLYNOMIAL_END (diffusers' polynomial at lr = 1), floored."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    remaining = 1.0 - _progress(step, total, warmup)
    return _floored((1.0 - POLYNOMIAL_END) * remaining ** settings.power + POLYNOMIAL_END, settings)


def decay_steps(settings: ScheduleSettings, total: int, warmup: int) -> int:
    """warmup_stable_decay: steps in the final decay, decay_ratio of all (half up), at most what warmup leaves."""
    return min(int(math.floor(settings.decay_ratio * total + 0.5)), total - warmup)


def warmup_stable_decay(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, a flat stretch at 1, then half a cosine over the last decay_steps steps (transformers'
    get_wsd_schedule with its defaults), floored. transformers' own min_lr_ratio would also lift the
    warmup; ours leaves warmup at 0 -> 1 like every other schedule here and floors the rest."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    decay = decay_steps(settings, total, warmup)
    decay_start = total - decay
    if step < decay_start:
        return 1.0  # the stable phase; r + (1 - r) x 1 rounds to exactly 1 for every r, so no floor to apply
    progress = (step - decay_start) / max(1, decay)
    return _floored(0.5 * (1.0 + math.cos(math.pi * progress)), settings)


# transformers' timescale for inverse_sqrt without warmup (a decay to 1/sqrt(2) over 10,000 steps).
INVERSE_SQRT_TIMESCALE = 10_000


def inverse_sqrt(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup w, then 1 / sqrt(step / w), so 1 at the end of warmup (transformers' inverse_sqrt); with no
    warmup, 1 / sqrt((step + t) / t) with t = INVERSE_SQRT_TIMESCALE. Not floored: it never ends."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    timescale = warmup or INVERSE_SQRT_TIMESCALE
    return 1.0 / math.sqrt((step + timescale - warmup) / timescale)


def rex(step: int, total: int, settings: ScheduleSettings) -> float:
    """Warmup, then REX (Chen et al. 2022, "REX: Revisiting Budgeted Training with an Improved
    Schedule"): (1 - z) / (1 - z / 2) with z the post-warmup progress, floored."""
    warmup = settings.warmup_steps(total)
    if step < warmup:
        return _warmup_ramp(step, warmup)
    progress = _progress(step, total, warmup)
    return _floored((1.0 - progress) / (1.0 - progress / 2.0), settings)


@functools.lru_cache(maxsize=32)
def _step_rules(step_rules: str) -> tuple[tuple[tuple[float, int], ...], float]:
    """parse_step_rules once per rule string rather than once per step."""
    rules, final = parse_step_rules(step_rules)
    return tuple(rules), final


def piecewise_constant(step: int, total: int, settings: ScheduleSettings) -> float:
    """step_rules "1:10,0.1:20,0.01": x1 before step 10, x0.1 before step 20, then x0.01 (diffusers'
    piecewise_constant). No warmup, no floor: the rules say everything."""
    rules, final = _step_rules(settings.step_rules)
    for multiplier, until_step in rules:
        if step < until_step:
            return multiplier
    return final


@dataclass(frozen=True)
class Schedule:
    """One option of the scheduler widget."""

    curve: Callable[[int, int, ScheduleSettings], float]  # (step, total, settings) -> multiplier
    uses: tuple[str, ...]  # settings it reads (no "warmup": 0 warmup steps); chart titles name only these


# Option name (shown in the UI, stored in saved workflows) -> schedule. The order is the widget's.
SCHEDULES: dict[str, Schedule] = {
    "constant": Schedule(constant, ()),
    "constant_with_warmup": Schedule(constant_with_warmup, ("warmup",)),
    "linear": Schedule(linear, ("warmup", "min_lr_ratio")),
    "cosine": Schedule(cosine, ("warmup", "min_lr_ratio")),
    "cosine_with_restarts": Schedule(cosine_with_restarts, ("warmup", "num_cycles", "min_lr_ratio")),
    "polynomial": Schedule(polynomial, ("warmup", "power", "min_lr_ratio")),
    "cosine_with_min_lr": Schedule(cosine, ("warmup", "min_lr_ratio")),  # transformers' name for cosine
    "warmup_stable_decay": Schedule(warmup_stable_decay, ("warmup", "decay_ratio", "min_lr_ratio")),
    "inverse_sqrt": Schedule(inverse_sqrt, ("warmup",)),
    "rex": Schedule(rex, ("warmup", "min_lr_ratio")),
    "piecewise_constant": Schedule(piecewise_constant, ("step_rules",)),
}
SCHEDULER_NAMES = tuple(SCHEDULES)


@dataclass(frozen=True)
class ScheduleSettings(NodeSettings):
    """The LR_SCHEDULE socket value (the LR Schedule node's widgets; each field is the one source of its
    default, range and help): how the base rate is scaled over training."""

    TITLE = "LR Schedule"

    scheduler: str = setting("cosine", (
        "Shape of the rate after warmup. constant: flat, no warmup (use constant_with_warmup to warm up). "
        "linear/cosine: decay to min_lr_ratio. cosine_with_restarts: num_cycles cosine decays. "
        "polynomial: (1-progress)^power. cosine_with_min_lr: cosine to min_lr_ratio (transformers' name). "
        "warmup_stable_decay: flat, then cosine over the last decay_ratio of steps. inverse_sqrt: "
        "1/sqrt(step), timescale = warmup. rex: REX (Chen et al. 2022). piecewise_constant: step_rules."),
        choices=SCHEDULER_NAMES)
    warmup: float = setting(5.0, "Warmup length (rate ramps linearly from 0 to the base rate), in warmup_unit. "
                                 "Not used by constant and piecewise_constant.", min=0.0, max=1_000_000.0, step=1.0,
                            hint="(0 = no warmup)")
    warmup_unit: str = setting("percent", (
        "steps: warmup is a number of optimizer steps. percent: a share of the total steps, "
        "round(warmup/100 x steps), so it follows the trainer's step count."), choices=WARMUP_UNITS)
    num_cycles: int = setting(1, "cosine_with_restarts only: number of cosine decays (hard restarts between).",
                              min=1, max=1000, hint="(1 = a single cosine decay with no restart)")
    power: float = setting(1.0, "polynomial only: exponent of the decay (1 = linear, 2 = faster early drop).",
                           min=0.01, max=100.0, step=0.1, hint="(1 = linear decay, 2 = quadratic)")
    min_lr_ratio: float = setting(0.0, "Floor of the decaying part as a fraction of the base rate: the decay "
                                       "becomes r + (1-r) x curve. 0 = decay to zero. Used by linear, cosine, "
                                       "cosine_with_restarts, polynomial, cosine_with_min_lr, warmup_stable_decay, "
                                       "rex.", min=0.0, max=1.0, step=0.01,
                                  hint="(0 = decay to zero, 0.1 = stop at 10% of the base rate, 1 = no decay)")
    decay_ratio: float = setting(0.2, "warmup_stable_decay only: fraction of all steps spent in the final cosine "
                                      "decay (0.2 = the last 20%).", min=0.0, max=1.0, step=0.01,
                                 hint="(the fraction of steps spent decaying; 0.2 = the last 20%)")
    step_rules: str = setting("", "piecewise_constant only, diffusers syntax: '1:100,0.1:200,0.01' = x1 until "
                                  "step 100, x0.1 until step 200, then x0.01.")
    preview_steps: int = setting(1000, "Total steps drawn on this chart. Train LoRA uses its own steps.", min=1,
                                 max=1_000_000)

    def __post_init__(self) -> None:
        validate(self, self.TITLE)
        if self.warmup_unit == "percent" and self.warmup > 100:
            raise SettingError(f"LR Schedule: warmup = {self.warmup}% is longer than training (100%). "
                               "Use a value between 0 and 100 (5-10% is typical).")
        if self.warmup_unit == "steps" and self.warmup != int(self.warmup):
            raise SettingError(f"LR Schedule: warmup = {self.warmup} steps is not a whole number of steps. "
                               f"Use {round(self.warmup)}, or warmup_unit = percent.")
        if self.scheduler == "piecewise_constant":
            parse_step_rules(self.step_rules)

    def warmup_steps(self, total_steps: int) -> int:
        """Warmup length in optimizer steps for a run of `total_steps` (0 when unused)."""
        if "warmup" not in SCHEDULES[self.scheduler].uses:
            return 0
        if self.warmup_unit == "percent":
            return int(math.floor(self.warmup / 100.0 * total_steps + 0.5))
        return int(self.warmup)

    def check_total(self, total_steps: int) -> None:
        """Raise SettingError when these settings cannot run for `total_steps` steps."""
        if total_steps < 1:
            raise SettingError(f"LR Schedule: total steps = {total_steps} must be at least 1.")
        warmup = self.warmup_steps(total_steps)
        if warmup > total_steps:
            raise SettingError(f"LR Schedule: warmup = {warmup} steps is longer than training ({total_steps} "
                             f"steps). Lower warmup to at most {total_steps} steps, or give it in percent.")

    def multiplier(self, step: int, total_steps: int) -> float:
        """Factor of the base learning rate applied at optimizer step `step` (0-based) of `total_steps`;
        steps outside 0..total_steps-1 take the value of the nearest end."""
        self.check_total(total_steps)
        return SCHEDULES[self.scheduler].curve(min(max(step, 0), total_steps - 1), total_steps, self)

    def multipliers(self, total_steps: int) -> list[float]:
        """The factor for every step 0..total_steps-1."""
        self.check_total(total_steps)
        curve = SCHEDULES[self.scheduler].curve
        return [curve(step, total_steps, self) for step in range(total_steps)]

    def describe(self) -> str:
        """One line naming the schedule and the settings it uses (chart titles, summaries)."""
        used = SCHEDULES[self.scheduler].uses
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

