"""LoRA Lab: train LoRAs for Stable Diffusion inside the ComfyUI graph, with full control of the learning rate.

ComfyUI imports this file under a path-derived module name, so everything here is imported
relatively. Its only side effect is registering the pack's HTTP routes, and only when a ComfyUI
server is running (in-process tests import the pack with no server).
"""
from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .nodes import routes as _routes

_routes.register_routes()

WEB_DIRECTORY = "./web/js"

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
