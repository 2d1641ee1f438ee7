"""The pack's HTTP routes, registered once when a ComfyUI server is running.

POST /lora_lab/schedule_preview (also served as /api/lora_lab/schedule_preview): see preview.py.
"""
from __future__ import annotations

import logging

from . import comfy
from .preview import schedule_preview

logger = logging.getLogger("lora_lab")
_registered = False


def register_routes() -> bool:
    """Add our routes to ComfyUI's PromptServer; a no-op without a server (in-process use, tests)."""
    global _registered
    if _registered:
        return True
    instance = comfy.prompt_server()
    if instance is None or not hasattr(instance, "routes"):
        return False
    from aiohttp import web   # ComfyUI's server runs on aiohttp

    @instance.routes.post("/lora_lab/schedule_preview")
    async def schedule_preview_route(request):
        try:
            body = await request.json()
        except ValueError:
            return web.json_response({"error": "schedule_preview: the body is not valid JSON."}, status=400)
        try:
            return web.json_response(schedule_preview(body))
        except ValueError as error:
            return web.json_response({"error": str(error)}, status=400)

    _registered = True
    return True
