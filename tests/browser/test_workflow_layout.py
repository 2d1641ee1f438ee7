"""The example workflows, opened in the real graph editor, have no node over another: in classic
(canvas) mode by LiteGraph's bounding boxes, in Nodes 2.0 by the rendered node elements (Vue nodes
are taller than canvas nodes, so a layout that fits one mode can overlap in the other)."""
from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

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


def test_example_workflow_nodes_do_not_overlap(page):
    """Every example workflow, loaded one after another into the same editor page (a fresh page per
    workflow cost ~7 s each, 28 times per ComfyUI); each is checked and screenshotted on its own."""
    names = sorted(path.name for path in EXAMPLES.glob("*.json"))
    assert len(names) >= 7, names
    # Everything in view at a scale where Vue nodes render in full (they simplify when zoomed far out).
    page.set_viewport_size({"width": 3000, "height": 2000})
    problems = []
    for name in names:
        workflow = json.loads((EXAMPLES / name).read_text())
        page.evaluate("(workflow) => app.loadGraphData(workflow)", workflow)
        page.keyboard.press("Escape")  # a missing-models dialog, if the editor opens one
        page.evaluate("""() => { app.canvas.ds.scale = 0.8; app.canvas.ds.offset = [20, 60];
                                 app.canvas.setDirty(true, true); }""")
        page.wait_for_timeout(1500)
        rects = page.evaluate(NODE_RECTS, page.loraLabMode)
        page.screenshot(path=artifact(page, f"layout_{Path(name).stem}.png"))
        if len(rects) != len(workflow["nodes"]):
            problems.append(f"{name}: {len(rects)} nodes drawn, {len(workflow['nodes'])} in the file")
        elif overlaps(rects):
            problems.append(f"{name} in {page.loraLabMode} mode: nodes overlap: {overlaps(rects)}")
    assert problems == [], problems
