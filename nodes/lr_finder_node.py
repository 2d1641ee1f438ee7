"""LR Finder node: sweeps the learning rate on a throwaway LoRA, measuring the stable validation loss,
and suggests the rate to train with (training/lr/finder.py)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..training.data.image_tensors import pil_to_image
from ..training.lr.charts import sweep_chart
from ..training.lr.finder import FinderSettings, check_sweep, summary, sweep
from ..training.run.host import TrainCallbacks
from ..training.run.memory import give_back_host_memory
from . import comfy
from .widgets import inputs, output, socket, training_sockets

logger = logging.getLogger("lora_lab")

FINDER_OPTIONAL = ("memory", "vram_budget_gb", "base_weights", "refine_runs", "refine_steps", "network",
                   "lokr_factor", "lokr_decompose_both", "loha_rank", "loha_alpha")


class LRFinderNode(io.ComfyNode):
    """Input order is a public API (saved workflows store widget values by position): append only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRALabLRFinder", display_name="LR Finder", category="LoRA Lab",
            description=("Finds the learning rate to train with: trains a throwaway LoRA while the rate rises "
                         "exponentially, measures a validation loss with fixed noise and timesteps (stable, unlike "
                         "the training loss), and suggests a rate. Writes no LoRA; the model is not changed."),
            inputs=[
                *training_sockets(),
                *inputs(FinderSettings, exclude=FINDER_OPTIONAL),
                socket("LORA_LEARNING_RATES", "learning_rates", (
                    "Given: every part is swept by the same factor, keeping their ratios (UNet vs text "
                    "encoders). Absent: the UNet alone."), optional=True),
                # appended: saved workflows fill widgets by position
                *inputs(FinderSettings, FINDER_OPTIONAL, optional=True),
            ],
            outputs=[
                output("LORA_LEARNING_RATES", "learning_rates", (
                    "The rates for Train LoRA: the suggestion as the UNet's rate, the other parts at their given "
                    "ratios (without learning_rates: the UNet alone, text encoders frozen)."), "suggested_rates"),
                output("FLOAT", "suggested_lr", "The suggested rate (with refine_runs: the confirmation runs' "
                                                "choice). Also the cap of an adaptive optimizer's step: connect it "
                                                "to Train LoRA's max_effective_lr (sweep with AdamW)."),
                output("IMAGE", "chart", "Loss vs rate (log axis): validation points, their smoothed curve, the "
                                         "suggestion (and the confirmation runs' final losses, with refine_runs)."),
                output("STRING", "summary", "The numbers and the rule."),
            ],
            hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def execute(cls, model, clip, vae, dataset, learning_rates=None, **values) -> io.NodeOutput:
        unique_id = cls.hidden.unique_id if cls.hidden is not None else None
        settings = FinderSettings.from_values(values)
        family = comfy.check_compatible(model, clip, vae)
        # Every check before a model loads: a bad input fails here, with the trainer's message.
        checked = check_sweep(settings, dataset, learning_rates, family, comfy.device_type(model))
        train_text = bool(checked.trained_text)
        try:
            with comfy.training_models(model, clip, train_text, settings.memory) as (train_model, train_clip):
                access = comfy.model_access(train_model, train_clip, vae, family)
                swept = []
                report = comfy.progress_reporter(settings.steps, unique_id,
                                                 lambda records: sweep_chart(records, settings.rate), label="LR Finder")
                refine_report = []   # made at the first confirmation step: its own progress bar

                def on_record(record, total):
                    swept.append(record)
                    report(record, total)

                def on_refine(record, total):
                    if not refine_report:
                        refine_report.append(comfy.progress_reporter(
                            total, unique_id, lambda _: sweep_chart(swept, settings.rate, title="LR Finder: "
                                                                    "confirmation runs"),
                            label="LR Finder: confirmation runs"))
                    refine_report[0](record, total)

                result = sweep(settings, checked, access, comfy.output_dir(),
                               TrainCallbacks(check_cancel=comfy.check_cancel), on_record=on_record,
                               on_refine=on_refine)
        finally:   # after success, error and Cancel: what the sweep freed goes back to the system
            give_back_host_memory()
        title = f"LR Finder: suggested {result.suggested_lr:.3g}"
        if result.refine:
            title += f" (refined from {result.sweep_lr:.3g} by {len(result.refine)} confirmation runs)"
        chart = sweep_chart(result.records, settings.rate, result.curve, result.suggested_lr, result.min_loss_lr,
                            result.steepest_lr, title=title, refine=result.refine)
        text = summary(result, settings)
        logger.info("LoRA Lab: %s", text.replace("\n", "; "))
        return io.NodeOutput(result.learning_rates, float(result.suggested_lr), pil_to_image(chart), text,
                             ui={"text": [text]})
