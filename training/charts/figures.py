"""What every chart of the pack shares: a headless matplotlib figure turned into a PIL image, and each
part's line style from the one parts table (training/charts/parts.py, which the editor's charts share)."""
from __future__ import annotations

import io

from PIL import Image

from .parts import PARTS

CHART_SIZE_INCHES = (8.0, 4.5)
CHART_DPI = 100
WARMUP_COLOR = "#ffb347"
VAL_LOSS_COLOR = "#e377c2"   # the stable validation loss, wherever it is drawn
DASHES = (0, (6, 4))
EFFECTIVE_DASHES = (0, (4, 1.5, 1, 1.5))   # an adaptive optimizer's step (d x lr): dash-dot, beside the set rate


def new_figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    # A bare Figure (no pyplot): no global state, safe in ComfyUI's worker thread.
    figure = Figure(figsize=CHART_SIZE_INCHES, dpi=CHART_DPI)
    return figure, figure.add_subplot(1, 1, 1)


def figure_to_image(figure) -> Image.Image:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=CHART_DPI)
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")


def part_color(part: str) -> str:
    style = PARTS.get(part)
    return style.color if style is not None else "#444444"


def part_linestyle(part: str):
    style = PARTS.get(part)
    return DASHES if style is not None and style.dashed else "-"


def part_label(part: str) -> str:
    style = PARTS.get(part)
    return style.label if style is not None else part
