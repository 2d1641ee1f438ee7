"""Every shipped example workflow fits the running server's node schemas, and runs."""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest

from lora_lab_devtools.comfy_server import ComfyServer
from lora_lab_devtools.sample_dataset import ensure_sample_dataset
from lora_lab_devtools.tiny_checkpoint import tiny_checkpoint
from lora_lab_devtools.workflow_api import DEMO_OVERRIDES, TINY_RUN, check_workflow, declared_overrides, to_api_prompt

# Every test here runs on every ComfyUI of make test (pyproject.toml: compat).
pytestmark = pytest.mark.compat

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
# Inputs whose value names a user's file (checked as strings only).
FREE_COMBOS = ("ckpt_name", "lora_name", "unet_name", "clip_name", "clip_name1", "clip_name2", "vae_name")


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info")


@pytest.mark.parametrize("path", EXAMPLES, ids=[path.stem for path in EXAMPLES])
def test_example_fits_the_server_schema(path, object_info):
    workflow = json.loads(path.read_text())
    assert check_workflow(workflow, object_info, FREE_COMBOS) == []


def test_the_check_notices_a_removed_or_reordered_input(object_info):
    workflow = json.loads((EXAMPLES[0].parent / "compare_schedules.json").read_text())
    removed = copy.deepcopy(object_info)
    del removed["LoRALabLRSchedule"]["input"]["required"]["power"]
    assert any("widget values saved, the node has" in problem for problem in check_workflow(workflow, removed))
    reordered = copy.deepcopy(object_info)
    required = reordered["LoRALabLRSchedule"]["input"]["required"]
    reordered["LoRALabLRSchedule"]["input"]["required"] = dict(reversed(list(required.items())))
    reordered["LoRALabLRSchedule"].pop("input_order", None)
    assert any("does not fit" in problem for problem in check_workflow(workflow, reordered))


def test_compare_schedules_runs(server, object_info):
    workflow = json.loads((EXAMPLES[0].parent / "compare_schedules.json").read_text())
    prompt = to_api_prompt(workflow, object_info)
    entry = server.run(prompt, timeout=300)
    previews = [images for output in entry["outputs"].values() for images in output.get("images", [])]
    assert len(previews) == 5  # four schedule charts and the per-part chart
    for image in previews:
        assert server.output_file(image).exists()


TRAINING_EXAMPLES = {"sd15_train_lora": (512, "v1-5-pruned-emaonly.safetensors"),
                     "sdxl_train_lora": (1024, "sd_xl_base_1.0.safetensors"),
                     "find_lr_then_train": (512, "v1-5-pruned-emaonly.safetensors")}


@pytest.mark.parametrize("name", TRAINING_EXAMPLES)
def test_training_examples_ship_real_starting_values(name, object_info):
    """What a user opens is what they would train with: no tiny test values saved by mistake."""
    prompt = to_api_prompt(json.loads((EXAMPLES[0].parent / f"{name}.json").read_text()), object_info)
    by_type = {entry["class_type"]: entry["inputs"] for entry in prompt.values()}
    resolution, checkpoint = TRAINING_EXAMPLES[name]
    assert by_type["CheckpointLoaderSimple"]["ckpt_name"] == checkpoint
    assert by_type["LoRALabDataset"]["resolution"] == resolution
    assert by_type["EmptyLatentImage"]["width"] == by_type["EmptyLatentImage"]["height"] == resolution
    assert by_type["LoRALabTrain"]["precision"] == "bf16" and by_type["LoRALabTrain"]["steps"] >= 500
    rates = by_type["LoRALabLearningRates"]
    assert 0 < rates["text_encoder_lr"] < rates["learning_rate"]  # the text encoder trains, more gently
    if name == "sdxl_train_lora":
        assert 0 < rates["text_encoder_2_lr"] != rates["text_encoder_lr"]  # CLIP-G at its own rate


FLOW_EXAMPLES = {"flux_train_lora": (("UNETLoader", "unet_name"), "flux1-dev.safetensors"),
                 "sd35_train_lora": (("CheckpointLoaderSimple", "ckpt_name"),
                                     "sd3.5_medium_incl_clips_t5xxlfp8scaled.safetensors"),
                 "zimage_train_lora": (("UNETLoader", "unet_name"), "z_image_turbo_bf16.safetensors"),
                 "qwen_image_train_lora": (("UNETLoader", "unet_name"), "qwen_image_fp8_e4m3fn.safetensors"),
                 "flux2_train_lora": (("UNETLoader", "unet_name"), "flux2_dev_fp8mixed.safetensors")}
# The guidance-distilled families sample through FluxGuidance; Flux.2 draws on its own empty latent.
GUIDED_EXAMPLES = ("flux_train_lora", "flux2_train_lora")


@pytest.mark.parametrize("name", FLOW_EXAMPLES)
def test_flow_examples_ship_real_starting_values(name, object_info):
    """The flow-matching examples: the family's real file names and 1024 px, bf16, the family's own
    timestep sampling, and none of the epsilon-only settings Train LoRA refuses on these models."""
    prompt = to_api_prompt(json.loads((EXAMPLES[0].parent / f"{name}.json").read_text()), object_info)
    by_type = {entry["class_type"]: entry["inputs"] for entry in prompt.values()}
    (loader, widget), model_file = FLOW_EXAMPLES[name]
    assert by_type[loader][widget] == model_file
    assert by_type["LoRALabDataset"]["resolution"] == 1024
    empty = by_type.get("EmptySD3LatentImage") or by_type["EmptyFlux2LatentImage"]
    assert empty["width"] == empty["height"] == 1024
    assert ("EmptyFlux2LatentImage" in by_type) == (name == "flux2_train_lora")
    train = by_type["LoRALabTrain"]
    assert train["precision"] == "bf16" and train["steps"] >= 500 and train["timestep_sampling"] == "auto"
    assert train["min_snr_gamma"] == 0 and train["noise_offset"] == 0
    rates = by_type["LoRALabLearningRates"]
    if name == "sd35_train_lora":   # CLIP-L and CLIP-G train, each at its own rate
        assert 0 < rates["text_encoder_2_lr"] < rates["text_encoder_lr"] < rates["learning_rate"]
    else:                           # the T5 / LLM encoders stay frozen: the graph says 0
        assert rates["text_encoder_lr"] == 0
    assert ("FluxGuidance" in by_type) == (name in GUIDED_EXAMPLES)


def test_declared_overrides_change_only_the_declared_inputs(object_info):
    workflow = json.loads((EXAMPLES[0].parent / "sd15_train_lora.json").read_text())
    saved = to_api_prompt(workflow, object_info)
    overridden = to_api_prompt(workflow, object_info, declared_overrides(
        checkpoint="tiny.safetensors", dataset_folder="/data", steps=3, sampler_steps=3, **TINY_RUN))
    changed = {(saved[node_id]["class_type"], name) for node_id in saved for name in saved[node_id]["inputs"]
               if saved[node_id]["inputs"][name] != overridden[node_id]["inputs"][name]}
    assert changed == {pair for pairs in DEMO_OVERRIDES.values() for pair in pairs}
    with pytest.raises(KeyError, match="not a declared override"):
        declared_overrides(batch_size=4)


def sdxl_example_here() -> bool:
    """The SDXL example run (a ~3 GB checkpoint) happens once per `make test`: on ComfyUI 0.33 when it is
    in the matrix, else on the one there is."""
    import subprocess

    available = subprocess.run([sys.executable, str(Path(__file__).resolve().parents[2] / "scripts" / "setup_env.py"),
                                "available"], capture_output=True, text=True, check=True).stdout
    return os.environ.get("LORA_LAB_COMFYUI_VERSION") == "0.33.0" or "0.33.0 ok" not in available


@pytest.fixture()
def own_server(comfyui_dir, tmp_path):
    """A server of its own, stopped when the test ends: an SDXL-family run holds ~14 GB of host memory
    in the server process, which the shared server would keep for the rest of the session."""
    instance = ComfyServer(comfyui_dir, tmp_path / "server-base").start()
    yield instance
    instance.stop()


def test_sd15_example_trains_then_samples_with_the_trained_model(server, object_info):
    run_training_example(server, object_info, "sd15_train_lora")


def test_sdxl_example_trains_then_samples_with_the_trained_model(request, object_info):
    if not sdxl_example_here():
        pytest.skip("the SDXL example runs on ComfyUI 0.33.0 in this matrix")
    run_training_example(request.getfixturevalue("own_server"), object_info, "sdxl_train_lora")


def test_find_lr_then_train_example_sweeps_then_trains_at_the_suggestion(server, object_info):
    """The saved graph: LR Finder (10 sweep steps here, then its 3 confirmation runs of 5 steps) feeds Train
    LoRA (3 steps), which trains the UNet at the refined rate and the text encoder at the ratio UNet/TE
    Learning Rates gave (1/2)."""
    checkpoint = tiny_checkpoint(server.models_dir / "checkpoints").name
    workflow = json.loads((EXAMPLES[0].parent / "find_lr_then_train.json").read_text())
    overrides = declared_overrides(checkpoint=checkpoint, dataset_folder=str(ensure_sample_dataset()), steps=3,
                                   sampler_steps=3, **TINY_RUN)
    overrides["LoRALabLRFinder"] = {"steps": 10, "precision": "fp32", "refine_steps": 5}
    prompt = to_api_prompt(workflow, object_info, overrides)
    entry = server.run(prompt, timeout=900)
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    summary = entry["outputs"][titles["LR Finder"]]["text"][0]
    suggested = float(summary.split("Suggested rate: ", 1)[1].split()[0])
    assert "(refined: the lowest validation loss of 3 confirmation runs" in summary and "<- chosen" in summary
    lora_name = entry["outputs"][titles["Train LoRA"]]["text"][0]
    log = [json.loads(line) for line in
           (server.output_dir / "lora_lab" / Path(lora_name).stem / "log.jsonl").read_text().splitlines()]
    assert log[0]["lr"]["unet"] == pytest.approx(suggested, rel=5e-3)   # the summary prints 3 digits
    assert log[0]["lr"]["text_encoder"] == pytest.approx(log[0]["lr"]["unet"] / 2, rel=1e-9)
    assert list((server.output_dir / "lora_lab").glob("lr_finder/sweep_*/sweep.jsonl"))


def test_flux_example_trains_then_samples_with_the_trained_model(comfyui_dir, tmp_path, object_info):
    """The saved Flux graph (UNETLoader + DualCLIPLoader + VAELoader -> Train LoRA -> FluxGuidance ->
    KSampler) on a tiny Flux-dev that ComfyUI detects as Flux, 2 steps at 64 px, fp32."""
    from lora_lab_devtools.flow_fixtures import flux_example_files

    files = flux_example_files()
    run_dit_example(comfyui_dir, tmp_path, object_info, "flux_train_lora", {
        "UNETLoader": ("unet_name", "diffusion_models", files["unet"]),
        "DualCLIPLoader": (("clip_name1", "clip_name2"), "text_encoders", (files["clip_l"], files["t5"])),
        "VAELoader": ("vae_name", "vae", files["vae"])},
        key_prefixes=("lora_unet_double_blocks_", "lora_unet_single_blocks_"), architecture="flux-1-dev/lora")


@pytest.mark.compat
def test_qwen_image_example_trains_then_samples_with_the_trained_model(comfyui_dir, tmp_path, object_info):
    """The saved Qwen-Image graph (UNETLoader + CLIPLoader qwen_image + VAELoader -> Train LoRA -> KSampler)
    on a tiny Qwen-Image that ComfyUI detects as QwenImage, its reduced Qwen2.5-VL-7B read by the stock
    CLIPLoader and a tiny Wan 2.1 VAE (5-D latents), 2 steps at 64 px, fp32."""
    from lora_lab_devtools.qwen_fixtures import qwen_image_example_files

    files = qwen_image_example_files()
    run_dit_example(comfyui_dir, tmp_path, object_info, "qwen_image_train_lora", {
        "UNETLoader": ("unet_name", "diffusion_models", files["unet"]),
        "CLIPLoader": ("clip_name", "text_encoders", files["clip"]),
        "VAELoader": ("vae_name", "vae", files["vae"])},
        key_prefixes=("lora_unet_transformer_blocks_",), architecture="qwen-image/lora")


def test_wan_example_ships_real_starting_values(object_info):
    """Wan 2.2 A14B as ComfyUI's own Wan 2.2 template loads and samples it: one Train LoRA per expert, each
    on its own noise range and its own expert, 33-frame clips at 16 fps, each LoRA applied to its expert."""
    workflow = json.loads((EXAMPLES[0].parent / "wan_train_lora.json").read_text())
    prompt = to_api_prompt(workflow, object_info)
    by_title = {entry["_meta"]["title"]: entry for entry in prompt.values()}
    high, low = by_title["Train LoRA (high-noise expert)"], by_title["Train LoRA (low-noise expert)"]
    assert (high["inputs"]["noise_range"], low["inputs"]["noise_range"]) == ("high_noise", "low_noise")
    assert high["inputs"]["noise_boundary"] == low["inputs"]["noise_boundary"] == 0.0   # the model's own: 0.875
    assert high["inputs"]["model"][0] != low["inputs"]["model"][0]   # each on its own expert's loader
    assert "high_noise" in prompt[high["inputs"]["model"][0]]["inputs"]["unet_name"]
    assert "low_noise" in prompt[low["inputs"]["model"][0]]["inputs"]["unet_name"]
    for train in (high, low):
        assert train["inputs"]["precision"] == "bf16" and train["inputs"]["steps"] >= 500
        assert train["inputs"]["timestep_sampling"] == "auto" and train["inputs"]["memory"] == "auto"
    dataset = by_title["LoRA Dataset"]["inputs"]
    assert dataset["frames_per_clip"] == 33 and dataset["target_fps"] == 16.0
    assert by_title["Load CLIP"]["inputs"]["type"] == "wan"
    # the sampling chain: each expert's KSamplerAdvanced takes the MODEL its own Train LoRA returned
    first, second = by_title["High-noise expert: steps 0-10"], by_title["Low-noise expert: steps 10-20"]
    shift_of = {node_id: entry for node_id, entry in prompt.items() if entry["class_type"] == "ModelSamplingSD3"}
    node_id = {id(entry): key for key, entry in prompt.items()}
    assert shift_of[first["inputs"]["model"][0]]["inputs"]["model"][0] == node_id[id(high)]
    assert shift_of[second["inputs"]["model"][0]]["inputs"]["model"][0] == node_id[id(low)]
    assert (first["inputs"]["end_at_step"], second["inputs"]["start_at_step"]) == (10, 10)


@pytest.mark.compat
def test_wan_example_trains_both_experts_then_samples_a_clip_with_both_loras(comfyui_dir, tmp_path, object_info):
    """The saved Wan 2.2 graph on tiny Wan experts that ComfyUI detects as WAN21, the reduced UMT5 read by
    the stock CLIPLoader (type wan) and a tiny Wan 2.1 VAE, on two generated clips: both experts train 2
    steps each on their own noise range (the sigmas in each log.jsonl), then the two KSamplerAdvanced run
    with the returned MODELs and SaveAnimatedWEBP writes the clip."""
    from PIL import Image
    from safetensors import safe_open

    from lora_lab_devtools.sample_dataset import make_sample_clips
    from lora_lab_devtools.wan_fixtures import wan_example_files

    support = Path(__file__).resolve().parents[1] / "support" / "reduced_text_encoders"
    server = ComfyServer(comfyui_dir, tmp_path / "wan-server", extra_custom_nodes=[support]).start()
    try:
        files = wan_example_files(server.models_dir, roles=("wan22_t2v_high_noise", "wan22_t2v_low_noise", "umt5",
                                                            "wan21_vae"))
        clips = tmp_path / "clips"
        make_sample_clips(clips, count=2, frames=9, size=(64, 64))
        workflow = json.loads((EXAMPLES[0].parent / "wan_train_lora.json").read_text())
        overrides = {
            "Load high-noise expert": {"unet_name": files["wan22_t2v_high_noise"].name},
            "Load low-noise expert": {"unet_name": files["wan22_t2v_low_noise"].name},
            "CLIPLoader": {"clip_name": files["umt5"].name}, "VAELoader": {"vae_name": files["wan21_vae"].name},
            "LoRALabDataset": {"folder": str(clips), "resolution": 64, "min_bucket_resolution": 64,
                               "frames_per_clip": 5},
            "EmptyHunyuanLatentVideo": {"width": 64, "height": 64, "length": 5},
            "LoRALabTrain": {"steps": 2, "precision": "fp32"},
            "High-noise expert: steps 0-10": {"steps": 4, "end_at_step": 2},
            "Low-noise expert: steps 10-20": {"steps": 4, "start_at_step": 2}}
        prompt = to_api_prompt(workflow, object_info, overrides)
        entry = server.run(prompt, timeout=900)
        titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
        for expert, inside in (("high", lambda sigma: sigma >= 0.875), ("low", lambda sigma: sigma <= 0.875)):
            lora_name = entry["outputs"][titles[f"Train LoRA ({expert}-noise expert)"]]["text"][0]
            with safe_open(str(server.models_dir / "loras" / lora_name), "pt") as handle:
                keys, metadata = list(handle.keys()), handle.metadata()
            assert keys and all(key.startswith("lora_unet_blocks_") for key in keys)
            assert metadata["modelspec.architecture"] == "wan2.1/lora"
            log = (server.output_dir / "lora_lab" / Path(lora_name).stem / "log.jsonl").read_text().splitlines()
            sigmas = [sigma for line in log for sigma in json.loads(line)["sigmas"]]
            assert len(sigmas) == 2 and all(inside(sigma) for sigma in sigmas), (expert, sigmas)
        assert "lora key not loaded" not in server.log()
        (clip,) = entry["outputs"][titles["Clip with both LoRAs"]]["images"]
        with Image.open(server.output_file(clip)) as animation:
            assert animation.size == (64, 64) and animation.n_frames == 5
    finally:
        server.stop()


def run_dit_example(comfyui_dir, tmp_path, object_info, name: str, loaders: dict, key_prefixes: tuple[str, ...],
                    architecture: str) -> None:
    """A flow family's saved graph on its tiny files (loaders: node type -> (widget(s), models folder,
    file(s))), 2 steps at 64 px, fp32, then KSampler with the trained MODEL/CLIP. The server has
    tests/support/reduced_text_encoders installed, so that the stock text-encoder loaders build T5 and
    Qwen2.5-VL with reduced configurations (the real ones are 4.7 B and 8 B parameters); everything else
    is stock."""
    from PIL import Image
    from safetensors import safe_open

    support = Path(__file__).resolve().parents[1] / "support" / "reduced_text_encoders"
    server = ComfyServer(comfyui_dir, tmp_path / f"{name}-server", extra_custom_nodes=[support]).start()
    try:
        overrides = {}
        for node_type, (widgets, folder, sources) in loaders.items():
            widgets, sources = (widgets, sources) if isinstance(widgets, tuple) else ((widgets,), (sources,))
            for source in sources:
                target = server.models_dir / folder / source.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(source)
            overrides[node_type] = {widget: source.name for widget, source in zip(widgets, sources)}
        workflow = json.loads((EXAMPLES[0].parent / f"{name}.json").read_text())
        overrides.update({"LoRALabDataset": {"folder": str(ensure_sample_dataset()), "resolution": 64,
                                             "min_bucket_resolution": 64},
                          "EmptySD3LatentImage": {"width": 64, "height": 64},
                          "LoRALabTrain": {"steps": 2, "precision": "fp32"}, "KSampler": {"steps": 3}})
        prompt = to_api_prompt(workflow, object_info, overrides)
        entry = server.run(prompt, timeout=900)
        titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
        lora_name = entry["outputs"][titles["Train LoRA"]]["text"][0]
        with safe_open(str(server.models_dir / "loras" / lora_name), "pt") as handle:
            keys, metadata = list(handle.keys()), handle.metadata()
        assert keys and all(key.startswith(key_prefixes) for key in keys)
        assert metadata["modelspec.architecture"] == architecture
        log = (server.output_dir / "lora_lab" / Path(lora_name).stem / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in log] == [0, 1]
        assert "lora key not loaded" not in server.log()
        (sample,) = entry["outputs"][titles["Sample with the LoRA"]]["images"]
        with Image.open(server.output_file(sample)) as image:
            assert image.size == (64, 64)
    finally:
        server.stop()


def run_training_example(server, object_info, name):
    """The example as `make demo` runs it (a generated checkpoint of that family, sample data, 3 steps at
    64 px, fp32): train, then KSampler (3 steps) with the returned MODEL/CLIP. SDXL: a Segmind-Vega-shaped
    checkpoint that the stock loader detects as SDXL-family, both text encoders training."""
    options = ("--vega",) if name == "sdxl_train_lora" else ()
    checkpoint = tiny_checkpoint(server.models_dir / "checkpoints", *options).name
    workflow = json.loads((EXAMPLES[0].parent / f"{name}.json").read_text())
    prompt = to_api_prompt(workflow, object_info, declared_overrides(
        checkpoint=checkpoint, dataset_folder=str(ensure_sample_dataset()), steps=3, sampler_steps=3, **TINY_RUN))
    entry = server.run(prompt, timeout=900)
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    train_id = titles["Train LoRA"]
    lora_name = entry["outputs"][train_id]["text"][0]
    lora_file = server.models_dir / "loras" / lora_name
    assert lora_file.is_file() and lora_file.stat().st_size > 10_000
    log = (server.output_dir / "lora_lab" / Path(lora_name).stem / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [0, 1, 2]
    from safetensors import safe_open

    with safe_open(str(lora_file), "pt") as handle:
        prefixes = {"_".join(key.split("_")[:2]) for key in handle.keys()}   # lora_unet, lora_te, lora_te1, ...
    expected = {"lora_te1", "lora_te2", "lora_unet"} if name == "sdxl_train_lora" else {"lora_te", "lora_unet"}
    assert prefixes == expected
    assert "lora key not loaded" not in server.log()
    from PIL import Image

    (sample,) = entry["outputs"][titles["Sample with the LoRA"]]["images"]
    with Image.open(server.output_file(sample)) as image:
        assert image.size == (64, 64)
    for title in ("Training chart (loss + rates)", "Learning-rate chart"):
        (chart,) = entry["outputs"][titles[title]]["images"]
        assert server.output_file(chart).stat().st_size > 5_000
