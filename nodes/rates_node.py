"""UNet/TE Learning Rates node: global / UNet / TE / TE2 rates, LoRA+ and block weights."""
from __future__ import annotations

from comfy_api.latest import io

from ..training.data.image_tensors import pil_to_image
from ..training.lr.charts import rates_chart
from ..training.lr.rates import LearningRates
from ..training.lr.schedules import ScheduleSettings
from .widgets import inputs, output, socket


class LearningRatesNode(io.ComfyNode):
    """Widget order is a public API (saved workflows store values by position): append only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRALabLearningRates", display_name="UNet/TE Learning Rates", category="LoRA Lab",
            description=("Learning rate of each trained part (UNet, text encoder, SDXL's second text encoder), "
                         "kohya-style, with LoRA+ and UNet block weights. Connect an LR Schedule to see the curves."),
            inputs=[*inputs(LearningRates),
                    socket("LR_SCHEDULE", "lr_schedule", "Only for this node's chart. Train LoRA takes its schedule "
                                                         "from its own lr_schedule input.", optional=True)],
            outputs=[output("LORA_LEARNING_RATES", "learning_rates", "The resolved rates, for Train LoRA."),
                     output("STRING", "summary", "The rate of every part, as resolved."),
                     output("IMAGE", "chart", "Absolute rate of each trained part per step (uses the connected "
                                              "schedule, or constant).")])

    @classmethod
    def validate_inputs(cls, learning_rate, unet_lr, text_encoder_lr, text_encoder_2_lr, lora_plus_ratio,
                        unet_block_weights):
        try:
            LearningRates.from_values(dict(
                learning_rate=learning_rate, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr,
                text_encoder_2_lr=text_encoder_2_lr, lora_plus_ratio=lora_plus_ratio,
                unet_block_weights=unet_block_weights))
        except ValueError as error:
            return str(error)
        return True

    @classmethod
    def execute(cls, lr_schedule: ScheduleSettings | None = None, **values) -> io.NodeOutput:
        rates = LearningRates.from_values(values)
        schedule = lr_schedule if lr_schedule is not None else ScheduleSettings(scheduler="constant", warmup=0.0)
        chart = rates_chart(rates, schedule, schedule.preview_steps)
        return io.NodeOutput(rates, rates.summary(), pil_to_image(chart))
