"""UNet/TE Learning Rates node: global / UNet / TE / TE2 rates, LoRA+ and block weights."""
from __future__ import annotations

from ..training.image_tensors import pil_to_image
from ..training.plots import rates_chart
from ..training.rates import DEFAULTS, LearningRates, rates_from_values
from ..training.schedules import ScheduleSettings

RATE_RULE = " -1 = inherit, 0 = frozen (not trained, no keys in the file), > 0 = the rate."


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
        rate = {"min": -1.0, "max": 10.0, "step": 1e-6, "round": False}
        return {
            "required": {
                "learning_rate": ("FLOAT", {**rate, "min": 0.0, "default": DEFAULTS["learning_rate"], "tooltip":
                                            "Global rate per optimizer step; UNet and TE inherit it when set to -1. "
                                            "1e-4 is a common LoRA rate with AdamW."}),
                "unet_lr": ("FLOAT", {**rate, "default": DEFAULTS["unet_lr"], "tooltip": "UNet rate." + RATE_RULE
                                      + " -1 inherits learning_rate."}),
                "text_encoder_lr": ("FLOAT", {**rate, "default": DEFAULTS["text_encoder_lr"], "tooltip": (
                    "Text encoder rate (SDXL: CLIP-L)." + RATE_RULE + " -1 inherits learning_rate. Usually "
                    "lower than the UNet's: the encoder overfits fast.")}),
                "text_encoder_2_lr": ("FLOAT", {**rate, "default": DEFAULTS["text_encoder_2_lr"], "tooltip": (
                    "SDXL's second text encoder (CLIP-G); ignored for SD1.x/2.x." + RATE_RULE
                    + " -1 inherits text_encoder_lr.")}),
                "lora_plus_ratio": ("FLOAT", {"default": DEFAULTS["lora_plus_ratio"], "min": 0.01, "max": 1000.0,
                                              "step": 0.5, "tooltip": "LoRA+: the B (lora_up) matrices train at this "
                                                                      "multiple of the part's rate. 1 = off; 16 is the "
                                                                      "paper's suggestion."}),
                "unet_block_weights": ("STRING", {"default": DEFAULTS["unet_block_weights"], "tooltip": (
                    "Scale the UNet rate per block, e.g. 'down=0.5,mid=1,up=1.5' (any subset; empty = all 1; "
                    "0 freezes a block).")}),
            },
            "optional": {
                "lr_schedule": ("LR_SCHEDULE", {"tooltip": "Only for this node's chart. Train LoRA takes its "
                                                           "schedule from its own lr_schedule input."}),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, learning_rate, unet_lr, text_encoder_lr, text_encoder_2_lr, lora_plus_ratio,
                        unet_block_weights):
        try:
            rates_from_values(dict(learning_rate=learning_rate, unet_lr=unet_lr, text_encoder_lr=text_encoder_lr,
                                   text_encoder_2_lr=text_encoder_2_lr, lora_plus_ratio=lora_plus_ratio,
                                   unet_block_weights=unet_block_weights))
        except ValueError as error:
            return str(error)
        return True

    def build(self, learning_rate, unet_lr, text_encoder_lr, text_encoder_2_lr, lora_plus_ratio, unet_block_weights,
              lr_schedule: ScheduleSettings | None = None):
        rates = LearningRates(learning_rate=float(learning_rate), unet_lr=float(unet_lr),
                              text_encoder_lr=float(text_encoder_lr), text_encoder_2_lr=float(text_encoder_2_lr),
                              lora_plus_ratio=float(lora_plus_ratio), unet_block_weights=unet_block_weights)
        schedule = lr_schedule if lr_schedule is not None else ScheduleSettings(scheduler="constant", warmup=0.0)
        chart = rates_chart(rates, schedule, schedule.preview_steps)
        return (rates, rates.summary(), pil_to_image(chart))
