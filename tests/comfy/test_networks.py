"""Train LoRA's `network` = lokr / loha in a real ComfyUI: a UNet with its text encoder (the tiny SD1.5),
SDXL's second text encoder (the tiny SDXL built in code) and a DiT (the tiny SD3, whose LoKr / LoHa
files take kohya names), streamed over an fp8 base with gradient checkpointing too.

Each file is checked three ways, layer by layer: the weight delta the trained layer applied (recorded
as the file is written), ComfyUI's own LoKr / LoHa adapter on the file (comfy.lora.calculate_weight,
what LoraLoader patches in), and LyCORIS's own rebuild from the file's tensors
(lycoris.functional.lokr / loha diff_weight; lycoris-lora is a test-only package) agree; LoraLoader
takes every key and gives what the node returned; the input MODEL / CLIP stay untouched.
"""
from __future__ import annotations

import json

import pytest
import torch

from .test_flow_families import conditioning, load_sd3, no_unmatched, release_all_models, state_bytes
from .test_generic_family import assert_refiner_output_is_the_stock_loaders, make_dataset, refiner  # noqa: F401
from .test_resume import assert_same_tensors
from .test_train import (CAPTIONS, checkpoint, clip_outputs, dataset, loaded, pattern_images, probe,  # noqa: F401
                         rates, read_lora, schedule, stock_lora_loader, tiny_sdxl, train, unet_outputs)

FACTORS = {"lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
           "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
SD15_NETWORKS = {
    "lokr": dict(network="lokr", rank=4, alpha=2.0, target="attention_ff"),
    # factor 8 with rank 2 < 8 / 2: both factors low-rank (lokr_w1_a/b and lokr_w2_a/b), 3x3 convolutions too
    "lokr_factor8_both": dict(network="lokr", rank=2, alpha=2.0, lokr_factor=8, lokr_decompose_both=True,
                              target="all_linear_conv"),
    "loha": dict(network="loha", loha_rank=4, loha_alpha=2.0, target="attention"),
}


@pytest.fixture()
def trained_deltas(comfy, monkeypatch):
    """[(the file's tensors of a layer, the weight delta that layer trained with)], recorded as files are written."""
    module = comfy.pack.training.network.lycoris
    recorded = []
    original = module.file_tensors

    def record(layer, network, adapter, dtype):
        tensors = original(layer, network, adapter, dtype)
        with torch.no_grad():
            recorded.append((tensors, module.delta_weight(layer, adapter).detach().cpu().clone()))
        return tensors

    monkeypatch.setattr(module, "file_tensors", record)
    return recorded


def lycoris_delta(weights: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """LyCORIS's functional rebuild of a layer's delta from the file's tensors (scale alpha / rank included)."""
    from lycoris.functional import loha as functional_loha
    from lycoris.functional import lokr as functional_lokr

    if "hada_w1_a" in weights:
        gamma = float(weights["alpha"]) / weights["hada_w1_b"].shape[0]
        return functional_loha.diff_weight(weights["hada_w1_b"], weights["hada_w1_a"], weights["hada_w2_b"],
                                           weights["hada_w2_a"], None, None, gamma=gamma).reshape(shape)
    return functional_lokr.diff_weight(*(weights.get(name) for name in FACTORS["lokr"]), None,
                                       gamma=float(weights["alpha"])).reshape(shape)


def layers_of(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{stem: {tensor name: tensor}} of a file."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, name = key.rsplit(".", 1)
        layers.setdefault(stem, {})[name] = tensor
    return layers


def check_file(comfy, loaded, lora_name: str, network: str, recorded: list) -> dict[str, dict[str, torch.Tensor]]:
    """The file holds only `network`'s tensors and alpha; per layer, the trained delta = ComfyUI's patch =
    LyCORIS's rebuild; LoraLoader takes every key. Returns the file's layers."""
    from comfy import lora as comfy_lora
    from comfy import utils as comfy_utils

    tensors, metadata = read_lora(comfy, lora_name)
    layers = layers_of(tensors)
    assert all(set(weights) <= {*FACTORS[network], "alpha"} and "alpha" in weights for weights in layers.values())
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"])["algo"] == network
    assert json.loads(metadata["lora_lab_settings"])["train"]["network"] == network

    model, clip, lines = stock_lora_loader(comfy, loaded, lora_name)
    assert no_unmatched(lines), lines
    key_map = comfy_lora.model_lora_keys_unet(loaded[0].model, {})
    key_map = comfy_lora.model_lora_keys_clip(loaded[1].cond_stage_model, key_map)
    trained = {}
    for file_weights, delta in recorded[-len(layers):]:   # this run's layers (an earlier run's come first)
        stem = next(stem for stem, weights in layers.items()
                    if weights.keys() == file_weights.keys()
                    and all(torch.equal(weights[name], file_weights[name]) for name in weights))
        trained[stem] = delta
    assert trained.keys() == layers.keys()
    moved = 0
    for stem, weights in layers.items():
        comfy_key = key_map[stem]
        patcher = model if comfy_key in model.patches else clip.patcher
        original = comfy_utils.get_attr(patcher.model, comfy_key).detach().float().clone()
        with torch.inference_mode():
            patched = comfy_lora.calculate_weight(patcher.patches[comfy_key], original.clone(), comfy_key).float()
        comfy_delta = patched - original
        moved += float(comfy_delta.abs().max()) > 0   # (a layer whose output nothing reads stays at 0)
        torch.testing.assert_close(comfy_delta, trained[stem].reshape(original.shape), rtol=1e-4, atol=1e-6, msg=stem)
        torch.testing.assert_close(lycoris_delta(weights, original.shape), comfy_delta, rtol=1e-4, atol=1e-6, msg=stem)
    assert moved > 0.9 * len(layers), (moved, len(layers))
    return layers


@pytest.mark.parametrize("case", [pytest.param("lokr", marks=pytest.mark.compat), "lokr_factor8_both", "loha"])
def test_sd15_unet_and_text_encoder_train_lycoris_networks_comfyui_and_lycoris_read(comfy, loaded, dataset, probe,
                                                                                  trained_deltas, case):
    latent, context = probe
    model, clip, _ = loaded
    widgets = SD15_NETWORKS[case]
    network = widgets["network"]
    before_unet, before_clip = unet_outputs(model, latent, context), clip_outputs(clip)
    base_bytes = state_bytes(model.model.diffusion_model, clip.cond_stage_model)
    trained_model, trained_clip, lora_name, _ = train(
        comfy, loaded, dataset, rates(comfy, learning_rate=2e-3, text_encoder_lr=1e-3), schedule(comfy), steps=2,
        save_precision="fp32", lora_name=f"sd15_{case}", **widgets)
    assert state_bytes(model.model.diffusion_model, clip.cond_stage_model) == base_bytes   # the input untouched

    layers = check_file(comfy, loaded, lora_name, network, trained_deltas)
    assert any(stem.startswith("lora_unet_down_blocks_0_attentions_0_") for stem in layers)
    assert any(stem.startswith("lora_te_text_model_encoder_layers_0_") for stem in layers)
    _, metadata = read_lora(comfy, lora_name)
    rank, alpha = (widgets["loha_rank"], widgets["loha_alpha"]) if network == "loha" else (widgets["rank"], widgets["alpha"])
    assert (metadata["ss_network_dim"], float(metadata["ss_network_alpha"])) == (str(rank), alpha)
    if case == "lokr_factor8_both":   # both factors low-rank where the rank allows, convolutions trained
        assert any({"lokr_w1_a", "lokr_w2_a"} <= set(weights) for weights in layers.values())
        assert any(stem.endswith("resnets_0_conv1") for stem in layers)
        assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "factor": "8", "decompose_both": "True",
                                                            "conv_dim": "2", "conv_alpha": "2.0"}
    if case == "lokr":   # rank 4: CLIP's 768 = 24 x 32 leaves w2 low-rank, w1 full
        assert all("lokr_w1" in weights for weights in layers.values())

    stock_model, stock_clip, _ = stock_lora_loader(comfy, loaded, lora_name)
    returned = unet_outputs(trained_model, latent, context)
    torch.testing.assert_close(returned, unet_outputs(stock_model, latent, context), rtol=0, atol=1e-5)
    torch.testing.assert_close(clip_outputs(trained_clip), clip_outputs(stock_clip), rtol=0, atol=1e-5)
    assert (returned - before_unet).abs().max() > 1e-5
    assert (clip_outputs(trained_clip) - before_clip).abs().max() > 1e-5


def test_sdxl_second_text_encoder_trains_loha(comfy, tiny_sdxl, dataset, trained_deltas):
    model, clip, _ = tiny_sdxl
    before = clip_outputs(clip)
    learning_rates = rates(comfy, learning_rate=2e-3, text_encoder_lr=2e-3, text_encoder_2_lr=2e-3)
    _, trained_clip, lora_name, _ = train(comfy, tiny_sdxl, dataset, learning_rates, schedule(comfy), steps=2,
                                          model=model, clip=clip, network="loha", loha_rank=4, loha_alpha=4.0,
                                          save_precision="fp32", lora_name="sdxl_loha")
    layers = check_file(comfy, tiny_sdxl, lora_name, "loha", trained_deltas)
    assert {stem.split("_text_model")[0].split("_blocks")[0] for stem in layers} >= {"lora_unet_input", "lora_te1",
                                                                                    "lora_te2"}
    _, stock_clip, _ = stock_lora_loader(comfy, tiny_sdxl, lora_name)
    after = clip_outputs(trained_clip)
    torch.testing.assert_close(after, clip_outputs(stock_clip), rtol=0, atol=1e-5)
    assert (after[..., 64:] - before[..., 64:]).abs().max() > 1e-5     # clip_g's part changed
    assert torch.equal(clip_outputs(clip), before)


@pytest.fixture(scope="module")
def sd3(comfy):
    yield load_sd3(comfy)
    release_all_models()


@pytest.fixture(scope="module")
def pair(comfy):
    """Two of the pattern images: SD3's frozen CLIP-G (real width) encodes each caption for a second on the CPU."""
    module = comfy.pack.training.data.dataset
    return module.build_image_dataset(pattern_images(2), CAPTIONS[:2],
                                      module.DatasetOptions(resolution=64, bucketing=False))


def dit_output(model, cond: dict, latent: torch.Tensor) -> torch.Tensor:
    """apply_model at sigma 0.5 on a fixed noisy latent, with conditioning encoded once."""
    import comfy.model_management

    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        return model.model.apply_model(latent, torch.tensor([0.5]), **cond).float().clone()


@pytest.mark.parametrize("network", ["lokr", "loha"])
def test_sd3_dit_trains_lycoris_networks_in_kohya_names(comfy, sd3, pair, trained_deltas, network):
    """SD3's LoRA files use diffusers names, which split the fused qkv by rows; a LoKr / LoHa file takes
    sd-scripts' SD3 names (lora_unet_<ComfyUI path>), which ComfyUI maps to the whole layer. (LoHa with
    gradient checkpointing: its blocks recomputed in backward.)"""
    model, clip, vae = sd3
    with torch.inference_mode():
        x0 = model.model.process_latent_in(vae.encode(pattern_images(1))).float()
        cond = conditioning(model, clip, CAPTIONS[0], x0)
    latent = 0.5 * x0 + 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
    before = dit_output(model, cond, latent)
    widgets = (dict(rank=2, alpha=2.0, lokr_factor=4, lokr_decompose_both=True) if network == "lokr"
               else dict(loha_rank=2, loha_alpha=1.0, gradient_checkpointing=True))
    trained_model, _, lora_name, _ = train(comfy, sd3, pair, rates(comfy, learning_rate=2e-3, text_encoder_lr=0.0),
                                           schedule(comfy), steps=2, batch_size=1, target="kohya_default",
                                           network=network, save_precision="fp32", lora_name=f"sd3_{network}", **widgets)
    layers = check_file(comfy, sd3, lora_name, network, trained_deltas)
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv" in layers and "lora_unet_joint_blocks_0_context_block_mlp_fc2" in layers
    assert all(stem.startswith("lora_unet_") for stem in layers)
    _, metadata = read_lora(comfy, lora_name)
    assert metadata["ss_base_model_version"] == "sd3"
    stock_model, _, _ = stock_lora_loader(comfy, sd3, lora_name)
    returned = dit_output(trained_model, cond, latent)
    torch.testing.assert_close(returned, dit_output(stock_model, cond, latent), rtol=0, atol=1e-4)
    assert (returned - before).abs().max() > 1e-5
    assert torch.equal(dit_output(model, cond, latent), before)


def test_lokr_streamed_over_fp8_with_checkpointing_trains_the_resident_lokr(comfy, sd3, pair):
    """base_weights fp8, bf16 compute, gradient checkpointing: every block streamed trains the LoKr the resident
    run trains, bit for bit, and the file loads with every key applied."""
    learning_rates = rates(comfy, learning_rate=2e-3, text_encoder_lr=0.0)
    common = dict(steps=2, batch_size=1, precision="bf16", target="attention_ff", save_precision="fp32",
                  base_weights="fp8_e4m3fn", gradient_checkpointing=True, network="lokr", rank=2, alpha=2.0)
    _, _, resident, _ = train(comfy, sd3, pair, learning_rates, schedule(comfy), memory="resident",
                              lora_name="lokr_fp8_resident", **common)
    _, _, streamed, _ = train(comfy, sd3, pair, learning_rates, schedule(comfy), memory="stream",
                              lora_name="lokr_fp8_streamed", **common)
    assert_same_tensors(comfy, resident, streamed)
    plan = json.loads((comfy.output_dir / "lora_lab" / "lokr_fp8_streamed" / "memory_plan.json").read_text())
    assert plan["mode"] == "stream" and plan["streamed"]
    tensors, metadata = read_lora(comfy, streamed)
    assert metadata["ss_fp8_base"] == "True" and all(torch.isfinite(tensor).all() for tensor in tensors.values())
    assert any(float(tensor.abs().max()) > 0 for key, tensor in tensors.items() if key.endswith("lokr_w2_b"))
    _, _, lines = stock_lora_loader(comfy, sd3, streamed)
    assert no_unmatched(lines), lines


def test_generic_path_trains_lokr_in_comfyui_native_names(comfy, refiner, trained_deltas):
    """A model with no family entry (SDXLRefiner built in code): the LoKr file takes ComfyUI's native
    diffusion_model.<path> stems, which LoraLoader maps for every model."""
    trained_model, _, lora_name, _ = train(comfy, refiner, make_dataset(comfy, 64), rates(comfy, learning_rate=2e-3),
                                           schedule(comfy), steps=2, batch_size=2, target="attention_ff", network="lokr",
                                           rank=2, alpha=1.0, lokr_factor=4, save_precision="fp32",
                                           lora_name="generic_lokr")
    layers = check_file(comfy, refiner, lora_name, "lokr", trained_deltas)
    assert all(stem.startswith("diffusion_model.") for stem in layers)
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q" in layers
    stock_model, _, _ = stock_lora_loader(comfy, refiner, lora_name)
    assert_refiner_output_is_the_stock_loaders(refiner, trained_model, stock_model)


@pytest.mark.parametrize("widgets, learning_rates, message", [
    (dict(network="lokr", use_dora=True), {}, r"use_dora = True with network = 'lokr'.*Turn use_dora off, or set network"),
    (dict(network="loha"), dict(lora_plus_ratio=4.0),
     r"lora_plus_ratio = 4 .*network = 'loha'.*Set lora_plus_ratio to 1, or network to lora"),
], ids=["dora", "lora_plus"])
def test_lycoris_networks_refuse_dora_and_lora_plus_naming_the_inputs(comfy, loaded, dataset, probe, widgets,
                                                                      learning_rates, message):
    latent, context = probe
    model, clip, _ = loaded
    before_unet, before_clip = unet_outputs(model, latent, context), clip_outputs(clip)
    with pytest.raises(ValueError, match=message):
        train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-3, **learning_rates), schedule(comfy), steps=1,
              lora_name="refused", **widgets)
    assert torch.equal(unet_outputs(model, latent, context), before_unet)
    assert torch.equal(clip_outputs(clip), before_clip)
    assert not (comfy.models_dir / "loras" / "refused.safetensors").exists()
