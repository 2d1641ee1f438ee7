"""The pack in a real ComfyUI server over HTTP: import smoke test, LR nodes, preview route."""
from __future__ import annotations

import subprocess
import sys

import pytest
from PIL import Image

SCHEDULE = {"scheduler": "cosine_with_restarts", "warmup": 10.0, "warmup_unit": "percent", "num_cycles": 3,
            "power": 1.0, "min_lr_ratio": 0.1, "decay_ratio": 0.2, "step_rules": "", "preview_steps": 300}
RATES = {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 5e-5, "text_encoder_2_lr": -1.0,
         "lora_plus_ratio": 1.0, "unet_block_weights": ""}


def test_quick_test_for_ci_imports_the_pack(comfyui_dir, tmp_path):
    from lora_lab_devtools.comfy_server import prepare_base_dir

    prepare_base_dir(tmp_path)
    completed = subprocess.run(
        [sys.executable, "main.py", "--cpu", "--quick-test-for-ci", "--base-directory", str(tmp_path),
         "--front-end-root", str(tmp_path / "frontend"), "--disable-api-nodes"],
        cwd=comfyui_dir, capture_output=True, text=True, timeout=300)
    output = completed.stdout + completed.stderr
    assert completed.returncode == 0, output[-3000:]
    pack_lines = [line for line in output.splitlines() if "custom_nodes/lora_lab" in line]
    assert pack_lines, output[-3000:]
    assert not any("IMPORT FAILED" in line for line in pack_lines), pack_lines


def test_object_info_lists_the_nodes(server):
    info = server.get("/object_info")
    assert info["LoRALabLRSchedule"]["display_name"] == "LR Schedule"
    assert info["LoRALabLearningRates"]["display_name"] == "UNet/TE Learning Rates"
    assert info["LoRALabLRSchedule"]["category"] == "LoRA Lab"
    assert info["LoRALabLRSchedule"]["output"] == ["LR_SCHEDULE", "IMAGE"]
    assert info["LoRALabLearningRates"]["output"] == ["LORA_LEARNING_RATES", "STRING", "IMAGE"]


def test_workflow_saves_both_charts_as_pngs(server):
    prompt = {
        "1": {"class_type": "LoRALabLRSchedule", "inputs": SCHEDULE},
        "2": {"class_type": "LoRALabLearningRates", "inputs": {**RATES, "lr_schedule": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["1", 1], "filename_prefix": "lora_lab/schedule"}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["2", 2], "filename_prefix": "lora_lab/rates"}},
    }
    entry = server.run(prompt, timeout=300)
    for node_id in ("3", "4"):
        images = entry["outputs"][node_id]["images"]
        assert len(images) == 1
        path = server.output_file(images[0])
        assert path.exists() and path.suffix == ".png"
        with Image.open(path) as image:
            assert image.size[0] >= 500 and image.size[1] >= 300
            colours = image.convert("RGB").getcolors(maxcolors=1_000_000)
            assert len(colours) > 50  # a drawn chart, not a blank canvas


def test_schedule_preview_route(server):
    status, answer = server.post("/lora_lab/schedule_preview", {**SCHEDULE, "total_steps": 100})
    assert status == 200
    assert len(answer["multipliers"]) == 100 and answer["warmup_steps"] == 10
    assert answer["multipliers"][0] == 0.0 and answer["multipliers"][10] == pytest.approx(1.0)
    assert min(answer["multipliers"][10:]) >= 0.1 - 1e-9
    assert "parts" not in answer
    # Keys left out take the node's defaults (cosine, 5% warmup).
    status, answer = server.post("/api/lora_lab/schedule_preview", {"total_steps": 40, "rates": {"text_encoder_lr": 0}})
    assert status == 200 and answer["warmup_steps"] == 2
    assert set(answer["parts"]) == {"unet"}
    assert answer["parts"]["unet"][2] == pytest.approx(1e-4)


@pytest.mark.parametrize("body,fragment", [
    ({"min_lr_ratio": 2, "total_steps": 10}, "min_lr_ratio = 2.0 must be at most 1 (0 = decay to zero"),
    ({"warmup": 50, "warmup_unit": "steps", "total_steps": 10}, "warmup = 50 steps is longer than training"),
    ({"total_steps": 0}, "total_steps = 0"),
    ({"total_steps": 10, "rates": {"unet_lr": -2}}, "unet_lr = -2.0 is not allowed"),
])
def test_schedule_preview_route_rejects_invalid_settings(server, body, fragment):
    status, answer = server.post("/lora_lab/schedule_preview", body)
    assert status == 400
    assert fragment in answer["error"]
