"""The live LR curves in the real graph editor (Chromium + ComfyUI's own frontend)."""
from __future__ import annotations

from browser.conftest import artifact

ADD_NODE = """(type) => { const node = LiteGraph.createNode(type); node.pos = [40 + (app.graph._nodes ?? app.graph.nodes ?? []).length * 460, 80];
                 app.graph.add(node); return node.id; }"""
STATE = "(id) => { const state = app.graph.getNodeById(id).loraLabState; return JSON.parse(JSON.stringify(state)); }"


def wait_state(page, node_id, condition: str):
    page.wait_for_function(f"(id) => {{ const s = app.graph.getNodeById(id)?.loraLabState; return s && ({condition}); }}",
                           arg=node_id, timeout=30_000, polling=200)
    return page.evaluate(STATE, node_id)


def set_widget(page, node_id, name, value):
    page.evaluate("""([id, name, value]) => { const node = app.graph.getNodeById(id);
        const widget = node.widgets.find((w) => w.name === name); widget.value = value; widget.callback?.(value); }""",
                  [node_id, name, value])


def canvas_pixel_spread(page, node_id) -> int:
    return page.evaluate("""(id) => { const canvas = app.graph.getNodeById(id).loraLabCanvas;
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
        const colours = new Set(); for (let i = 0; i < data.length; i += 16) colours.add(data[i] << 16 | data[i+1] << 8 | data[i+2]);
        return colours.size; }""", node_id)


def test_schedule_node_draws_and_redraws_on_widget_change(page):
    schedule = page.evaluate(ADD_NODE, "LoRALabLRSchedule")
    state = wait_state(page, schedule, "s.series && s.series.length")
    curve = state["series"][0]["values"]
    assert len(curve) == 1000 and state["warmup"] == 50  # defaults: 1000 preview steps, 5 %
    assert curve[0] == 0 and abs(curve[50] - 1.0) < 1e-9
    assert canvas_pixel_spread(page, schedule) > 5  # something was drawn, not a blank canvas

    set_widget(page, schedule, "warmup", 30)
    state = wait_state(page, schedule, "s.warmup === 300")
    assert abs(state["series"][0]["values"][300] - 1.0) < 1e-9

    set_widget(page, schedule, "warmup_unit", "steps")  # 30 steps
    state = wait_state(page, schedule, "s.warmup === 30")
    set_widget(page, schedule, "warmup", 5000)  # invalid: the node shows the server's message
    state = wait_state(page, schedule, "s.error")
    assert "warmup = 5000 steps is longer than training (1000 steps)" in state["error"]
    set_widget(page, schedule, "warmup", 300)
    wait_state(page, schedule, "s.series && s.warmup === 300")

    rates = page.evaluate(ADD_NODE, "LoRALabLearningRates")
    state = wait_state(page, rates, "s.message && s.message !== 'loading...'")
    assert "connect an LR Schedule" in state["message"]
    page.evaluate("""([from, to]) => { const source = app.graph.getNodeById(from), target = app.graph.getNodeById(to);
        source.connect(0, target, target.inputs.findIndex((slot) => slot.name === 'lr_schedule')); }""", [schedule, rates])
    state = wait_state(page, rates, "s.series && s.series.length >= 2")
    labels = [series["label"] for series in state["series"]]
    assert labels[:2] == ["UNet", "TE"]
    unet = state["series"][0]["values"]
    assert abs(max(unet) - 1e-4) < 1e-12 and state["warmup"] == 300

    page.evaluate("() => { app.canvas.ds.offset = [20, 20]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(300)
    page.screenshot(path=artifact(page, "lr_visualizer_per_part.png"))

    set_widget(page, rates, "text_encoder_lr", 0)  # frozen TE (and TE2, which inherits it): one curve left
    state = wait_state(page, rates, "s.series && s.series.length === 1")
    assert state["series"][0]["label"] == "UNet"

    set_widget(page, schedule, "scheduler", "constant")  # a schedule change redraws the connected rates node
    state = wait_state(page, rates, "s.series && s.warmup === 0")
    assert set(state["series"][0]["values"]) == {1e-4}

    page.evaluate("() => { app.canvas.ds.offset = [20, 20]; app.canvas.ds.scale = 1; app.canvas.setDirty(true, true); }")
    page.wait_for_timeout(500)
    page.screenshot(path=artifact(page, "lr_visualizer.png"))
    assert not page.loraLabErrors, page.loraLabErrors
