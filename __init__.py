"""LoRA Lab: train LoRAs inside the ComfyUI graph, with full control of the learning rate.

ComfyUI imports this file under a path-derived module name, so everything here is imported
relatively. The nodes are V3 (``comfy_api.latest``): ComfyUI registers them through
``comfy_entrypoint``. The only side effect is registering the pack's HTTP routes, and only when a
ComfyUI server is running (in-process tests import the pack with no server).
"""
from .nodes import comfy_entrypoint
from .nodes import routes as _routes

_routes.register_routes()

WEB_DIRECTORY = "./web/js"

__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
