"""Training jobs: Train LoRA writes job.json, `python -m lora_lab_job run job.json` trains it headless (a
fresh process: ComfyUI as a library, the stock loaders, no server and no graph), and torchrun runs it
data parallel on the CPU with the gloo backend.

Checks: the job a graph run wrote gives the identical LoRA headless (same device and seed); 2 processes at
global batch 4 give the LoRA of 1 process at batch 4 within 1e-5 (float sums in another order); a 2-process
run resumed from its step-2 checkpoint ends on the uninterrupted 2-process run's file, bit for bit; a rank
that dies stops the job with a clear message, a checkpoint and what was trained; export_only writes the
job and trains nothing; a job that cannot be replayed or read is refused naming why.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from .test_train import CAPTIONS, checkpoint, pattern_images, read_lora  # noqa: F401

PACK_DIR = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def image_folder(comfy):
    from PIL import Image

    folder = comfy.input_dir / "job_set"
    folder.mkdir(exist_ok=True)
    for index, image in enumerate(pattern_images()):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(CAPTIONS[index])
    return folder


def job_graph(comfy, checkpoint, folder, **train) -> dict:  # noqa: F811
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "10": {"class_type": "LoRALabDataset", "inputs": {**comfy.widget_defaults("LoRALabDataset"),
                                                          "folder": folder.name, "resolution": 64, "bucketing": False,
                                                          "flip": True, "shuffle_captions": True}},
        "11": {"class_type": "LoRALabLRSchedule", "inputs": {**comfy.widget_defaults("LoRALabLRSchedule"),
                                                             "scheduler": "cosine", "warmup": 1.0, "warmup_unit": "steps"}},
        "12": {"class_type": "LoRALabLearningRates", "inputs": {**comfy.widget_defaults("LoRALabLearningRates"),
                                                                "learning_rate": 2e-3, "text_encoder_lr": 1e-3}},
        "13": {"class_type": "LoRALabTrain", "inputs": {
            **comfy.widget_defaults("LoRALabTrain"), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
            "dataset": ["10", 0], "learning_rates": ["12", 0], "lr_schedule": ["11", 0],
            "steps": 4, "batch_size": 4, "rank": 4, "alpha": 4.0, "precision": "fp32", "gradient_checkpointing": False,
            "training_seed": 7, "noise_offset": 0.05, "save_precision": "fp32", **train}}}


def run_headless(comfy, job: Path, *arguments: str, processes: int = 1, wait: bool = True):
    """`python -m lora_lab_job run job.json` (or under torchrun with `processes` ranks) in a fresh process on
    this ComfyUI and base folder; the finished process (or the running one when not `wait`)."""
    command = [sys.executable, "-m", "lora_lab_job", "run", str(job), "--comfyui", str(comfy.comfyui_dir),
               "--base-directory", str(comfy.base_dir), "--cpu", *arguments]
    if processes > 1:
        with socket.socket() as probe:   # a free port for the group's rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(port), *command[1:]]
    # One process: the in-process graph run's thread count, so CPU sums split alike and the LoRA is
    # bit-identical (a different count changes float summation order); ranks: one thread each (2 cores).
    threads = torch.get_num_threads() if processes == 1 else 1
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    process = subprocess.Popen(command, cwd=PACK_DIR, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    if wait:
        process.output = process.communicate(timeout=600)[0]
    return process


def lora_of(process) -> str:
    """The file a finished headless run names on its last line ("LoRA: <path>")."""
    assert process.returncode == 0, process.output[-3000:]
    line = [line for line in process.output.splitlines() if line.startswith("LoRA: ")][-1]
    return Path(line[len("LoRA: "):]).name


def assert_close_loras(comfy, first: str, second: str, tolerance: float) -> None:
    tensors, _ = read_lora(comfy, first)
    other, _ = read_lora(comfy, second)
    assert tensors.keys() == other.keys()
    for key in tensors:
        if tolerance == 0:
            assert torch.equal(tensors[key], other[key]), key
        else:
            torch.testing.assert_close(other[key], tensors[key], rtol=0, atol=tolerance * max(1.0, float(tensors[key].abs().max())))


@pytest.fixture(scope="module")
def graph_run(comfy, checkpoint, image_folder):  # noqa: F811
    """Train LoRA run in the graph (the executor, as the server runs it): its file and the job it wrote."""
    results = comfy.run(job_graph(comfy, checkpoint, image_folder, lora_name="job_graph"))
    name = results["13"]["outputs"][2][0]
    job = comfy.output_dir / "lora_lab" / "job_graph" / "job.json"
    return name, job


def test_the_job_is_complete_and_refers_to_no_graph(comfy, graph_run):
    _, job_path = graph_run
    job = json.loads(job_path.read_text())
    assert job["lora_lab_job"] == comfy.pack.nodes.job.JOB_VERSION and job["pack_version"]
    assert [node["class_type"] for node in job["loaders"].values()] == ["CheckpointLoaderSimple"]
    assert job["inputs"] == {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}
    assert Path(job["dataset"]["folder"]).is_absolute() and job["dataset"]["options"]["flip"] is True
    assert job["train"]["batch_size"] == 4 and job["lr_schedule"]["scheduler"] == "cosine"
    assert job["learning_rates"]["text_encoder_lr"] == 1e-3 and job["run"]["resume_from"] == ""
    assert not any(isinstance(value, list) for node in job["loaders"].values() for value in node["inputs"].values())


def test_a_job_runs_headless_to_the_identical_lora(comfy, graph_run):
    name, job = graph_run
    process = run_headless(comfy, job)
    headless = lora_of(process)
    assert headless == "job_graph_2.safetensors"   # the graph's file is never overwritten
    assert_close_loras(comfy, name, headless, tolerance=0)
    run_dir = comfy.output_dir / "lora_lab" / "job_graph_2"
    assert (run_dir / "training_chart.png").is_file() and len((run_dir / "log.jsonl").read_text().splitlines()) == 4


def job_variant(job_path, lora_name: str, **train):
    """A copy of the exported job with other Train LoRA settings, next to it as <lora_name>.json."""
    job = json.loads(job_path.read_text())
    job["train"].update(lora_name=lora_name, **train)
    path = job_path.with_name(f"{lora_name}.json")
    path.write_text(json.dumps(job))
    return path


@pytest.fixture(scope="module")
def two_ranks(comfy, graph_run):
    """The job on 2 processes (gloo), each with 2 of the global batch of 4; checkpoint at step 2."""
    name, job_path = graph_run
    path = job_variant(job_path, lora_name="job_ddp", save_every_n_steps=2)
    return path, lora_of(run_headless(comfy, path, processes=2))


def test_two_processes_give_the_one_process_lora(comfy, graph_run, two_ranks):
    """Same global batch, same schedule, same draws: only the order of float sums differs."""
    name, _ = graph_run
    assert_close_loras(comfy, name, two_ranks[1], tolerance=1e-5)
    lines = [json.loads(line) for line in (comfy.output_dir / "lora_lab" / "job_ddp" / "log.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (comfy.output_dir / "lora_lab" / "job_graph" / "log.jsonl").read_text().splitlines()]
    assert [line["sigmas"] for line in lines] == [line["sigmas"] for line in reference]   # the whole batch's draws
    assert [line["loss"] for line in lines] == pytest.approx([line["loss"] for line in reference], rel=1e-5)


def test_two_processes_resume_from_their_checkpoint(comfy, two_ranks):
    path, uninterrupted = two_ranks
    process = run_headless(comfy, path, "--resume", str(comfy.output_dir / "lora_lab" / "job_ddp"), processes=2)
    assert_close_loras(comfy, uninterrupted, lora_of(process), tolerance=0)


def test_a_rank_that_dies_stops_the_job_with_a_checkpoint(comfy, graph_run):
    import psutil

    _, job_path = graph_run
    path = job_variant(job_path, lora_name="job_killed", steps=100000)
    process = run_headless(comfy, path, processes=2, wait=False)
    log = comfy.output_dir / "lora_lab" / "job_killed" / "log.jsonl"
    deadline = time.monotonic() + 300
    while not (log.is_file() and len(log.read_text().splitlines()) >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.2)
    workers = [child for child in psutil.Process(process.pid).children(recursive=True)
               if child.environ().get("RANK") == "1" and "lora_lab_job" in " ".join(child.cmdline())]
    assert len(workers) == 1, [child.cmdline() for child in workers]
    workers[0].kill()
    output = process.communicate(timeout=300)[0]
    assert process.returncode != 0
    assert "job stopped" in output and "--resume auto" in output, output[-3000:]
    state = json.loads((comfy.output_dir / "lora_lab" / "job_killed" / "resume_state.json").read_text())
    assert state["step"] >= 2
    assert (comfy.models_dir / "loras" / "job_killed_interrupted.safetensors").is_file()


def test_export_only_writes_the_job_and_trains_nothing(comfy, checkpoint, image_folder):  # noqa: F811
    results = comfy.run(job_graph(comfy, checkpoint, image_folder, lora_name="job_export", export_only=True))
    assert results["13"]["outputs"][2][0] == ""
    job = comfy.output_dir / "lora_lab" / "job_export" / "job.json"
    assert json.loads(job.read_text())["train"]["lora_name"] == "job_export"
    assert "python -m lora_lab_job run" in results["13"]["outputs"][4][0]
    assert not (comfy.models_dir / "loras" / "job_export.safetensors").exists()


def test_a_graph_a_job_cannot_replay_is_refused_for_export(comfy, checkpoint, image_folder):  # noqa: F811
    graph = job_graph(comfy, checkpoint, image_folder, lora_name="job_refused", export_only=True)
    graph["2"] = {"class_type": "ModelSamplingDiscrete", "inputs": {"model": ["1", 0], "sampling": "eps", "zsnr": False}}
    graph["13"]["inputs"]["model"] = ["2", 0]
    with pytest.raises(Exception, match="its model comes from node 2 \\(ModelSamplingDiscrete\\)"):
        comfy.run(graph)


def test_a_bad_job_file_is_refused_naming_the_problem(comfy, graph_run, tmp_path):
    job = json.loads(graph_run[1].read_text())
    job["lora_lab_job"] = 99
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(job))
    process = run_headless(comfy, bad)
    assert process.returncode == 2 and "lora_lab_job = 99; this pack" in process.output
    job["lora_lab_job"], job["train"]["rank"] = 1, 0
    bad.write_text(json.dumps(job))
    process = run_headless(comfy, bad)
    assert process.returncode == 2 and "rank = 0" in process.output


def test_export_only_runs_the_checks_first(comfy, checkpoint, image_folder):  # noqa: F811
    """A job Train LoRA would refuse is not written: batch 8 on a dataset of 4 images."""
    graph = job_graph(comfy, checkpoint, image_folder, lora_name="job_unchecked", export_only=True, batch_size=8)
    with pytest.raises(Exception, match="batch_size = 8 is larger than the dataset's largest bucket"):
        comfy.run(graph)
    assert not (comfy.output_dir / "lora_lab" / "job_unchecked" / "job.json").exists()
