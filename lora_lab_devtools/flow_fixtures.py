"""Tiny random-weight flow-matching models (Flux.1, SD3, Z-Image) that ComfyUI's own detection
recognises, and their text encoders in reduced configurations. Never committed: generated on demand
into the fixtures cache (like tiny_checkpoint.py's SD files), an existing file is reused.

How each is built: a "skeleton" holding only the tensors ComfyUI's model detection reads (their
shapes pick the configuration) goes through ``comfy.model_detection`` exactly as a loaded file
would; the detected config builds ComfyUI's own model class, whose weights are filled from one
seeded generator and saved. So the files are what the stock loaders detect, in whichever ComfyUI
runs (0.3.75 and 0.33 differ in the Flux config they detect), and loading them is real.

* Flux.1 dev / schnell: 1 double + 1 single block at the real width (ComfyUI 0.3.75 detects every
  Flux as 24 heads of 128, so hidden 3072; ~0.5 B parameters, saved in bf16), CLIP-L pooled width
  768, text width 64 (the reduced T5 below). A diffusion-model-only file, loaded by UNETLoader as
  flux1-dev.safetensors is.
* SD3: MMDiT depth 2 (hidden 128, 2 heads), RMS q/k norm (SD3.5), pooled 2048 (CLIP-L + CLIP-G),
  context 4096, a 32x32 position grid; one checkpoint with the full CLIP-L and CLIP-G (no T5, which
  SD3 allows) and a 16-channel TAESD VAE, loaded by CheckpointLoaderSimple.
* Z-Image: ComfyUI detects Z-Image by its width (dim 3840), so the blocks are real-width: one main
  layer plus the two noise- and two context-refiner layers every Z-Image has (~0.9 B parameters,
  saved in bf16), caption width 256 (the reduced Qwen3 below).
* VAEs: TAESD with 16 latent channels (the Flux/SD3/Z-Image latent width), as ComfyUI's VAELoader
  reads a TAESD state dict; a 4-channel one for PixArt.

Models with no family entry, for the generic path (tests/comfy/test_generic_family.py):

* Lumina 2 (NetaYume / Lumina-Image 2.0's layout): ComfyUI configures dim 2304 as Lumina 2 (24 heads of
  96, 8 KV heads), so the blocks are real-width: one main layer plus the two noise- and two
  context-refiner layers (~0.3 B parameters, saved in bf16), caption width 256 (the reduced Qwen3).
* PixArt Sigma: one block at the real width (hidden 1152, 16 heads; ~30 M parameters), caption width
  4096 from a reduced T5 (d_model 4096, one layer, the real vocabulary and tokenizer), epsilon
  prediction; a 4-channel TAESD VAE.

Reduced text encoders (the real T5-XXL has 4.7 B parameters and Z-Image's Qwen3 4 B: far too big for
a 2-core test machine): ComfyUI's own classes with smaller configurations, built by
:func:`reduced_text_encoder`. T5: d_model 64, 2 layers, 2 heads, the real vocabulary and tokenizer;
Qwen3: hidden 256, 3 layers (ComfyUI reads the second to last), 2 heads of 128, the real vocabulary, tokenizer and chat template. The
CLIP-L of Flux is the real configuration. What this covers: ComfyUI's tokenizers, its encoder code
paths, the conditioning they produce (shapes, masks, pooled vectors) and the model's use of it. What
it does not: the real encoders' widths and depths (so not their memory or speed), or any learned
behaviour (the weights are random).
"""
from __future__ import annotations

from pathlib import Path

from .environment import fixtures_dir, generated_once
from .tiny_checkpoint import _import_comfy, _initialise, write_atomically

FLOW_FIXTURE_VERSION = 1
SEED = 20261201
REDUCED_T5 = {"d_ff": 128, "d_kv": 32, "d_model": 64, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
              "layer_norm_epsilon": 1e-6, "model_type": "t5", "num_heads": 2, "num_layers": 2,
              "relative_attention_num_buckets": 32, "vocab_size": 32128, "eos_token_id": 1, "pad_token_id": 0}
REDUCED_QWEN3 = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 2,
                 "num_key_value_heads": 1}
FLUX_HIDDEN = 3072               # ComfyUI 0.3.75 fixes Flux at 24 heads of 128: the real width
REDUCED_T5_4096 = {**REDUCED_T5, "d_model": 4096, "num_layers": 1}   # PixArt's caption width
LUMINA2_DIM = 2304               # ComfyUI's Lumina 2 configuration (3840 is Z-Image)
SD3_DEPTH = 2
SD3_POSITIONS = 32                 # pos_embed grid side: images up to 32 x 2 x 8 = 512 px


def fixture_path(name: str) -> Path:
    return fixtures_dir() / f"lora_lab_{name}_v{FLOW_FIXTURE_VERSION}.safetensors"


def _zeros(*shape):
    import torch
    return torch.zeros(shape)


def flux_skeleton(guidance: bool = True) -> dict:
    """The tensors ComfyUI's detection reads for a Flux.1 model (BFL key layout)."""
    skeleton = {"img_in.weight": _zeros(FLUX_HIDDEN, 64), "txt_in.weight": _zeros(FLUX_HIDDEN, REDUCED_T5["d_model"]),
                "vector_in.in_layer.weight": _zeros(FLUX_HIDDEN, 768)}
    for index in range(1):
        skeleton[f"double_blocks.{index}.img_attn.norm.key_norm.scale"] = _zeros(128)
        skeleton[f"single_blocks.{index}.norm.key_norm.scale"] = _zeros(128)
    if guidance:
        skeleton["guidance_in.in_layer.weight"] = _zeros(FLUX_HIDDEN, 256)
    return skeleton


def sd3_skeleton() -> dict:
    hidden = 64 * SD3_DEPTH
    skeleton = {"x_embedder.proj.weight": _zeros(hidden, 16, 2, 2), "final_layer.linear.weight": _zeros(2 * 2 * 16, hidden),
                "y_embedder.mlp.0.weight": _zeros(hidden, 2048), "context_embedder.weight": _zeros(hidden, 4096),
                "pos_embed": _zeros(1, SD3_POSITIONS * SD3_POSITIONS, hidden)}
    for index in range(SD3_DEPTH):
        skeleton[f"joint_blocks.{index}.context_block.attn.qkv.weight"] = _zeros(3 * hidden, hidden)
        skeleton[f"joint_blocks.{index}.context_block.attn.ln_q.weight"] = _zeros(64)
    return skeleton


def zimage_skeleton() -> dict:
    skeleton = {"cap_embedder.1.weight": _zeros(3840, REDUCED_QWEN3["hidden_size"]),
                "noise_refiner.0.attention.k_norm.weight": _zeros(128), "layers.0.attention.qkv.weight": _zeros(1),
                "cap_pad_token": _zeros(1, 3840), "x_pad_token": _zeros(1, 3840)}
    return skeleton


def full_flux_skeleton() -> dict:
    """Flux.1-dev's real layout (19 double + 38 single blocks, hidden 3072) with the reduced T5's text
    width: the benchmark's Flux-sized model (~12 B parameters; the text width changes only txt_in)."""
    skeleton = flux_skeleton(True)
    for index in range(19):
        skeleton[f"double_blocks.{index}.img_attn.norm.key_norm.scale"] = _zeros(128)
    for index in range(38):
        skeleton[f"single_blocks.{index}.norm.key_norm.scale"] = _zeros(128)
    return skeleton


def sd35_medium_skeleton() -> dict:
    """SD3.5-medium-sized MMDiT (depth 24: hidden 1536, 24 heads; a 192 x 192 position grid as SD3's,
    RMS q/k norm), the benchmark's SD3.5-sized model (~2 B parameters)."""
    depth, hidden = 24, 64 * 24
    skeleton = {"x_embedder.proj.weight": _zeros(hidden, 16, 2, 2), "final_layer.linear.weight": _zeros(64, hidden),
                "y_embedder.mlp.0.weight": _zeros(hidden, 2048), "context_embedder.weight": _zeros(hidden, 4096),
                "pos_embed": _zeros(1, 192 * 192, 1)}
    for index in range(depth):
        skeleton[f"joint_blocks.{index}.context_block.attn.qkv.weight"] = _zeros(1)
        skeleton[f"joint_blocks.{index}.context_block.attn.ln_q.weight"] = _zeros(1)
    return skeleton


def lumina2_skeleton() -> dict:
    """Lumina 2 at dim 2304 (NetaYume / Lumina-Image 2.0): one main layer (ComfyUI adds the refiners)."""
    return {"cap_embedder.1.weight": _zeros(LUMINA2_DIM, REDUCED_QWEN3["hidden_size"]),
            "noise_refiner.0.attention.k_norm.weight": _zeros(96), "layers.0.attention.qkv.weight": _zeros(1)}


def pixart_sigma_skeleton() -> dict:
    """PixArt Sigma (no size micro-conditions), one block."""
    return {"t_block.1.weight": _zeros(1), "blocks.0.attn.qkv.weight": _zeros(1),
            "y_embedder.y_embedding": _zeros(120, REDUCED_T5_4096["d_model"])}


SKELETONS = {"flux_dev": lambda: flux_skeleton(True), "flux_schnell": lambda: flux_skeleton(False),
             "sd3": sd3_skeleton, "zimage": zimage_skeleton, "flux_full": full_flux_skeleton,
             "sd35m_full": sd35_medium_skeleton, "lumina2": lumina2_skeleton, "pixart_sigma": pixart_sigma_skeleton}


def detected_model(name: str, skeleton: dict, dtype=None):
    """(model config, ComfyUI's model_base object) for a skeleton, as its detection configures it (the
    weights are not initialised: each builder seeds its own)."""
    _import_comfy()
    import torch
    import comfy.model_detection

    unet_config = comfy.model_detection.detect_unet_config(skeleton, "")
    config = comfy.model_detection.model_config_from_unet_config(unet_config, skeleton)
    if config is None:
        raise RuntimeError(f"ComfyUI's detection did not recognise the {name} skeleton: {unet_config}")
    config.set_inference_dtype(dtype or torch.float32, None)
    return config, config.get_model({})


def build_diffusion_model(name: str, dtype=None):
    """ComfyUI's model (model_base) for a skeleton, as its detection configures it, with seeded weights."""
    import torch

    config, base_model = detected_model(name, SKELETONS[name](), dtype)
    generator = torch.Generator().manual_seed(SEED + len(name))
    _initialise(base_model.diffusion_model, generator)
    with torch.no_grad():   # buffers that a file holds (SD3's position table) are made with torch.empty too
        for buffer_name, buffer in base_model.diffusion_model.named_buffers():
            if buffer_name.endswith("pos_embed"):
                buffer.copy_(0.02 * torch.randn(buffer.shape, generator=generator))
    return config, base_model


def tiny_taesd16(seed: int, latent_channels: int = 16):
    """A 16-latent-channel TAESD (Flux / SD3 / Z-Image latent width; or `latent_channels`) with seeded weights."""
    import torch
    import comfy.taesd.taesd

    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    _initialise(taesd, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    return taesd


def _save(target: Path, tensors: dict, dtype) -> Path:
    import safetensors.torch

    target.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to(dtype).contiguous() for key, value in tensors.items()}
    write_atomically(target, lambda temporary: safetensors.torch.save_file(
        state, temporary, metadata={"lora_lab_fixture": target.name}))
    return target


def vae_model_from_skeleton(skeleton: dict):
    """The first-stage model comfy.sd.VAE builds for a key skeleton (the keys that mark a VAE kind), in fp32 on
    the CPU, its weights not yet initialised (the caller seeds them)."""
    _import_comfy()
    import logging

    import torch
    import comfy.sd

    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)   # the skeleton leaves nearly every key "missing": expected here
    try:
        vae = comfy.sd.VAE(sd=skeleton)
    finally:
        logger.setLevel(level)
    return vae.first_stage_model.to(device="cpu", dtype=torch.float32)


@generated_once
def ensure_diffusion_model(name: str) -> Path:
    """The diffusion-model-only file (UNETLoader) of a SKELETONS entry (flux_dev, flux_schnell, zimage;
    sd3's diffusion model alone; flux_full / sd35m_full for the GPU benchmark)."""
    import torch

    target = fixture_path(f"tiny_{name}_unet")
    if target.is_file():
        return target
    dtype = torch.float32 if name in ("flux_dev", "flux_schnell", "sd3") else torch.bfloat16   # big ones in bf16
    _, base_model = build_diffusion_model(name, dtype)
    state = base_model.diffusion_model.state_dict()
    if name.startswith("flux"):   # BFL's file layout names the q/k RMSNorm weights "scale" (ComfyUI renames on load)
        state = {(key[:-len(".weight")] + ".scale" if key.endswith("_norm.weight") else key): value
                 for key, value in state.items()}
    return _save(target, state, torch.bfloat16)


@generated_once
def ensure_vae16() -> Path:
    import torch

    target = fixture_path("tiny_taesd16_vae")
    if target.is_file():
        return target
    _import_comfy()
    return _save(target, tiny_taesd16(SEED + 3).state_dict(), torch.float16)


@generated_once
def ensure_vae4() -> Path:
    """A 4-latent-channel TAESD (SD / SDXL / PixArt latent width)."""
    import torch

    target = fixture_path("tiny_taesd4_vae")
    if target.is_file():
        return target
    _import_comfy()
    return _save(target, tiny_taesd16(SEED + 4, latent_channels=4).state_dict(), torch.float16)


def reduced_text_encoder(kind: str, device="cpu", dtype=None, model_options=None):
    """ComfyUI's text-encoder model for `kind` ("flux": CLIP-L + reduced T5; "zimage": reduced Qwen3;
    "pixart": a reduced T5 of T5-XXL's width 4096),
    the same classes and methods the stock loaders build, with the reduced configurations above."""
    _import_comfy()
    import torch
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.t5
    import comfy.text_encoders.z_image
    import comfy.text_encoders.llama

    options = dict(model_options or {})
    if kind == "flux":
        model = comfy.text_encoders.flux.FluxClipModel.__new__(comfy.text_encoders.flux.FluxClipModel)
        torch.nn.Module.__init__(model)
        model.clip_l = comfy.sd1_clip.SDClipModel(device=device, dtype=dtype, return_projected_pooled=False,
                                                  model_options=options)
        model.t5xxl = comfy.sd1_clip.SDClipModel(device=device, layer="last", textmodel_json_config=dict(REDUCED_T5),
                                                 dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                                 model_class=comfy.text_encoders.t5.T5, model_options=options)
        model.dtypes = {dtype}
        return model
    if kind == "zimage":
        def qwen3(device="cpu", dtype=None, model_options={}):
            return comfy.sd1_clip.SDClipModel(
                device=device, layer="hidden", layer_idx=-2, textmodel_json_config=dict(REDUCED_QWEN3), dtype=dtype,
                special_tokens={"pad": 151643}, layer_norm_hidden_state=False,
                model_class=comfy.text_encoders.llama.Qwen3_4B, enable_attention_masks=True,
                return_attention_masks=True, model_options=model_options)

        model = comfy.text_encoders.z_image.ZImageTEModel.__new__(comfy.text_encoders.z_image.ZImageTEModel)
        comfy.sd1_clip.SD1ClipModel.__init__(model, device=device, dtype=dtype, model_options=options,
                                             name="qwen3_4b", clip_model=qwen3)
        return model
    if kind == "pixart":
        import comfy.text_encoders.pixart_t5

        def t5(device="cpu", dtype=None, model_options={}):
            return comfy.sd1_clip.SDClipModel(device=device, layer="last", textmodel_json_config=dict(REDUCED_T5_4096),
                                              dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                              model_class=comfy.text_encoders.t5.T5, model_options=model_options)

        model = comfy.text_encoders.pixart_t5.PixArtT5XXL.__new__(comfy.text_encoders.pixart_t5.PixArtT5XXL)
        comfy.sd1_clip.SD1ClipModel.__init__(model, device=device, dtype=dtype, model_options=options, name="t5xxl",
                                             clip_model=t5)
        return model
    raise ValueError(kind)


def reduced_clip(kind: str, weights: dict | None = None, dtype=None):
    """A comfy.sd.CLIP around :func:`reduced_text_encoder` (ComfyUI's tokenizer for the family)."""
    _import_comfy()
    import torch
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux
    import comfy.text_encoders.z_image

    dtype = dtype or torch.float32
    import comfy.text_encoders.pixart_t5

    tokenizer = {"flux": comfy.text_encoders.flux.FluxTokenizer,
                 "zimage": comfy.text_encoders.z_image.ZImageTokenizer,
                 "pixart": comfy.text_encoders.pixart_t5.PixArtTokenizer}[kind]

    class ReducedTextEncoder(torch.nn.Module):
        def __new__(cls, device="cpu", dtype=None, model_options={}):
            return reduced_text_encoder(kind, device=device, dtype=dtype, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(tokenizer, ReducedTextEncoder)
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
    if weights is not None:
        clip.load_sd(weights, full_model=True)
    return clip


@generated_once
def ensure_text_encoder(kind: str) -> Path:
    """Seeded weights of the reduced text encoder (the whole cond_stage_model state dict)."""
    import torch

    target = fixture_path(f"tiny_{kind}_text_encoder")
    if target.is_file():
        return target
    model = reduced_text_encoder(kind, dtype=torch.float32)
    _initialise(model, torch.Generator().manual_seed(SEED + 7))
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("position_ids")}
    return _save(target, state, torch.float32)


@generated_once
def ensure_flux_text_encoder_files() -> tuple[Path, Path]:
    """(clip_l, t5) files as DualCLIPLoader reads them (each encoder's own keys), split from
    ensure_text_encoder("flux"). The T5 file loads only where ComfyUI builds T5 with the reduced
    configuration (tests/support/reduced_text_encoders, installed in the e2e server that runs the
    Flux example)."""
    import safetensors.torch

    clip_l, t5 = fixture_path("tiny_flux_clip_l"), fixture_path("tiny_flux_t5_reduced")
    if clip_l.is_file() and t5.is_file():
        return clip_l, t5
    import torch

    weights = safetensors.torch.load_file(str(ensure_text_encoder("flux")))
    for target, prefix in ((clip_l, "clip_l.transformer."), (t5, "t5xxl.transformer.")):
        _save(target, {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)},
              torch.float32)
    return clip_l, t5


@generated_once
def ensure_sd3_checkpoint() -> Path:
    """SD3 (MMDiT) + full CLIP-L + CLIP-G + 16-channel TAESD, written by ComfyUI's own save_checkpoint."""
    target = fixture_path("tiny_sd3")
    if target.is_file():
        return target
    _import_comfy()
    import torch
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip

    _, base_model = build_diffusion_model("sd3", torch.float16)
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    clip_target = comfy.supported_models_base.ClipTarget(
        comfy.text_encoders.sd3_clip.SD3Tokenizer,
        comfy.text_encoders.sd3_clip.sd3_clip(clip_l=True, clip_g=True, t5=False))
    clip = comfy.sd.CLIP(clip_target, model_options={"dtype": torch.float16})
    _initialise(clip.cond_stage_model, torch.Generator().manual_seed(SEED + 5))
    vae = comfy.sd.VAE(sd={key: value.half() for key, value in tiny_taesd16(SEED + 6).state_dict().items()})
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda name: comfy.sd.save_checkpoint(
        name, model, clip=clip, vae=vae, metadata={"lora_lab_fixture": target.name}))
    return target


@generated_once
def ensure_sd3_scaled_fp8_checkpoint() -> Path:
    """The tiny SD3 checkpoint with its MMDiT blocks' Linear weights in ComfyUI's quantized checkpoint
    format (comfy/quant_ops.py, scaled fp8): each such weight in fp8 with its fp32 ``weight_scale``
    (weight = fp8 * scale), marked the way each ComfyUI detects it: per layer a ``comfy_quant`` JSON tensor
    {"format": "float8_e4m3fn"} (0.33: comfy.utils.detect_layer_quantization) and the file's
    ``_quantization_metadata`` (0.3.75: model_detection.detect_layer_quantization; names relative to the
    diffusion model). Both load them as QuantizedTensor weights of their mixed-precision ops."""
    target = fixture_path("tiny_sd3_scaled_fp8")
    if target.is_file():
        return target
    import json

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(ensure_sd3_checkpoint()), "pt") as handle:
        metadata = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")), dtype=torch.uint8)
    largest = torch.finfo(torch.float8_e4m3fn).max
    layers = {}
    for key in [key for key, tensor in tensors.items() if key.startswith("model.diffusion_model.joint_blocks.")
                and key.endswith(".weight") and tensor.dim() == 2]:
        weight = tensors[key].float()
        scale = weight.abs().max().clamp(min=1e-12) / largest
        layer = key[:-len(".weight")]
        tensors[key] = (weight / scale).clamp(-largest, largest).to(torch.float8_e4m3fn)
        tensors[f"{layer}.weight_scale"] = scale.reshape(())
        tensors[f"{layer}.comfy_quant"] = marker.clone()
        layers[layer[len("model.diffusion_model."):]] = {"format": "float8_e4m3fn"}
    metadata = {**metadata, "lora_lab_fixture": target.name,
                "_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    write_atomically(target, lambda name: save_file(tensors, name, metadata=metadata))
    return target


def example_files(module: str, makers: dict[str, str]) -> dict[str, Path]:
    """{name: path} of fixture files made by `lora_lab_devtools.<module>.<maker>()`, generated in a child
    process (the e2e tier does not import ComfyUI itself)."""
    import json
    import os
    import subprocess
    import sys

    from .environment import REPO_ROOT
    from .tiny_checkpoint import _comfyui_dir

    calls = ", ".join(f"{name!r}: str(m.{maker}())" for name, maker in makers.items())
    code = f"import json; from lora_lab_devtools import {module} as m; print(json.dumps({{{calls}}}))"
    environment = {**os.environ, "LORA_LAB_COMFYUI_DIR": str(_comfyui_dir())}
    output = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO_ROOT,
                            env=environment).stdout
    return {key: Path(value) for key, value in json.loads(output.strip().splitlines()[-1]).items()}


def flux_example_files() -> dict[str, Path]:
    """The Flux example's files (diffusion model, CLIP-L, reduced T5, VAE)."""
    return example_files("flow_fixtures", {"unet": "ensure_diffusion_model_flux_dev",
                                           "clip_l": "ensure_flux_clip_l_file", "t5": "ensure_flux_t5_file",
                                           "vae": "ensure_vae16"})


def ensure_diffusion_model_flux_dev() -> Path:
    return ensure_diffusion_model("flux_dev")


def ensure_flux_clip_l_file() -> Path:
    return ensure_flux_text_encoder_files()[0]


def ensure_flux_t5_file() -> Path:
    return ensure_flux_text_encoder_files()[1]
