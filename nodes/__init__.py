"""The pack's ComfyUI nodes, in the V3 schema (``comfy_api.latest``; nodes/registry.py lists them). Node ids
are a public API: never rename them.

ComfyUI registers the nodes through ``comfy_entrypoint`` (re-exported by the pack's root __init__). The
node modules are imported when it is called, so importing this package needs no ComfyUI (tools and the
unit tests import the pack's library beside it)."""


async def comfy_entrypoint():
    from .registry import LoraLabExtension
    return LoraLabExtension()
