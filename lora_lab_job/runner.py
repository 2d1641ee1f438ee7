"""The headless runner: boot ComfyUI as a library, load this pack, run a job (nodes/job.py)."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

PACK_DIR = Path(__file__).resolve().parents[1]


def default_comfyui_dir() -> Path | None:
    """The ComfyUI this pack is installed in (custom_nodes/<pack>), if it is."""
    root = PACK_DIR.parent.parent
    return root if PACK_DIR.parent.name == "custom_nodes" and (root / "comfy").is_dir() else None


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_lab_job", description=(
        "Run a LoRA Lab training job (the job.json Train LoRA writes into output/lora_lab/<name>/) with no "
        "server and no graph; under torchrun, one rank of a data-parallel run."))
    commands = parser.add_subparsers(dest="command", required=True)
    for name, text in (("run", "train the job"), ("check", "check the job and the files it names, train nothing")):
        command = commands.add_parser(name, help=text)
        command.add_argument("job", help="path of job.json")
        command.add_argument("--comfyui", type=Path, default=default_comfyui_dir(),
                             help="the ComfyUI folder (default: the one this pack is installed in)")
        command.add_argument("--base-directory", default=None,
                             help="ComfyUI's --base-directory (models/, input/, output/), as the server uses it")
        command.add_argument("--extra-model-paths-config", default=None,
                             help="ComfyUI's --extra-model-paths-config, as the server uses it")
        command.add_argument("--cpu", action="store_true", help="train on the CPU (ComfyUI's --cpu)")
        if name == "run":
            command.add_argument("--resume", default="", help=(
                "continue a stopped run: its run folder or resume_state.json (Train LoRA's resume_from); "
                "'auto' = the run folder of this job"))
    return parser.parse_args(argv)


def boot_comfyui(arguments: argparse.Namespace):
    """ComfyUI's modules importable and configured from its own command line (no server started), its
    built-in nodes registered, and this pack loaded as ComfyUI loads a custom node. Returns the pack module."""
    comfyui = arguments.comfyui
    if comfyui is None or not (Path(comfyui) / "comfy").is_dir():
        raise SystemExit(f"lora_lab_job: no ComfyUI at {comfyui}: give --comfyui (the folder with main.py)")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and not arguments.cpu and "CUDA_VISIBLE_DEVICES" not in os.environ:
        os.environ["CUDA_VISIBLE_DEVICES"] = local_rank   # each rank sees its own GPU as cuda:0 (as --cuda-device)
    sys.argv = [sys.argv[0], "--disable-api-nodes", *(["--cpu"] if arguments.cpu else []),
                *(["--base-directory", str(arguments.base_directory)] if arguments.base_directory else []),
                *(["--extra-model-paths-config", str(arguments.extra_model_paths_config)]
                  if arguments.extra_model_paths_config else [])]
    sys.path.insert(0, str(Path(comfyui).resolve()))
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401  (reads --base-directory)
    import utils.install_util  # noqa: F401  (ComfyUI's utils package, before its other modules import theirs)
    import nodes
    if arguments.extra_model_paths_config:
        import utils.extra_config
        utils.extra_config.load_extra_path_config(arguments.extra_model_paths_config)
    asyncio.run(nodes.init_builtin_extra_nodes())   # TripleCLIPLoader and the other loaders outside nodes.py
    asyncio.run(nodes.load_custom_node(str(PACK_DIR)))
    pack = next((module for module in list(sys.modules.values())
                 if Path(getattr(module, "__file__", "") or "").resolve() == PACK_DIR / "__init__.py"), None)
    if pack is None:
        raise SystemExit("lora_lab_job: ComfyUI did not load the LoRA Lab pack; see the import error above")
    return pack


def main(argv: list[str]) -> int:
    arguments = parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    pack = boot_comfyui(arguments)
    import importlib

    job_module = importlib.import_module(f"{pack.__name__}.nodes.job")
    try:
        job = job_module.read_job(arguments.job)
        if arguments.command == "check":
            print(job_module.describe_job(job))
            return 0
        path = job_module.run_job(job, Path(arguments.job), resume=arguments.resume)
    except job_module.JobError as error:
        print(f"lora_lab_job: {error}", file=sys.stderr)
        return 2
    if path is not None:
        print(f"LoRA: {path}")
    return 0
