"""Train LoRA node: trains a LoRA on the loaded MODEL/CLIP in the ComfyUI process, writes a kohya file
into models/loras and returns MODEL/CLIP with that file applied (ready for KSampler)."""
from __future__ import annotations

import logging
from pathlib import Path

from comfy_api.latest import io

from ..training.charts.parts import PART_LABELS
from ..training.charts.training_chart import training_chart
from ..training.data.image_tensors import pil_to_image
from ..training.families.table import FAMILIES
from ..training.lr.charts import rates_chart
from ..training.network.kohya import lora_name_for
from ..training.run.host import TrainCallbacks, TrainingResult
from ..training.run.memory import give_back_host_memory
from ..training.run.plan import RunInputs, check_run, run_folder
from ..training.run.sampling import parse_sample_prompts
from ..training.run.train_settings import (INITIAL_LORA_NONE, NODE_RENDERED_SETTINGS, OPTIONAL_SETTINGS,
                                           RunOptions, TrainSettings)
from ..training.run.trainer import train_checked
from ..training.settings import specs
from . import comfy
from .dataset_node import resolve_folder
from .job import JobError, make_job, write_job
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
                *inputs(TrainSettings, exclude=OPTIONAL_SETTINGS + NODE_RENDERED_SETTINGS),
                # Appended over time (saved workflows fill widgets by position): run options, then settings.
                *inputs(RunOptions, optional=True),
                *inputs(TrainSettings, OPTIONAL_SETTINGS, optional=True),
                io.Boolean.Input("export_only", default=False, optional=True, tooltip=(
                    "Write the training job (output/lora_lab/<lora_name>/job.json: every setting, the dataset "
                    "folder, the model files as the loaders named them) and stop, without training: run it "
                    "headless with `python -m lora_lab_job run job.json`, or on several GPUs with torchrun (README, "
                    "Scale out). Every run writes its job there too. The MODEL/CLIP pass through unchanged.")),
                io.Combo.Input("initial_lora", options=[INITIAL_LORA_NONE, *comfy.lora_names()],
                               default=INITIAL_LORA_NONE, optional=True,
                               tooltip=specs(TrainSettings)["initial_lora"][1].help),
            ],
            outputs=[
                # V3 ids are unique across a node's inputs and outputs: the MODEL/CLIP outputs keep their
                # shown names (model, clip) under their own ids.
                output("MODEL", "model", "The input model with the trained LoRA file applied (through ComfyUI's "
                                         "LoRA loader).", "trained_model"),
                output("CLIP", "clip", "The input CLIP with the LoRA file applied (unchanged when the text encoder "
                                       "was frozen).", "trained_clip"),
                output("STRING", "lora_name", "The file name as LoraLoader lists it.", "trained_lora_name"),
                output("IMAGE", "chart", "Loss, smoothed loss and the learning rate applied to each part per step "
                                         "(an adaptive optimizer's: the rate set and the step d x lr it took)."),
                output("STRING", "summary", "The file name; steps, time and final loss; the memory plan (what "
                                            "stayed on the GPU, what streamed, the estimated peak); an adaptive "
                                            "optimizer's last step size (d x lr)."),
            ],
            hidden=[io.Hidden.unique_id, io.Hidden.prompt], is_output_node=True)

    @classmethod
    def execute(cls, model, clip, vae, dataset, learning_rates, lr_schedule, export_only=False,
                **values) -> io.NodeOutput:
        hidden = cls.hidden
        unique_id = hidden.unique_id if hidden is not None else None
        if values.get("initial_lora") == INITIAL_LORA_NONE:
            values = {**values, "initial_lora": ""}
        settings = TrainSettings.from_values(values, others=specs(RunOptions))
        options = RunOptions.from_values(values, others=specs(TrainSettings))
        job = job_of(hidden.prompt if hidden is not None else None, unique_id, dataset, learning_rates, lr_schedule,
                     settings, options, required=bool(export_only))
        if export_only:   # the run's checks first: a job that would be refused is not written
            check_run(settings, dataset, learning_rates, lr_schedule, comfy.check_compatible(model, clip, vae),
                      comfy.device_type(model), resume_from=options.resume_from, output_dir=comfy.output_dir(),
                      initial_lora=comfy.lora_path(settings.initial_lora) if settings.initial_lora else None)
            return export_outputs(model, clip, job, settings, learning_rates, lr_schedule)
        result, _ = train_from_inputs(model, clip, vae, dataset, learning_rates, lr_schedule, settings, options,
                                      unique_id=unique_id, job=job)
        trained_model, trained_clip = comfy.apply_lora_file(model, clip, result.path)
        name = lora_name_for(result.path, comfy.loras_dir())
        chart = pil_to_image(training_chart(result.records, title=f"Train LoRA: {name}"))
        logger.info("LoRA Lab: trained %s in %.1f s (%d steps, final loss %.4f)", name, result.seconds, settings.steps,
                    result.records[-1].loss)
        return io.NodeOutput(trained_model, trained_clip, name, chart, summary_of(result, name), ui={"text": [name]})


def train_from_inputs(model, clip, vae, dataset, learning_rates, lr_schedule, settings: TrainSettings,
                      options: RunOptions, unique_id: str | None = None, job: dict | None = None,
                      loras_dir: Path | None = None, output_dir: Path | None = None, check_cancel=None, is_cancel=None,
                      previews: bool = True) -> tuple[TrainingResult, RunInputs]:
    """A Train LoRA run from its inputs, as the node and the headless job runner (nodes/job.py) both run it:
    the checks before anything loads, the job written into the run folder (`job`), the training on the models
    `training_models` hands out (the user's, or private copies under dynamic VRAM, released when this
    returns), what the run freed given back. loras_dir / output_dir: where it writes (ComfyUI's folders by
    default); check_cancel / is_cancel: ComfyUI's interrupt by default; previews: draw the sample prompts."""
    loras_dir = loras_dir if loras_dir is not None else comfy.loras_dir()
    output_dir = output_dir if output_dir is not None else comfy.output_dir()
    family = comfy.check_compatible(model, clip, vae)
    # Every check before a model loads: a bad input fails here, with the trainer's message.
    checked = check_run(settings, dataset, learning_rates, lr_schedule, family, comfy.device_type(model),
                        resume_from=options.resume_from, output_dir=output_dir,
                        initial_lora=comfy.lora_path(settings.initial_lora) if settings.initial_lora else None)
    entry = FAMILIES[family]
    sample_prompts = parse_sample_prompts(options.sample_prompt, dataset.options.resolution, settings.training_seed,
                                          cfg=entry.preview_cfg, steps=entry.preview_steps,
                                          frames=entry.preview_frames if entry.video else None) if previews else []
    if sample_prompts and options.sample_every_n_steps <= 0:
        logger.warning("LoRA Lab: sample_prompt is set but sample_every_n_steps is 0: no previews will be drawn.")
    if job is not None:
        write_job(job, run_folder(loras_dir, output_dir, settings.lora_name))
    try:
        with comfy.training_models(model, clip, bool(checked.trained_text), settings.memory) as (train_model,
                                                                                              train_clip):
            access = comfy.model_access(train_model, train_clip, vae, checked.family)
            callbacks = TrainCallbacks(
                on_step=comfy.progress_reporter(settings.steps, unique_id, training_chart),
                check_cancel=check_cancel or comfy.check_cancel, is_cancel=is_cancel or comfy.is_cancel,
                on_sample=comfy.sample_previewer(train_model, vae, access, sample_prompts, options.sample_every_n_steps,
                                                 settings.steps, unique_id, start_image=start_image_of(checked)))
            return train_checked(checked, access, loras_dir, output_dir, callbacks), checked
    finally:   # after success, error and Cancel: what the run freed goes back to the system
        give_back_host_memory()


def job_of(prompt, unique_id, dataset, learning_rates, lr_schedule, settings, options, required: bool) -> dict | None:
    """The run's job (nodes/job.py), from the graph ComfyUI ran; None where the graph cannot be replayed
    (a model from a node other than the stock loaders, an IMAGE-batch dataset, no prompt), unless the job is
    what the user asked for (export_only): then the reason is the error."""
    try:
        if not prompt or unique_id is None:
            raise JobError("Train LoRA: cannot write the job: ComfyUI gave no prompt to read the loaders from")
        dataset_node = prompt.get(str(unique_id), {}).get("inputs", {}).get("dataset")
        control = ""
        if isinstance(dataset_node, list):
            folder = prompt.get(str(dataset_node[0]), {}).get("inputs", {}).get("control_folder") or ""
            control = str(resolve_folder(folder).resolve()) if str(folder).strip() else ""
        return make_job(prompt, str(unique_id), dataset, control, learning_rates, lr_schedule, settings, options)
    except JobError as error:
        if required:
            raise
        logger.info("LoRA Lab: no job.json for this run: %s", error)
        return None


def export_outputs(model, clip, job: dict, settings, learning_rates, lr_schedule) -> io.NodeOutput:
    """export_only: the job written, the MODEL/CLIP unchanged, the planned rates as the chart."""
    path = write_job(job, run_folder(comfy.loras_dir(), comfy.output_dir(), settings.lora_name))
    chart = pil_to_image(rates_chart(learning_rates, lr_schedule, settings.steps))
    text = (f"Job written: {path}\nRun it headless (from the pack's folder, custom_nodes/<pack>):\n"
            f"  python -m lora_lab_job run {path}\nOn N GPUs: torchrun --nproc_per_node N -m lora_lab_job run {path}")
    logger.info("LoRA Lab: %s", text)
    return io.NodeOutput(model, clip, "", chart, text, ui={"text": [str(path)]})


def summary_of(result, name: str) -> str:
    """The run's summary; after an adaptive optimizer, with the step size it ended on (d x lr) per part."""
    effective = result.records[-1].effective_lr
    if not effective:
        return result.summary(name)
    rates = ", ".join(f"{PART_LABELS.get(part, part)} {rate:.3g}" for part, rate in effective.items())
    return f"{result.summary(name)}\nEffective rate at the last step (d x lr): {rates}"


def start_image_of(checked):
    """An image-to-video model's previews start from the dataset's first clip's first frame (as the user would
    sample it with WanImageToVideo); None for other models."""
    if not FAMILIES[checked.family].start_frame:
        return None
    return checked.dataset.source_image(0)
