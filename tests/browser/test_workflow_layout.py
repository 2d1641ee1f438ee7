"""The example workflows, opened in the real graph editor, have no node over another: in classic
(canvas) mode by LiteGraph's bounding boxes, in Nodes 2.0 by the rendered node elements (Vue nodes
are taller than canvas nodes, so a layout that fits one mode can overlap in the other)."""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest

from browser.conftest import artifact

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"

# Rectangles [id, x, y, width, height] in one space per mode (canvas units, or screen pixels).
NODE_RECTS = """(mode) => {
  if (mode === 'nodes2') {
    return [...document.querySelectorAll('[data-node-id]')]
      .filter((element) => element.parentElement?.closest('[data-node-id]') == null)
      .map((element) => { const box = element.getBoundingClientRect();
                          return [element.dataset.nodeId, box.x, box.y, box.width, box.height]; });
  }
  return app.graph.nodes.map((node) => { const box = node.boundingRect;
                                         return [String(node.id), box[0], box[1], box[2], box[3]]; });
}"""


def overlaps(rects: list) -> list[tuple[str, str]]:
    found = []
    for (first, x1, y1, w1, h1), (second, x2, y2, w2, h2) in combinations(rects, 2):
        if x1 < x2 + w2 and x2 < x1 + w1 and y1 < y2 + h2 and y2 < y1 + h1:
            found.append((first, second))
    return found


@pytest.mark.parametrize("name", sorted(path.name for path in EXAMPLES.glob("*.json")))
def test_example_workflow_nodes_do_not_overlap(page, name):
    workflow = json.loads((EXAMPLES / name).read_text())
    page.evaluate("(workflow) => app.loadGraphData(workflow)", workflow)
    page.keyboard.press("Escape")  # a missing-models dialog, if the editor opens one
    # Everything in view at a scale where Vue nodes render in full (they simplify when zoomed far out).
    page.set_viewport_size({"width": 3000, "height": 2000})
    page.evaluate("""() => { app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [20, 60];
                             app.canvas.setDirty(true, true); }""")
    page.wait_for_timeout(1500)
    rects = page.evaluate(NODE_RECTS, page.loraLabMode)
    assert len(rects) == len(workflow["nodes"]), (len(rects), len(workflow["nodes"]))
    page.screenshot(path=artifact(page, f"layout_{Path(name).stem}.png"))
    assert overlaps(rects) == [], f"{name} in {page.loraLabMode} mode: nodes overlap: {overlaps(rects)}"
