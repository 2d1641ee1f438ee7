"""The schedule preview contract shared by the HTTP route and its tests (no ComfyUI imports).

Request: the LR Schedule widget values + "total_steps" (keys left out take the node defaults),
optionally "rates": the Learning Rates widget values. Response: {"multipliers": [...],
"warmup_steps": w, "parts": {"unet": [...], ...}} (parts only with "rates"; trained parts only).
Invalid settings raise ValueError with the node's own message (the route answers HTTP 400).
"""
from __future__ import annotations

from ..training.lr.rates import LearningRates
from ..training.lr.schedules import ScheduleSettings

MAX_PREVIEW_STEPS = 1_000_000
REQUEST_KEYS = ("total_steps", "rates")   # the request's own keys beside the widget values


def schedule_preview(body: dict) -> dict:
    if not isinstance(body, dict):
        raise ValueError("schedule_preview: the body must be a JSON object of LR Schedule widget values.")
    settings = ScheduleSettings.from_values(body, others=REQUEST_KEYS)
    try:
        total_steps = int(body.get("total_steps", settings.preview_steps))
    except (TypeError, ValueError):
        raise ValueError(f"schedule_preview: total_steps = {body.get('total_steps')!r} is not a whole number.") from None
    if not 1 <= total_steps <= MAX_PREVIEW_STEPS:
        raise ValueError(f"schedule_preview: total_steps = {total_steps} must be between 1 and {MAX_PREVIEW_STEPS}.")
    settings.check_total(total_steps)
    answer: dict = {"multipliers": settings.multipliers(total_steps),
                    "warmup_steps": settings.warmup_steps(total_steps),
                    "description": settings.describe(), "note": settings.ignored_note()}
    if body.get("rates") is not None:
        if not isinstance(body["rates"], dict):
            raise ValueError("schedule_preview: 'rates' must be an object of Learning Rates widget values.")
        rates = LearningRates.from_values(body["rates"])
        answer["parts"] = rates.part_curves(settings, total_steps)
        answer["lora_plus_ratio"] = rates.lora_plus_ratio
    return answer
