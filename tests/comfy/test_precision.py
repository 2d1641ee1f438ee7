"""Every precision trains for real, with the base model loaded in that dtype as ComfyUI loads it on a
GPU (fp16/bf16 weights), LoRA and DoRA, on the UNet and the text encoder: a few tiny steps each.

The base is loaded by the function the stock Load Checkpoint node calls
(``comfy.sd.load_checkpoint_guess_config``), with the weight dtype that ComfyUI's --fp16-unet /
--bf16-unet / --fp16-text-enc / --bf16-text-enc options set. bf16 is slow on these CPUs, so the runs
are 3 steps at 64 px with rank 4.
"""
from __future__ import annotations

import logging

import pytest
import torch

from .test_train import checkpoint, dataset, rates, read_lora, schedule, stock_lora_loader  # noqa: F401

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def load_in_dtype(comfy, checkpoint):
    """(MODEL, CLIP, VAE) with UNet and text-encoder weights stored in `dtype` (cached per dtype)."""
    import folder_paths
    from comfy import sd as comfy_sd

    cache = {}

    def load(dtype: torch.dtype):
        if dtype not in cache:
            with torch.inference_mode():
                cache[dtype] = comfy_sd.load_checkpoint_guess_config(
                    folder_paths.get_full_path("checkpoints", checkpoint), output_vae=True, output_clip=True,
                    embedding_directory=folder_paths.get_folder_paths("embeddings"),
                    model_options={"dtype": dtype}, te_model_options={"dtype": dtype})[:3]
        return cache[dtype]

    return load


def trainable_tensors(access) -> dict[str, torch.Tensor]:
    """"<part>/<module path>/<A|B|M>" -> every tensor the optimizer trains (peft layers in the model)."""
    roots = {"unet": access.unet, **access.text_encoders}
    found = {}
    for part, root in roots.items():
        for path, module in root.named_modules():
            if not hasattr(module, "lora_A") or "default" not in module.lora_A:
                continue
            found[f"{part}/{path}/A"] = module.lora_A["default"].weight
            found[f"{part}/{path}/B"] = module.lora_B["default"].weight
            magnitudes = getattr(module, "lora_magnitude_vector", None)
            if magnitudes is not None and "default" in magnitudes:
                found[f"{part}/{path}/M"] = magnitudes["default"].weight
    return found


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_precision_trains_every_tensor_of_every_part_in_fp32(comfy, load_in_dtype, dataset, precision, use_dora):
    model, clip, vae = load_in_dtype(PRECISIONS[precision])
    # The base really is in that dtype (what a GPU load gives), not fp32 with autocast on top.
    assert model.model.diffusion_model.input_blocks[1][1].proj_in.weight.dtype == PRECISIONS[precision]
    assert clip.cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].mlp.fc1.weight.dtype == \
        PRECISIONS[precision]
    pack = comfy.pack
    bridge, run = pack.nodes.comfy, pack.training.run
    name = f"precision_{precision}_{'dora' if use_dora else 'lora'}"
    settings = run.train_settings.TrainSettings(steps=3, batch_size=2, rank=4, alpha=4.0, target="attention_ff",
                                                use_dora=use_dora, precision=precision, gradient_checkpointing=True,
                                                weight_decay=0.01, lora_name=name)
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    dtypes: dict[str, torch.dtype] = {}

    def snapshot(key: str) -> None:
        tensors = trainable_tensors(access)
        dtypes.update({tensor_name: tensor.dtype for tensor_name, tensor in tensors.items()})
        snapshots[key] = {tensor_name: tensor.detach().float().clone() for tensor_name, tensor in tensors.items()}

    def check_cancel() -> None:   # called first after the layers are injected, before any update
        if "initial" not in snapshots:
            snapshot("initial")

    def on_step(record, total) -> None:
        if record.step == total - 1:
            snapshot("final")

    with torch.inference_mode():
        family = bridge.check_compatible(model, clip, vae)
        access = bridge.model_access(model, clip, vae, family)
        result = run.trainer.train_lora(settings, access, dataset,
                                        rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-3),
                                        schedule(comfy), bridge.loras_dir(), bridge.output_dir(),
                                        run.host.TrainCallbacks(on_step=on_step, check_cancel=check_cancel))
    initial, final = snapshots["initial"], snapshots["final"]
    assert {tensor_name.split("/")[0] for tensor_name in initial} == {"unet", "text_encoder"}
    kinds = {tensor_name.rsplit("/", 1)[1] for tensor_name in initial}
    assert kinds == ({"A", "B", "M"} if use_dora else {"A", "B"})
    assert {dtype for dtype in dtypes.values()} == {torch.float32}, "every trainable tensor must be fp32"
    unchanged = [tensor_name for tensor_name in initial if torch.equal(initial[tensor_name], final[tensor_name])]
    assert unchanged == [], f"{len(unchanged)} of {len(initial)} trainable tensors never moved, e.g. {unchanged[:3]}"
    assert all(torch.isfinite(tensor).all() for tensor in final.values())

    tensors, _ = read_lora(comfy, result.path.name)
    assert all(torch.isfinite(tensor.float()).all() for tensor in tensors.values())
    assert any(key.endswith(".dora_scale") for key in tensors) == use_dora
    _, _, log_lines = stock_lora_loader(comfy, (model, clip, vae), result.path.name)
    assert not [line for line in log_lines if "lora key not loaded" in line], log_lines


def test_dora_magnitude_gets_no_weight_decay(comfy):
    """Weight decay pulls toward zero: right for the low-rank update, wrong for DoRA's per-row norms."""
    optimizers = comfy.pack.training.lr.optimizers
    down, up, magnitude = (torch.nn.Parameter(torch.ones(2, 2)) for _ in range(3))
    layer = optimizers.TrainedLayer(part="unet", block="down", down=down, up=up, magnitude=magnitude)
    groups = optimizers.build_param_groups([layer], {"unet": 1e-3}, 1.0, lambda block: 1.0)
    optimizer = optimizers.build_optimizer("AdamW", groups, weight_decay=0.1)
    decay = {id(parameter): group["weight_decay"] for group in optimizer.param_groups for parameter in group["params"]}
    assert decay[id(magnitude)] == 0.0 and decay[id(down)] == decay[id(up)] == 0.1
    assert {group["lr"] for group in optimizer.param_groups
            if any(parameter is magnitude for parameter in group["params"])} == {1e-3}


def test_dora_on_the_text_encoder_alone_trains(comfy, load_in_dtype, dataset, caplog):
    """The reported case: DoRA on the text encoder only (UNet frozen) turned NaN at step 1 at any rate
    (its fp16 magnitude met AdamW's eps underflow). Both a normal and a tiny rate must train."""
    from .test_train import train

    loaded = load_in_dtype(torch.float16)
    for rate in (1e-4, 1e-7):
        with caplog.at_level(logging.WARNING):
            _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=0.0, text_encoder_lr=rate),
                                  schedule(comfy), steps=2, use_dora=True, lora_name="dora_te_only")
        tensors, _ = read_lora(comfy, name)
        assert tensors and all(key.startswith("lora_te_") for key in tensors)
        assert any(key.endswith(".dora_scale") for key in tensors)
        assert all(torch.isfinite(tensor.float()).all() for tensor in tensors.values())


def test_gradient_checkpointing_recomputes_unet_and_text_encoder_layers(comfy, load_in_dtype, dataset):
    """With gradient_checkpointing, activations of the UNet's layers and of a trained CLIP's layers are
    recomputed during backward (their forwards run again inside the backward pass); without it, never."""
    from .test_train import train

    loaded = load_in_dtype(torch.float32)
    watched = {"text_encoder": loaded[1].cond_stage_model.clip_l.transformer.text_model.encoder.layers[0].layer_norm1,
               "unet": loaded[0].model.diffusion_model.input_blocks[1][1].norm}
    in_backward: dict[bool, dict[str, int]] = {}
    for checkpointing in (False, True):
        counts = {part: 0 for part in watched}

        def hook(part):
            def count(*_):
                if torch._C._current_graph_task_id() != -1:   # running inside a backward pass
                    counts[part] += 1
            return count

        handles = [module.register_forward_hook(hook(part)) for part, module in watched.items()]
        try:
            train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-3), schedule(comfy),
                  steps=1, gradient_checkpointing=checkpointing, lora_name="checkpointing")
        finally:
            for handle in handles:
                handle.remove()
        in_backward[checkpointing] = counts
    assert in_backward[False] == {"text_encoder": 0, "unet": 0}, in_backward
    assert all(count > 0 for count in in_backward[True].values()), in_backward
