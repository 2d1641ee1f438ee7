"""The LR Schedule and UNet/TE Learning Rates nodes inside a real ComfyUI (in-process executor)."""
from __future__ import annotations

import pytest
from lora_lab_devtools.inprocess import PromptFailed

SCHEDULE_DEFAULTS = {"scheduler": "cosine", "warmup": 5.0, "warmup_unit": "percent", "num_cycles": 1, "power": 1.0,
                     "min_lr_ratio": 0.0, "decay_ratio": 0.2, "step_rules": "", "preview_steps": 1000}
RATES_DEFAULTS = {"learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 5e-5, "text_encoder_2_lr": -1.0,
                  "lora_plus_ratio": 1.0, "unet_block_weights": ""}


def lr_prompt(schedule: dict | None = None, rates: dict | None = None) -> dict:
    return {
        "1": {"class_type": "LoRALabLRSchedule", "inputs": {**SCHEDULE_DEFAULTS, **(schedule or {})}},
        "2": {"class_type": "LoRALabLearningRates",
              "inputs": {**RATES_DEFAULTS, **(rates or {}), "lr_schedule": ["1", 0]}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 1]}},
        "4": {"class_type": "PreviewImage", "inputs": {"images": ["2", 2]}},
    }


def test_node_ids_display_names_and_input_order(comfy):
    import nodes

    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LoRALabLRSchedule"] == "LR Schedule"
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["LoRALabLearningRates"] == "UNet/TE Learning Rates"
    schedule_inputs = comfy.node_class("LoRALabLRSchedule").INPUT_TYPES()["required"]
    assert list(schedule_inputs) == list(SCHEDULE_DEFAULTS)
    assert {name: spec[1]["default"] for name, spec in schedule_inputs.items()} == SCHEDULE_DEFAULTS
    rates_types = comfy.node_class("LoRALabLearningRates").INPUT_TYPES()
    assert list(rates_types["required"]) == list(RATES_DEFAULTS)
    assert list(rates_types["optional"]) == ["lr_schedule"]
    for spec in [*schedule_inputs.values(), *rates_types["required"].values(), *rates_types["optional"].values()]:
        assert spec[1].get("tooltip"), spec


def test_nodes_run_and_output_schedule_rates_and_charts(comfy):
    results = comfy.run(lr_prompt({"scheduler": "linear", "warmup": 10, "preview_steps": 200},
                                  {"text_encoder_lr": 0, "lora_plus_ratio": 4}))
    schedule, chart = results["1"]["outputs"][0][0], results["1"]["outputs"][1][0]
    assert schedule.scheduler == "linear" and schedule.warmup_steps(200) == 20
    assert schedule.multiplier(20, 200) == pytest.approx(1.0)
    assert tuple(chart.shape[-1:]) == (3,) and chart.shape[1] >= 300 and chart.shape[2] >= 500
    assert 0.0 <= float(chart.min()) and float(chart.max()) <= 1.0 and float(chart.std()) > 0.05
    rates, summary, rates_chart = (results["2"]["outputs"][index][0] for index in range(3))
    assert rates.resolved() == {"unet": 1e-4, "text_encoder": 0.0, "text_encoder_2": 0.0}
    assert "TE: frozen" in summary and "LoRA+" in summary
    assert rates_chart.shape == chart.shape
    # The preview nodes received the charts as PNG files.
    assert results["3"]["ui"]["images"] and results["4"]["ui"]["images"]


def test_chart_changes_with_settings(comfy):
    first = comfy.run(lr_prompt({"scheduler": "cosine"}))["1"]["outputs"][1][0]
    second = comfy.run(lr_prompt({"scheduler": "rex", "warmup": 30}))["1"]["outputs"][1][0]
    assert float((first - second).abs().mean()) > 0.001


@pytest.mark.parametrize("schedule,rates,fragment", [
    ({"min_lr_ratio": 1.5}, {}, "min_lr_ratio = 1.5 must be at most 1 (0 = decay to zero"),
    ({"warmup": 2000, "warmup_unit": "steps"}, {}, "warmup = 2000 steps is longer than training (1000 steps)"),
    ({"num_cycles": 0}, {}, "num_cycles = 0 must be at least 1"),
    ({"scheduler": "piecewise_constant", "step_rules": "1:x,0.1"}, {}, "step_rules"),
    ({}, {"unet_lr": -3}, "unet_lr = -3.0 is not allowed"),
    ({}, {"unet_block_weights": "left=2"}, "'left=2' is not 'block=weight'"),
])
def test_invalid_settings_are_refused_at_validation(comfy, schedule, rates, fragment):
    valid, error, outputs, node_errors = comfy.validate(lr_prompt(schedule, rates))
    messages = [detail["details"] for node in node_errors.values() for detail in node["errors"]]
    assert any(fragment in message for message in messages), messages
    with pytest.raises(PromptFailed):
        comfy.run(lr_prompt(schedule, rates))
