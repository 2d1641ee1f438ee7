"""Qwen-Image, Flux.2 and Chroma: first-class family entries (training/families/table.py), trained on
tiny random-weight files that ComfyUI's own detection recognises (lora_lab_devtools/qwen_fixtures.py,
flux2_fixtures.py), loaded through the stock UNETLoader and VAELoader with reduced text encoders.

Each checks: the loss at fixed noise falls (the model's own objective through ComfyUI's model_sampling
and extra_conds), the input MODEL/CLIP are untouched, the summary names the family (not the generic
path), the file has the family's lora_unet_<block path> keys (the layers its kohya_default trains),
ComfyUI's stock LoraLoader loads it with no unmatched key and gives what the node returned, and a
second tool converts the keys: diffusers' own converter for the family, which raises on a key it
cannot place.
"""
from __future__ import annotations


from pathlib import Path

import pytest
import torch

from lora_lab_devtools import flow_fixtures, flux2_fixtures, qwen_fixtures

from .test_flow_families import link, release_all_models
from .test_generic_family import make_dataset, train_and_check
from .test_train import rates, read_lora, schedule, train_outputs


@pytest.fixture(autouse=True)
def release_models_after_each_test():
    """These models are real-width (Qwen-Image's block alone is 0.38 B parameters): out of ComfyUI's
    cache after each test, so one file's tests never hold the next one's."""
    yield
    release_all_models()


def load_diffusion_model(comfy, unet_file, vae_file, clip):
    """(MODEL, CLIP, VAE): UNETLoader and VAELoader on the fixture files, with the reduced CLIP."""
    unet, vae_name = link(comfy, "diffusion_models", unet_file), link(comfy, "vae", vae_file)
    with torch.inference_mode():
        model = comfy.node_class("UNETLoader")().load_unet(unet, "default")[0]
        vae = comfy.node_class("VAELoader")().load_vae(vae_name)[0]
    return model, clip, vae


@pytest.fixture(scope="module")
def qwen_image(comfy):
    from comfy import utils as comfy_utils

    weights = comfy_utils.load_torch_file(str(qwen_fixtures.ensure_qwen_image_text_encoder()))
    clip = qwen_fixtures.reduced_qwen_image_clip(weights)
    del weights
    loaded = load_diffusion_model(comfy, qwen_fixtures.ensure_qwen_image_unet(), qwen_fixtures.ensure_wan21_vae(), clip)
    yield loaded
    del loaded, clip
    release_all_models()


def check_family_training(comfy, loaded, caplog, family_label: str, lora_name: str, learning_rate: float,
                          **widgets) -> tuple[dict, dict, str]:
    """train_and_check, then what a first-class family's file must be: nothing said of the generic path,
    kohya keys; returns the file's (tensors, metadata) and the node's summary."""
    name, summary, messages = train_and_check(comfy, loaded, caplog, lora_name, learning_rate, **widgets)
    assert "generic path" not in summary and not any("generic path" in message for message in messages), summary
    tensors, metadata = read_lora(comfy, name)
    assert tensors and all(key.startswith("lora_unet_") for key in tensors), sorted(tensors)[:5]
    assert "lora_lab_generic_path" not in metadata
    return tensors, metadata, summary


@pytest.mark.compat
def test_qwen_image_trains_and_its_file_loads_in_comfyui_and_diffusers(comfy, qwen_image, caplog):
    """Qwen-Image: 5-D latents from the Wan 2.1 VAE, the Qwen2.5-VL text frozen, conditioning through its
    own extra_conds; kohya_default = every Linear of the blocks (musubi-tuner's set, modulation included);
    musubi-tuner's key names, which diffusers' Qwen-Image loader converts."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_qwen_lora_to_diffusers

    assert type(qwen_image[0].model).__name__ == "QwenImage"
    tensors, metadata, _ = check_family_training(comfy, qwen_image, caplog, "Qwen-Image", "qwen_image_lora", 2e-3,
                                                 target="kohya_default")
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    block = "lora_unet_transformer_blocks_0_"
    assert {f"{block}attn_to_q", f"{block}attn_add_k_proj", f"{block}attn_to_add_out", f"{block}img_mlp_net_0_proj",
            f"{block}txt_mlp_net_2", f"{block}img_mod_1", f"{block}txt_mod_1"} <= stems, sorted(stems)
    assert all(stem.startswith(block) for stem in stems)   # the blocks only: no embedder or output head
    assert metadata["ss_base_model_version"] == "qwen_image"
    assert metadata["modelspec.architecture"] == "qwen-image/lora"
    assert metadata["ss_timestep_sampling"] == "shift" and metadata["ss_discrete_flow_shift"] == "2.2"

    converted = _convert_non_diffusers_qwen_lora_to_diffusers(dict(tensors))   # raises on a leftover key
    assert all(key.startswith("transformer.") for key in converted)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in converted
    assert "transformer.transformer_blocks.0.img_mod.1.lora_B.weight" in converted
    assert len([key for key in converted if key.endswith("lora_A.weight")]) == len(stems)


@pytest.mark.compat
def test_qwen_image_previews_and_streams(comfy, qwen_image):
    """Previews sample and decode 5-D latents (a frame axis of 1), and memory = stream trains the
    resident run's LoRA bit for bit."""
    from .test_resume import assert_same_tensors

    dataset = make_dataset(comfy, 64)
    common = dict(steps=2, batch_size=2, target="attention", save_precision="fp32")
    resident = train_outputs(comfy, qwen_image, dataset, rates(comfy, learning_rate=1e-3), schedule(comfy),
                             memory="resident", lora_name="qwen_resident",
                             sample_prompt="a red square on black --w 64 --h 64 --s 2", sample_every_n_steps=2,
                             **common)[2]
    samples = comfy.output_dir / "lora_lab" / "qwen_resident" / "samples"
    assert [path.name for path in samples.iterdir()] == ["step00002_0.png"]
    streamed = train_outputs(comfy, qwen_image, dataset, rates(comfy, learning_rate=1e-3), schedule(comfy),
                             memory="stream", lora_name="qwen_streamed", **common)[2]
    assert_same_tensors(comfy, resident, streamed)


@pytest.fixture(scope="module")
def chroma(comfy):
    from comfy import utils as comfy_utils

    clip = flux2_fixtures.reduced_chroma_clip(comfy_utils.load_torch_file(str(flux2_fixtures.ensure_chroma_text_encoder())))
    loaded = load_diffusion_model(comfy, flux2_fixtures.ensure_chroma_unet(), flow_fixtures.ensure_vae16(), clip)
    yield loaded
    del loaded, clip
    release_all_models()


@pytest.mark.compat
def test_chroma_trains_and_its_file_loads_in_comfyui_and_diffusers(comfy, chroma, caplog):
    """Chroma: Flux's blocks with no modulation linears in them (its distilled guidance layer modulates),
    T5 only and frozen, guidance input 0 as ComfyUI's Chroma.extra_conds gives it; sd-scripts' Flux key
    names, which diffusers' Chroma pipeline converts with its Flux kohya converter."""
    from diffusers import ChromaPipeline

    assert type(chroma[0].model).__name__ == "Chroma"
    tensors, metadata, _ = check_family_training(comfy, chroma, caplog, "Chroma", "chroma_lora", 2e-3,
                                                 target="kohya_default")
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert stems == {f"lora_unet_double_blocks_0_{side}_{layer}" for side in ("img", "txt")
                     for layer in ("attn_qkv", "attn_proj", "mlp_0", "mlp_2")} | {
        "lora_unet_single_blocks_0_linear1", "lora_unet_single_blocks_0_linear2"}
    assert metadata["ss_base_model_version"] == "chroma" and metadata["modelspec.architecture"] == "chroma/lora"
    assert metadata["ss_timestep_sampling"] == "logit_normal" and "ss_guidance_scale" not in metadata

    # diffusers: its kohya Flux converter raises on any key it cannot place; every module comes out
    state_dict = ChromaPipeline.lora_state_dict(str(comfy.models_dir / "loras" / "chroma_lora.safetensors"))
    converted = [key for key in state_dict if key.endswith("lora_A.weight")]
    assert converted and all(key.startswith("transformer.") for key in state_dict)
    assert len(converted) >= len(stems)


@pytest.fixture(scope="module")
def flux2_klein(comfy):
    if "klein" not in flux2_fixtures.flux2_variants():
        pytest.skip("Flux.2 Klein needs ComfyUI 0.33 (0.3.75 has no Klein text encoder and fixes Flux.2 at 48 heads)")
    from comfy import utils as comfy_utils

    weights = comfy_utils.load_torch_file(str(flux2_fixtures.ensure_flux2_text_encoder("klein")))
    clip = flux2_fixtures.reduced_flux2_clip("klein", weights)
    loaded = load_diffusion_model(comfy, flux2_fixtures.ensure_flux2_unet("klein"), flux2_fixtures.ensure_flux2_vae(),
                                  clip)
    yield loaded
    del loaded, clip
    release_all_models()


def test_flux2_klein_trains_and_its_file_loads_in_comfyui_and_diffusers(comfy, flux2_klein, caplog):
    """Flux.2 Klein (ComfyUI 0.33): 128-channel latents at 1/16 from the Flux.2 VAE (one token per
    latent pixel: flux2_shift), the Qwen3 text frozen and left-padded to 512 by Flux2.extra_conds, no
    guidance input; musubi-tuner's key names, which diffusers' Flux.2 kohya converter places (qkv and
    linear1 split)."""
    from diffusers import Flux2Pipeline

    model = flux2_klein[0]
    assert type(model.model).__name__ == "Flux2" and not model.model.model_config.unet_config["guidance_embed"]
    tensors, metadata, summary = check_family_training(comfy, flux2_klein, caplog, "Flux.2", "flux2_klein_lora",
                                                       3e-2, target="kohya_default",
                                                       sample_prompt="a red square on black --w 64 --h 64 --s 2",
                                                       sample_every_n_steps=4)
    samples = comfy.output_dir / "lora_lab" / "flux2_klein_lora" / "samples"   # 1/16 latents, decoded
    assert [path.name for path in samples.iterdir()] == ["step00004_0.png"]
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert "lora_unet_double_blocks_0_img_attn_qkv" in stems and "lora_unet_single_blocks_0_linear1" in stems
    assert not any("modulation" in stem for stem in stems)   # Flux.2 modulates outside the blocks
    assert metadata["ss_base_model_version"] == "flux2"
    assert metadata["modelspec.architecture"] == "flux-2-klein/lora"   # no guidance input: Klein
    assert metadata["ss_timestep_sampling"] == "flux2_shift" and "ss_guidance_scale" not in metadata

    state_dict = Flux2Pipeline.lora_state_dict(str(comfy.models_dir / "loras" / "flux2_klein_lora.safetensors"))
    converted = [key for key in state_dict if key.endswith("lora_A.weight")]
    assert converted and all(key.startswith("transformer.") for key in state_dict)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in state_dict
    assert len(converted) >= len(stems)


def edit_dataset(comfy, name: str, control_seeds: tuple[int, ...] = (11, 12), **inputs):
    """(dataset, summary) from the LoRA Dataset node on a folder of two 64 px images with captions and a
    control folder pairing each by file name (the controls in another format)."""
    from support.images import write_image

    from .test_dataset_node import SMALL, dataset_prompt, outputs_of

    root = comfy.input_dir / name
    for index, seed in enumerate(control_seeds):
        write_image(root / "targets" / f"pair{index}.png", (64, 64), index + 1, caption=f"edit {index}, make it red")
        write_image(root / "controls" / f"pair{index}.jpg", (64, 64), seed)
    dataset, summary, _ = outputs_of(comfy.run(dataset_prompt(
        folder=f"{name}/targets", control_folder=f"{name}/controls",
        **{**SMALL, "resolution": 64, "min_bucket_resolution": 64, "bucket_step": 64}, **inputs)))
    return dataset, summary


@pytest.mark.compat
def test_qwen_image_edit_trains_on_control_images(comfy, qwen_image):
    """Qwen-Image-Edit: LoRA Dataset's control_folder pairs each image with its control image by name;
    the control reaches the model as its reference latent (ComfyUI's reference_latents through
    extra_conds) and the Qwen2.5-VL sees it too (the edit template's vision tokens): another control
    image trains another LoRA, the file loads in the stock LoraLoader with no unmatched key."""
    from .test_flow_families import no_unmatched
    from .test_resume import assert_same_tensors
    from .test_train import stock_lora_loader

    dataset, summary = edit_dataset(comfy, "edit_a")
    assert dataset.has_controls and "control images: 2, paired by file name" in summary
    assert [Path(sample.control_path).name for sample in dataset.samples] == ["pair0.jpg", "pair1.jpg"]
    other, _ = edit_dataset(comfy, "edit_b", control_seeds=(21, 22))   # the same targets, other controls

    common = dict(steps=2, batch_size=2, target="attention", save_precision="fp32")
    names = [train_outputs(comfy, qwen_image, data, rates(comfy, learning_rate=1e-3), schedule(comfy),
                           lora_name=f"qwen_edit_{index}", **common)[2] for index, data in enumerate((dataset, other))]
    with pytest.raises(AssertionError):   # the control images are trained on: other controls, another LoRA
        assert_same_tensors(comfy, *names)
    _, _, lines = stock_lora_loader(comfy, qwen_image, names[0])
    assert no_unmatched(lines), lines

    # The text encoder sees the control image: the same caption encodes longer, with its vision tokens.
    access = comfy.pack.nodes.comfy.access.model_access(*qwen_image, "qwen_image")
    image = torch.rand((1, 64, 64, 3), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        alone = access.encode_captions(["make it red"])["c_crossattn"]
        seeing = access.encode_captions(["make it red"], images=[image])["c_crossattn"]
    assert seeing.shape[1] > alone.shape[1]


@pytest.mark.compat
def test_control_images_are_refused_by_a_model_that_takes_no_reference(comfy, chroma):
    """A control dataset on a family with no reference input (Chroma) is refused before any work, naming
    the input and the families that take one; a training image without its control image is named."""
    dataset, _ = edit_dataset(comfy, "edit_refused")
    with pytest.raises(ValueError, match=r"control_folder.*Chroma, which takes no reference image.*Qwen-Image or "
                                         r"Flux\.2"):
        train_outputs(comfy, chroma, dataset, rates(comfy), schedule(comfy), steps=1, batch_size=1)
    (comfy.input_dir / "edit_refused" / "controls" / "pair1.jpg").unlink()
    from .test_dataset_node import SMALL, dataset_prompt

    with pytest.raises(Exception, match=r"pair1\.png.*no control image of the same name in control_folder"):
        comfy.run(dataset_prompt(folder="edit_refused/targets", control_folder="edit_refused/controls", **SMALL))


def test_flux2_klein_trains_on_control_images_as_references(comfy, flux2_klein):
    """Flux.2 (ComfyUI 0.33's Klein): control images reach the model as reference latents only (its text
    encoder takes no image): another control image trains another LoRA."""
    from .test_resume import assert_same_tensors

    datasets = [edit_dataset(comfy, f"klein_edit_{index}", control_seeds=seeds)[0]
                for index, seeds in enumerate(((11, 12), (21, 22)))]
    names = [train_outputs(comfy, flux2_klein, data, rates(comfy, learning_rate=1e-2), schedule(comfy), steps=2,
                           batch_size=2, target="attention", save_precision="fp32", lora_name=f"klein_edit_{index}")[2]
             for index, data in enumerate(datasets)]
    with pytest.raises(AssertionError):
        assert_same_tensors(comfy, *names)
