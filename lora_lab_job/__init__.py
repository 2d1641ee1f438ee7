"""Run a LoRA Lab training job headless: `python -m lora_lab_job run job.json`.

Train LoRA writes job.json into its run folder (output/lora_lab/<name>/job.json): every setting, the
dataset folder and options, the rates and schedule, and the model files as the stock loaders named them.
This runner boots ComfyUI as a library (no server, no graph, only its built-in nodes and this pack),
loads the models with the loaders' own code and trains with the pack's training code, writing the same
LoRA file, log.jsonl and charts. Under torchrun it is one rank of a data-parallel job (see README, "Scale
out"). Run it from the pack's folder (custom_nodes/<pack>) or give --comfyui.
"""
