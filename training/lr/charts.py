"""The learning-rate charts (matplotlib, headless, PIL images): the LR Schedule node's multiplier
curve and the UNet/TE Learning Rates node's rate per part."""
from __future__ import annotations

import math
from typing import Callable

from PIL import Image

from ..charts.figures import VAL_LOSS_COLOR, WARMUP_COLOR, figure_to_image, new_figure, part_color, part_label, part_linestyle
from .rates import LearningRates
from .schedules import ScheduleSettings

REFINE_COLOR = "#9467bd"   # the LR Finder's confirmation runs


def mark_warmup(axes, warmup_steps: int) -> None:
    if warmup_steps > 0:
        axes.axvspan(0, warmup_steps, color=WARMUP_COLOR, alpha=0.25, label=f"warmup ({warmup_steps} steps)")


def schedule_chart(settings: ScheduleSettings, total_steps: int) -> Image.Image:
    """Multiplier of the base rate vs optimizer step, warmup shaded, settings in the title."""
    multipliers = settings.multipliers(total_steps)
    figure, axes = new_figure()
    warmup = settings.warmup_steps(total_steps)
    mark_warmup(axes, warmup)
    axes.plot(range(total_steps), multipliers, color="#1f77b4", linewidth=2, label="LR multiplier")
    axes.set_xlim(0, max(1, total_steps - 1))
    axes.set_ylim(0, max(1.05, max(multipliers) * 1.05))
    axes.set_xlabel(f"optimizer step (of {total_steps})")
    axes.set_ylabel("x base learning rate")
    axes.set_title(f"LR schedule: {settings.describe()}", fontsize=11)
    axes.grid(True, alpha=0.3)
    note = settings.ignored_note()
    if note:
        axes.text(0.5, 0.5, note, transform=axes.transAxes, ha="center", va="center", fontsize=10,
                  color="#b00020", bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "#b00020"})
    axes.legend(loc="lower left", fontsize=9)
    figure.tight_layout()
    return figure_to_image(figure)


def rates_chart(rates: LearningRates, settings: ScheduleSettings, total_steps: int) -> Image.Image:
    """Absolute learning rate per trained part over the steps (one line per part)."""
    curves = rates.part_curves(settings, total_steps)
    figure, axes = new_figure()
    mark_warmup(axes, settings.warmup_steps(total_steps))
    weights = rates.block_weights()
    weighted = any(weight != 1.0 for weight in weights.values())
    for part, curve in curves.items():
        label = f"{part_label(part)} (base {rates.resolved()[part]:.3g})"
        if part == "unet" and weighted:
            label += ", blocks " + " ".join(f"{block} x{weight:g}" for block, weight in weights.items())
        axes.plot(range(total_steps), curve, color=part_color(part), linestyle=part_linestyle(part), linewidth=2,
                  label=label)
        if rates.lora_plus_ratio != 1.0:
            axes.plot(range(total_steps), [value * rates.lora_plus_ratio for value in curve], color=part_color(part),
                      linewidth=1, linestyle=":", label=f"{part_label(part)} B matrices (LoRA+ x{rates.lora_plus_ratio:g})")
    frozen = [part_label(part) for part, rate in rates.resolved().items() if rate == 0]
    title = f"Learning rate per part: {settings.describe()}"
    if frozen:
        title += f"\nfrozen: {', '.join(frozen)}"
    axes.set_title(title, fontsize=11)
    axes.set_xlim(0, max(1, total_steps - 1))
    axes.set_ylim(bottom=0)
    axes.set_xlabel(f"optimizer step (of {total_steps})")
    axes.set_ylabel("learning rate")
    axes.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    axes.grid(True, alpha=0.3)
    if not curves:
        axes.text(0.5, 0.5, "nothing is trained: every rate is 0", transform=axes.transAxes, ha="center",
                  va="center", color="#b00020")
    axes.legend(loc="upper right", fontsize=8)
    figure.tight_layout()
    return figure_to_image(figure)


def swept_part_rate(rates: dict[str, float]) -> float:
    """The rate of the part a sweep moves (the UNet's, or the first trained part's) from {part: rate}."""
    return rates.get("unet", next(iter(rates.values())))


def sweep_chart(records: list, rate: Callable[[int], float], curve: list[tuple[float, float]] | None = None,
                suggested_lr: float | None = None, min_loss_lr: float | None = None, steepest_lr: float | None = None,
                title: str = "LR Finder", refine: list | None = None) -> Image.Image:
    """The LR Finder's chart: loss vs rate (log axis). `records` are the loop's StepRecords (step, loss,
    val_loss), `rate(step)` the rate swept at a step; the smoothed validation curve and the marked
    rates are drawn when given. `refine`: the confirmation runs (objects with rate, val_loss, steps,
    chosen), their final validation losses drawn as diamonds at their rates, the chosen one filled."""
    figure, axes = new_figure()
    rates = [rate(record.step) for record in records]
    axes.plot(rates, [record.loss for record in records], color="#bbbbbb", linewidth=0.8,
              label="training loss (random noise)")
    validated = [(rate(record.step), record.val_loss) for record in records if record.val_loss is not None]
    if validated:
        axes.plot([rate for rate, _ in validated], [loss for _, loss in validated], "o", color=VAL_LOSS_COLOR,
                  markersize=4, label="validation loss (fixed noise)")
    # An adaptive optimizer (Prodigy) steps by d x the swept rate: the same points at the step really taken.
    stepped = [(swept_part_rate(record.effective_lr), record.val_loss) for record in records
               if record.val_loss is not None and getattr(record, "effective_lr", None)]
    if stepped:
        axes.plot([rate for rate, _ in stepped], [loss for _, loss in stepped], "o", markerfacecolor="none",
                  color=VAL_LOSS_COLOR, markersize=5, label="the same at the effective rate (d x lr)")
    confirmed = [run for run in refine or [] if math.isfinite(run.val_loss)]
    if confirmed:
        steps = max(run.steps for run in confirmed)
        axes.plot([run.rate for run in confirmed], [run.val_loss for run in confirmed], "D--", color=REFINE_COLOR,
                  markerfacecolor="white", markersize=6, linewidth=1,
                  label=f"confirmation runs: validation loss after {steps} steps")
        for run in confirmed:
            if run.chosen:
                axes.plot([run.rate], [run.val_loss], "D", color=REFINE_COLOR, markersize=9,
                          label=f"chosen {run.rate:.3g}")
    if curve:
        axes.plot([rate for rate, _ in curve], [loss for _, loss in curve], color="black", linewidth=1.8,
                  label="validation loss, smoothed")
        low = min(loss for _, loss in curve)
        shown = [loss for _, loss in validated] + [run.val_loss for run in confirmed]
        axes.set_ylim(min(low, *shown) * 0.95 if shown else low * 0.95,
                      max([loss for _, loss in curve] + [run.val_loss for run in confirmed]) * 1.3)
    if min_loss_lr is not None:
        axes.axvline(min_loss_lr, color="#555555", linestyle=":", label=f"minimum {min_loss_lr:.3g}")
    if steepest_lr is not None:
        axes.axvline(steepest_lr, color="#2ca02c", linestyle="--", label=f"steepest descent {steepest_lr:.3g}")
    if min_loss_lr is not None:
        axes.axvline(min_loss_lr / 10, color="#999999", linestyle="-.", label=f"minimum / 10 {min_loss_lr / 10:.3g}")
    if suggested_lr is not None:
        axes.axvline(suggested_lr, color="#d62728", linewidth=2, label=f"suggested {suggested_lr:.3g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (log scale)")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=11)
    axes.grid(True, alpha=0.3, which="both")
    axes.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure_to_image(figure)
