"""Tiny random-weight Qwen-Image fixtures that ComfyUI's own detection recognises: the diffusion
model, its Qwen2.5-VL-7B text encoder in a reduced configuration, and a tiny Wan 2.1 VAE. Never
committed: generated on demand into the fixtures cache with flow_fixtures.py's helpers (same naming,
seed and saving), an existing file is reused. The files are byte-identical in ComfyUI 0.3.75 and 0.33.

* Diffusion model: a skeleton holding only the tensors ComfyUI's detection reads goes through
  ``comfy.model_detection``, which configures ``comfy.model_base.QwenImage``. Detection reads the
  input width (64: 16 latent channels in 2 x 2 patches) and counts the transformer blocks; every
  other size is fixed by ComfyUI (24 heads of 128, so hidden 3072; text width 3584, Qwen2.5-VL-7B's
  hidden size). So the one block is real-width (~0.38 B parameters, saved in bf16: 0.76 GB), loaded
  by UNETLoader as qwen_image_fp8_e4m3fn.safetensors is.
* Text encoder: ComfyUI's Qwen-Image text-encoder classes (``qwen_image.te()``, QwenImageTEModel,
  Qwen25_7BVLIModel, llama.Qwen25_7BVLI, qwen_vl's vision tower) with the real vocabulary,
  tokenizer and chat templates. The language model keeps the width the diffusion model's txt_in
  reads (3584: the vocabulary table alone is 0.55 B parameters, so the file is saved in bf16,
  1.1 GB) but has 2 layers of 2 heads (+ 1 KV head) of 128 (the head width MRoPE's sections need).
  The vision tower, whose width ComfyUI fixes at 1280, is rebuilt 64 wide with 8 blocks (block 7 is
  the first full-attention one, so both attention paths run): Qwen-Image-Edit's text encoder sees
  the control image through it (TextEncodeQwenImageEdit / EditPlus pass ``images=`` to
  ``clip.tokenize``). The file holds the whole cond_stage_model state dict, loaded by
  :func:`reduced_qwen_image_clip`; the stock CLIPLoader builds the full 7 B configuration, which it
  does not fit.
* VAE: ComfyUI's own ``comfy.ldm.wan.vae.WanVAE`` (Qwen-Image's VAE is Wan 2.1's: 16 channels,
  3-D latents, latent format Wan21) at dim 4 instead of 96 (ComfyUI's VAE class reads dim from
  ``decoder.head.0.gamma``; 0.24 M parameters); VAELoader loads it as qwen_image_vae.safetensors is.
  Dims 1 and 2 load too, but their first-level RMS norms would normalise over one or two channels.

What this covers: ComfyUI's detection and loaders for Qwen-Image, its tokenizer and templates, its
encoder code paths with and without an image (the conditioning's shape, template trimming, the
all-ones attention mask dropped), the model's conditioning (``extra_conds``: cross attention,
reference latents) and a forward pass on 5-D latents. What it does not: the real encoder's depth and
the vision tower's width, the diffusion model's depth (so not their memory or speed), or any learned
behaviour (the weights are random). The stock Edit nodes resize their images to about 1 Mpx (a
128 x 128 reference latent, 4096 image tokens at width 3072): on a CPU that costs seconds and
gigabytes even with these fixtures, so tests pass small images and reference latents directly.
"""
from __future__ import annotations

import functools
import math
from pathlib import Path

from .environment import generated_once
from .flow_fixtures import SEED, _save, _zeros, detected_model, example_files, fixture_path
from .tiny_checkpoint import _import_comfy, _initialise

QWEN_IMAGE_HIDDEN = 3072        # ComfyUI fixes Qwen-Image at 24 heads of 128
QWEN_IMAGE_TEXT_WIDTH = 3584    # joint_attention_dim (txt_norm / txt_in), fixed by ComfyUI: Qwen2.5-VL-7B's width
QWEN_IMAGE_IN_CHANNELS = 64     # img_in: 16 latent channels x 2 x 2 patch
# Qwen25_7BVLI_Config overrides. head_dim stays 128: MRoPE's sections (16, 24, 24) cover half of it. 4 KV
# heads as the real model has: ComfyUI's CLIPLoader tells Qwen2.5-VL-7B by its 512-wide k_proj bias.
REDUCED_QWEN25_VL = {"hidden_size": QWEN_IMAGE_TEXT_WIDTH, "intermediate_size": 512, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "num_key_value_heads": 4}
# Qwen2VLVisionTransformer arguments; patch 14, temporal patch 2 and merge 2 stay (the image
# preprocessing assumes them). Head width 32: the 2-D rotary embedding needs a multiple of 4.
REDUCED_QWEN25_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "num_layers": 8}
WAN21_VAE_DIM = 4               # the real Wan 2.1 VAE has 96
# ComfyUI's VAE class builds the Wan 2.1 VAE with this configuration (only dim comes from the file).
WAN21_VAE_CONFIG = {"z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
                    "temperal_downsample": [False, True, True], "dropout": 0.0}
QWEN_PAD_TOKEN = 151643


def qwen_image_skeleton() -> dict:
    """The tensors ComfyUI's detection reads for Qwen-Image: txt_norm marks the family, img_in gives
    the input width, the transformer_blocks keys are counted (one block)."""
    return {"txt_norm.weight": _zeros(QWEN_IMAGE_TEXT_WIDTH),
            "img_in.weight": _zeros(QWEN_IMAGE_HIDDEN, QWEN_IMAGE_IN_CHANNELS),
            "transformer_blocks.0.img_mod.1.weight": _zeros(1)}


def build_qwen_image_model(dtype=None):
    """(model config, comfy.model_base.QwenImage) as ComfyUI's detection configures the skeleton, with
    seeded weights."""
    import torch

    config, base_model = detected_model("Qwen-Image", qwen_image_skeleton(), dtype)
    _initialise(base_model.diffusion_model, torch.Generator().manual_seed(SEED + 11))
    return config, base_model


@generated_once
def ensure_qwen_image_unet() -> Path:
    """The diffusion-model-only file (UNETLoader) of the one-block Qwen-Image, in bf16."""
    import torch

    target = fixture_path("tiny_qwen_image_unet")
    if target.is_file():
        return target
    # Built in bf16 directly: the real-width block is ~0.38 B parameters.
    _, base_model = build_qwen_image_model(torch.bfloat16)
    return _save(target, base_model.diffusion_model.state_dict(), torch.bfloat16)


@functools.cache
def reduced_qwen25_vl_class():
    """ComfyUI's Qwen25_7BVLI with a reduced vision tower (ComfyUI fixes its width at 1280 and 32
    blocks; the language model takes its configuration from the config dict as usual)."""
    import comfy.text_encoders.llama as llama
    import comfy.text_encoders.qwen_vl as qwen_vl

    class ReducedQwen25_7BVLI(llama.Qwen25_7BVLI):
        def __init__(self, config_dict, dtype, device, operations):
            # Qwen25_7BVLI's own initialiser with a smaller vision tower: building the real one
            # first and replacing it would allocate its 0.67 B parameters for nothing.
            super(llama.Qwen25_7BVLI, self).__init__()
            config = llama.Qwen25_7BVLI_Config(**config_dict)
            self.num_layers = config.num_hidden_layers
            self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
            self.visual = qwen_vl.Qwen2VLVisionTransformer(output_hidden_size=config.hidden_size,
                                                           **REDUCED_QWEN25_VISION, device=device, dtype=dtype,
                                                           ops=operations)
            self.dtype = dtype

    return ReducedQwen25_7BVLI


def reduced_qwen25_7b_init(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=True,
                           model_options={}):
    """ComfyUI's Qwen25_7BVLIModel.__init__ (the SDClipModel settings Qwen-Image uses: last layer, attention
    masks, pad 151643) around the reduced Qwen2.5-VL; tests/support/reduced_text_encoders installs it as
    that class's initialiser in the e2e server."""
    import comfy.sd1_clip

    comfy.sd1_clip.SDClipModel.__init__(
        self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(REDUCED_QWEN25_VL),
        dtype=dtype, special_tokens={"pad": QWEN_PAD_TOKEN}, layer_norm_hidden_state=False,
        model_class=reduced_qwen25_vl_class(), enable_attention_masks=attention_mask,
        return_attention_masks=attention_mask, model_options=model_options)


def _reduced_qwen25_7b(device="cpu", dtype=None, model_options={}):
    """ComfyUI's Qwen25_7BVLIModel around the reduced Qwen2.5-VL."""
    import comfy.text_encoders.qwen_image as qwen_image

    encoder = qwen_image.Qwen25_7BVLIModel.__new__(qwen_image.Qwen25_7BVLIModel)
    reduced_qwen25_7b_init(encoder, device=device, dtype=dtype, model_options=model_options)
    return encoder


def reduced_qwen_image_text_encoder(device="cpu", dtype=None, model_options=None):
    """ComfyUI's Qwen-Image text-encoder model (the class ``qwen_image.te()`` makes, as the stock
    loaders build it) whose Qwen2.5-VL is the reduced one above."""
    _import_comfy()
    import comfy.text_encoders.qwen_image as qwen_image

    # SD1ClipModel takes the class of its encoder from "<name>_class" when given: everything else
    # (the template trimming of QwenImageTEModel, the dtype handling of te()) stays ComfyUI's.
    options = {**(model_options or {}), "qwen25_7b_class": _reduced_qwen25_7b}
    return qwen_image.te()(device=device, dtype=dtype, model_options=options)


def reduced_qwen_image_clip(weights: dict | None = None, dtype=None):
    """A comfy.sd.CLIP around :func:`reduced_qwen_image_text_encoder` with ComfyUI's QwenImageTokenizer."""
    _import_comfy()
    import torch
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.qwen_image

    dtype = dtype or torch.float32

    class ReducedTextEncoder(torch.nn.Module):
        def __new__(cls, device="cpu", dtype=None, model_options={}):
            return reduced_qwen_image_text_encoder(device=device, dtype=dtype, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.qwen_image.QwenImageTokenizer,
                                                     ReducedTextEncoder)
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype})
    if weights is not None:
        clip.load_sd(weights, full_model=True)
    return clip


def _initialise_text_encoder(model, generator) -> None:
    """_initialise, except that the vocabulary table (152064 x 3584) is filled a slice of rows at a
    time with the same N(0, 1/width): _initialise's whole-table float32 noise and its scaled copy
    would hold 4.4 GB at once."""
    import torch

    embedding = model.qwen25_7b.transformer.model.embed_tokens
    table = embedding.weight
    embedding.weight = torch.nn.Parameter(table[:0], requires_grad=False)   # an empty stand-in while the rest is filled
    try:
        _initialise(model, generator)
    finally:
        embedding.weight = table
    with torch.no_grad():
        for start in range(0, table.shape[0], 16384):
            rows = table[start:start + 16384]
            rows.copy_(torch.randn(rows.shape, generator=generator) / math.sqrt(table.shape[1]))


@generated_once
def ensure_qwen_image_text_encoder() -> Path:
    """Seeded weights of the reduced text encoder (the whole cond_stage_model state dict), in bf16:
    the vocabulary table at width 3584 is 1.1 GB even so."""
    import torch

    target = fixture_path("tiny_qwen_image_text_encoder_kv4")
    if target.is_file():
        return target
    model = reduced_qwen_image_text_encoder(dtype=torch.bfloat16)
    _initialise_text_encoder(model, torch.Generator().manual_seed(SEED + 12))
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("position_ids")}
    return _save(target, state, torch.bfloat16)


def tiny_wan21_vae(seed: int):
    """ComfyUI's Wan 2.1 VAE at dim WAN21_VAE_DIM with seeded weights."""
    _import_comfy()
    import torch
    import comfy.ldm.wan.vae as wan_vae

    vae = wan_vae.WanVAE(dim=WAN21_VAE_DIM, **WAN21_VAE_CONFIG)
    generator = torch.Generator().manual_seed(seed)
    _initialise(vae, generator)
    initialise_wan_norms(vae, generator)
    return vae


def initialise_wan_norms(model, generator) -> None:
    """The Wan VAEs' own RMS norm (comfy.ldm.wan.vae.RMS_norm, a "gamma" per channel, also used by the Wan 2.2
    VAE) is not one _initialise recognises: its gains get the norm treatment here (about 1, bias 0), or every
    normalised activation would shrink 50-fold."""
    import torch
    import comfy.ldm.wan.vae as wan_vae

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, wan_vae.RMS_norm):
                module.gamma.copy_(1.0 + 0.02 * torch.randn(module.gamma.shape, generator=generator))
                if module.bias is not None:
                    module.bias.zero_()


@generated_once
def ensure_wan21_vae() -> Path:
    """The tiny Wan 2.1 VAE file (VAELoader; comfy.sd.VAE detects it by its keys)."""
    import torch

    target = fixture_path("tiny_wan21_vae")
    if target.is_file():
        return target
    return _save(target, tiny_wan21_vae(SEED + 13).state_dict(), torch.float32)


@generated_once
def ensure_qwen_image_clip_file() -> Path:
    """The reduced text encoder as a text-encoder file (the Qwen2.5-VL's own keys: model.*, visual.*, lm_head),
    as CLIPLoader (type qwen_image) reads qwen_2.5_vl_7b.safetensors. The stock loader builds the reduced
    configuration only where tests/support/reduced_text_encoders is installed (the e2e server that runs
    the Qwen-Image example)."""
    import safetensors.torch
    import torch

    target = fixture_path("tiny_qwen_image_clip_file")
    if target.is_file():
        return target
    prefix = "qwen25_7b.transformer."
    weights = safetensors.torch.load_file(str(ensure_qwen_image_text_encoder()))
    return _save(target, {key[len(prefix):]: value for key, value in weights.items() if key.startswith(prefix)},
                 torch.bfloat16)


def qwen_image_example_files() -> dict[str, Path]:
    """The Qwen-Image example's files (diffusion model, text encoder, VAE), generated in a child process
    (the e2e tier does not import ComfyUI itself)."""
    return example_files("qwen_fixtures", {"unet": "ensure_qwen_image_unet", "clip": "ensure_qwen_image_clip_file",
                                           "vae": "ensure_wan21_vae"})
