# LoRA Lab developer commands. Every target sets itself up first (idempotent, fast when done).
# With COMFYUI_DIR (and COMFYUI_PYTHON) set, your own ComfyUI is used instead of the managed one.
SETUP := python3 scripts/setup_env.py
PORT ?= 8188
PYTEST_ARGS ?=

.PHONY: setup test test-fast test-unit demo bench bench-memory lr-finder-bench serve python comfyui-dir

setup:
	@$(SETUP)

test:
	@python3 scripts/run_tests.py $(PYTEST_ARGS)

# Everyday check: tests/unit, then the in-process core (tests/comfy -m compat), on the default ComfyUI.
test-fast:
	@python3 scripts/run_tests.py --fast $(PYTEST_ARGS)

test-unit:
	@$(SETUP) run -- -m pytest -q tests/unit $(PYTEST_ARGS)

demo:
	@$(SETUP) run -- scripts/demo.py $(if $(CKPT),--checkpoint "$(CKPT)") $(if $(DATA),--data "$(DATA)")

bench:
	@$(SETUP) run -- scripts/bench.py

# NVIDIA only: peak VRAM and steps/s at simulated 8/12/16/24 GiB cards and resident, beside the built-in trainer.
bench-memory:
	@$(SETUP) run -- scripts/bench.py --gpu-memory

lr-finder-bench:
	@$(SETUP) run -- scripts/lr_finder_bench.py

serve:
	@$(SETUP) run -- scripts/serve.py --port $(PORT)

python:
	@$(SETUP) print python

comfyui-dir:
	@$(SETUP) print comfyui-dir
