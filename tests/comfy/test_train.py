"""Train LoRA in a real ComfyUI: tiny random-weight SD1.5 checkpoint, fp32 on CPU, a few steps.

Tolerances: the returned MODEL vs LoraLoader on the same file must agree to 1e-5 (both apply the
same fp32 file through ComfyUI's patcher: any difference is a bug, not rounding).
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import pytest
import torch

from lora_lab_devtools.tiny_checkpoint import ensure_tiny_sd15

CHECKPOINT = "lora_lab_tiny_sd15.safetensors"
CAPTIONS = ["a red square on black", "a blue circle on white", "green stripes", "a yellow cross"]


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(comfy) -> str:
    link = comfy.models_dir / "checkpoints" / CHECKPOINT
    if not link.exists():
        link.symlink_to(ensure_tiny_sd15())
    return CHECKPOINT


@pytest.fixture(scope="module")
def loaded(comfy, checkpoint):
    """(MODEL, CLIP, VAE) from the stock CheckpointLoaderSimple, as a graph would produce them."""
    with torch.inference_mode():
        return comfy.node_class("CheckpointLoaderSimple")().load_checkpoint(checkpoint)[:3]


def pattern_images(count: int = 4, size: int = 64) -> torch.Tensor:
    """Distinct, structured images (no randomness): shapes the LoRA can learn."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for index in range(count):
        red = (torch.sin(xs * (index + 1) * 6.28) > 0).float()
        green = (ys > 0.25 * (index + 1) % 1.0).float()
        blue = ((xs - 0.5) ** 2 + (ys - 0.5) ** 2 < 0.08 * (index + 1)).float()
        images.append(torch.stack([red, green, blue], dim=-1))
    return torch.stack(images)


@pytest.fixture(scope="module")
def dataset(comfy):
    module = comfy.pack.training.data.dataset
    return module.build_image_dataset(pattern_images(), CAPTIONS,
                                      module.DatasetOptions(resolution=64, bucketing=False))


def rates(comfy, **values):
    return comfy.pack.training.lr.rates.LearningRates.from_values(values)


def schedule(comfy, **values):
    return comfy.pack.training.lr.schedules.ScheduleSettings.from_values({"scheduler": "constant", "warmup": 0.0, **values})


def train(comfy, loaded, dataset, learning_rates, lr_schedule, **widgets):
    """(model, clip, lora_name, chart): Train LoRA's first four outputs (see train_outputs)."""
    return train_outputs(comfy, loaded, dataset, learning_rates, lr_schedule, **widgets)[:4]


def train_outputs(comfy, loaded, dataset, learning_rates, lr_schedule, **widgets):
    """Call the node the way ComfyUI's executor does (inside inference_mode); every output."""
    model, clip, vae = loaded
    train_settings = comfy.pack.training.run.train_settings
    # The node's own defaults (from TrainSettings' fields), made tiny and CPU-friendly for tests.
    defaults = {name: default for name, (default, _)
                in comfy.pack.training.settings.specs(train_settings.TrainSettings).items()
                if name not in train_settings.OPTIONAL_SETTINGS}
    defaults.update(steps=4, batch_size=2, rank=4, alpha=4.0, weight_decay=0.0, precision="fp32",
                    gradient_checkpointing=False, lora_name="test_lora")
    defaults.update(widgets)
    with torch.inference_mode():
        output = comfy.call_node("LoRALabTrain",
            model=widgets.pop("model", model), clip=widgets.pop("clip", clip), vae=vae, dataset=dataset,
            learning_rates=learning_rates, lr_schedule=lr_schedule,
            **{key: value for key, value in defaults.items() if key not in ("model", "clip")})
    return output["result"]


FIXED_TIMESTEPS = (999, 700, 400, 100)


def unet_outputs(model, latent: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """apply_model at fixed sigmas (deterministic), through ComfyUI's own model loading/patching."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        sampling = model.get_model_object("model_sampling")
        sigma = sampling.sigmas[list(FIXED_TIMESTEPS)].float()
        batch = latent.repeat(len(FIXED_TIMESTEPS), 1, 1, 1)
        return model.model.apply_model(batch, sigma, c_crossattn=context.repeat(len(FIXED_TIMESTEPS), 1, 1)).clone()


def clip_outputs(clip, text: str = "a red square on black") -> torch.Tensor:
    with torch.inference_mode():
        return clip.encode_from_tokens(clip.tokenize(text)).clone()


@pytest.fixture(scope="module")
def probe():
    generator = torch.Generator().manual_seed(7)
    return torch.randn((1, 4, 8, 8), generator=generator), torch.randn((1, 77, 768), generator=generator) * 0.5


class LoraKeyLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def stock_lora_loader(comfy, loaded, lora_name: str):
    """ComfyUI's LoraLoader node on the file; returns (model, clip, log lines it produced)."""
    handler = LoraKeyLog()
    logging.getLogger().addHandler(handler)
    try:
        with torch.inference_mode():
            model, clip = comfy.node_class("LoraLoader")().load_lora(loaded[0], loaded[1], lora_name, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    return model, clip, handler.lines


def read_lora(comfy, lora_name: str):
    from safetensors import safe_open

    path = comfy.models_dir / "loras" / lora_name
    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------

def sampling_graph(checkpoint: str) -> dict:
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a red square"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": 1, "steps": 2, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


@pytest.mark.compat
def test_tiny_checkpoint_loads_through_checkpoint_loader_as_sd15_and_samples(comfy, checkpoint):
    results = comfy.run(sampling_graph(checkpoint))
    model, clip, vae = (output[0] for output in results["1"]["outputs"][:3])
    assert type(model.model.model_config).__name__ == "SD15"
    assert hasattr(clip.cond_stage_model, "clip_l") and not hasattr(clip.cond_stage_model, "clip_g")
    image = results["6"]["outputs"][0][0]
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
    with torch.inference_mode():
        latent = vae.encode(pattern_images(1))
        text = clip.encode_from_tokens(clip.tokenize("a cat"))
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all() and latent.std() > 0.01
    assert text.shape == (1, 77, 768) and torch.isfinite(text).all() and text.std() > 0.01


@pytest.mark.compat
def test_train_unet_and_text_encoder_round_trips_through_stock_lora_loader(comfy, loaded, dataset, probe):
    latent, context = probe
    model, clip, _ = loaded
    before_unet, before_clip = unet_outputs(model, latent, context), clip_outputs(clip)
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=5e-4)
    lr_schedule = schedule(comfy, scheduler="linear")

    trained_model, trained_clip, lora_name, chart = train(comfy, loaded, dataset, learning_rates, lr_schedule,
                                                          steps=4, lora_name="round_trip", save_precision="fp32")

    assert lora_name == "round_trip.safetensors"
    tensors, metadata = read_lora(comfy, lora_name)
    assert any(key.startswith("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q")
               for key in tensors)
    assert any(key.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for key in tensors)
    assert any(key.endswith("ff_net_2.lora_down.weight") for key in tensors)
    assert all(tensor.dtype == torch.float32 for tensor in tensors.values())   # save_precision fp32 -> fp32 file
    assert float(tensors[next(key for key in tensors if key.endswith(".alpha"))]) == 4.0
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_max_train_steps"] == "4"
    assert float(metadata["ss_unet_lr"]) == 1e-3 and float(metadata["ss_text_encoder_lr"]) == 5e-4
    assert metadata["ss_lr_scheduler"] == "linear" and metadata["ss_lr_warmup_steps"] == "0"
    assert metadata["ss_num_train_images"] == "4" and metadata["ss_mixed_precision"] == "no"
    assert json.loads(metadata["lora_lab_settings"])["train"]["rank"] == 4

    # The user's MODEL/CLIP are untouched, bit for bit.
    assert torch.equal(unet_outputs(model, latent, context), before_unet)
    assert torch.equal(clip_outputs(clip), before_clip)

    # The stock LoraLoader takes every key, and gives exactly what the node returned.
    stock_model, stock_clip, log_lines = stock_lora_loader(comfy, loaded, lora_name)
    assert not [line for line in log_lines if "lora key not loaded" in line], log_lines
    returned = unet_outputs(trained_model, latent, context)
    torch.testing.assert_close(returned, unet_outputs(stock_model, latent, context), rtol=0, atol=1e-5)
    torch.testing.assert_close(clip_outputs(trained_clip), clip_outputs(stock_clip), rtol=0, atol=1e-5)
    assert (returned - before_unet).abs().max() > 1e-4         # the LoRA does something
    assert (clip_outputs(trained_clip) - before_clip).abs().max() > 1e-4

    # log.jsonl: one line per optimizer step, rates read from the optimizer (linear decay, no warmup).
    lines = [json.loads(line) for line in
             (comfy.output_dir / "lora_lab" / "round_trip" / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2, 3]
    assert all(isinstance(line["loss"], float) and line["loss"] > 0 for line in lines)
    for line in lines:
        multiplier = lr_schedule.multiplier(line["step"], 4)
        assert set(line["lr"]) == {"unet", "text_encoder"}
        assert line["lr"]["unet"] == pytest.approx(1e-3 * multiplier)
        assert line["lr"]["text_encoder"] == pytest.approx(5e-4 * multiplier)
    assert lines[0]["lr"]["unet"] > lines[-1]["lr"]["unet"]
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and chart.std() > 0


@pytest.mark.compat
def test_frozen_text_encoder_gets_no_keys_and_clip_is_unchanged(comfy, loaded, dataset):
    clip = loaded[1]
    before = clip_outputs(clip)
    _, trained_clip, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                                          schedule(comfy), steps=2, target="attention", lora_name="unet_only")
    tensors, _ = read_lora(comfy, lora_name)
    assert tensors and not [key for key in tensors if key.startswith("lora_te")]
    assert not [key for key in tensors if "ff_net" in key]        # target=attention: no feed-forward keys
    assert torch.equal(clip_outputs(trained_clip), before)
    assert torch.equal(clip_outputs(clip), before)


def test_summary_output_and_the_first_log_line_hold_the_memory_plan(comfy, loaded, dataset):
    _, _, lora_name, _, summary = train_outputs(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3),
                                                schedule(comfy), steps=3, lora_name="with_summary")
    run_dir = comfy.output_dir / "lora_lab" / "with_summary"
    plan = json.loads((run_dir / "memory_plan.json").read_text())
    lines = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [0, 1, 2]            # still one line per step
    assert {key: value for key, value in lines[0]["memory"].items() if key != "summary"} == plan
    assert lines[0]["memory"]["summary"].startswith("memory auto -> resident on cpu")
    assert not [line for line in lines[1:] if "memory" in line]      # the first step's line only
    summary_lines = summary.splitlines()
    assert summary_lines[0] == f"LoRA: {lora_name}"
    assert summary_lines[1].startswith("3 steps in ") and f"final loss {lines[-1]['loss']:.4f}" in summary_lines[1]
    assert summary_lines[2] == f"Memory: {lines[0]['memory']['summary']}"


def test_taken_name_gets_a_suffix_and_is_never_overwritten(comfy, loaded, dataset):
    existing = comfy.models_dir / "loras" / "taken.safetensors"
    existing.write_bytes(b"not a lora")
    _, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-4, text_encoder_lr=0.0),
                               schedule(comfy), steps=1, lora_name="taken")
    assert lora_name == "taken_2.safetensors"
    assert existing.read_bytes() == b"not a lora"


def fixed_pair_loss(model, latents: torch.Tensor, context: torch.Tensor) -> float:
    """Epsilon loss at fixed (noise, timestep) pairs: comparable before/after training."""
    import comfy.model_management

    generator = torch.Generator().manual_seed(1234)
    total = 0.0
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        sampling = model.get_model_object("model_sampling")
        x0 = model.model.process_latent_in(latents)
        for timestep in (50, 200, 400, 600, 800, 950):
            noise = torch.randn(x0.shape, generator=generator)
            sigma = sampling.sigmas[[timestep] * x0.shape[0]].float()
            xt = sampling.noise_scaling(sigma, noise, x0)
            denoised = model.model.apply_model(xt, sigma, c_crossattn=context)
            eps = (xt - denoised) / sigma.view(-1, 1, 1, 1)
            total += float(((eps - noise) ** 2).mean())
    return total


def fixed_pair_inputs(loaded, dataset) -> tuple[torch.Tensor, torch.Tensor, object]:
    """(latents, text context, the dataset cut to them) of the dataset's first two images, for fixed_pair_loss."""
    _, clip, vae = loaded
    with torch.inference_mode():
        latents = vae.encode(dataset.images[:2])
        context = torch.cat([clip.encode_from_tokens(clip.tokenize(caption)) for caption in CAPTIONS[:2]])
    return latents, context, dataclasses.replace(dataset, samples=dataset.samples[:2])


def test_loss_at_fixed_noise_and_timesteps_drops_by_a_fifth(comfy, loaded, dataset):
    model = loaded[0]
    latents, context, small = fixed_pair_inputs(loaded, dataset)
    before = fixed_pair_loss(model, latents, context)
    trained_model, _, _, _ = train(comfy, loaded, small, rates(comfy, learning_rate=2e-3, text_encoder_lr=0.0),
                                   schedule(comfy), steps=30, rank=8, alpha=8.0, lora_name="learning")
    after = fixed_pair_loss(trained_model, latents, context)
    assert after <= 0.8 * before, (before, after)


def tiny_sdxl_clip():
    """A real (small) SDXL CLIP: clip_l + clip_g, built in code."""
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models_base

    small = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    return comfy.sd.CLIP(target, model_options={"clip_l_model_config": small,
                                                "clip_g_model_config": {**small, "projection_dim": 64}})


@pytest.mark.parametrize("case", ["mismatched_clip", "batch_too_large", "all_rates_zero", "optimizer_missing",
                                  "bad_lora_name", "warmup_too_long", "empty_dataset"])
def test_bad_inputs_fail_before_training_with_a_clear_message(comfy, loaded, dataset, case):
    learning_rates, lr_schedule, widgets = rates(comfy, learning_rate=1e-4), schedule(comfy), {}
    expected = {"mismatched_clip": "clip has text encoder", "batch_too_large": "batch_size = 9",
                "all_rates_zero": "every learning rate resolves to 0", "optimizer_missing": "optimizer =",
                "bad_lora_name": "lora_name", "warmup_too_long": "warmup",
                "empty_dataset": "dataset has no images"}[case]
    if case == "mismatched_clip":
        with torch.inference_mode():
            widgets["clip"] = tiny_sdxl_clip()
    elif case == "batch_too_large":
        widgets["batch_size"] = 9
    elif case == "all_rates_zero":
        learning_rates = rates(comfy, learning_rate=0.0, text_encoder_lr=0.0)
    elif case == "optimizer_missing":
        # Prodigy needs prodigyopt; 8-bit optimizers need bitsandbytes and CUDA. One of them is refused here.
        import importlib.util
        widgets["optimizer"] = "Prodigy" if importlib.util.find_spec("prodigyopt") is None else "AdamW8bit"
    elif case == "bad_lora_name":
        widgets["lora_name"] = "../../escape"
    elif case == "warmup_too_long":
        lr_schedule = schedule(comfy, scheduler="constant_with_warmup", warmup=50.0, warmup_unit="steps")
    elif case == "empty_dataset":
        dataset = dataclasses.replace(dataset, samples=[])
    loras_before = sorted((comfy.models_dir / "loras").rglob("*"))
    with pytest.raises(ValueError, match=expected):
        train(comfy, loaded, dataset, learning_rates, lr_schedule, steps=4, lora_name=widgets.pop("lora_name", "bad"),
              **widgets)
    assert sorted((comfy.models_dir / "loras").rglob("*")) == loras_before


@pytest.mark.compat
def test_models_are_restored_when_training_fails_midway(comfy, loaded, dataset, probe):
    latent, context = probe
    model, clip, _ = loaded
    before_unet, before_clip = unet_outputs(model, latent, context), clip_outputs(clip)
    flags_before = [parameter.requires_grad for parameter in model.model.diffusion_model.parameters()]
    broken = dataclasses.replace(dataset, images=None)       # fails when the first batch is loaded
    with pytest.raises(Exception, match="lost its images"):
        train(comfy, loaded, broken, rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-4), schedule(comfy),
              steps=2, gradient_checkpointing=True, lora_name="broken")
    assert torch.equal(unet_outputs(model, latent, context), before_unet)
    assert torch.equal(clip_outputs(clip), before_clip)
    unet = model.model.diffusion_model
    assert not any("lora_" in name or "base_layer" in name for name, _ in unet.named_parameters())
    assert [parameter.requires_grad for parameter in unet.parameters()] == flags_before
    assert not any("forward" in vars(block) for block in unet.input_blocks)




@pytest.mark.compat
def test_full_graph_dataset_train_ksampler_save(comfy, checkpoint):
    from PIL import Image

    folder = comfy.input_dir / "graph_set"
    folder.mkdir(exist_ok=True)
    for index, image in enumerate(pattern_images()):
        Image.fromarray((image.numpy() * 255).astype("uint8")).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(CAPTIONS[index])
    graph = sampling_graph(checkpoint)
    graph["10"] = {"class_type": "LoRALabDataset", "inputs": {**comfy.widget_defaults("LoRALabDataset"),
                                                             "folder": str(folder), "resolution": 64,
                                                             "bucketing": False}}
    graph["11"] = {"class_type": "LoRALabLRSchedule", "inputs": comfy.widget_defaults("LoRALabLRSchedule")}
    graph["12"] = {"class_type": "LoRALabLearningRates", "inputs": comfy.widget_defaults("LoRALabLearningRates")}
    graph["13"] = {"class_type": "LoRALabTrain", "inputs": {
        **comfy.widget_defaults("LoRALabTrain"), "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
        "dataset": ["10", 0], "learning_rates": ["12", 0], "lr_schedule": ["11", 0],
        "steps": 3, "rank": 4, "alpha": 4.0, "precision": "fp32", "lora_name": "graph_lora"}}
    graph["2"]["inputs"]["clip"] = ["13", 1]
    graph["3"]["inputs"]["clip"] = ["13", 1]
    graph["5"]["inputs"]["model"] = ["13", 0]
    graph["7"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "lora_lab_graph"}}
    results = comfy.run(graph)
    assert results["13"]["outputs"][2][0] == "graph_lora.safetensors"
    assert (comfy.models_dir / "loras" / "graph_lora.safetensors").is_file()
    assert list(comfy.output_dir.glob("lora_lab_graph_*.png"))
    assert len((comfy.output_dir / "lora_lab" / "graph_lora" / "log.jsonl").read_text().splitlines()) == 3


@pytest.mark.compat
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_file_through_stock_loader_equals_the_model_as_trained(comfy, loaded, dataset, probe, use_dora):
    """What ComfyUI's loader makes of the file = the peft-injected model at the end of training
    (tolerance 1e-4 absolute on outputs of magnitude ~1: fp32 file, different summation order)."""
    latent, context = probe
    model, clip, vae = loaded
    pack = comfy.pack
    bridge = pack.nodes.comfy
    run = pack.training.run
    settings = run.train_settings.TrainSettings(steps=3, batch_size=2, rank=4, alpha=8.0, target="attention_ff",
                                                use_dora=use_dora, precision="fp32", gradient_checkpointing=False,
                                                lora_name=f"as_trained_{'dora' if use_dora else 'lora'}",
                                                weight_decay=0.0, save_precision="fp32")
    in_training: list[torch.Tensor] = []

    def on_step(record, total):
        if record.step == total - 1:
            with torch.no_grad():
                sampling = model.get_model_object("model_sampling")
                sigma = sampling.sigmas[list(FIXED_TIMESTEPS)].float()
                in_training.append(model.model.apply_model(latent.repeat(4, 1, 1, 1), sigma,
                                                           c_crossattn=context.repeat(4, 1, 1)).clone())

    with torch.inference_mode():
        family = bridge.check_compatible(model, clip, vae)
        access = bridge.model_access(model, clip, vae, family)
        result = run.trainer.train_lora(settings, access, dataset,
                                        rates(comfy, learning_rate=5e-3, text_encoder_lr=0.0),
                                        schedule(comfy), bridge.loras_dir(), bridge.output_dir(),
                                        run.host.TrainCallbacks(on_step=on_step))
    tensors, _ = read_lora(comfy, result.path.name)
    assert any(key.endswith(".dora_scale") for key in tensors) == use_dora
    stock_model, _, log_lines = stock_lora_loader(comfy, loaded, result.path.name)
    assert not [line for line in log_lines if "lora key not loaded" in line], log_lines
    from_file = unet_outputs(stock_model, latent, context)
    assert (from_file - unet_outputs(model, latent, context)).abs().max() > 1e-3
    torch.testing.assert_close(from_file, in_training[0], rtol=0, atol=1e-4)


class InterruptingDataset:
    """Wraps a real dataset; presses ComfyUI's own interrupt once `after` captions were drawn."""

    def __init__(self, dataset, after: int) -> None:
        self._dataset, self._after, self._calls = dataset, after, 0

    def __getattr__(self, name):
        return getattr(self._dataset, name)

    def caption_for_step(self, index, rng):
        import comfy.model_management as model_management

        self._calls += 1
        if self._calls == self._after:
            model_management.interrupt_current_processing(True)
        return self._dataset.caption_for_step(index, rng)


@pytest.mark.compat
def test_cancel_saves_interrupted_lora_and_restores_models(comfy, loaded, dataset, probe):
    import comfy.model_management as model_management

    latent, context = probe
    model, clip, _ = loaded
    before_unet, before_clip = unet_outputs(model, latent, context), clip_outputs(clip)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            train(comfy, loaded, InterruptingDataset(dataset, after=5), rates(comfy, learning_rate=1e-3),
                  schedule(comfy), steps=50, batch_size=2, lora_name="cancelled")
    finally:
        model_management.interrupt_current_processing(False)
    lines = (comfy.output_dir / "lora_lab" / "cancelled" / "log.jsonl").read_text().splitlines()
    assert 1 <= len(lines) <= 3                                   # stopped within a step of the press
    assert not (comfy.models_dir / "loras" / "cancelled.safetensors").exists()
    _, _, log_lines = stock_lora_loader(comfy, loaded, "cancelled_interrupted.safetensors")
    assert not [line for line in log_lines if "lora key not loaded" in line]
    assert torch.equal(unet_outputs(model, latent, context), before_unet)
    assert torch.equal(clip_outputs(clip), before_clip)


def test_lora_key_capture_sees_unmatched_keys(comfy, loaded, dataset):
    """Guards the 'no lora key not loaded' assertions above: a stray key is reported."""
    import safetensors.torch

    tensors, metadata = read_lora(comfy, "round_trip.safetensors") if (
        comfy.models_dir / "loras" / "round_trip.safetensors").exists() else ({}, {})
    tensors = dict(tensors) or {"lora_te_x.alpha": torch.tensor(1.0)}
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 8)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(8, 4)
    safetensors.torch.save_file(tensors, str(comfy.models_dir / "loras" / "stray_key.safetensors"))
    _, _, log_lines = stock_lora_loader(comfy, loaded, "stray_key.safetensors")
    assert [line for line in log_lines if "lora key not loaded" in line and "no_such_layer" in line]


# --------------------------------------------------------------------------------------------
# SDXL-shaped objects built in code (ComfyUI's own classes, tiny widths)
# --------------------------------------------------------------------------------------------

SMALL_TEXT = {"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2}


def small_sdxl_unet_and_clip(config_class: str, size_embeddings: int):
    """(MODEL, CLIP): a UNet of ComfyUI's `config_class` (supported_models: SDXL, or SDXLRefiner) at small
    widths, whose `y` holds the pooled text plus `size_embeddings` size/score embeddings of 256, and a
    real SDXL CLIP (clip_l + clip_g) at small widths; seeded weights."""
    import comfy.model_management as model_management
    import comfy.model_patcher
    import comfy.supported_models
    from lora_lab_devtools.tiny_checkpoint import _initialise

    unet_config = {"image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 64,
                   "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
                   "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 1, 1],
                   "use_linear_in_transformer": True, "context_dim": 128,
                   "adm_in_channels": 64 + size_embeddings * 256,
                   "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
                   "use_temporal_attention": False, "use_temporal_resblock": False}
    with torch.inference_mode():
        config = getattr(comfy.supported_models, config_class)(unet_config)
        config.set_inference_dtype(torch.float32, None)
        base_model = config.get_model({})
        generator = torch.Generator().manual_seed(3)
        _initialise(base_model.diffusion_model, generator)
        model = comfy.model_patcher.ModelPatcher(base_model, load_device=model_management.get_torch_device(),
                                                 offload_device=model_management.unet_offload_device())
        clip = tiny_sdxl_clip()
        _initialise(clip.cond_stage_model, generator)
    return model, clip


@pytest.fixture(scope="module")
def tiny_sdxl(comfy, loaded):
    """(MODEL, CLIP, VAE): ComfyUI's SDXL model class (y conditioning, ldm key names) and a real SDXL CLIP
    (clip_l + clip_g) at small widths, seeded weights; the VAE is the tiny checkpoint's TAESD."""
    return (*small_sdxl_unet_and_clip("SDXL", 6), loaded[2])


@pytest.mark.compat
def test_sdxl_trains_unet_and_both_text_encoders_with_their_own_rates(comfy, tiny_sdxl, dataset):
    model, clip, _ = tiny_sdxl
    with torch.inference_mode():
        tokens = clip.tokenize("a red square on black")
        before_l = clip.encode_from_tokens(tokens).clone()
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-3, text_encoder_2_lr=4e-4)
    trained_model, trained_clip, lora_name, _ = train(comfy, tiny_sdxl, dataset, learning_rates, schedule(comfy),
                                                      steps=2, model=model, clip=clip, lora_name="tiny_sdxl")
    tensors, metadata = read_lora(comfy, lora_name)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert any(key.startswith("lora_unet_input_blocks_") for key in tensors)
    assert any(key.startswith("lora_unet_output_blocks_") for key in tensors)
    assert not any(key.startswith("lora_unet_down_blocks") for key in tensors)
    assert any(key.startswith("lora_te1_text_model_encoder_layers_") for key in tensors)
    assert any(key.startswith("lora_te2_text_model_encoder_layers_") for key in tensors)
    lines = [json.loads(line) for line in
             (comfy.output_dir / "lora_lab" / "tiny_sdxl" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["lr"] == pytest.approx({"unet": 1e-3, "text_encoder": 1e-3, "text_encoder_2": 4e-4})
    lora_path = comfy.models_dir / "loras" / lora_name
    handler = LoraKeyLog()
    logging.getLogger().addHandler(handler)
    try:
        import comfy.sd as comfy_sd
        import comfy.utils as comfy_utils

        with torch.inference_mode():
            lora = comfy_utils.load_torch_file(str(lora_path), safe_load=True)
            comfy_sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [line for line in handler.lines if "lora key not loaded" in line], handler.lines
    with torch.inference_mode():
        after = trained_clip.encode_from_tokens(trained_clip.tokenize("a red square on black"))
        assert torch.equal(clip.encode_from_tokens(tokens), before_l)
    assert (after[..., :64] - before_l[..., :64]).abs().max() > 1e-5     # clip_l part changed
    assert (after[..., 64:] - before_l[..., 64:]).abs().max() > 1e-5     # clip_g part changed


def test_diverging_loss_stops_with_a_clear_error_and_keeps_the_last_good_weights(comfy, loaded, dataset, probe):
    latent, context = probe
    model, clip, _ = loaded
    before_unet = unet_outputs(model, latent, context)
    with pytest.raises(RuntimeError, match=r"the (loss|gradient norm) became (nan|inf) at step [0-9].*learning rate") as caught:
        # The highest rates the widgets allow: 10, and x1000 for the B matrices (LoRA+).
        train(comfy, loaded, dataset, rates(comfy, learning_rate=10.0, lora_plus_ratio=1000.0, text_encoder_lr=0.0),
              schedule(comfy),
              steps=30, optimizer="SGD", max_grad_norm=0.0, lora_name="diverged")
    assert "diverged_interrupted" in str(caught.value)
    tensors, _ = read_lora(comfy, "diverged_interrupted.safetensors")
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
    assert torch.equal(unet_outputs(model, latent, context), before_unet)


def test_diffusers_kohya_conversion_takes_every_key(comfy, loaded, dataset):
    """diffusers' own kohya converter leaves no key behind, and each converted UNet name is a real
    module of the equivalent diffusers UNet (SD1.5 layout, the tiny checkpoint's widths)."""
    import re

    from diffusers import UNet2DConditionModel
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    _, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-4, text_encoder_lr=1e-4),
                               schedule(comfy), steps=1, target="attention_ff", lora_name="for_diffusers")
    tensors, _ = read_lora(comfy, lora_name)
    converted, alphas = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    assert len(converted) == len([key for key in tensors if not key.endswith(".alpha")]) and alphas
    unet = UNet2DConditionModel(sample_size=8, block_out_channels=(320,), layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                cross_attention_dim=768, attention_head_dim=8)
    module_names = {name for name, _ in unet.named_modules()}
    for key in converted:
        if not key.startswith("unet.") or ".down." not in key:
            continue
        name = key[len("unet."):].replace(".processor", "")
        name = re.sub(r"(_lora|\.lora)\.down\.weight$", "", name).replace("to_out", "to_out.0")
        assert name in module_names, (key, name)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_and_writes_fp16_weights(comfy, loaded, dataset, precision):
    _, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-4),
                               schedule(comfy), steps=1, target="attention", precision=precision,
                               lora_name=f"mixed_{precision}")
    tensors, metadata = read_lora(comfy, lora_name)
    assert all(tensor.dtype == torch.float16 for tensor in tensors.values())
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
    assert metadata["ss_mixed_precision"] == precision


def test_intermediate_saves_and_disk_latent_cache(comfy, loaded, dataset):
    cache = comfy.output_dir / "lora_lab" / ".latent_cache"
    _, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                               schedule(comfy), steps=3, save_every_n_steps=1, cache_latents_to_disk=True,
                               gradient_accumulation=2, min_snr_gamma=5.0, noise_offset=0.05,
                               lora_name="styles/periodic")
    loras = comfy.models_dir / "loras" / "styles"
    assert lora_name == "styles/periodic.safetensors"
    assert sorted(path.name for path in loras.glob("periodic*")) == [
        "periodic.safetensors", "periodic_step00001.safetensors", "periodic_step00002.safetensors"]
    assert (comfy.output_dir / "lora_lab" / "styles" / "periodic" / "log.jsonl").is_file()
    cached = sorted(cache.glob("*.pt"))
    assert len(cached) == 4                          # 4 images, centre crop, no flip: one latent each
    stamps = [path.stat().st_mtime_ns for path in cached]
    train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0), schedule(comfy),
          steps=2, cache_latents_to_disk=True, lora_name="styles/periodic")
    assert [path.stat().st_mtime_ns for path in sorted(cache.glob("*.pt"))] == stamps   # reused, not rewritten


@pytest.fixture()
def unload_models_after():
    """Big models (the SDXL-family checkpoint, ~10 GB of host memory while it trains) leave ComfyUI's
    loaded-model list after the test, so the next tier's server has the memory."""
    yield
    import gc

    import comfy.model_management as model_management
    model_management.unload_all_models()
    gc.collect()
    model_management.soft_empty_cache()


@pytest.mark.slow
def test_vega_sdxl_checkpoint_trains_both_text_encoders_with_their_own_rates(comfy, dataset, unload_models_after):
    """A generated Segmind-Vega-shaped SDXL checkpoint through CheckpointLoaderSimple (~3 GB, ~10 GB RAM)."""
    from lora_lab_devtools.tiny_checkpoint import ensure_vega_sdxl

    link = comfy.models_dir / "checkpoints" / "lora_lab_vega_sdxl.safetensors"
    if not link.exists():
        link.symlink_to(ensure_vega_sdxl())
    with torch.inference_mode():
        vega = comfy.node_class("CheckpointLoaderSimple")().load_checkpoint(link.name)[:3]
    model, clip, _ = vega
    assert type(model.model.model_config).__name__ == "Segmind_Vega"
    with torch.inference_mode():
        before = clip.encode_from_tokens(clip.tokenize(CAPTIONS[0])).clone()
    learning_rates = rates(comfy, learning_rate=1e-4, text_encoder_lr=1e-3, text_encoder_2_lr=2e-4)
    _, trained_clip, lora_name, _ = train(comfy, vega, dataset, learning_rates, schedule(comfy), steps=2,
                                          batch_size=1, target="attention", model=model, clip=clip,
                                          lora_name="vega")
    tensors, metadata = read_lora(comfy, lora_name)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    prefixes = {key.split("_text_model")[0] for key in tensors if key.startswith("lora_te")}
    assert prefixes == {"lora_te1", "lora_te2"}
    assert any(key.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for key in tensors)
    _, _, log_lines = stock_lora_loader(comfy, vega, lora_name)
    assert not [line for line in log_lines if "lora key not loaded" in line], log_lines[:5]
    lines = [json.loads(line) for line in (comfy.output_dir / "lora_lab" / "vega" / "log.jsonl").read_text().splitlines()]
    assert lines[0]["lr"] == pytest.approx({"unet": 1e-4, "text_encoder": 1e-3, "text_encoder_2": 2e-4})
    with torch.inference_mode():
        after = trained_clip.encode_from_tokens(trained_clip.tokenize(CAPTIONS[0]))
        assert torch.equal(clip.encode_from_tokens(clip.tokenize(CAPTIONS[0])), before)
    assert (after[..., :768] - before[..., :768]).abs().max() > 0        # CLIP-L part changed
    assert (after[..., 768:] - before[..., 768:]).abs().max() > 0        # CLIP-G part changed


@pytest.mark.compat
def test_sample_previews_draw_with_the_model_being_trained(comfy, loaded, dataset, probe):
    """sample_prompt + sample_every_n_steps: PNGs per interval in the run folder, drawn with the LoRA in place
    (they change as it trains), and the input MODEL is still restored afterwards."""
    import numpy
    from PIL import Image

    before = unet_outputs(loaded[0], *probe)
    _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=5e-3, text_encoder_lr=0), schedule(comfy),
                          steps=4, lora_name="sampled", sample_every_n_steps=2,
                          sample_prompt="a red square on black --w 64 --h 48 --s 4 --l 5\n# a comment\n"
                                        "green stripes --n blurry --d 3 --s 3")
    samples = comfy.output_dir / "lora_lab" / Path(name).stem / "samples"
    assert sorted(path.name for path in samples.iterdir()) == [
        "step00002_0.png", "step00002_1.png", "step00004_0.png", "step00004_1.png"]
    with Image.open(samples / "step00002_0.png") as first, Image.open(samples / "step00004_0.png") as last:
        assert first.size == (64, 48) and last.size == (64, 48)
        difference = (torch.from_numpy(numpy.asarray(first.convert("L"), dtype=numpy.float32))
                      - torch.from_numpy(numpy.asarray(last.convert("L"), dtype=numpy.float32)))
        assert difference.abs().mean() > 0.5  # the LoRA changed between step 2 and 4 (rate 5e-3)
    with Image.open(samples / "step00002_1.png") as second:
        assert second.size == (64, 64)  # dataset resolution when --w/--h are not given
    assert torch.equal(unet_outputs(loaded[0], *probe), before)


def test_bad_sample_prompt_is_refused_before_training(comfy, loaded, dataset):
    from lora_lab_devtools.inprocess import PromptFailed  # noqa: F401  (same message path as the graph)

    with pytest.raises(ValueError, match=r"sample_prompt line 1: '--q' is not a sample option"):
        train(comfy, loaded, dataset, rates(comfy), schedule(comfy), sample_prompt="a cat --q 3",
              sample_every_n_steps=1, lora_name="never_written")
    assert not list((comfy.models_dir / "loras").glob("never_written*"))


@pytest.mark.compat
def test_vae_and_frozen_text_encoder_leave_the_device_once_their_outputs_are_cached(comfy, loaded, dataset):
    """Latents and frozen-TE captions are encoded up front; then ComfyUI's model management no longer
    holds the VAE or the frozen CLIP (on a GPU: their VRAM is free for training)."""
    import importlib

    model_management = importlib.import_module("comfy.model_management")  # `comfy` is the fixture here
    model, clip, vae = loaded
    with torch.inference_mode():
        vae.encode(torch.zeros(1, 64, 64, 3))  # the VAE is now loaded
        model_management.load_models_gpu([clip.patcher])

    def holds(patcher) -> bool:
        return any(entry.model is patcher for entry in model_management.current_loaded_models)

    assert holds(vae.patcher) and holds(clip.patcher)
    train(comfy, loaded, dataset, rates(comfy, text_encoder_lr=0), schedule(comfy), steps=2, lora_name="released")
    assert not holds(vae.patcher) and not holds(clip.patcher)
    with torch.inference_mode():  # and they come back by themselves when used again
        assert torch.isfinite(vae.encode(torch.zeros(1, 64, 64, 3))).all()
    assert holds(vae.patcher)
