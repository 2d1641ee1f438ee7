"""LR Schedule node: warmup + scheduler settings -> LR_SCHEDULE and a chart of the multiplier."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.data.image_tensors import pil_to_image
from ..training.lr.charts import schedule_chart
from ..training.lr.schedules import ScheduleSettings
from .widgets import inputs, output


class LRScheduleNode(io.ComfyNode):
    """Widget order is a public API (saved workflows store values by position): append only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRALabLRSchedule", display_name="LR Schedule", category="LoRA Lab",
            description=("How the learning rate changes over training: warmup, then a scheduler. The chart is drawn "
                         "by the same function the trainer uses; the Train LoRA node gives the real step count."),
            inputs=inputs(ScheduleSettings),
            outputs=[output("LR_SCHEDULE", "lr_schedule", "The schedule, for Train LoRA and UNet/TE Learning Rates."),
                     output("IMAGE", "chart", "The multiplier of the base rate at each step (over preview_steps).")])

    @classmethod
    def validate_inputs(cls, scheduler, warmup, warmup_unit, num_cycles, power, min_lr_ratio, decay_ratio,
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

    @classmethod
    def execute(cls, **values) -> io.NodeOutput:
        settings = ScheduleSettings.from_values(values)
        settings.check_total(settings.preview_steps)
        return io.NodeOutput(settings, pil_to_image(schedule_chart(settings, settings.preview_steps)))
