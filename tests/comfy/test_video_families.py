"""Wan 2.1 / 2.2: video LoRAs trained on clips (and images) in the graph, on tiny random-weight files that
ComfyUI's own detection recognises (lora_lab_devtools/wan_fixtures.py), loaded through the stock
UNETLoader and VAELoader with the reduced UMT5 CLIP; the clips are written by the test (PyAV).

Each checks what every trained model must give (train_and_check: the loss at fixed noise on the clips'
own latents falls, the input MODEL/CLIP untouched, the stock LoraLoader loads the file with no unmatched
key into what the node returned), the family's kohya keys that diffusers' Wan loader converts (it raises
on a key it cannot place), and what is particular to video: batches of one frame count, clip previews,
Wan 2.2 A14B's experts each trained on its own side of the boundary (the sigmas of every step are in
log.jsonl), and Wan 2.2 I2V's start image.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageSequence

from lora_lab_devtools import wan_fixtures
from lora_lab_devtools.sample_dataset import make_sample_clips

from .test_flow_families import CAPTIONS
from .test_generic_family import train_and_check
from .test_image_families import check_family_training
from .test_train import pattern_images, read_lora
from .test_wan_fixtures import release_models_after_each_test, wan_files  # noqa: F401  (the same fixtures)

SIZE = 64          # pixels: the clips' side (8 latent pixels with Wan 2.1's VAE, 4 with Wan 2.2's)
CLIP_FRAMES = 9    # frames per written clip (16 fps)
WINDOW = 5         # frames per training clip (4n+1: 2 latent frames)
RATE = 3e-2        # the tiny random Wan moves slowly: 4 steps at this rate lower its fixed-noise loss by 5 % or more




@pytest.fixture(scope="module")
def umt5(comfy, wan_files):
    """The CLIP that CLIPLoader (type wan) makes of the reduced UMT5 file."""
    return wan_fixtures.wan_clip()


def load(comfy, wan_files, umt5, model_role: str, vae_role: str):
    with torch.inference_mode():
        model = comfy.node_class("UNETLoader")().load_unet(wan_files[model_role].name, "default")[0]
        vae = comfy.node_class("VAELoader")().load_vae(wan_files[vae_role].name)[0]
    return model, umt5, vae


def clip_folder(tmp_path: Path, images: int = 0) -> tuple[Path, list[torch.Tensor]]:
    """A dataset folder of two 9-frame clips captioned CAPTIONS[0] and [1] (and `images` still images
    captioned after them), and the first WINDOW frames of each clip as IMAGE batches (the windows the
    default head extraction trains on, at the clips' own 16 fps)."""
    from lora_lab.training.data.dataset.video import decode_frames
    from lora_lab.training.data.image_tensors import frames_to_image

    folder = tmp_path / "clips"
    paths = make_sample_clips(folder, count=2, frames=CLIP_FRAMES, size=(SIZE, SIZE), fps=16)
    pixels = []
    for index, path in enumerate(sorted(paths)):
        path.with_suffix(".txt").write_text(CAPTIONS[index])
        pixels.append(frames_to_image(decode_frames(path, list(range(WINDOW)))))
    for index, image in enumerate(pattern_images(images, SIZE) if images else []):
        Image.fromarray((image.numpy() * 255).round().astype("uint8")).save(folder / f"still_{index}.png")
        (folder / f"still_{index}.txt").write_text(CAPTIONS[2 + index])
    return folder, pixels


def clip_dataset(comfy, folder: Path, **options):
    module = comfy.pack.training.data.dataset
    return module.build_folder_dataset(folder, module.DatasetOptions(
        resolution=SIZE, min_bucket_resolution=SIZE, frames_per_clip=WINDOW, **options))


def log_lines(comfy, lora_name: str) -> list[dict]:
    path = comfy.output_dir / "lora_lab" / lora_name / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.compat
def test_wan21_trains_on_clips_and_images_and_its_file_loads_in_comfyui_and_diffusers(comfy, wan_files, umt5,
                                                                                      tmp_path, caplog):
    """Wan 2.1 T2V on a folder of two clips and two stills: batches keep one frame count (a clip's 2 latent
    frames, a still's 1), the clip preview is saved as an animation beside its first frame, and the file
    has musubi-tuner's lora_unet_blocks_* keys for every Linear of the blocks, which diffusers converts."""
    from diffusers.loaders.lora_conversion_utils import _convert_musubi_wan_lora_to_diffusers

    loaded = load(comfy, wan_files, umt5, "wan21_t2v", "wan21_vae")
    assert type(loaded[0].model).__name__ == "WAN21"
    folder, pixels = clip_folder(tmp_path, images=2)
    dataset = clip_dataset(comfy, folder)
    assert dataset.has_clips and sorted(dataset.buckets()) == [(SIZE, SIZE), (SIZE, SIZE, WINDOW)]
    tensors, metadata, summary = check_family_training(
        comfy, loaded, caplog, "Wan", "wan21_lora", RATE, dataset=dataset, pixels=pixels, target="kohya_default",
        sample_prompt=f"a red circle --w {SIZE} --h {SIZE} --f {WINDOW} --s 2", sample_every_n_steps=4)
    stems = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert stems == {f"lora_unet_blocks_{block}_{layer}" for block in range(wan_fixtures.WAN_LAYERS) for layer in (
        "self_attn_q", "self_attn_k", "self_attn_v", "self_attn_o", "cross_attn_q", "cross_attn_k", "cross_attn_v",
        "cross_attn_o", "ffn_0", "ffn_2")}
    assert metadata["ss_base_model_version"] == "wan" and metadata["modelspec.architecture"] == "wan2.1/lora"
    assert metadata["ss_timestep_sampling"] == "shift" and metadata["ss_discrete_flow_shift"] == "3.0"
    converted = _convert_musubi_wan_lora_to_diffusers(dict(tensors))
    assert "transformer.blocks.0.attn1.to_q.lora_A.weight" in converted and "transformer.blocks.1.ffn.net.2.lora_B.weight" in converted
    samples = comfy.output_dir / "lora_lab" / "wan21_lora" / "samples"
    assert sorted(path.name for path in samples.iterdir()) == ["step00004_0.png", "step00004_0.webp"]
    with Image.open(samples / "step00004_0.webp") as animation:   # the clip: 5 frames at 16 fps
        assert animation.n_frames == WINDOW and animation.size == (SIZE, SIZE)
        durations = []
        for frame in ImageSequence.Iterator(animation):
            frame.load()   # a WebP frame's duration is known once it is decoded
            durations.append(frame.info["duration"])
        assert durations == [round(1000 / 16)] * WINDOW
    lines = log_lines(comfy, "wan21_lora")
    assert [len(line["sigmas"]) for line in lines] == [2, 2, 2, 2]   # batch 2, one sigma per sample


@pytest.mark.parametrize("expert,inside", [("high_noise", lambda sigma: sigma >= 0.875),
                                           ("low_noise", lambda sigma: sigma <= 0.875)])
def test_each_wan22_expert_trains_only_its_own_noise_levels(comfy, wan_files, umt5, tmp_path, caplog, expert,
                                                            inside):
    """Wan 2.2 A14B: one Train LoRA per expert (noise_range high_noise / low_noise; noise_boundary 0 = the
    family's 0.875), each on its own expert file; every sigma a step trained is on the expert's side, the
    validation loss measures the same side, and each LoRA loads onto its expert with no unmatched key."""
    loaded = load(comfy, wan_files, umt5, f"wan22_t2v_{expert}", "wan21_vae")
    folder, pixels = clip_folder(tmp_path)
    name, _, _ = train_and_check(comfy, loaded, caplog, f"wan22_{expert}", RATE, dataset=clip_dataset(comfy, folder),
                                 pixels=pixels, noise_range=expert, validate_every_n_steps=4)
    lines = log_lines(comfy, f"wan22_{expert}")
    sigmas = [sigma for line in lines for sigma in line["sigmas"]]
    assert len(sigmas) == 8 and all(inside(sigma) for sigma in sigmas), sigmas
    assert lines[-1]["val_loss"] > 0
    _, metadata = read_lora(comfy, name)
    settings = json.loads(metadata["lora_lab_settings"])["train"]
    assert settings["noise_range"] == expert and settings["noise_boundary"] == 0.0


@pytest.mark.compat
def test_wan22_ti2v_5b_trains_on_the_48_channel_latents_of_its_own_vae(comfy, wan_files, umt5, tmp_path, caplog):
    loaded = load(comfy, wan_files, umt5, "wan22_ti2v", "wan22_vae")
    assert type(loaded[0].model).__name__ == "WAN22" and loaded[2].latent_channels == 48
    folder, pixels = clip_folder(tmp_path)
    check_family_training(comfy, loaded, caplog, "Wan", "wan22_ti2v_lora", RATE, dataset=clip_dataset(comfy, folder),
                          pixels=pixels)


def test_wan22_i2v_trains_from_each_clip_first_frame(comfy, wan_files, umt5, tmp_path, caplog):
    """Wan 2.2 I2V A14B (its high-noise expert, the boundary its own 0.9): each clip starts from its first
    frame (the start-image latent and mask WanImageToVideo gives, through the model's own concat_cond), the
    preview starts from the dataset's first clip; stills are refused before anything loads."""
    loaded = load(comfy, wan_files, umt5, "wan22_i2v_high_noise", "wan21_vae")
    folder, pixels = clip_folder(tmp_path)
    check_family_training(comfy, loaded, caplog, "Wan", "wan22_i2v_lora", RATE, dataset=clip_dataset(comfy, folder),
                          pixels=pixels, noise_range="high_noise",
                          sample_prompt=f"a red circle --w {SIZE} --h {SIZE} --f {WINDOW} --s 2", sample_every_n_steps=4)
    assert all(sigma >= 0.9 for line in log_lines(comfy, "wan22_i2v_lora") for sigma in line["sigmas"])
    samples = comfy.output_dir / "lora_lab" / "wan22_i2v_lora" / "samples"
    with Image.open(samples / "step00004_0.webp") as animation:
        assert animation.n_frames == WINDOW


def test_wan21_image_to_video_is_refused_with_the_reason(comfy):
    """Wan 2.1 I2V 14B (and FLF2V) take CLIP-vision features beside the start image: no first-class entry,
    and the generic path refuses it, naming the model class and what it needs, before any work."""
    from comfy.model_patcher import ModelPatcher

    from lora_lab_devtools.flow_fixtures import _zeros, detected_model

    skeleton = {**wan_fixtures.wan_skeleton("wan22_i2v"), "img_emb.proj.0.bias": _zeros(1)}
    _, base_model = detected_model("wan21_i2v", skeleton)
    assert type(base_model).__name__ == "WAN21" and base_model.model_config.unet_config["model_type"] == "i2v"
    model = ModelPatcher(base_model, torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(ValueError, match="model is WAN21 \\(WAN21_I2V\\).*CLIP-vision features: Wan 2.1 I2V"):
        comfy.pack.nodes.comfy.detect.model_family(model)
