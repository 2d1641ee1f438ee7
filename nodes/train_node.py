"""Train LoRA node: trains a LoRA on the loaded MODEL/CLIP in the ComfyUI process, writes a kohya file
into models/loras and returns MODEL/CLIP with that file applied (ready for KSampler)."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..training.charts.training_chart import training_chart
from ..training.data.image_tensors import pil_to_image
from ..training.families.table import FAMILIES
from ..training.network.kohya import lora_name_for
from ..training.run.host import TrainCallbacks
from ..training.run.memory import give_back_host_memory
from ..training.run.plan import check_run
from ..training.run.sampling import parse_sample_prompts
from ..training.run.train_settings import OPTIONAL_SETTINGS, RunOptions, TrainSettings
from ..training.run.trainer import train_checked
from ..training.settings import specs
from . import comfy
from .widgets import inputs, output, socket, training_sockets

logger = logging.getLogger("lora_lab")


class TrainNode(io.ComfyNode):
    """Input order is a public API (saved workflows store widget values by position): append only."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoRALabTrain", display_name="Train LoRA", category="LoRA Lab",
            description=("Trains a LoRA (UNet and, when their rate is above 0, the text encoders) on a LoRA Dataset, "
                         "writes it to models/loras in kohya format, and returns the MODEL/CLIP with it applied."),
            inputs=[
                *training_sockets(),
                socket("LORA_LEARNING_RATES", "learning_rates", "Rates per part, from UNet/TE Learning Rates. A part "
                                                                "at rate 0 is frozen and gets no keys."),
                socket("LR_SCHEDULE", "lr_schedule", "How the rates change over the steps (LR Schedule)."),
                *inputs(TrainSettings, exclude=OPTIONAL_SETTINGS),
                # Appended over time (saved workflows fill widgets by position): run options, then settings.
                *inputs(RunOptions, optional=True),
                *inputs(TrainSettings, OPTIONAL_SETTINGS, optional=True),
            ],
            outputs=[
                # V3 ids are unique across a node's inputs and outputs: the MODEL/CLIP outputs keep their
                # shown names (model, clip) under their own ids.
                output("MODEL", "model", "The input model with the trained LoRA file applied (through ComfyUI's "
                                         "LoRA loader).", "trained_model"),
                output("CLIP", "clip", "The input CLIP with the LoRA file applied (unchanged when the text encoder "
                                       "was frozen).", "trained_clip"),
                output("STRING", "lora_name", "The file name as LoraLoader lists it.", "trained_lora_name"),
                output("IMAGE", "chart", "Loss, smoothed loss and the learning rate applied to each part per step."),
                output("STRING", "summary", "The file name; steps, time and final loss; the memory plan (what "
                                            "stayed on the GPU, what streamed, the estimated peak)."),
            ],
            hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def execute(cls, model, clip, vae, dataset, learning_rates, lr_schedule, **values) -> io.NodeOutput:
        unique_id = cls.hidden.unique_id if cls.hidden is not None else None
        settings = TrainSettings.from_values(values, others=specs(RunOptions))
        options = RunOptions.from_values(values, others=specs(TrainSettings))
        family = comfy.check_compatible(model, clip, vae)
        # Every check before a model loads: a bad input fails here, with the trainer's message.
        checked = check_run(settings, dataset, learning_rates, lr_schedule, family, comfy.device_type(model),
                           resume_from=options.resume_from, output_dir=comfy.output_dir())
        entry = FAMILIES[family]
        sample_prompts = parse_sample_prompts(options.sample_prompt, dataset.options.resolution, settings.training_seed,
                                              cfg=entry.preview_cfg, steps=entry.preview_steps,
                                              frames=entry.preview_frames if entry.video else None)
        if sample_prompts and options.sample_every_n_steps <= 0:
            logger.warning("LoRA Lab: sample_prompt is set but sample_every_n_steps is 0: no previews will be drawn.")

        try:
            result = cls._run(model, clip, vae, checked, sample_prompts, options.sample_every_n_steps, unique_id)
        finally:   # after success, error and Cancel: what the run freed goes back to the system
            give_back_host_memory()
        trained_model, trained_clip = comfy.apply_lora_file(model, clip, result.path)
        name = lora_name_for(result.path, comfy.loras_dir())
        chart = pil_to_image(training_chart(result.records, title=f"Train LoRA: {name}"))
        logger.info("LoRA Lab: trained %s in %.1f s (%d steps, final loss %.4f)", name, result.seconds, settings.steps,
                    result.records[-1].loss)
        return io.NodeOutput(trained_model, trained_clip, name, chart, result.summary(name), ui={"text": [name]})

    @staticmethod
    def _run(model, clip, vae, checked, sample_prompts, sample_every_n_steps, unique_id):
        """Train on the models `training_models` hands out (the user's, or private copies under dynamic
        VRAM, released when this returns)."""
        settings = checked.settings
        train_text = bool(checked.trained_text)
        with comfy.training_models(model, clip, train_text, settings.memory) as (train_model, train_clip):
            access = comfy.model_access(train_model, train_clip, vae, checked.family)
            callbacks = TrainCallbacks(
                on_step=comfy.progress_reporter(settings.steps, unique_id, training_chart),
                check_cancel=comfy.check_cancel, is_cancel=comfy.is_cancel,
                on_sample=comfy.sample_previewer(train_model, vae, access, sample_prompts, sample_every_n_steps,
                                                 settings.steps, unique_id, start_image=start_image_of(checked)))
            return train_checked(checked, access, comfy.loras_dir(), comfy.output_dir(), callbacks)


def start_image_of(checked):
    """An image-to-video model's previews start from the dataset's first clip's first frame (as the user would
    sample it with WanImageToVideo); None for other models."""
    if not FAMILIES[checked.family].start_frame:
        return None
    return checked.dataset.source_image(0)
