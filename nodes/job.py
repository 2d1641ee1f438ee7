"""Training jobs: a Train LoRA run written down as `job.json`, complete enough to run again with no graph.

Train LoRA writes the job into its run folder (output/lora_lab/<name>/job.json) at the start of every run
(and only the job, with `export_only`). The job holds every setting, the dataset's folder and options,
the rates and schedule, the model files as the stock loaders named them (the loader nodes that feed
Train LoRA's model, clip and vae, in ComfyUI's API format: their file names, weight dtypes, CLIP types,
and LoraLoader steps between them), and the pack's version. Nothing in it refers to the running graph.
`python -m lora_lab_job run job.json` (lora_lab_job/ beside this package) loads the models with those
loaders' own code, with no server and no graph, and trains with the same code (train_from_inputs), on one
process or as one rank of a torchrun group (training/run/distributed.py).

JOB_VERSION is the schema's version: a reader refuses a job of another major version, naming both.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

JOB_VERSION = 1
# The nodes a job may replay, with the inputs that are links (the rest are widget values).
LOADERS: dict[str, tuple[str, ...]] = {
    "CheckpointLoaderSimple": (), "UNETLoader": (), "CLIPLoader": (), "DualCLIPLoader": (), "TripleCLIPLoader": (),
    "QuadrupleCLIPLoader": (), "VAELoader": (), "LoraLoader": ("model", "clip"), "LoraLoaderModelOnly": ("model",),
}
MODEL_INPUTS = ("model", "clip", "vae")
SECTIONS = ("lora_lab_job", "pack_version", "created", "loaders", "inputs", "dataset", "learning_rates", "lr_schedule",
            "train", "run")


class JobError(ValueError):
    """A job that cannot be written or read: the message names what, the value and the fix."""


def pack_version() -> str:
    """The pack's version (pyproject.toml), recorded in every job."""
    import tomllib

    path = Path(__file__).resolve().parents[1] / "pyproject.toml"
    return tomllib.loads(path.read_text(encoding="utf-8"))["project"]["version"]


def loader_graph(prompt: dict, node_id: str) -> tuple[dict, dict]:
    """(the loader nodes that feed Train LoRA node `node_id`'s model / clip / vae, {input: [node, slot]}) from
    ComfyUI's API prompt; JobError naming the first node that is not a loader the job can replay."""
    node = prompt.get(str(node_id))
    if node is None:
        raise JobError(f"Train LoRA: cannot write the job: node {node_id} is not in the prompt")
    loaders: dict[str, dict] = {}
    links = {}

    def visit(link, via: str) -> None:
        source = str(link[0])
        entry = prompt[source]
        class_type = entry["class_type"]
        if class_type not in LOADERS:
            raise JobError(f"Train LoRA: cannot write the job: its {via} comes from node {source} ({class_type}), which "
                           f"a job cannot replay without the graph. A job replays the stock loaders "
                           f"({', '.join(LOADERS)}): connect Train LoRA's {via} to them directly.")
        if source in loaders:
            return
        loaders[source] = {"class_type": class_type, "inputs": dict(entry["inputs"])}
        for name in LOADERS[class_type]:
            value = entry["inputs"].get(name)
            if isinstance(value, list):
                visit(value, f"{via} (through {class_type}'s {name})")

    for name in MODEL_INPUTS:
        link = node["inputs"].get(name)
        if not isinstance(link, list):
            raise JobError(f"Train LoRA: cannot write the job: its {name} input is not connected")
        visit(link, name)
        links[name] = [str(link[0]), int(link[1])]
    return loaders, links


def dataset_section(dataset, control_folder: str = "") -> dict:
    """The dataset as a job holds it: the scanned folder (absolute), the control folder and the options."""
    source = getattr(dataset, "source", "")
    if not source or not Path(source).is_dir():
        raise JobError("Train LoRA: cannot write the job: the dataset comes from an IMAGE batch, not a folder. A job "
                       "re-reads its dataset from disk: point LoRA Dataset's folder at the images.")
    return {"folder": str(Path(source).resolve()), "control_folder": control_folder,
            "options": asdict(dataset.options)}


def make_job(prompt: dict, node_id: str, dataset, control_folder: str, rates, schedule, settings, options) -> dict:
    """The job of a Train LoRA run (see the module docstring)."""
    loaders, links = loader_graph(prompt, node_id)
    return {"lora_lab_job": JOB_VERSION, "pack_version": pack_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "loaders": loaders, "inputs": links,
            "dataset": dataset_section(dataset, control_folder), "learning_rates": asdict(rates),
            "lr_schedule": asdict(schedule), "train": asdict(settings), "run": asdict(options)}


def write_job(job: dict, run_dir: Path) -> Path:
    """job.json in the run folder, written atomically (a reader never sees half a job)."""
    from ..training.run.resume import write_atomically

    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.json"
    text = json.dumps(job, indent=1)
    write_atomically(path, lambda temporary: Path(temporary).write_text(text, encoding="utf-8"))
    return path


def check_job(job: Any, where: str = "job") -> dict:
    """The job if it is one this pack can run; JobError naming the first problem and the fix. The settings
    sections are checked by the settings themselves (read_settings)."""
    if not isinstance(job, dict):
        raise JobError(f"{where}: not a LoRA Lab job (a JSON object is expected)")
    version = job.get("lora_lab_job")
    if version != JOB_VERSION:
        raise JobError(f"{where}: lora_lab_job = {version!r}; this pack ({pack_version()}) reads version {JOB_VERSION}. "
                       "Export the job again from Train LoRA with this pack.")
    missing = [name for name in SECTIONS if name not in job]
    if missing:
        raise JobError(f"{where}: the section(s) {', '.join(missing)} are missing; export the job again from Train LoRA")
    for name in ("loaders", "inputs", "dataset", "learning_rates", "lr_schedule", "train", "run"):
        if not isinstance(job[name], dict):
            raise JobError(f"{where}: {name} must be an object, got {type(job[name]).__name__}")
    for node_id, node in job["loaders"].items():
        if not isinstance(node, dict) or node.get("class_type") not in LOADERS or not isinstance(node.get("inputs"), dict):
            raise JobError(f"{where}: loaders.{node_id} must be one of the stock loaders ({', '.join(LOADERS)}) with "
                           f"its inputs, got {node!r}")
    for name in MODEL_INPUTS:
        link = job["inputs"].get(name)
        if not (isinstance(link, list) and len(link) == 2 and str(link[0]) in job["loaders"]):
            raise JobError(f"{where}: inputs.{name} must name one of the loaders and its output, got {link!r}")
    if not isinstance(job["dataset"].get("folder"), str) or not isinstance(job["dataset"].get("options"), dict):
        raise JobError(f"{where}: dataset needs a folder (string) and options (object)")
    read_settings(job, where)
    return job


def read_job(path: str | Path) -> dict:
    """A job file, checked (check_job)."""
    path = Path(path)
    try:
        job = json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise JobError(f"job file {str(path)!r} cannot be read: {error}") from error
    except json.JSONDecodeError as error:
        raise JobError(f"job file {str(path)!r} is not JSON: {error}") from error
    return check_job(job, str(path))


def read_settings(job: dict, where: str = "job"):
    """(dataset options, rates, schedule, train settings, run options) from a job, each checked as the node's
    widgets are (a bad value names the setting, the value and the fix)."""
    from ..training.data.dataset import DatasetOptions
    from ..training.lr.rates import LearningRates
    from ..training.lr.schedules import ScheduleSettings
    from ..training.run.train_settings import RunOptions, TrainSettings
    from ..training.settings import SettingError

    try:
        return (DatasetOptions.from_values(job["dataset"]["options"]),
                LearningRates.from_values(job["learning_rates"]), ScheduleSettings.from_values(job["lr_schedule"]),
                TrainSettings.from_values(job["train"]), RunOptions.from_values(job["run"]))
    except (SettingError, ValueError) as error:
        raise JobError(f"{where}: {error}") from error


def load_models(job: dict) -> tuple[Any, Any, Any]:
    """(MODEL, CLIP, VAE) made by the job's loader nodes with ComfyUI's own loader code (nodes/comfy/files.py
    run_loaders)."""
    from . import comfy

    try:
        return comfy.run_loaders(job["loaders"], [job["inputs"][name] for name in MODEL_INPUTS])
    except KeyError as error:
        raise JobError(f"job: this ComfyUI has no {error.args[0]} node (a loader the job names)") from None


def job_dataset(job: dict):
    """The LORA_DATASET of a job: its folder scanned with its options, as LoRA Dataset scans it."""
    from ..training.data.dataset import build_folder_dataset

    options = read_settings(job)[0]
    section = job["dataset"]
    return build_folder_dataset(section["folder"], options, section.get("control_folder") or None)


def describe_job(job: dict) -> str:
    """What `check` prints: the models, the dataset and the run, in a few lines."""
    settings = job["train"]
    loaders = ", ".join(f"{node['class_type']}({', '.join(f'{key}={value}' for key, value in node['inputs'].items() if not isinstance(value, list))})"
                        for node in job["loaders"].values())
    return "\n".join([f"LoRA Lab job v{job['lora_lab_job']} from pack {job['pack_version']} ({job['created']})",
                      f"models: {loaders}", f"dataset: {job['dataset']['folder']}",
                      f"run: {settings['steps']} steps, batch {settings['batch_size']}, rank {settings['rank']}, "
                      f"network {settings.get('network', 'lora')}, optimizer {settings['optimizer']}, "
                      f"lora_name {settings['lora_name']}"])


def run_job(job: dict, job_path: Path, resume: str = "") -> Path | None:
    """Train a job headless, on one process or as one rank of a torchrun group; returns the LoRA file (rank 0;
    None on the other ranks, whose files go to a throwaway folder). resume: a run folder or
    resume_state.json, or "auto" for the folder the job file sits in."""
    import signal
    import tempfile

    from ..training.run.distributed import is_group_failure, join_from_environment, leave
    from ..training.charts.training_chart import training_chart
    from . import comfy
    from .train_node import train_from_inputs

    _, rates, schedule, settings, options = read_settings(job)
    model, clip, vae = load_models(job)
    dataset = job_dataset(job)
    shard = join_from_environment(comfy.device_type(model))
    if settings.batch_size % shard.world:
        leave()
        raise JobError(f"job: batch_size = {settings.batch_size} is the global batch, shared by {shard.world} "
                       f"processes: it must be a multiple of {shard.world}. Launch {shard.world} processes with a "
                       f"batch_size that divides, or change the job's batch_size.")
    if resume == "auto":
        resume = str(Path(job_path).resolve().parent)
    elif resume:
        resume = str(Path(resume).resolve())
    options = dataclasses.replace(options, resume_from=resume)

    stop = {"signal": None}

    def on_signal(number, frame) -> None:   # Cancel: finish the micro-batch, save a checkpoint, stop
        stop["signal"] = signal.Signals(number).name

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}

    def check_cancel() -> None:
        if shard.any(stop["signal"] is not None):
            raise JobCancelled(stop["signal"] or "another rank")

    def is_cancel(error: BaseException) -> bool:
        return isinstance(error, JobCancelled) or is_group_failure(error)

    scratch = None if shard.writes else tempfile.TemporaryDirectory(prefix=f"lora_lab_rank{shard.rank}_")
    loras_dir = comfy.loras_dir() if scratch is None else Path(scratch.name) / "loras"
    output_dir = comfy.output_dir() if scratch is None else Path(scratch.name) / "output"
    try:
        result, _ = train_from_inputs(model, clip, vae, dataset, rates, schedule, settings, options,
                                      loras_dir=loras_dir, output_dir=output_dir, check_cancel=check_cancel,
                                      is_cancel=is_cancel, previews=shard.writes)
    except JobCancelled as error:
        raise JobError(f"job stopped by {error} (rank {shard.rank} of {shard.world}): what was trained is saved as "
                       f"<lora_name>_interrupted, with a checkpoint; continue with: python -m lora_lab_job run "
                       f"{job_path} --resume auto") from None
    except Exception as error:
        if is_group_failure(error):
            raise JobError(f"job stopped: a process of the group failed ({str(error).splitlines()[0][:200]}); rank "
                           f"{shard.rank} saved what was trained and a checkpoint where it could. Continue with: "
                           f"torchrun ... -m lora_lab_job run {job_path} --resume auto") from None
        raise
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if scratch is not None:
            scratch.cleanup()
        leave()
    if not shard.writes:
        return None
    chart = training_chart(result.records, title=f"Train LoRA: {result.path.name}")
    chart.save(result.run_dir / "training_chart.png")
    return result.path


class JobCancelled(Exception):
    """SIGINT / SIGTERM on some rank: every rank stops at the same step."""
