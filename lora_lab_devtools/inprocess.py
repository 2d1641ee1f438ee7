"""A real ComfyUI booted inside the test process (no HTTP): stock loaders, stock executor.

Only one ComfyUI can live in a process (it owns module names like `nodes`), so `boot()` is
idempotent and every test shares the instance. Each test session uses its own base directory
(models/, input/, output/, custom_nodes/ with a link to this checkout), so nothing the user has
is touched.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import inspect
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .comfy_server import BaseDirectoryFolders, prepare_base_dir, widget_defaults


class ServerStub:
    """What PromptExecutor needs from PromptServer; it also records the messages sent."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class PromptFailed(AssertionError):
    """A prompt did not validate or its execution failed; carries ComfyUI's own messages."""

    def __init__(self, message: str, details: Any) -> None:
        super().__init__(message)
        self.details = details


@dataclass
class ComfyInProcess(BaseDirectoryFolders):
    comfyui_dir: Path
    base_dir: Path
    pack: Any = None
    server: ServerStub = field(default_factory=ServerStub)
    executor: Any = None

    def widget_defaults(self, class_type: str) -> dict:
        """Every required widget of a node at its default value (sockets left out)."""
        return widget_defaults(self.node_class(class_type).INPUT_TYPES())

    def node_class(self, class_type: str):
        import nodes  # ComfyUI's nodes.py
        return nodes.NODE_CLASS_MAPPINGS[class_type]

    def call_node(self, class_type: str, **inputs) -> dict:
        """Run one node's function directly, as the executor calls it (a V3 node's execute, a V1 node's
        FUNCTION on an instance; no hidden inputs): {"result": outputs tuple, "ui": its ui dict or None}."""
        node = self.node_class(class_type)
        if hasattr(node, "define_schema"):
            returned = node.execute(**inputs)
            return {"result": tuple(returned.result or ()), "ui": returned.ui}
        returned = getattr(node(), node.FUNCTION)(**inputs)
        return returned if isinstance(returned, dict) else {"result": returned, "ui": None}

    def outputs(self, class_type: str, **inputs) -> tuple:
        """call_node's outputs tuple, run under inference mode as the executor runs nodes."""
        import torch

        with torch.inference_mode():
            return self.call_node(class_type, **inputs)["result"]

    def validate(self, prompt: dict) -> tuple[bool, Any, list, dict]:
        import execution
        return _call_outside_event_loop(
            lambda: asyncio.run(execution.validate_prompt(str(uuid.uuid4()), prompt, None)))

    def run(self, prompt: dict) -> dict:
        """Validate and execute an API-format prompt; returns {node_id: {"outputs": ..., "ui": ...}}.

        Raises PromptFailed with ComfyUI's validation errors or the execution error message.
        """
        # ComfyUI writes its IS_CHANGED results into the prompt it is given: work on a copy so a
        # test can run the same dict twice.
        prompt = copy.deepcopy(prompt)
        valid, error, outputs, node_errors = self.validate(prompt)
        if not valid or node_errors:  # ComfyUI runs the valid outputs and drops the rest: tests want all
            raise PromptFailed(f"prompt invalid: {error} {node_errors}", (error, node_errors))
        prompt_id = str(uuid.uuid4())
        self.server.messages.clear()
        _call_outside_event_loop(self.executor.execute, prompt, prompt_id, {"client_id": None}, outputs)
        if not self.executor.success:
            failures = [data for event, data in self.executor.status_messages
                        if event in ("execution_error", "execution_interrupted")]
            message = failures[0].get("exception_message", failures[0]) if failures else "unknown failure"
            raise PromptFailed(str(message), failures)
        results = {}
        for node_id in prompt:
            entry = self.executor.caches.outputs.get(node_id)
            if inspect.iscoroutine(entry):   # ComfyUI 0.33's caches are async
                entry = _call_outside_event_loop(asyncio.run, entry)
            if entry is not None:
                ui = entry.ui or {}
                # ComfyUI stores {"output": <the node's ui dict>, "meta": ...} for output nodes.
                results[node_id] = {"outputs": entry.outputs, "ui": ui.get("output", ui) or {}}
        return results


_INSTANCE: ComfyInProcess | None = None


def _call_outside_event_loop(function, *arguments):
    """Call `function` (which may use asyncio.run) where no event loop runs in the thread.

    A session fixture such as playwright's sync API keeps an event loop running in the main thread
    for the whole session, and asyncio.run() refuses to start inside it; then the call runs in a
    worker thread, as ComfyUI's own server runs prompts in its prompt-worker thread.
    """
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is None:  # called outside the except block: no exception context leaks into ComfyUI's logs
        return function(*arguments)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(function, *arguments).result()


def boot(comfyui_dir: Path, base_dir: Path, cpu: bool = True) -> ComfyInProcess:
    """Start (once per process) a ComfyUI with the pack; cpu=False lets ComfyUI use the GPU (benchmarks)."""
    global _INSTANCE
    if _INSTANCE is not None:
        return _INSTANCE
    prepare_base_dir(base_dir)
    sys.argv = [sys.argv[0], *(["--cpu"] if cpu else []), "--base-directory", str(base_dir), "--disable-api-nodes",
                "--front-end-root", str(base_dir / "user")]
    sys.path.insert(0, str(comfyui_dir))  # ComfyUI is a folder of top-level modules, not a package
    import comfy.options
    comfy.options.enable_args_parsing()
    import folder_paths  # noqa: F401  (reads --base-directory)
    import utils.install_util  # noqa: F401  (must be ComfyUI's utils package, imported before execution)
    import execution
    import nodes
    _call_outside_event_loop(
        lambda: asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False)))
    pack_module = next((module for name, module in sys.modules.items()
                        if name.endswith("custom_nodes/lora_lab") or name.endswith("custom_nodes\\lora_lab")),
                       None)
    if pack_module is None or "LoRALabLRSchedule" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError("ComfyUI did not load the LoRA Lab pack; see the import error above")
    instance = ComfyInProcess(comfyui_dir=comfyui_dir, base_dir=base_dir, pack=pack_module)
    # "ram_inactive" is read by ComfyUI 0.33 (0.3.75 ignores it), as main.py passes it.
    instance.executor = execution.PromptExecutor(instance.server, execution.CacheType.CLASSIC,
                                                 {"lru": 0, "ram": 0, "ram_inactive": 0})
    _INSTANCE = instance
    return instance
