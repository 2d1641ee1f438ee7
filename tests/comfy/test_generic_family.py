"""The generic path: models ComfyUI samples that have no family entry train through targets found by
their structure, their own model_sampling and extra_conds, and ComfyUI-native keys.

Two models with no table entry, tiny random-weight files that ComfyUI's own detection recognises
(lora_lab_devtools/flow_fixtures.py), loaded through the stock UNETLoader and VAELoader:

* Lumina 2 at dim 2304 (NetaYume / Lumina-Image 2.0; Z-Image, the family entry, is dim 3840): flow
  matching (ModelSamplingDiscreteFlow, shift 6), text from a reduced Qwen3 CLIP (its attention mask and
  token count reach the model through Lumina2.extra_conds), three block containers (the two refiners
  and the main layers).
* PixArt Sigma: epsilon prediction (ModelSamplingDiscrete), text from a reduced T5 of width 4096, one
  block. At 384 px: ComfyUI's PixArt derives its position grid from the latent size and divides by
  zero below 48 latent pixels.

And a UNet, ComfyUI's SDXLRefiner class built in code at small widths (its `y` holds size and
aesthetic-score embeddings from its own encode_adm), which also streams. All three classes exist in
ComfyUI 0.3.75 and 0.33.0. Each checks: the loss at fixed noise falls, the input
MODEL/CLIP are untouched, the file has only diffusion_model.<path> keys, ComfyUI's stock LoraLoader
loads it with no unmatched key and gives what the node returned, and the file says it was trained
through the generic path. Models the generic path cannot train get a ValueError naming the class and
the reason.
"""
from __future__ import annotations

import json
import logging

import pytest
import torch

from lora_lab_devtools import flow_fixtures
from lora_lab_devtools.tiny_checkpoint import TINY_SD15_UNET

from .test_flow_families import CAPTIONS, link, no_unmatched, release_all_models, state_bytes
from .test_train import pattern_images, rates, read_lora, schedule, stock_lora_loader, train, train_outputs

FIXED_SIGMAS = (0.5, 0.75, 0.9)       # flow models (Lumina 2's default shift 6 trains mostly above 0.5)
FIXED_TIMESTEPS = (900, 600, 300)     # discrete models


@pytest.fixture(scope="module", autouse=True)
def release_models_after_module():
    yield
    release_all_models()


SIZES = {"Lumina2": 64, "PixArt": 384, "QwenImage": 64, "Flux2": 64, "Chroma": 64}   # image sizes each model trains and is checked at


def make_dataset(comfy, size: int):
    module = comfy.pack.training.data.dataset
    return module.build_image_dataset(pattern_images(2, size), CAPTIONS[:2],
                                      module.DatasetOptions(resolution=size, bucketing=False))


def size_of(model) -> int:
    return SIZES[type(model.model).__name__]


def load_generic(comfy, name: str, kind: str, vae_file):
    """(MODEL, CLIP, VAE): UNETLoader + the reduced CLIP + VAELoader."""
    from comfy import utils as comfy_utils

    unet = link(comfy, "diffusion_models", flow_fixtures.ensure_diffusion_model(name))
    vae_name = link(comfy, "vae", vae_file)
    weights = comfy_utils.load_torch_file(str(flow_fixtures.ensure_text_encoder(kind)))
    with torch.inference_mode():
        model = comfy.node_class("UNETLoader")().load_unet(unet, "default")[0]
        vae = comfy.node_class("VAELoader")().load_vae(vae_name)[0]
        clip = flow_fixtures.reduced_clip(kind, weights)
    return model, clip, vae


@pytest.fixture(scope="module")
def lumina2(comfy):
    return load_generic(comfy, "lumina2", "zimage", flow_fixtures.ensure_vae16())


@pytest.fixture(scope="module")
def pixart(comfy):
    return load_generic(comfy, "pixart_sigma", "pixart", flow_fixtures.ensure_vae4())


def conditioning(model, clip, caption: str, noise: torch.Tensor) -> dict:
    """The model's inputs for a caption, built by ComfyUI's own extra_conds (not the pack's)."""
    output = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True, return_dict=True)
    cond = output.pop("cond")
    extras = model.model.extra_conds(cross_attn=cond, noise=noise, device="cpu", **output)   # pooled_output even if None
    return {key: value.cond for key, value in extras.items()}


def is_flow(model) -> bool:
    return model.model.model_type.name in ("FLOW", "FLUX")


def fixed_sigmas(model) -> list[torch.Tensor]:
    if is_flow(model):
        return [torch.tensor([sigma]) for sigma in FIXED_SIGMAS]
    sampling = model.get_model_object("model_sampling")
    return [sampling.sigma(torch.tensor([float(timestep)])) for timestep in FIXED_TIMESTEPS]


def fixed_loss(model, clip, vae, pixels: list | None = None) -> float:
    """The model's own objective at fixed noise and sigmas, through ComfyUI's model_sampling and
    apply_model: (xt - denoised) / sigma against noise - x0 (flow velocity) or noise (epsilon). pixels:
    IMAGE batches, each encoded on its own (a video model's clips: one latent each); two pattern images by
    default."""
    from comfy import model_management

    sampling = model.get_model_object("model_sampling")
    total, count = 0.0, 0
    pixels = pixels if pixels is not None else [pattern_images(2, size_of(model))]
    with torch.inference_mode():
        model_management.load_models_gpu([model], force_full_load=True)
        x0 = torch.cat([model.model.process_latent_in(vae.encode(batch)).float() for batch in pixels])
        generator = torch.Generator().manual_seed(11)
        for index in range(x0.shape[0]):
            sample = x0[index:index + 1]
            cond = conditioning(model, clip, CAPTIONS[index], sample)
            for sigma in fixed_sigmas(model):
                noise = torch.randn(sample.shape, generator=generator)
                xt = sampling.noise_scaling(sigma, noise, sample)
                denoised = model.model.apply_model(xt, sigma, **cond).float()
                target = noise - sample if is_flow(model) else noise
                total += float((((xt - denoised) / sigma - target) ** 2).mean())
                count += 1
    return total / count


def outputs(model, clip, vae, pixels=None) -> torch.Tensor:
    import comfy.model_management

    pixels = pixels if pixels is not None else pattern_images(1, size_of(model))
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        x0 = model.model.process_latent_in(vae.encode(pixels)).float()
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        sigma = fixed_sigmas(model)[1]
        xt = model.get_model_object("model_sampling").noise_scaling(sigma, noise, x0)
        return model.model.apply_model(xt, sigma, **conditioning(model, clip, CAPTIONS[0], x0)).float().clone()


def train_and_check(comfy, loaded, caplog, lora_name: str, learning_rate: float, dataset=None, pixels=None,
                    **widgets) -> tuple[str, str, list]:
    """Train 4 steps (batch 2) and check what every trained model must give: the input MODEL/CLIP
    untouched, the loss at fixed noise fallen, and the stock LoraLoader loading the file with no
    unmatched key into what the node returned (which differs from the base). Returns the file's name,
    the node's summary and the log messages. dataset / pixels: a video model's clips (the dataset and
    their frames as IMAGE batches, one per clip, in caption order); two pattern images by default."""
    model, clip, vae = loaded
    dataset = dataset if dataset is not None else make_dataset(comfy, size_of(model))
    base_bytes = state_bytes(model.model.diffusion_model, clip.cond_stage_model)
    before = fixed_loss(model, clip, vae, pixels)
    first = pixels[0] if pixels is not None else None
    before_outputs = outputs(model, clip, vae, first)
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        trained_model, _, name, _, summary = train_outputs(
            comfy, loaded, dataset, rates(comfy, learning_rate=learning_rate), schedule(comfy), steps=4, batch_size=2,
            lora_name=lora_name, save_precision="fp32", **widgets)
    assert state_bytes(model.model.diffusion_model, clip.cond_stage_model) == base_bytes   # the input untouched
    after = fixed_loss(trained_model, clip, vae, pixels)
    assert after < 0.95 * before, (before, after)
    stock_model, _, lines = stock_lora_loader(comfy, loaded, name)
    assert no_unmatched(lines), lines
    returned = outputs(trained_model, clip, vae, first)
    torch.testing.assert_close(returned, outputs(stock_model, clip, vae, first), rtol=0, atol=1e-4)
    assert (returned - before_outputs).abs().max() > 1e-5
    return name, summary, [record.getMessage() for record in caplog.records]


def check_generic_training(comfy, loaded, caplog, lora_name: str, model_class: str, containers: set[str],
                           learning_rate: float, target: str, **widgets) -> dict:
    name, summary, messages = train_and_check(comfy, loaded, caplog, lora_name, learning_rate, target=target, **widgets)
    # The node's summary says the model trained through the generic path, and names the first-class families.
    assert f"Model: {model_class} has no first-class entry" in summary and "Z-Image" in summary, summary
    assert any(f"{model_class} is not one of the first-class families" in message and "generic path" in message
               for message in messages), messages

    tensors, metadata = read_lora(comfy, name)
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert all(stem.startswith("diffusion_model.") for stem in stems), sorted(stems)[:5]
    assert {stem.split(".")[1] for stem in stems} == containers
    assert all(f"{stem}.alpha" in tensors for stem in stems)
    assert model_class in metadata["lora_lab_generic_path"] and "Z-Image" in metadata["lora_lab_generic_path"]
    assert metadata["ss_base_model_version"] == f"comfyui_{model_class.lower()}"
    return metadata


@pytest.mark.compat   # the generic path on either ComfyUI (PixArt's 384 px run: the full suite only)
def test_lumina2_trains_through_the_generic_path(comfy, lumina2, caplog):
    assert type(lumina2[0].model).__name__ == "Lumina2"
    assert lumina2[0].model.model_config.unet_config["dim"] == flow_fixtures.LUMINA2_DIM
    metadata = check_generic_training(comfy, lumina2, caplog, "generic_lumina2", "Lumina2",
                                      {"noise_refiner", "context_refiner", "layers"}, 5e-3, "all_linear_conv",
                                      sample_prompt="a red square on black --w 64 --h 64 --s 2", sample_every_n_steps=4)
    samples = comfy.output_dir / "lora_lab" / "generic_lumina2" / "samples"   # previews draw through extra_conds too
    assert [path.name for path in samples.iterdir()] == ["step00004_0.png"]
    # flow: logit-normal t shifted by the model's own shift (supported_models.Lumina2: 6.0)
    assert metadata["ss_timestep_sampling"] == "shift" and metadata["ss_discrete_flow_shift"] == "6.0"
    tensors, _ = read_lora(comfy, "generic_lumina2.safetensors")
    # all_linear_conv: every Linear of the blocks (adaLN modulation included), nothing outside them
    assert {"diffusion_model.layers.0.attention.qkv.lora_down.weight", "diffusion_model.layers.0.feed_forward.w3.alpha",
            "diffusion_model.noise_refiner.1.adaLN_modulation.1.lora_up.weight"} <= set(tensors)


def test_pixart_trains_through_the_generic_path(comfy, pixart, caplog):
    assert type(pixart[0].model).__name__ == "PixArt"
    metadata = check_generic_training(comfy, pixart, caplog, "generic_pixart", "PixArt", {"blocks"}, 5e-3,
                                      "attention_ff")
    assert metadata["modelspec.prediction_type"] == "epsilon" and "ss_timestep_sampling" not in metadata
    tensors, _ = read_lora(comfy, "generic_pixart.safetensors")
    assert {"diffusion_model.blocks.0.cross_attn.kv_linear.lora_up.weight",
            "diffusion_model.blocks.0.mlp.fc2.lora_down.weight"} <= set(tensors)


@pytest.mark.compat
def test_models_the_generic_path_cannot_train_get_a_clear_error(comfy, pixart):
    """No usable model_sampling (PixArt switched to a continuous EDM schedule by ComfyUI's own node) and
    an input the dataset does not have (InstructPix2Pix's source-image latents): refused before any work,
    naming the model class and the reason."""
    from comfy import model_patcher, supported_models

    model, clip, vae = pixart
    dataset = make_dataset(comfy, 64)   # refused before any image is encoded
    with torch.inference_mode():
        edm = comfy.node_class("ModelSamplingContinuousEDM")().patch(model, "v_prediction", 120.0, 0.002)[0]
    with pytest.raises(ValueError, match=r"model is PixArt \(PixArtSigma\).*generic path: its model_sampling "
                                         r"\(ModelSamplingAdvanced\) has no schedule the loss can draw from"):
        train(comfy, (edm, clip, vae), dataset, rates(comfy), schedule(comfy), steps=1, batch_size=1)

    config = supported_models.SD15_instructpix2pix({**TINY_SD15_UNET, "in_channels": 8})
    config.set_inference_dtype(torch.float32, None)
    ip2p = model_patcher.ModelPatcher(config.get_model({}), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"model is SD15_instructpix2pix .*extra input latents .*c_concat"):
        train(comfy, (ip2p, clip, vae), dataset, rates(comfy), schedule(comfy), steps=1, batch_size=1)


@pytest.mark.compat
def test_the_flow_default_takes_the_shift_the_model_samples_with(comfy):
    """auto on the generic path: the shift of the model's own model_sampling (ModelSamplingFlux stores
    mu = log shift: Chroma and other Flux-style models sample with exp(mu))."""
    import math

    from comfy import model_sampling

    detect = comfy.pack.nodes.comfy.detect
    flux_style = type("FluxStyle", (model_sampling.ModelSamplingFlux, model_sampling.CONST), {})()
    assert detect.model_shift(flux_style) == pytest.approx(math.exp(flux_style.shift))
    discrete_flow = type("Flow", (model_sampling.ModelSamplingDiscreteFlow, model_sampling.CONST), {})()
    assert detect.model_shift(discrete_flow) == 1.0
    assert detect.model_shift(type("Eps", (model_sampling.ModelSamplingDiscrete, model_sampling.EPS), {})()) is None


@pytest.fixture(scope="module")
def refiner(comfy):
    """(MODEL, CLIP, VAE): ComfyUI's SDXLRefiner class at small widths, built in code (seeded weights), a
    small SDXL CLIP and the 4-channel TAESD."""
    from .test_train import small_sdxl_unet_and_clip

    model, clip = small_sdxl_unet_and_clip("SDXLRefiner", 5)
    with torch.inference_mode():
        vae = comfy.node_class("VAELoader")().load_vae(link(comfy, "vae", flow_fixtures.ensure_vae4()))[0]
    return model, clip, vae


@pytest.mark.compat
def test_a_unet_model_with_no_entry_trains_through_the_generic_path(comfy, refiner, caplog):
    """SDXLRefiner (a UNet with size and aesthetic-score embeddings in `y`, which no table entry has)
    built in code at small widths with a small SDXL CLIP: targets by structure are the input and output
    block lists (each TimestepEmbedSequential's layers are the checkpointed units) and the middle block's
    transformer blocks, `y` comes from its own encode_adm through extra_conds, and the file loads in the
    stock LoraLoader with no unmatched key."""
    model, clip, vae = refiner
    base_bytes = state_bytes(model.model.diffusion_model, clip.cond_stage_model)
    with caplog.at_level(logging.INFO, logger="lora_lab"):
        trained_model, _, name, _ = train(comfy, refiner, make_dataset(comfy, 64),
                                          rates(comfy, learning_rate=1e-3), schedule(comfy), steps=2, batch_size=2,
                                          target="attention_ff", gradient_checkpointing=True, lora_name="generic_refiner")
    assert state_bytes(model.model.diffusion_model, clip.cond_stage_model) == base_bytes
    assert any("SDXLRefiner is not one of the first-class families" in record.getMessage() for record in caplog.records)
    tensors, metadata = read_lora(comfy, name)
    # the input and output block lists, and the middle block's list of transformer blocks (its own repeated
    # blocks, as big as theirs); conv_in, the time embedding and the output head stay out
    assert {key.split(".")[1] for key in tensors} == {"input_blocks", "middle_block", "output_blocks"}
    assert any(key.startswith("diffusion_model.output_blocks.") and key.endswith(".attn2.to_k.lora_down.weight")
               for key in tensors)
    assert any(".ff." in key for key in tensors) and not any(".proj_in." in key for key in tensors)
    assert metadata["ss_base_model_version"] == "comfyui_sdxlrefiner"
    stock_model, _, lines = stock_lora_loader(comfy, refiner, name)
    assert no_unmatched(lines), lines
    assert_refiner_output_is_the_stock_loaders(refiner, trained_model, stock_model)


def assert_refiner_output_is_the_stock_loaders(refiner, trained_model, stock_model) -> None:
    """The trained MODEL's output equals the stock LoraLoader's on the file, and differs from the base's."""
    from comfy import model_management

    model, clip, _ = refiner
    with torch.inference_mode():
        latent = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(5))
        sigma = model.get_model_object("model_sampling").sigma(torch.tensor([500.0]))
        results = []
        for patched in (trained_model, stock_model, model):
            model_management.load_models_gpu([patched], force_full_load=True)
            results.append(patched.model.apply_model(latent, sigma, **conditioning(patched, clip, CAPTIONS[0], latent))
                           .float().clone())
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-4)
    assert (results[0] - results[2]).abs().max() > 1e-6


@pytest.mark.compat
def test_generic_blocks_stream_and_train_the_resident_lora(comfy, refiner):
    """memory = stream on the generic path: every unit found by structure streams (borrowed per block,
    learned prefetch, recompute in backward), and the LoRA is the resident run's, bit for bit."""
    from .test_resume import assert_same_tensors

    common = dict(steps=2, batch_size=2, target="all_linear_conv", save_precision="fp32")
    dataset = make_dataset(comfy, 64)
    _, _, resident, _ = train(comfy, refiner, dataset, rates(comfy, learning_rate=1e-3), schedule(comfy),
                              memory="resident", lora_name="generic_resident", **common)
    _, _, streamed, _ = train(comfy, refiner, dataset, rates(comfy, learning_rate=1e-3), schedule(comfy),
                              memory="stream", lora_name="generic_streamed", **common)
    assert_same_tensors(comfy, resident, streamed)
    plan = json.loads((comfy.output_dir / "lora_lab" / "generic_streamed" / "memory_plan.json").read_text())
    assert plan["mode"] == "stream" and plan["streamed"]


@pytest.mark.compat
def test_settings_the_models_objective_cannot_use_are_refused(comfy, refiner):
    """The generic entry's objective comes from the model, so its settings are checked once it is known:
    an epsilon model (the refiner) refuses a flow sigma sampling, naming the model."""
    with pytest.raises(ValueError, match=r"timestep_sampling = shift applies to flow-matching models .*"
                                         r"SDXLRefiner \(generic path\) samples its 1000 timesteps uniformly"):
        train(comfy, refiner, make_dataset(comfy, 64), rates(comfy), schedule(comfy), steps=1, batch_size=1,
              timestep_sampling="shift", lora_name="generic_refused")


@pytest.mark.compat
def test_lr_finder_sweeps_a_generic_model(comfy, refiner):
    """The LR Finder runs the generic path too (its validation loss through the model's extra_conds)."""
    from .test_lr_finder import find

    _, suggested, _, summary = find(comfy, refiner, make_dataset(comfy, 64), steps=10, batch_size=2,
                                    min_lr=1e-5, max_lr=1e-2)
    assert 1e-5 <= suggested <= 1e-2 and "Suggested rate" in summary
