"""LR Schedule node: warmup + scheduler settings -> LR_SCHEDULE and a chart of the multiplier."""
from __future__ import annotations

from ..training.data.image_tensors import pil_to_image
from ..training.lr.charts import schedule_chart
from ..training.lr.schedules import ScheduleSettings
from .widgets import widgets


class LRScheduleNode:
    """Widget order is a public API (saved workflows store values by position): append only."""

    CATEGORY = "LoRA Lab"
    DESCRIPTION = ("How the learning rate changes over training: warmup, then a scheduler. The chart is drawn "
                   "by the same function the trainer uses; the Train LoRA node gives the real step count.")
    RETURN_TYPES = ("LR_SCHEDULE", "IMAGE")
    RETURN_NAMES = ("lr_schedule", "chart")
    OUTPUT_TOOLTIPS = ("The schedule, for Train LoRA and UNet/TE Learning Rates.",
                       "The multiplier of the base rate at each step (over preview_steps).")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": widgets(ScheduleSettings)}

    @classmethod
    def VALIDATE_INPUTS(cls, scheduler, warmup, warmup_unit, num_cycles, power, min_lr_ratio, decay_ratio,
                        step_rules, preview_steps):
        try:
            settings = ScheduleSettings.from_values(dict(
                scheduler=scheduler, warmup=warmup, warmup_unit=warmup_unit, num_cycles=num_cycles, power=power,
                min_lr_ratio=min_lr_ratio, decay_ratio=decay_ratio, step_rules=step_rules,
                preview_steps=preview_steps))
            settings.check_total(settings.preview_steps)
        except ValueError as error:
            return str(error)
        return True

    def build(self, **values):
        settings = ScheduleSettings.from_values(values)
        settings.check_total(settings.preview_steps)
        return (settings, pil_to_image(schedule_chart(settings, settings.preview_steps)))
