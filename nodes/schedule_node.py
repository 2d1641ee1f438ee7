"""LR Schedule node: warmup + scheduler settings -> LR_SCHEDULE and a chart of the multiplier."""
from __future__ import annotations

from ..training.image_tensors import pil_to_image
from ..training.plots import schedule_chart
from ..training.schedules import DEFAULTS, SCHEDULER_NAMES, WARMUP_UNITS, ScheduleSettings, settings_from_values


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
        return {"required": {
            "scheduler": (list(SCHEDULER_NAMES), {"default": DEFAULTS["scheduler"], "tooltip": (
                "Shape of the rate after warmup. constant: flat, no warmup (use constant_with_warmup to warm up). "
                "linear/cosine: decay to min_lr_ratio. cosine_with_restarts: num_cycles cosine decays. "
                "polynomial: (1-progress)^power. cosine_with_min_lr: cosine to min_lr_ratio (transformers' name). "
                "warmup_stable_decay: flat, then cosine over the last decay_ratio of steps. inverse_sqrt: "
                "1/sqrt(step), timescale = warmup. rex: REX (Chen et al. 2022). piecewise_constant: step_rules.")}),
            "warmup": ("FLOAT", {"default": DEFAULTS["warmup"], "min": 0.0, "max": 1_000_000.0, "step": 1.0,
                                 "tooltip": "Warmup length (rate ramps linearly from 0 to the base rate), in "
                                            "warmup_unit. Not used by constant and piecewise_constant."}),
            "warmup_unit": (list(WARMUP_UNITS), {"default": DEFAULTS["warmup_unit"], "tooltip": (
                "steps: warmup is a number of optimizer steps. percent: a share of the total steps, "
                "round(warmup/100 x steps), so it follows the trainer's step count.")}),
            "num_cycles": ("INT", {"default": DEFAULTS["num_cycles"], "min": 1, "max": 1000, "tooltip":
                                   "cosine_with_restarts only: number of cosine decays (hard restarts between)."}),
            "power": ("FLOAT", {"default": DEFAULTS["power"], "min": 0.01, "max": 100.0, "step": 0.1, "tooltip":
                                "polynomial only: exponent of the decay (1 = linear, 2 = faster early drop)."}),
            "min_lr_ratio": ("FLOAT", {"default": DEFAULTS["min_lr_ratio"], "min": 0.0, "max": 1.0, "step": 0.01,
                                       "tooltip": "Floor of the decaying part as a fraction of the base rate: the "
                                                  "decay becomes r + (1-r) x curve. 0 = decay to zero. Used by linear, "
                                                  "cosine, cosine_with_restarts, polynomial, cosine_with_min_lr, "
                                                  "warmup_stable_decay, rex."}),
            "decay_ratio": ("FLOAT", {"default": DEFAULTS["decay_ratio"], "min": 0.0, "max": 1.0, "step": 0.01,
                                      "tooltip": "warmup_stable_decay only: fraction of all steps spent in the "
                                                 "final cosine decay (0.2 = the last 20%)."}),
            "step_rules": ("STRING", {"default": DEFAULTS["step_rules"], "multiline": False, "tooltip": (
                "piecewise_constant only, diffusers syntax: '1:100,0.1:200,0.01' = x1 until step 100, "
                "x0.1 until step 200, then x0.01.")}),
            "preview_steps": ("INT", {"default": DEFAULTS["preview_steps"], "min": 1, "max": 1_000_000, "tooltip":
                                      "Total steps drawn on this chart. Train LoRA uses its own steps."}),
        }}

    @classmethod
    def VALIDATE_INPUTS(cls, scheduler, warmup, warmup_unit, num_cycles, power, min_lr_ratio, decay_ratio,
                        step_rules, preview_steps):
        try:
            settings = settings_from_values(dict(
                scheduler=scheduler, warmup=warmup, warmup_unit=warmup_unit, num_cycles=num_cycles, power=power,
                min_lr_ratio=min_lr_ratio, decay_ratio=decay_ratio, step_rules=step_rules,
                preview_steps=preview_steps))
            settings.check_total(settings.preview_steps)
        except ValueError as error:
            return str(error)
        return True

    def build(self, scheduler, warmup, warmup_unit, num_cycles, power, min_lr_ratio, decay_ratio, step_rules,
              preview_steps):
        settings = ScheduleSettings(scheduler=scheduler, warmup=float(warmup), warmup_unit=warmup_unit,
                                    num_cycles=int(num_cycles), power=float(power), min_lr_ratio=float(min_lr_ratio),
                                    decay_ratio=float(decay_ratio), step_rules=step_rules,
                                    preview_steps=int(preview_steps))
        settings.check_total(settings.preview_steps)
        return (settings, pil_to_image(schedule_chart(settings, settings.preview_steps)))
