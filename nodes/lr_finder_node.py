"""LR Finder node: sweeps the learning rate on a throwaway LoRA, measuring the stable validation loss,
and suggests the rate to train with (training/lr/finder.py)."""
from __future__ import annotations

import logging

from ..training.data.image_tensors import pil_to_image
from ..training.lr.charts import sweep_chart
from ..training.lr.finder import FinderSettings, check_sweep, summary, sweep
from ..training.run.host import TrainCallbacks
from . import comfy
from .widgets import TRAINING_SOCKETS, widgets

logger = logging.getLogger("lora_lab")

FINDER_OPTIONAL = ("memory", "vram_budget_gb")


class LRFinderNode:
    """Input order is a public API (saved workflows store widget values by position): append only."""

    CATEGORY = "LoRA Lab"
    DESCRIPTION = ("Finds the learning rate to train with: trains a throwaway LoRA while the rate rises "
                   "exponentially, measures a validation loss with fixed noise and timesteps (stable, unlike the "
                   "training loss), and suggests a rate. Writes no LoRA; the model is not changed.")
    RETURN_TYPES = ("LORA_LEARNING_RATES", "FLOAT", "IMAGE", "STRING")
    RETURN_NAMES = ("learning_rates", "suggested_lr", "chart", "summary")
    OUTPUT_TOOLTIPS = ("The rates for Train LoRA: the suggestion as the UNet's rate, the other parts at their "
                       "given ratios (without learning_rates: the UNet alone, text encoders frozen).",
                       "The suggested rate.",
                       "Loss vs rate (log axis): validation points, their smoothed curve, the suggestion.",
                       "The numbers and the rule.")
    FUNCTION = "find"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                **TRAINING_SOCKETS,
                **widgets(FinderSettings, exclude=FINDER_OPTIONAL),
            },
            "optional": {
                "learning_rates": ("LORA_LEARNING_RATES", {"tooltip": (
                    "Given: every part is swept by the same factor, keeping their ratios (UNet vs text "
                    "encoders). Absent: the UNet alone.")}),
                **widgets(FinderSettings, FINDER_OPTIONAL),   # appended: saved workflows fill widgets by position
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def find(self, model, clip, vae, dataset, learning_rates=None, unique_id=None, **values):
        settings = FinderSettings.from_values(values)
        family = comfy.check_compatible(model, clip, vae)
        # Every check before a model loads: a bad input fails here, with the trainer's message.
        inputs = check_sweep(settings, dataset, learning_rates, family, comfy.device_type(model))
        train_text = bool(inputs.trained_text)
        with comfy.training_models(model, clip, train_text, settings.memory) as (train_model, train_clip):
            access = comfy.model_access(train_model, train_clip, vae, family)
            report = comfy.progress_reporter(settings.steps, unique_id,
                                             lambda records: sweep_chart(records, settings.rate), label="LR Finder")
            result = sweep(settings, inputs, access, comfy.output_dir(),
                           TrainCallbacks(check_cancel=comfy.check_cancel), on_record=report)
        chart = sweep_chart(result.records, settings.rate, result.curve, result.suggested_lr, result.min_loss_lr,
                            result.steepest_lr, title=f"LR Finder: suggested {result.suggested_lr:.3g}")
        text = summary(result, settings)
        logger.info("LoRA Lab: %s", text.replace("\n", "; "))
        return {"ui": {"text": [text]},
                "result": (result.learning_rates, float(result.suggested_lr), pil_to_image(chart), text)}
