"""Flow-matching families (Flux.1 dev/schnell, SD3, Z-Image) in a real ComfyUI: tiny random models
that ComfyUI's own detection recognises (lora_lab_devtools/flow_fixtures.py), loaded through the
stock loaders (UNETLoader, VAELoader, CheckpointLoaderSimple), trained a few steps on the CPU.

Text encoders: SD3's CLIP-L and CLIP-G are real-size and load with the checkpoint. Flux's T5-XXL and
Z-Image's Qwen3 are far too big for this machine, so their CLIP objects are ComfyUI's own encoder
classes with reduced configurations (flow_fixtures.reduced_clip: ComfyUI's tokenizers and encoder
code, smaller widths and depths, random weights). That covers the conditioning path (tokenizer,
masks, pooled vectors, the model's use of them); it does not cover the real encoders' size or any
learned behaviour. Flux's CLIP-L is the real configuration.

Each family checks: the loss at fixed noise and sigma falls (Flux-dev), the file loads through the
stock LoraLoader with no unmatched key and gives what the node returned, diffusers' loader for the
family takes every key, and the input MODEL/CLIP are untouched.
"""
from __future__ import annotations

import json
import logging
import math
import os

import pytest
import torch

from lora_lab_devtools import flow_fixtures
from lora_lab_devtools.tiny_checkpoint import link_checkpoint

from .test_train import pattern_images, rates, read_lora, schedule, stock_lora_loader, train

CAPTIONS = ["a red square on black", "a blue circle on white", "green stripes", "a yellow cross"]
FIXED_SIGMAS = (0.2, 0.5, 0.8)


def link(comfy, folder: str, source) -> str:
    return link_checkpoint(source, comfy.models_dir / folder)


@pytest.fixture(autouse=True)
def release_models_after_each_test():
    """The flow models are large (Flux at its real width, ~2 GB in fp32 each): out of ComfyUI's
    loaded-model list after each test, so what a test loaded for itself is freed before the next one
    trains (the module's peak stays one model's, not the sum: it was 20 GB of a 24 GB machine)."""
    yield
    release_all_models()


def resident_mib() -> int | None:
    """This process's resident memory (Linux), or None."""
    try:
        text = open("/proc/self/status", encoding="ascii").read()
    except OSError:
        return None
    return int(text.split("VmRSS:")[1].split()[0]) // 1024


def release_all_models() -> None:
    import gc

    from comfy import model_management
    model_management.unload_all_models()
    gc.collect()
    model_management.soft_empty_cache()


@pytest.fixture(scope="module")
def dataset(comfy):
    module = comfy.pack.training.data.dataset
    return module.build_image_dataset(pattern_images(), CAPTIONS, module.DatasetOptions(resolution=64, bucketing=False))


def load_dit(comfy, name: str, kind: str, dtype=None):
    """(MODEL, CLIP, VAE): UNETLoader + the reduced CLIP + VAELoader, as a Flux/Z-Image graph has them."""
    from comfy import sd as comfy_sd, utils as comfy_utils

    unet = link(comfy, "diffusion_models", flow_fixtures.ensure_diffusion_model(name))
    vae_name = link(comfy, "vae", flow_fixtures.ensure_vae16())
    weights = comfy_utils.load_torch_file(str(flow_fixtures.ensure_text_encoder(kind)))
    with torch.inference_mode():
        if dtype is None:
            model = comfy.node_class("UNETLoader")().load_unet(unet, "default")[0]
        else:   # the base in that dtype, as on a GPU
            model = comfy_sd.load_diffusion_model(str(comfy.models_dir / "diffusion_models" / unet),
                                                  model_options={"dtype": dtype})
        vae = comfy.node_class("VAELoader")().load_vae(vae_name)[0]
        clip = flow_fixtures.reduced_clip(kind, weights)
    return model, clip, vae


@pytest.fixture()   # one test each: freed when it ends
def flux_dev(comfy):
    return load_dit(comfy, "flux_dev", "flux")


@pytest.fixture()
def flux_schnell(comfy):
    return load_dit(comfy, "flux_schnell", "flux")


def conditioning(model, clip, caption: str, noise: torch.Tensor) -> dict:
    """The model's conditioning for a caption, built by ComfyUI's own extra_conds (not the pack's)."""
    output = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
    cond = output.pop("cond")
    extras = model.model.extra_conds(cross_attn=cond, pooled_output=output.get("pooled_output"), guidance=1.0,
                                     attention_mask=output.get("attention_mask"), noise=noise, device="cpu")
    return {key: value.cond for key, value in extras.items()}


def fixed_flow_loss(model, clip, vae, images: torch.Tensor) -> float:
    """Flow-matching loss (velocity eps - x0) at fixed noise and fixed sigmas, through apply_model."""
    from comfy import model_management

    total = 0.0
    with torch.inference_mode():
        model_management.load_models_gpu([model], force_full_load=True)
        x0 = model.model.process_latent_in(vae.encode(images)).float()
        generator = torch.Generator().manual_seed(11)
        for index in range(x0.shape[0]):
            sample = x0[index:index + 1]
            cond = conditioning(model, clip, CAPTIONS[index], sample)
            for sigma in FIXED_SIGMAS:
                noise = torch.randn(sample.shape, generator=generator)
                xt = (1 - sigma) * sample + sigma * noise
                denoised = model.model.apply_model(xt, torch.tensor([sigma]), **cond).float()
                total += float((((xt - denoised) / sigma - (noise - sample)) ** 2).mean())
    return total / (x0.shape[0] * len(FIXED_SIGMAS))


def state_bytes(*modules) -> str:
    """A digest of every tensor's bytes, in order (a NaN-safe exact comparison that holds no copy)."""
    import hashlib

    digest = hashlib.sha256()
    for module in modules:
        for name, tensor in module.state_dict().items():
            digest.update(name.encode())
            if tensor.numel():
                digest.update(tensor.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def no_unmatched(lines: list[str]) -> bool:
    return not [line for line in lines if "lora key not loaded" in line]


def dit_outputs(model, clip, vae) -> torch.Tensor:
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        x0 = model.model.process_latent_in(vae.encode(pattern_images(1))).float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        cond = conditioning(model, clip, CAPTIONS[0], x0)
        return model.model.apply_model(0.5 * x0 + 0.5 * noise, torch.tensor([0.5]), **cond).float().clone()


def test_flux_dev_trains_and_its_file_loads_in_comfyui_and_diffusers(comfy, flux_dev, dataset):
    from diffusers import FluxPipeline

    model, clip, vae = flux_dev
    images = pattern_images(2)
    base_bytes = state_bytes(model.model.diffusion_model, clip.cond_stage_model)
    before = fixed_flow_loss(model, clip, vae, images)
    before_outputs = dit_outputs(model, clip, vae)

    trained_model, trained_clip, lora_name, _ = train(
        comfy, flux_dev, dataset, rates(comfy, learning_rate=2e-3), schedule(comfy), steps=5, batch_size=2,
        target="attention_ff", lora_name="flux_dev_lora", save_precision="fp32")
    # The input untouched (checked before anything loads the trained clone, whose patches ComfyUI applies
    # to the module the clones share).
    assert state_bytes(model.model.diffusion_model, clip.cond_stage_model) == base_bytes

    after = fixed_flow_loss(trained_model, clip, vae, images)
    assert after < 0.9 * before, (before, after)

    tensors, metadata = read_lora(comfy, lora_name)
    stems = {key.split(".")[0] for key in tensors}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in stems and "lora_unet_single_blocks_0_linear1" in stems
    assert "lora_unet_double_blocks_0_txt_mlp_2" in stems
    assert all(stem.startswith("lora_unet_") for stem in stems)    # Flux's encoders stay frozen
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    assert metadata["ss_timestep_sampling"] == "flux_shift" and metadata["ss_guidance_scale"] == "1.0"
    assert "modelspec.prediction_type" not in metadata

    stock_model, _, lines = stock_lora_loader(comfy, flux_dev, lora_name)
    assert no_unmatched(lines), lines
    returned = dit_outputs(trained_model, clip, vae)
    torch.testing.assert_close(returned, dit_outputs(stock_model, clip, vae), rtol=0, atol=1e-4)
    assert (returned - before_outputs).abs().max() > 1e-4

    # diffusers: its kohya Flux converter raises on any key it cannot place; every module comes out.
    state_dict = FluxPipeline.lora_state_dict(str(comfy.models_dir / "loras" / lora_name))
    converted = [key for key in state_dict if key.endswith("lora_A.weight")]
    assert converted and all(key.startswith("transformer.") for key in state_dict)
    # fused layers are split (qkv -> to_q/k/v; a single block's linear1 -> q/k/v/mlp): at least one each
    assert len(converted) >= len([key for key in tensors if key.endswith("lora_down.weight")])


def test_flux_schnell_trains_without_guidance(comfy, flux_schnell, dataset):
    _, _, lora_name, _ = train(comfy, flux_schnell, dataset, rates(comfy, learning_rate=1e-3), schedule(comfy),
                               steps=1, batch_size=1, target="attention", lora_name="schnell")
    tensors, metadata = read_lora(comfy, lora_name)
    assert metadata["modelspec.architecture"] == "flux-1-schnell/lora"
    assert metadata["ss_timestep_sampling"] == "flux_shift" and "ss_guidance_scale" not in metadata
    assert {key.split(".")[0] for key in tensors} >= {"lora_unet_double_blocks_0_img_attn_proj"}
    assert not any("mlp" in key for key in tensors)   # target attention: no MLP layers
    _, _, lines = stock_lora_loader(comfy, flux_schnell, lora_name)
    assert no_unmatched(lines), lines


@pytest.mark.parametrize("sampling", ["uniform", "logit_normal", "shift"])
def test_each_timestep_sampling_trains_and_is_recorded(comfy, sd3, dataset, sampling):
    """Every timestep_sampling choice trains for real (on the SD3 fixture, frozen CLIPs: cheap), with the
    stable validation loss on a flow model (fixed sigmas) logged."""
    _, _, lora_name, _ = train(comfy, sd3, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                               schedule(comfy), steps=2, batch_size=1, target="attention",
                               lora_name=f"sd3_{sampling}", timestep_sampling=sampling, timestep_shift=2.0,
                               validate_every_n_steps=2)
    _, metadata = read_lora(comfy, lora_name)
    assert metadata["ss_timestep_sampling"] == sampling
    assert metadata.get("ss_discrete_flow_shift") == ("2.0" if sampling == "shift" else None)
    log = [json.loads(line) for line in
           (comfy.output_dir / "lora_lab" / f"sd3_{sampling}" / "log.jsonl").read_text().splitlines()]
    assert "val_loss" not in log[0] and math.isfinite(log[1]["val_loss"]) and log[1]["val_loss"] > 0


def load_sd3(comfy, dtype=None):
    """(MODEL, CLIP, VAE) of the tiny SD3 checkpoint: the stock CheckpointLoaderSimple, or with `dtype`
    ComfyUI's checkpoint loading with the diffusion model in that dtype (as on a GPU)."""
    from comfy import sd as comfy_sd

    name = link(comfy, "checkpoints", flow_fixtures.ensure_sd3_checkpoint())
    with torch.inference_mode():
        if dtype is None:
            return comfy.node_class("CheckpointLoaderSimple")().load_checkpoint(name)[:3]
        return comfy_sd.load_checkpoint_guess_config(str(comfy.models_dir / "checkpoints" / name), output_vae=True,
                                                     output_clip=True, model_options={"dtype": dtype})[:3]


@pytest.fixture(scope="module")
def sd3(comfy):
    return load_sd3(comfy)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_dit_dora_trains_on_a_base_loaded_in_that_dtype(comfy, dataset, precision):
    """The DiT base in bf16/fp16 (as on a GPU), DoRA on its blocks, autocast in that dtype, gradient
    checkpointing: every saved tensor finite, the B matrices moved, the file loads with no unmatched key.
    (On the SD3 fixture: its blocks are small, so half precision stays affordable on the CPU.)"""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    loaded = load_sd3(comfy, dtype)
    assert loaded[0].model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == dtype
    _, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                               schedule(comfy), steps=2, batch_size=1, use_dora=True, precision=precision,
                               gradient_checkpointing=True, target="kohya_default", lora_name=f"dit_dora_{precision}")
    tensors, _ = read_lora(comfy, lora_name)
    assert any(key.endswith("norm1.linear.dora_scale") for key in tensors)   # kohya_default: adaLN too
    assert all(torch.isfinite(tensor.float()).all() for tensor in tensors.values())
    assert any(float(tensor.float().abs().max()) > 0 for key, tensor in tensors.items() if "lora_B" in key)
    _, _, lines = stock_lora_loader(comfy, loaded, lora_name)
    assert no_unmatched(lines), lines


def test_dit_trains_on_an_fp8_base(comfy, dataset):
    """fp8 weights (UNETLoader's fp8_e4m3fn, how Flux is often loaded): ComfyUI casts them per layer, the
    LoRA trains in the compute precision beside them and loads back with no unmatched key."""
    loaded = load_sd3(comfy, torch.float8_e4m3fn)
    assert loaded[0].model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.float8_e4m3fn
    _, _, lora_name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                               schedule(comfy), steps=2, batch_size=1, precision="bf16", target="attention_ff",
                               lora_name="dit_fp8")
    tensors, _ = read_lora(comfy, lora_name)
    assert all(torch.isfinite(tensor.float()).all() for tensor in tensors.values())
    assert any(float(tensor.float().abs().max()) > 0 for key, tensor in tensors.items() if "lora_B" in key)
    _, _, lines = stock_lora_loader(comfy, loaded, lora_name)
    assert no_unmatched(lines), lines


def test_flow_model_previews_and_lr_finder(comfy, sd3, dataset):
    """Previews draw with the trained model at the family's settings (SD3: cfg 5 unless --l), and the
    LR Finder sweeps a flow model (its validation at fixed sigmas) and suggests a rate."""
    from .test_lr_finder import find

    _, _, lora_name, _ = train(comfy, sd3, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=0.0),
                               schedule(comfy), steps=2, batch_size=1, lora_name="sd3_previews",
                               sample_prompt="a red square on black --w 64 --h 64 --s 3", sample_every_n_steps=2)
    samples = comfy.output_dir / "lora_lab" / "sd3_previews" / "samples"
    assert [path.name for path in samples.iterdir()] == ["step00002_0.png"]
    _, suggested, _, summary = find(comfy, sd3, dataset, steps=10, batch_size=1, min_lr=1e-5, max_lr=1e-2)
    assert 1e-5 <= suggested <= 1e-2 and "Suggested rate" in summary


@pytest.mark.parametrize("widget, value", [("min_snr_gamma", 5.0), ("noise_offset", 0.05)])
def test_flow_models_refuse_min_snr_and_noise_offset(comfy, sd3, dataset, widget, value):
    with pytest.raises(ValueError, match=f"{widget} = .* does not apply to SD3 / SD3.5.*Set {widget} to 0"):
        train(comfy, sd3, dataset, rates(comfy), schedule(comfy), steps=1, batch_size=1, **{widget: value})


def test_sd3_trains_transformer_and_both_clips_in_diffusers_keys(comfy, sd3, dataset):
    from diffusers import SD3Transformer2DModel
    from diffusers.loaders import SD3LoraLoaderMixin

    loaded = sd3
    model, clip, vae = loaded
    assert type(model.model).__name__ == "SD3" and clip.cond_stage_model.t5xxl is None
    base_bytes = state_bytes(model.model.diffusion_model, clip.cond_stage_model)
    before_outputs = dit_outputs(model, clip, vae)

    resident_before = resident_mib()
    trained_model, trained_clip, lora_name, _ = train(
        comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, text_encoder_lr=5e-4, text_encoder_2_lr=2e-4),
        schedule(comfy), steps=2, batch_size=2, target="attention_ff", lora_name="sd3_lora", save_precision="fp32")
    # Memory given back: the ~8 GB the run used (CLIP-G trained in fp32) leaves the process when the node
    # returns (without it, the allocator kept it: +8 GB measured after this very run).
    if resident_before is not None:
        assert resident_mib() - resident_before < 1500, (resident_before, resident_mib())

    assert state_bytes(model.model.diffusion_model, clip.cond_stage_model) == base_bytes
    tensors, metadata = read_lora(comfy, lora_name)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in tensors      # the fused qkv, split
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in tensors   # the context stream
    assert any(key.startswith("text_encoder.text_model.encoder.layers.0.self_attn") for key in tensors)
    assert any(key.startswith("text_encoder_2.text_model.encoder.layers.0.mlp") for key in tensors)
    assert not any(key.endswith(".alpha") for key in tensors)   # alpha / rank folded into lora_B
    assert metadata["ss_base_model_version"] == "sd3" and metadata["ss_timestep_sampling"] == "logit_normal"
    assert float(metadata["ss_text_encoder_2_lr"]) == 2e-4

    stock_model, stock_clip, lines = stock_lora_loader(comfy, loaded, lora_name)
    assert no_unmatched(lines), lines
    returned = dit_outputs(trained_model, trained_clip, vae)
    torch.testing.assert_close(returned, dit_outputs(stock_model, stock_clip, vae), rtol=0, atol=1e-4)
    assert (returned - before_outputs).abs().max() > 1e-4

    # diffusers: the transformer keys load into the equivalent diffusers SD3 transformer with none left over.
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=2,
        joint_attention_dim=4096, caption_projection_dim=128, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=32, qk_norm="rms_norm")
    transformer_keys = {key: value for key, value in tensors.items() if key.startswith("transformer.")}
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    diffusers_logger = logging.getLogger("diffusers")
    diffusers_logger.addHandler(handler)
    try:
        SD3LoraLoaderMixin.load_lora_into_transformer(transformer_keys, transformer=transformer)
    finally:
        diffusers_logger.removeHandler(handler)
    assert not [message for message in messages if "unexpected" in message.lower()], messages
    lora_a = [name for name, _ in transformer.named_parameters() if "lora_A" in name]
    assert len(lora_a) == len([key for key in transformer_keys if key.endswith("lora_A.weight")])
