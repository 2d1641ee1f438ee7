"""The SD1.5 example workflow in the real graph editor: LR curve, no self-randomizing widgets, a queued
training run with its live chart, and the sampled image (Chromium + ComfyUI's own frontend)."""
from __future__ import annotations

import json
from pathlib import Path

from browser.conftest import artifact
from browser.test_lr_visualizer import canvas_pixel_spread, set_widget, wait_state

from lora_lab_devtools.sample_dataset import ensure_sample_dataset
from lora_lab_devtools.tiny_checkpoint import tiny_checkpoint
from lora_lab_devtools.workflow_api import TINY_RUN, declared_overrides

WORKFLOW = Path(__file__).resolve().parents[2] / "example_workflows" / "sd15_train_lora.json"
STEPS = 16
SCHEDULE, TRAIN, SAMPLE = 3, 5, 11  # node ids in sd15_train_lora.json

# Every saved widget value of the LoRA Lab nodes (not our charts, nor the editor's own "$$" image preview).
LORA_LAB_VALUES = """() => Object.fromEntries(app.graph.nodes.filter((node) => node.type.startsWith('LoRALab'))
    .map((node) => [node.id, node.widgets.filter((widget) => widget.serialize !== false && !widget.name.startsWith('$$'))
                                          .map((widget) => [widget.name, widget.value])]))"""
TRAINING = "() => JSON.parse(JSON.stringify(app.graph.getNodeById(%d).loraLabTraining))" % TRAIN


def changed_values(before: dict, after: dict) -> dict:
    """{node id: {widget: (before, after)}} for every LoRA Lab widget value that differs."""
    changes = {}
    for node_id in before.keys() | after.keys():
        old, new = dict(before.get(node_id, [])), dict(after.get(node_id, []))
        differing = {name: (old.get(name), new.get(name)) for name in old.keys() | new.keys() if old.get(name) != new.get(name)}
        if differing:
            changes[node_id] = differing
    return changes


def apply_overrides(page, overrides: dict) -> None:
    """Type the declared demo overrides into the widgets, as a user would."""
    for node_type, values in overrides.items():
        node_ids = page.evaluate("(type) => app.graph.nodes.filter((node) => node.type === type).map((node) => node.id)",
                                 node_type)
        assert node_ids, node_type
        for node_id in node_ids:
            for name, value in values.items():
                set_widget(page, node_id, name, value)


def wait_for_run(page, server, condition: str) -> None:
    """Wait for a JS condition during the queued run; on failure say what the server and editor saw."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(f"() => window.loraLabRunError || ({condition})", timeout=240_000, polling=200)
    except PlaywrightTimeout:
        raise AssertionError(f"timed out waiting for {condition}; history: {json.dumps(server.get('/history'))[-3000:]}"
                             f"\nserver log:\n{server.log()[-3000:]}") from None
    error = page.evaluate("() => window.loraLabRunError")
    assert not error, f"the run failed in the editor: {error}"


def show_whole_graph(page) -> None:
    """The whole example in view, without the minimap (screenshots)."""
    page.evaluate("""async () => {
        await app.extensionManager.setting.set('Comfy.Minimap.Visible', false);
        app.canvas.ds.scale = 0.72; app.canvas.ds.offset = [100, 130]; app.canvas.setDirty(true, true); }""")
    page.wait_for_timeout(1500)  # image previews load, the canvas redraws


def zoom_on_node_bottom(page, node_id: int, scale: float) -> None:
    """Zoom in with the bottom of the node (where the charts are) in the middle of the view."""
    page.evaluate("""([id, scale]) => { const node = app.graph.getNodeById(id); const ds = app.canvas.ds;
        const rect = app.canvas.canvas.getBoundingClientRect();
        ds.scale = scale; ds.offset = [rect.width / 2 / scale - node.pos[0] - node.size[0] / 2,
                                       rect.height / 2 / scale - node.pos[1] - node.size[1] + 150];
        app.canvas.setDirty(true, true); }""", [node_id, scale])
    page.wait_for_timeout(500)


def test_sd15_example_trains_with_a_live_chart_and_samples(page, ui_server):
    page.evaluate("(workflow) => app.loadGraphData(workflow)", json.loads(WORKFLOW.read_text()))
    page.keyboard.press("Escape")  # a missing-models dialog, if the editor opens one

    # The LR Schedule node draws the saved schedule: cosine, 5 % warmup of 1500 preview steps.
    state = wait_state(page, SCHEDULE, "s.series && s.series.length")
    curve = state["series"][0]["values"]
    assert len(curve) == 1500 and state["warmup"] == 75 and curve[0] == 0 and abs(curve[75] - 1) < 1e-9
    assert canvas_pixel_spread(page, SCHEDULE) > 5
    set_widget(page, SCHEDULE, "warmup", 20)
    state = wait_state(page, SCHEDULE, "s.warmup === 300")
    assert state["series"][0]["values"][150] < 0.51 < curve[150]  # mid-warmup now, past the peak before

    # The demo's declared overrides: tiny checkpoint, generated data, tiny size, fp32, few steps.
    checkpoint = tiny_checkpoint(ui_server.models_dir / "checkpoints").name
    apply_overrides(page, declared_overrides(checkpoint=checkpoint, dataset_folder=str(ensure_sample_dataset()),
                                             steps=STEPS, **TINY_RUN))
    # One server serves every node mode: a name of its own makes each run train rather than reuse the
    # previous run's cached outputs.
    set_widget(page, TRAIN, "lora_name", f"browser_{page.loraLabMode}")
    no_controls = page.evaluate("""() => app.graph.nodes.filter((node) => node.type.startsWith('LoRALab'))
        .flatMap((node) => node.widgets).filter((widget) => widget.name === 'control_after_generate' || widget.linkedWidgets)
        .map((widget) => widget.name)""")
    assert no_controls == []
    before = page.evaluate(LORA_LAB_VALUES)
    assert len(before) == 4

    page.evaluate("""async () => {
        const api = window.comfyAPI?.api?.api ?? app.api;
        api.addEventListener('execution_error', ({detail}) => { window.loraLabRunError = JSON.stringify(detail); });
        await app.queuePrompt(0, 1);
        if (app.lastNodeErrors && Object.keys(app.lastNodeErrors).length)
            window.loraLabRunError = JSON.stringify(app.lastNodeErrors); }""")
    assert changed_values(before, page.evaluate(LORA_LAB_VALUES)) == {}  # nothing re-rolled itself after queueing

    # The live chart in Train LoRA: one record per optimizer step, arriving while training runs.
    wait_for_run(page, ui_server, f"app.graph.getNodeById({TRAIN}).loraLabTraining.updates >= 2")
    early = page.evaluate(TRAINING)
    wait_for_run(page, ui_server, f"app.graph.getNodeById({TRAIN}).loraLabTraining.records.length === {STEPS}")
    final = page.evaluate(TRAINING)
    assert 2 <= len(early["records"]) < STEPS and final["total"] == STEPS
    assert [record["step"] for record in final["records"]] == list(range(STEPS))
    assert final["records"][: len(early["records"])] == early["records"]
    assert all(record["lr"]["unet"] > record["lr"]["text_encoder"] > 0 for record in final["records"][2:-1])
    assert all(record["loss"] > 0 for record in final["records"])

    # The sampled image reaches the Save Image node, and the file is where /history says.
    wait_for_run(page, ui_server, f"app.nodeOutputs?.['{SAMPLE}']?.images?.length")
    history = ui_server.get("/history")
    entry = next(entry for entry in history.values() if str(SAMPLE) in entry.get("outputs", {}))
    assert entry["status"]["status_str"] == "success"
    (image,) = entry["outputs"][str(SAMPLE)]["images"]
    assert ui_server.output_file(image).is_file()
    assert changed_values(before, page.evaluate(LORA_LAB_VALUES)) == {}

    page.set_viewport_size({"width": 1920, "height": 1120})
    show_whole_graph(page)
    page.screenshot(path=artifact(page, "training_graph.png"))
    zoom_on_node_bottom(page, TRAIN, 1.3)
    page.locator("canvas[data-lora-lab-training-chart]").screenshot(path=artifact(page, "training_chart_live.png"))
    assert not page.loraLabErrors, page.loraLabErrors
