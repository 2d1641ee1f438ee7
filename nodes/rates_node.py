"""UNet/TE Learning Rates node: global / UNet / TE / TE2 rates, LoRA+ and block weights."""
from __future__ import annotations

from ..training.data.image_tensors import pil_to_image
from ..training.lr.charts import rates_chart
from ..training.lr.rates import LearningRates
from ..training.lr.schedules import ScheduleSettings
from .widgets import widgets


class LearningRatesNode:
    """Widget order is a public API (saved workflows store values by position): append only."""

    CATEGORY = "LoRA Lab"
    DESCRIPTION = ("Learning rate of each trained part (UNet, text encoder, SDXL's second text encoder), "
                   "kohya-style, with LoRA+ and UNet block weights. Connect an LR Schedule to see the curves.")
    RETURN_TYPES = ("LORA_LEARNING_RATES", "STRING", "IMAGE")
    RETURN_NAMES = ("learning_rates", "summary", "chart")
    OUTPUT_TOOLTIPS = ("The resolved rates, for Train LoRA.", "The rate of every part, as resolved.",
                       "Absolute rate of each trained part per step (uses the connected schedule, or constant).")
    FUNCTION = "build"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": widgets(LearningRates),
            "optional": {
                "lr_schedule": ("LR_SCHEDULE", {"tooltip": "Only for this node's chart. Train LoRA takes its "
                                                           "schedule from its own lr_schedule input."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate, unet_lr, text_encoder_lr, text_encoder_2_lr, lora_plus_ratio,
                        unet_block_weights):
        try:
            LearningRates.from_values(dict(
                learning_rate=learning_rate, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr,
                text_encoder_2_lr=text_encoder_2_lr, lora_plus_ratio=lora_plus_ratio,
                unet_block_weights=unet_block_weights))
        except ValueError as error:
            return str(error)
        return True

    def build(self, lr_schedule: ScheduleSettings | None = None, **values):
        rates = LearningRates.from_values(values)
        schedule = lr_schedule if lr_schedule is not None else ScheduleSettings(scheduler="constant", warmup=0.0)
        chart = rates_chart(rates, schedule, schedule.preview_steps)
        return (rates, rates.summary(), pil_to_image(chart))
