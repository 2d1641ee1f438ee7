"""LoRA Lab's developer library: what the command-line tools in scripts/ and the tests share.

The pack's runtime never imports it (ComfyUI loads only the root ``__init__.py``, which imports
nodes/ and training/). How it is found: pytest puts the repository root on ``sys.path`` through
``pythonpath`` in pyproject.toml; the scripts through ``scripts/_repo_path.py``.

    environment     the checkout, the cache, the ComfyUI the set-up provisioned, ``lora_lab.*`` imports
    comfy_server    a real headless ComfyUI server (subprocess) spoken to over HTTP
    inprocess       a real ComfyUI booted inside this process (no HTTP)
    workflow_api    saved (UI-format) workflows: check against /object_info, convert to API prompts
    tiny_checkpoint generated random-weight checkpoints (tiny SD1.5, SDXL-family, real-size)
    sample_dataset  the generated sample dataset (checkerboard + captions)
    node_schema     the saved-workflow compatibility snapshot of the nodes' inputs and outputs
"""
