"""The LR Finder's confirmation runs (refine_runs), their pure parts: the candidate rates, the choice
among the runs' results, a refine.jsonl line and the summary's lines. The runs themselves are trained by
training/lr/finder.py `refine` (the trainer's own sequence); `settings` and `result` here are the
finder's FinderSettings and FinderResult."""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..run.validation import VALIDATION_IMAGES, VALIDATION_TIMESTEPS
from .schedules import ScheduleSettings

REFINE_MIN_SPAN = 0.5            # decades: the confirmation rates span at least this much (up to the minimum)
REFINE_SCHEDULE = ScheduleSettings()   # the LR Schedule node's defaults (cosine, 5 % warmup): Train LoRA's peak rate


def refine_runs_rule(value: int) -> str | None:
    """FinderSettings.refine_runs's check: one run compares nothing."""
    if value == 1:
        return "compares nothing. Use 0 (off) or 2 or more (3: the suggestion, the curve's minimum and one between)."
    return None


@dataclass
class RefineRun:
    """One confirmation run: its rate (the swept part's base rate), its final stable validation loss
    (inf when it diverged), the steps it trained and how long it took."""

    rate: float
    val_loss: float
    steps: int
    seconds: float
    stopped: str = ""                  # why it ended early (diverged), else ""
    chosen: bool = False

    def line(self) -> str:
        """A line of refine.jsonl."""
        return json.dumps({"lr": self.rate, "val_loss": self.val_loss if math.isfinite(self.val_loss) else None,
                           "steps": self.steps, "seconds": round(self.seconds, 3), "stopped": self.stopped,
                           "chosen": self.chosen})


def refine_candidates(suggestion: float, min_loss_lr: float | None, runs: int, settings) -> list[float]:
    """The confirmation runs' rates: `runs` rates log-evenly spaced from the suggestion up to the smoothed
    curve's minimum, both included. The steepest descent lies below the best rate of a short run and the
    minimum at its edge (README, "LR Finder": half a decade below where training broke), so the best
    lies between them. When the two are closer than REFINE_MIN_SPAN decades (or there is no minimum),
    the span is widened downward to REFINE_MIN_SPAN below its top, or, where that would pass min_lr,
    upward from min_lr. Within [min_lr, max_lr]; ascending, no duplicates; [] for runs < 2."""
    if runs < 2:
        return []
    top = max(suggestion, min_loss_lr) if min_loss_lr is not None else suggestion
    high = math.log10(top)
    low = min(math.log10(suggestion), high - REFINE_MIN_SPAN)
    floor, ceiling = math.log10(settings.min_lr), math.log10(settings.max_lr)
    if low < floor:                            # at the sweep's bottom: the span moves up instead
        low, high = floor, min(ceiling, max(high, floor + REFINE_MIN_SPAN))
    rates = [10 ** (low + (high - low) * index / (runs - 1)) for index in range(runs)]
    if high == math.log10(top):
        rates[-1] = top                        # the ends exactly, not through log10 and back
    if low == math.log10(suggestion):
        rates[0] = suggestion
    clamped = [min(settings.max_lr, max(settings.min_lr, rate)) for rate in rates]
    return sorted(dict.fromkeys(clamped))


def pick_refined(runs: list[RefineRun]) -> RefineRun | None:
    """The run with the lowest final validation loss (a tie goes to the lower rate); None when every run
    diverged."""
    finite = [run for run in runs if math.isfinite(run.val_loss)]
    return min(finite, key=lambda run: (run.val_loss, run.rate)) if finite else None


def refine_lines(result, settings) -> list[str]:
    """The summary's lines on the confirmation runs: each rate and its final validation loss, the cost."""
    runs = result.refine
    steps = settings.refine_steps * len(runs)
    swept = max(1, len(result.records))
    cost = steps / swept
    timing = (f", {result.refine_seconds:.0f} s against the sweep's {result.sweep_seconds:.0f} s"
              if result.sweep_seconds > 0 else "")
    lines = [f"Refine: {len(runs)} confirmation runs of {settings.refine_steps} steps ({REFINE_SCHEDULE.describe()}, "
             f"seed {settings.training_seed}, the same fresh LoRA), final validation loss ({VALIDATION_IMAGES} images x "
             f"{VALIDATION_TIMESTEPS} timesteps):"]
    for run in runs:
        outcome = f"{run.val_loss:.4f}" if math.isfinite(run.val_loss) else run.stopped
        lines.append(f"  {run.rate:.3g}: {outcome}{'  <- chosen' if run.chosen else ''}")
    if not any(run.chosen for run in runs):
        lines.append("  every confirmation run diverged: the sweep's suggestion is kept (lower max_lr).")
    lines.append(f"Refine cost: {len(runs)} x {settings.refine_steps} = {steps} training steps, {cost:.2g}x the "
                 f"sweep's {swept}{timing}.")
    return lines
