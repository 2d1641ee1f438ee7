"""The Wan fixtures (lora_lab_devtools/wan_fixtures.py) in a real ComfyUI: placed under the real files'
names by wan_example_files, loaded by the stock UNETLoader, CLIPLoader (type wan, UMT5-XXL built
reduced) and VAELoader, then used as a Wan graph uses them: the caption encoded to UMT5's [1, 512, 4096]
conditioning, videos through the Wan 2.1 and 2.2 VAEs, the diffusion models run on 5-D latents with the
conditioning ComfyUI's own extra_conds builds (and one KSampler step), Wan 2.2 I2V with WanImageToVideo's
start-image concat.

The text encoder needs the sentencepiece package (ComfyUI's UMT5 tokenizer is a SentencePiece model):
where the environment lacks it, the text-encoder tests are skipped, saying so, and the diffusion models
get random conditioning of UMT5's shape instead of the encoder's.
"""
from __future__ import annotations

import importlib.util
import zlib

import pytest
import torch

from lora_lab_devtools import wan_fixtures

from .test_flow_families import release_all_models

CAPTION = "a red circle on a blue background"
HAS_SENTENCEPIECE = importlib.util.find_spec("sentencepiece") is not None
needs_sentencepiece = pytest.mark.skipif(not HAS_SENTENCEPIECE,
                                         reason="sentencepiece is not installed: ComfyUI's UMT5 tokenizer needs it")
# role: (supported_models class, model_base class, latent format, in channels, out channels)
DIFFUSION_MODELS = {
    "wan21_t2v": ("WAN21_T2V", "WAN21", "Wan21", 16, 16),
    "wan22_ti2v": ("WAN22_T2V", "WAN22", "Wan22", 48, 48),
    "wan22_t2v_high_noise": ("WAN21_T2V", "WAN21", "Wan21", 16, 16),
    "wan22_t2v_low_noise": ("WAN21_T2V", "WAN21", "Wan21", 16, 16),
    "wan22_i2v_high_noise": ("WAN21_T2V", "WAN21", "Wan21", 36, 16),
    "wan22_i2v_low_noise": ("WAN21_T2V", "WAN21", "Wan21", 36, 16),
}


@pytest.fixture(autouse=True)
def release_models_after_each_test():
    yield
    release_all_models()


@pytest.fixture(scope="module")
def wan_files(comfy):
    """Every Wan example file, linked into this ComfyUI's models folder under its real name."""
    return wan_fixtures.wan_example_files(comfy.models_dir)


def load_unet(comfy, wan_files, role: str):
    with torch.inference_mode():
        return comfy.node_class("UNETLoader")().load_unet(wan_files[role].name, "default")[0]


def load_vae(comfy, wan_files, role: str):
    with torch.inference_mode():
        return comfy.node_class("VAELoader")().load_vae(wan_files[role].name)[0]


@pytest.fixture(scope="module")
def wan_clip(comfy, wan_files):
    """CLIPLoader (type wan) on umt5_xxl_bf16.safetensors, UMT5-XXL built reduced."""
    if not HAS_SENTENCEPIECE:
        pytest.skip("sentencepiece is not installed: ComfyUI's UMT5 tokenizer needs it")
    with wan_fixtures.reduced_umt5(), torch.inference_mode():
        clip = comfy.node_class("CLIPLoader")().load_clip(wan_files["umt5"].name, "wan")[0]
    yield clip
    del clip


def encode(comfy, clip, text: str = CAPTION):
    with torch.inference_mode():
        return comfy.call_node("CLIPTextEncode", clip=clip, text=text)["result"][0]


@pytest.fixture(scope="module")
def text(comfy, request):
    """text(caption) -> CONDITIONING: CLIPTextEncode with the Wan CLIP, or (no sentencepiece) a random tensor of
    its shape [1, 512, 4096] seeded by the caption."""
    clip = request.getfixturevalue("wan_clip") if HAS_SENTENCEPIECE else None

    def conditioning(caption: str = CAPTION):
        if clip is not None:
            return encode(comfy, clip, caption)
        generator = torch.Generator().manual_seed(zlib.crc32(caption.encode()))
        return [[torch.randn((1, wan_fixtures.WAN_TEXT_TOKENS, wan_fixtures.WAN_TEXT_WIDTH), generator=generator), {}]]

    return conditioning


def model_inputs(model, conditioning, noise: torch.Tensor) -> dict:
    """apply_model's keyword inputs for a conditioning, built by the model's own extra_conds (what a sampler
    does with the conditioning's tensor and its options)."""
    cond, options = conditioning[0]
    extras = model.model.extra_conds(cross_attn=cond, noise=noise, device="cpu", **options)
    return {key: value.cond for key, value in extras.items()}


def apply_model(model, latent: torch.Tensor, inputs: dict) -> torch.Tensor:
    from comfy import model_management

    with torch.inference_mode():
        model_management.load_models_gpu([model], force_full_load=True)
        return model.model.apply_model(latent, torch.tensor([0.5]), **inputs).float().clone()


def one_ksampler_step(comfy, model, positive, negative, latent: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        result = comfy.call_node("KSampler", model=model, seed=3, steps=1, cfg=1.0, sampler_name="euler",
                                 scheduler="simple", positive=positive, negative=negative,
                                 latent_image={"samples": latent}, denoise=1.0)["result"][0]
    return result["samples"]


def frames(count: int, size: int) -> torch.Tensor:
    """An IMAGE batch of `count` frames: a square moving across a gradient."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    video = torch.stack([torch.stack([xs, ys, 1 - xs], dim=-1)] * count).clone()
    for index in range(count):
        start = index * (size // 2) // count
        video[index, start:start + size // 4, start:start + size // 4] = torch.tensor([1.0, 0.1, 0.1])
    return video


@pytest.mark.compat
def test_example_files_have_the_real_names(wan_files):
    assert {role: (path.parent.name, path.name) for role, path in wan_files.items()} == {
        role: (folder, name) for role, (folder, name, _) in wan_fixtures.EXAMPLE_FILES.items()}
    assert all(path.resolve().is_file() for path in wan_files.values())
    sources = {role: path.resolve() for role, path in wan_files.items()}
    assert len(set(sources.values())) == len(sources)   # the experts are files of their own


@pytest.mark.compat
@pytest.mark.parametrize("role", DIFFUSION_MODELS)
def test_unet_loader_detects_the_wan_model(comfy, wan_files, role):
    from comfy import latent_formats, model_base, supported_models
    from comfy.ldm.wan import model as wan_model

    config_class, model_class, latent_format, in_dim, out_dim = DIFFUSION_MODELS[role]
    model = load_unet(comfy, wan_files, role)
    assert type(model.model.model_config) is getattr(supported_models, config_class)
    assert type(model.model) is getattr(model_base, model_class)
    assert type(model.model.latent_format) is getattr(latent_formats, latent_format)
    network = model.model.diffusion_model
    assert type(network) is wan_model.WanModel
    assert (network.in_dim, network.out_dim, network.dim, network.num_heads, network.ffn_dim, len(network.blocks)) == (
        in_dim, out_dim, wan_fixtures.WAN_DIM, 1, wan_fixtures.WAN_FFN, wan_fixtures.WAN_LAYERS)
    assert network.text_embedding[0].weight.shape == (wan_fixtures.WAN_DIM, wan_fixtures.WAN_TEXT_WIDTH)
    assert network.img_emb is None and model.model.model_type.name == "FLOW"


@pytest.mark.compat
def test_the_two_experts_differ(comfy, wan_files):
    high = load_unet(comfy, wan_files, "wan22_t2v_high_noise").model.diffusion_model.state_dict()
    low = load_unet(comfy, wan_files, "wan22_t2v_low_noise").model.diffusion_model.state_dict()
    assert high.keys() == low.keys()
    assert not torch.equal(high["blocks.0.self_attn.q.weight"], low["blocks.0.self_attn.q.weight"])


@pytest.mark.compat
@needs_sentencepiece
def test_clip_loader_builds_the_reduced_umt5_and_encodes_512_tokens(comfy, wan_clip):
    from comfy.text_encoders import sd3_clip, wan

    encoder = wan_clip.cond_stage_model
    assert type(encoder).__name__ == "WanTEModel" and isinstance(encoder, wan.WanT5Model)
    umt5 = encoder.umt5xxl
    assert isinstance(umt5, wan.UMT5XXlModel)
    assert (umt5.transformer.num_layers, umt5.transformer.shared.weight.shape) == (2, (32128, 4096))
    blocks = umt5.transformer.encoder.block
    assert all(block.layer[0].SelfAttention.relative_attention_bias is not None for block in blocks)  # UMT5's
    assert isinstance(getattr(wan_clip.tokenizer, wan_clip.tokenizer.clip), wan.UMT5XXlTokenizer)

    tokens = wan_clip.tokenize(CAPTION)["umt5xxl"][0]
    ids = [token[0] for token in tokens]
    # The file's SentencePiece model tokenises as ComfyUI's T5-XXL tokenizer (tokenizer.json) does.
    reference = sd3_clip.T5XXLTokenizer().tokenize_with_weights(CAPTION)[0]
    count = ids.index(1) + 1
    assert ids[:count] == [token[0] for token in reference][:count] and count == 10
    assert len(ids) == 512 and set(ids[count:]) == {0}

    conditioning = encode(comfy, wan_clip)
    cond = conditioning[0][0]
    assert cond.shape == (1, 512, 4096) and torch.isfinite(cond).all()
    assert cond[0, :count].abs().amax(dim=-1).min() > 0      # every real token encoded
    assert not cond[0, count:].any()                           # padding zeroed (zero_out_masked)
    other = encode(comfy, wan_clip, "a photo of sks dog")[0][0]
    assert not torch.equal(other, cond)


@pytest.mark.compat
@needs_sentencepiece
def test_wan_clip_is_what_the_clip_loader_builds(comfy, wan_clip):
    clip = wan_fixtures.wan_clip()
    torch.testing.assert_close(encode(comfy, clip)[0][0], encode(comfy, wan_clip)[0][0], rtol=0, atol=0)


@needs_sentencepiece
def test_a_bigger_tokenizer_than_the_table_is_refused():
    wan_fixtures.check_umt5_vocabulary(wan_fixtures.umt5_tokenizer_model())
    with pytest.raises(ValueError, match="ids >= 1000 would index past it"):
        wan_fixtures.check_umt5_vocabulary(wan_fixtures.umt5_tokenizer_model(), vocab_size=1000)


@pytest.mark.parametrize("role,module,channels,size,latent_side", [
    pytest.param("wan21_vae", "vae", 16, 32, 4, marks=pytest.mark.compat),   # 1/8 in space
    ("wan22_vae", "vae2_2", 48, 64, 4)])                                      # 1/16 in space, real size
def test_wan_vae_encodes_and_decodes_a_9_frame_clip(comfy, wan_files, role, module, channels, size, latent_side):
    """VAE Encode / VAE Decode on a 9-frame clip: 3 latent frames (the first, then 4 to 1)."""
    import importlib

    vae = load_vae(comfy, wan_files, role)
    assert type(vae.first_stage_model) is importlib.import_module(f"comfy.ldm.wan.{module}").WanVAE
    assert vae.latent_channels == channels
    with torch.inference_mode():
        latent = comfy.call_node("VAEEncode", vae=vae, pixels=frames(9, size))["result"][0]["samples"]
        assert latent.shape == (1, channels, 3, latent_side, latent_side)
        assert torch.isfinite(latent).all() and latent.std() > 0
        decoded = comfy.call_node("VAEDecode", vae=vae, samples={"samples": latent})["result"][0]
    assert decoded.shape == (9, size, size, 3) and torch.isfinite(decoded).all()
    assert 0 <= decoded.min() and decoded.max() <= 1 and decoded.std() > 0
    del vae


@pytest.mark.compat
@pytest.mark.parametrize("role, channels", [("wan21_t2v", 16), ("wan22_ti2v", 48)])
def test_text_to_video_models_run_on_video_latents(comfy, wan_files, text, role, channels):
    model = load_unet(comfy, wan_files, role)
    conditioning = text()
    latent = torch.randn((1, channels, 3, 4, 4), generator=torch.Generator().manual_seed(1))
    inputs = model_inputs(model, conditioning, latent)
    assert inputs["c_crossattn"].shape == (1, 512, 4096) and "c_concat" not in inputs
    output = apply_model(model, latent, inputs)
    assert output.shape == latent.shape and torch.isfinite(output).all()
    other = apply_model(model, latent, model_inputs(model, text("a photo of sks dog"), latent))
    assert not torch.equal(output, other)                     # the text reaches the model
    sampled = one_ksampler_step(comfy, model, conditioning, conditioning, torch.zeros_like(latent))
    assert sampled.shape == latent.shape and torch.isfinite(sampled).all()


@pytest.mark.compat
def test_wan22_i2v_takes_the_start_image_as_20_concat_channels(comfy, wan_files, text):
    model = load_unet(comfy, wan_files, "wan22_i2v_high_noise")
    vae = load_vae(comfy, wan_files, "wan21_vae")
    caption = text()
    with torch.inference_mode():
        positive, negative, latent = comfy.call_node(
            "WanImageToVideo", positive=caption, negative=caption, vae=vae, width=32, height=32, length=9, batch_size=1,
            start_image=frames(1, 32))["result"]
    latent = latent["samples"]
    assert latent.shape == (1, 16, 3, 4, 4)
    options = positive[0][1]
    assert options["concat_latent_image"].shape == (1, 16, 3, 4, 4) and options["concat_mask"].shape == (1, 1, 3, 4, 4)

    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    inputs = model_inputs(model, positive, noise)
    concat = inputs["c_concat"]
    assert concat.shape == (1, 20, 3, 4, 4)                   # 16 + 20 = the model's 36 input channels
    assert model.model.diffusion_model.patch_embedding.weight.shape[1] == 36
    assert torch.equal(concat[:, :4, :1], torch.ones_like(concat[:, :4, :1]))    # the start frame is given...
    assert not concat[:, :4, 1:].any()                                          # ...the rest is generated
    torch.testing.assert_close(concat[:, 4:], model.model.process_latent_in(options["concat_latent_image"]))
    output = apply_model(model, noise, inputs)
    assert output.shape == (1, 16, 3, 4, 4) and torch.isfinite(output).all()
    without_image = apply_model(model, noise, model_inputs(model, caption, noise))   # concat_cond's zeros instead
    assert not torch.equal(output, without_image)
    sampled = one_ksampler_step(comfy, model, positive, negative, latent)
    assert sampled.shape == (1, 16, 3, 4, 4) and torch.isfinite(sampled).all()
