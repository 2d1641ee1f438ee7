"""The Train LoRA node's chart: loss, smoothed loss and the rate each part actually trained at."""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from .figures import (EFFECTIVE_DASHES, VAL_LOSS_COLOR, figure_to_image, new_figure, part_color, part_label,
                      part_linestyle)

SMOOTHING = 0.9  # exponential moving average factor, as TensorBoard's default-ish smoothing


def smoothed(values: Sequence[float], factor: float = SMOOTHING) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard's smoothing)."""
    result, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = factor * average + (1.0 - factor) * value
        result.append(average / (1.0 - factor ** count))
    return result


def training_chart(records: Sequence, title: str = "Train LoRA") -> Image.Image:
    """Loss (raw + smoothed) on the left axis, applied rate per part  on the right.

    `records` are loop.StepRecord-like objects with step, loss and lr ({part: rate}), and, from an
    adaptive optimizer, effective_lr ({part: d x lr}): drawn dash-dot beside the set rate, on a log rate
    axis (Prodigy's set rate is near 1, the step it takes orders of magnitude below).
    """
    figure, loss_axes = new_figure()
    steps = [record.step for record in records]
    losses = [record.loss for record in records]
    loss_axes.plot(steps, losses, color="#999999", linewidth=0.8, label="loss")
    loss_axes.plot(steps, smoothed(losses), color="black", linewidth=1.6, label="loss (smoothed)")
    validated = [(record.step, record.val_loss) for record in records if getattr(record, "val_loss", None) is not None]
    if validated:
        loss_axes.plot([step for step, _ in validated], [value for _, value in validated], color=VAL_LOSS_COLOR,
                       marker="o", markersize=4, linewidth=1.2, label="validation loss (fixed noise)")
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("loss")
    rate_axes = loss_axes.twinx()
    parts = sorted({part for record in records for part in record.lr})
    taken = [getattr(record, "effective_lr", None) or {} for record in records]
    effective = sorted({part for rates in taken for part in rates})
    for part in parts:
        rates = [record.lr.get(part, float("nan")) for record in records]
        rate_axes.plot(steps, rates, color=part_color(part), linestyle=part_linestyle(part),
                       label=f"lr {part_label(part)}" + (" (set)" if effective else ""))
    for part in effective:
        rates = [step_rates.get(part, float("nan")) for step_rates in taken]
        rate_axes.plot(steps, rates, color=part_color(part), linestyle=EFFECTIVE_DASHES, linewidth=1.8,
                       label=f"lr {part_label(part)} effective (d x lr)")
    if effective:
        rate_axes.set_ylabel("learning rate: set, and effective (d x lr)")
        if any(rate > 0 for record, step_rates in zip(records, taken)
               for rate in [*record.lr.values(), *step_rates.values()]):
            rate_axes.set_yscale("log", nonpositive="mask")   # warmup's 0 is left out
    else:
        rate_axes.set_ylabel("learning rate (applied)")
        rate_axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    handles, labels = loss_axes.get_legend_handles_labels()
    more_handles, more_labels = rate_axes.get_legend_handles_labels()
    loss_axes.legend(handles + more_handles, labels + more_labels, loc="upper right", fontsize=8)
    loss_axes.set_title(title)
    figure.tight_layout()
    return figure_to_image(figure)
