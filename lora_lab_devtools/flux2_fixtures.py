"""Tiny random-weight Flux.2 and Chroma models that ComfyUI's own detection recognises, their text
encoders in reduced configurations and a Flux.2 VAE. Never committed: generated on demand into the
fixtures cache (like flow_fixtures.py's), an existing file is reused.

Built the way flow_fixtures.py builds Flux.1: a "skeleton" holding only the tensors ComfyUI's model
detection reads goes through ``comfy.model_detection``; the detected config builds ComfyUI's own
model class, whose weights are filled from one seeded generator and saved in BFL's file layout (the
q/k RMSNorm weights named "scale"). The stock UNETLoader / ``comfy.sd.load_diffusion_model`` detects
the files in ComfyUI 0.3.75 and 0.33 alike, except where a model is newer than 0.3.75 (Klein), and
either ComfyUI writes the same files bit for bit.

* Flux.2 dev (``comfy.model_base.Flux2``; 128-channel latents, patch size 1, guidance embedding,
  Mistral-3 text encoder): 1 double + 1 single block. ComfyUI 0.3.75 fixes every Flux.2 at 48 heads
  of 128, so the width is the real one (hidden 6144; ~2.2 B parameters, saved in bf16, ~4.4 GB);
  0.33 reads the heads from the width, and loads the same file.
* Flux.2 Klein (the Qwen3-4B text encoder, no guidance embedding): ComfyUI 0.33 only (0.3.75 has no
  Klein text encoder, and its 48 heads of 128 make every Flux.2 6144 wide). 0.33 reads heads =
  hidden / 128, so hidden 256: two heads, so that splitting into heads is exercised (~4 M parameters).
* Chroma (``comfy.model_base.Chroma``; Flux's 16-channel latents, T5 only): 1 double + 1 single
  block. Both ComfyUIs fix the width (0.3.75: 24 heads of 128; both: the approximator's output 3072)
  and the approximator (distilled_guidance_layer: 5 layers of 5120), so ~0.6 B parameters, saved in
  bf16. Its text width is the reduced T5's d_model (64).
* Flux.2 VAE: ComfyUI's AutoencoderKL with 32 latent channels and the latent batch norm that
  patchifies 2 x 2 into Flux.2's 128 channels at 1/16 of the image size (detected by
  ``bn.running_mean``; VAELoader loads it as it loads flux2-vae.safetensors). Its widths are the real
  ones (~84 M parameters, saved in fp16): 0.3.75 fixes them (0.33 reads only the decoder's width).
  Chroma uses flow_fixtures' 16-channel TAESD (:func:`~lora_lab_devtools.flow_fixtures.ensure_vae16`).

Reduced text encoders (ComfyUI's own classes, smaller configurations; :func:`reduced_flux2_clip`,
:func:`reduced_chroma_clip`):

* Flux.2 concatenates three hidden states of its text encoder (Qwen3-4B of 36 layers: after layers
  9, 18, 27; Mistral-3 24B of 40: after 10, 20, 30; the layers past the last one are unused, so
  ComfyUI's "pruned" Mistral ends at layer 30 with no final norm), so the context width is 3 x hidden.
  Reduced: 3 layers with no final norm, the states after layers 1, 2 and 3 (every layer counts), hidden
  256 (2 heads of 128): context width 768, the width of both Flux.2 fixtures' txt_in.
* Klein's Qwen3: the real vocabulary, ComfyUI's Qwen tokenizer and Klein's chat template.
* Dev's Mistral-3: ComfyUI reads its tokenizer from a "tekken_model" tensor in the text-encoder
  file (Mistral's tekken JSON; no tokenizer ships with ComfyUI). The file holds a tekken of ours:
  Mistral's 1000 special tokens at their ranks ([INST], [SYSTEM_PROMPT], <pad> 11 ...) and the 256
  byte tokens, no merges, so text is tokenized byte by byte (vocabulary 1256). ComfyUI 0.3.75 builds
  this tokenizer with transformers' MistralConverter through an API that transformers 5 dropped, so
  there it fails as it does with the real file (:func:`reduced_flux2_clip` says so).
* Chroma's T5 (ComfyUI's "pixart" T5 encoder, as CLIPLoader type "chroma" builds it): flow_fixtures'
  reduced T5 (d_model 64, 2 layers, the real vocabulary and tokenizer).

What this covers: ComfyUI's detection and model classes for Flux.2 and Chroma, their conditioning
(Flux.2's 512-token context padding, 4-axis positions, global modulation; Chroma's approximator),
the Flux.2 VAE's latent geometry, and ComfyUI's tokenizers and encoder code paths. What it does not:
the real depths (so not the real models' memory or speed), the real encoders' widths, the real
Mistral vocabulary, or any learned behaviour (the weights are random).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

from .environment import generated_once
from .flow_fixtures import (REDUCED_QWEN3, REDUCED_T5, SEED, _save, _zeros, detected_model, fixture_path,
                            vae_model_from_skeleton)
from .tiny_checkpoint import _import_comfy, _initialise, write_atomically

HEAD_DIM = 128                       # Flux.2's and Chroma's heads: their rope axes add up to 128
FLUX2_TEXT_LAYERS = [1, 2, 3]        # hidden states the reduced encoders hand Flux.2 (real: 9/18/27, 10/20/30)
FLUX2_TEXT_HIDDEN = 256
FLUX2_CONTEXT = len(FLUX2_TEXT_LAYERS) * FLUX2_TEXT_HIDDEN      # txt_in's input width
REDUCED_FLUX2_QWEN3 = {**REDUCED_QWEN3, "num_hidden_layers": 3, "final_norm": False}
TEKKEN_SPECIAL = 1000                # Mistral's tekken reserves ranks 0..999 for special tokens
TEKKEN_VOCAB = TEKKEN_SPECIAL + 256  # + one token per byte
REDUCED_MISTRAL3 = {"vocab_size": TEKKEN_VOCAB, "hidden_size": FLUX2_TEXT_HIDDEN, "intermediate_size": 512,
                    "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "final_norm": False}
# Per variant: the width (dev: ComfyUI 0.3.75's fixed 48 heads of 128), the guidance embedding, and the
# text encoder's name in ComfyUI (the prefix of its weights).
FLUX2_VARIANTS = {
    "dev": {"hidden": 48 * HEAD_DIM, "guidance": True, "text_encoder": "mistral3_24b"},
    "klein": {"hidden": 2 * HEAD_DIM, "guidance": False, "text_encoder": "qwen3_4b"},
}
CHROMA_HIDDEN = 3072                 # the approximator's fixed output width (and 0.3.75's 24 heads of 128)
# The first 20 of Mistral's special tokens, at their tekken ranks (the rest are <SPECIAL_n> placeholders).
MISTRAL_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
                          "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]",
                          "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                          "[TOOL_CONTENT]"]
TEKKEN_PATTERN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+|[^\r\n\p{L}\p{N}]?"
                  r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
SEEDS = {"flux2_dev": SEED + 21, "flux2_klein": SEED + 22, "chroma": SEED + 23, "flux2_vae": SEED + 24,
         "flux2_dev_text_encoder": SEED + 25, "flux2_klein_text_encoder": SEED + 26, "chroma_text_encoder": SEED + 27}


def flux2_variants() -> tuple[str, ...]:
    """The Flux.2 variants the running ComfyUI loads: ("dev",) in 0.3.75, ("dev", "klein") in 0.33."""
    _import_comfy()
    import comfy.text_encoders.flux

    return ("dev", "klein") if hasattr(comfy.text_encoders.flux, "klein_te") else ("dev",)


def _check_variant(variant: str) -> None:
    if variant not in FLUX2_VARIANTS:
        raise ValueError(f"unknown Flux.2 variant {variant!r} (known: {', '.join(FLUX2_VARIANTS)})")
    if variant not in flux2_variants():
        raise RuntimeError(f"this ComfyUI has no Flux.2 {variant} (it loads: {', '.join(flux2_variants())})")


def flux2_skeleton(variant: str) -> dict:
    """The tensors ComfyUI's detection reads for a Flux.2 model (BFL key layout): the global modulation
    marks Flux.2, img_in / txt_in give the width and text width, guidance_in the guidance embedding."""
    settings = FLUX2_VARIANTS[variant]
    hidden = settings["hidden"]
    skeleton = {"img_in.weight": _zeros(hidden, 128), "txt_in.weight": _zeros(hidden, FLUX2_CONTEXT),
                "double_stream_modulation_img.lin.weight": _zeros(1),
                "double_blocks.0.img_attn.norm.key_norm.scale": _zeros(HEAD_DIM),
                "single_blocks.0.norm.key_norm.scale": _zeros(HEAD_DIM)}
    if settings["guidance"]:
        skeleton["guidance_in.in_layer.weight"] = _zeros(hidden, 256)
    return skeleton


def chroma_skeleton() -> dict:
    """Chroma: Flux's layout with the approximator (distilled_guidance_layer) instead of the modulation
    layers; the text width is the reduced T5's."""
    return {"img_in.weight": _zeros(CHROMA_HIDDEN, 64), "txt_in.weight": _zeros(CHROMA_HIDDEN, REDUCED_T5["d_model"]),
            "distilled_guidance_layer.norms.0.scale": _zeros(1),
            "double_blocks.0.img_attn.norm.key_norm.scale": _zeros(HEAD_DIM),
            "single_blocks.0.norm.key_norm.scale": _zeros(HEAD_DIM)}


def _initialise_norms_as_weights(module, generator) -> None:
    """_initialise, with ComfyUI 0.3.75's Flux RMSNorm "scale" parameters filled as norm weights (~1, as
    0.33's RMSNorm "weight" is; _initialise keys on the name "weight" and would fill them like biases,
    ~0). They are renamed "weight" for the call, so either ComfyUI writes the same file bit for bit."""
    renamed = [submodule for submodule in module.modules()
               if "RMSNorm" in type(submodule).__name__ and "scale" in submodule._parameters]
    for submodule in renamed:
        submodule._parameters = {("weight" if name == "scale" else name): value
                                 for name, value in submodule._parameters.items()}
    try:
        _initialise(module, generator)
    finally:
        for submodule in renamed:
            submodule._parameters = {("scale" if name == "weight" else name): value
                                     for name, value in submodule._parameters.items()}


def _build_from_skeleton(name: str, skeleton: dict, dtype):
    """ComfyUI's model (model_base) for a skeleton, as its detection configures it, with seeded weights."""
    import torch

    config, base_model = detected_model(name, skeleton, dtype)
    _initialise_norms_as_weights(base_model.diffusion_model, torch.Generator().manual_seed(SEEDS[name]))
    return config, base_model


def build_flux2_diffusion_model(variant: str, dtype=None):
    """(model config, comfy.model_base.Flux2) of a variant with seeded weights."""
    _check_variant(variant)
    return _build_from_skeleton(f"flux2_{variant}", flux2_skeleton(variant), dtype)


def build_chroma_diffusion_model(dtype=None):
    """(model config, comfy.model_base.Chroma) with seeded weights."""
    return _build_from_skeleton("chroma", chroma_skeleton(), dtype)


def _bfl_state_dict(diffusion_model) -> dict:
    """The state dict in BFL's file layout: every RMSNorm weight named "scale" (0.33 names them "weight"
    and renames on load; 0.3.75 reads "scale" only)."""
    norms = {name for name, module in diffusion_model.named_modules() if "RMSNorm" in type(module).__name__}
    state = {}
    for key, value in diffusion_model.state_dict().items():
        module, _, parameter = key.rpartition(".")
        state[f"{module}.scale" if module in norms and parameter == "weight" else key] = value
    return state


@generated_once
def _ensure_unet(name: str, build) -> Path:
    import torch

    target = fixture_path(f"tiny_{name}_unet")
    if target.is_file():
        return target
    _, base_model = build(torch.bfloat16)   # built in bf16: Flux.2 dev alone would take 8.8 GB in fp32
    return _save(target, _bfl_state_dict(base_model.diffusion_model), torch.bfloat16)


def ensure_flux2_unet(variant: str) -> Path:
    """The diffusion-model-only file (UNETLoader) of Flux.2 "dev" or "klein"."""
    _check_variant(variant)
    return _ensure_unet(f"flux2_{variant}", lambda dtype: build_flux2_diffusion_model(variant, dtype))


def ensure_chroma_unet() -> Path:
    """The diffusion-model-only file (UNETLoader) of Chroma."""
    return _ensure_unet("chroma", build_chroma_diffusion_model)


def tiny_tekken() -> bytes:
    """A Mistral tekken tokenizer JSON of ours: the special tokens at Mistral's ranks, then the 256 bytes
    (no merges), in the format ComfyUI reads from a Flux.2 text-encoder file's "tekken_model"."""
    special = MISTRAL_SPECIAL_TOKENS + [f"<SPECIAL_{rank}>"
                                        for rank in range(len(MISTRAL_SPECIAL_TOKENS), TEKKEN_SPECIAL)]
    tekken = {"config": {"pattern": TEKKEN_PATTERN, "num_vocab_tokens": 256, "default_vocab_size": TEKKEN_VOCAB,
                         "default_num_special_tokens": TEKKEN_SPECIAL, "version": "v7"},
              "vocab": [{"rank": byte, "token_bytes": base64.b64encode(bytes([byte])).decode("ascii"),
                         "token_str": chr(byte) if 32 <= byte < 127 else None} for byte in range(256)],
              "special_tokens": [{"rank": rank, "token_str": token, "is_control": True}
                                 for rank, token in enumerate(special)]}
    return json.dumps(tekken, sort_keys=True).encode("utf-8")


def _tekken_tensor():
    import torch

    return torch.tensor(list(tiny_tekken()), dtype=torch.uint8)


def reduced_flux2_text_encoder(variant: str, device="cpu", dtype=None, model_options=None):
    """ComfyUI's Flux.2 text-encoder model (Flux2TEModel: three hidden states concatenated) around a
    reduced Mistral-3 ("dev") or Qwen3 ("klein"), as flux2_te / klein_te build it."""
    _import_comfy()
    import comfy.sd1_clip
    import comfy.text_encoders.flux
    import comfy.text_encoders.llama

    if variant not in FLUX2_VARIANTS:
        raise ValueError(variant)
    model_class, config, special_tokens = {
        "dev": (comfy.text_encoders.llama.Mistral3Small24B, REDUCED_MISTRAL3, {"start": 1, "pad": 0}),
        "klein": (comfy.text_encoders.llama.Qwen3_4B, REDUCED_FLUX2_QWEN3, {"pad": 151643}),
    }[variant]

    def encoder(device="cpu", dtype=None, model_options={}):
        return comfy.sd1_clip.SDClipModel(
            device=device, layer=list(FLUX2_TEXT_LAYERS), layer_idx=None, textmodel_json_config=dict(config),
            dtype=dtype, special_tokens=dict(special_tokens), layer_norm_hidden_state=False, model_class=model_class,
            enable_attention_masks=True, return_attention_masks=True, model_options=model_options)

    return comfy.text_encoders.flux.Flux2TEModel(device=device, dtype=dtype, model_options=dict(model_options or {}),
                                                 name=FLUX2_VARIANTS[variant]["text_encoder"], clip_model=encoder)


def reduced_flux2_clip(variant: str, weights: dict | None = None, dtype=None):
    """A comfy.sd.CLIP around :func:`reduced_flux2_text_encoder` with ComfyUI's Flux.2 tokenizer (Klein's
    Qwen chat template; dev's Mistral template, its tekken from weights["tekken_model"] or :func:`tiny_tekken`)."""
    _check_variant(variant)
    import torch
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.flux

    dtype = dtype or torch.float32
    weights = dict(weights) if weights is not None else None
    tokenizer_data = {}
    if variant == "dev":
        tekken = weights.pop("tekken_model", None) if weights is not None else None
        tokenizer_data["tekken_model"] = tekken if tekken is not None else _tekken_tensor()
    tokenizer = comfy.text_encoders.flux.Flux2Tokenizer if variant == "dev" else comfy.text_encoders.flux.KleinTokenizer

    class ReducedTextEncoder(torch.nn.Module):
        def __new__(cls, device="cpu", dtype=None, model_options={}):
            return reduced_flux2_text_encoder(variant, device=device, dtype=dtype, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(tokenizer, ReducedTextEncoder)
    try:
        clip = comfy.sd.CLIP(target, tokenizer_data=tokenizer_data, model_options={"dtype": dtype})
    except TypeError as error:
        if variant != "dev" or "MistralConverter" not in str(error):
            raise
        import transformers
        raise RuntimeError(f"this ComfyUI builds the Mistral tokenizer with transformers' MistralConverter "
                           f"(vocab=..., additional_special_tokens=...), which transformers {transformers.__version__} "
                           f"no longer has; the real Flux.2 dev text encoder fails the same way here") from error
    if weights is not None:
        clip.load_sd(weights, full_model=True)
    return clip


def _save_with_tekken(target: Path, tensors: dict, dtype) -> Path:
    """_save, but the tokenizer's bytes stay uint8 (as in ComfyUI's Flux.2 text-encoder files)."""
    import safetensors.torch

    target.parent.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().to(dtype).contiguous() for key, value in tensors.items()}
    state["tekken_model"] = _tekken_tensor()
    write_atomically(target, lambda temporary: safetensors.torch.save_file(
        state, temporary, metadata={"lora_lab_fixture": target.name}))
    return target


@generated_once
def ensure_flux2_text_encoder(variant: str) -> Path:
    """Seeded weights of the reduced Flux.2 text encoder (the whole cond_stage_model state dict; dev's
    also holds the tekken tokenizer as "tekken_model"), for ``reduced_flux2_clip(variant, weights)``."""
    import torch

    if variant not in FLUX2_VARIANTS:
        raise ValueError(variant)
    target = fixture_path(f"tiny_flux2_{variant}_text_encoder")
    if target.is_file():
        return target
    model = reduced_flux2_text_encoder(variant, dtype=torch.float32)
    _initialise(model, torch.Generator().manual_seed(SEEDS[f"flux2_{variant}_text_encoder"]))
    state = {key: value for key, value in model.state_dict().items() if not key.endswith("position_ids")}
    if variant == "dev":
        return _save_with_tekken(target, state, torch.float32)
    return _save(target, state, torch.float32)


def reduced_chroma_text_encoder(device="cpu", dtype=None, model_options=None):
    """ComfyUI's PixArt/Chroma T5 model (PixArtT5XXL, "t5xxl") around the reduced T5 (d_model 64)."""
    _import_comfy()
    import types

    import comfy.sd1_clip
    import comfy.text_encoders.pixart_t5
    import comfy.text_encoders.t5

    def t5(device="cpu", dtype=None, model_options={}):
        model = comfy.sd1_clip.SDClipModel(device=device, layer="last", textmodel_json_config=dict(REDUCED_T5),
                                           dtype=dtype, special_tokens={"end": 1, "pad": 0},
                                           model_class=comfy.text_encoders.t5.T5, model_options=model_options)
        # ComfyUI's PixArt/Chroma T5 encodes the empty prompt as pad tokens only (no end token)
        model.gen_empty_tokens = types.MethodType(comfy.text_encoders.pixart_t5.T5XXLModel.gen_empty_tokens, model)
        return model

    model = comfy.text_encoders.pixart_t5.PixArtT5XXL.__new__(comfy.text_encoders.pixart_t5.PixArtT5XXL)
    comfy.sd1_clip.SD1ClipModel.__init__(model, device=device, dtype=dtype, model_options=dict(model_options or {}),
                                         name="t5xxl", clip_model=t5)
    return model


def reduced_chroma_clip(weights: dict | None = None, dtype=None):
    """A comfy.sd.CLIP around :func:`reduced_chroma_text_encoder` with ComfyUI's PixArt (T5) tokenizer."""
    _import_comfy()
    import torch
    import comfy.sd
    import comfy.supported_models_base
    import comfy.text_encoders.pixart_t5

    class ReducedTextEncoder(torch.nn.Module):
        def __new__(cls, device="cpu", dtype=None, model_options={}):
            return reduced_chroma_text_encoder(device=device, dtype=dtype, model_options=model_options)

    target = comfy.supported_models_base.ClipTarget(comfy.text_encoders.pixart_t5.PixArtTokenizer, ReducedTextEncoder)
    clip = comfy.sd.CLIP(target, model_options={"dtype": dtype or torch.float32})
    if weights is not None:
        clip.load_sd(weights, full_model=True)
    return clip


@generated_once
def ensure_chroma_text_encoder() -> Path:
    """Seeded weights of the reduced Chroma T5 (the whole cond_stage_model state dict)."""
    import torch

    target = fixture_path("tiny_chroma_text_encoder")
    if target.is_file():
        return target
    model = reduced_chroma_text_encoder(dtype=torch.float32)
    _initialise(model, torch.Generator().manual_seed(SEEDS["chroma_text_encoder"]))
    return _save(target, dict(model.state_dict()), torch.float32)


def flux2_vae_skeleton() -> dict:
    """The tensors ComfyUI's VAE detection reads for the Flux.2 VAE: a 32-channel SD-style decoder input,
    four levels (downsample at level 2, upsample at level 3), post_quant_conv (BFL's layout, under
    decoder.) and the latent batch norm (``bn``) that makes it patchify to 128 channels. comfy.sd.VAE loads
    what it is given, so each tensor has its real shape."""
    return {"decoder.conv_in.weight": _zeros(512, 32, 3, 3), "decoder.post_quant_conv.weight": _zeros(32, 32, 1, 1),
            "encoder.down.2.downsample.conv.weight": _zeros(512, 512, 3, 3),
            "decoder.up.3.upsample.conv.weight": _zeros(512, 512, 3, 3), "bn.running_mean": _zeros(128)}


def tiny_flux2_vae():
    """ComfyUI's Flux.2 VAE model (AutoencoderKL with the latent batch norm), as comfy.sd.VAE configures it
    for :func:`flux2_vae_skeleton`, with seeded weights and an identity batch norm (mean 0, variance 1)."""
    import torch

    model = vae_model_from_skeleton(flux2_vae_skeleton())
    _initialise(model, torch.Generator().manual_seed(SEEDS["flux2_vae"]))
    with torch.no_grad():
        model.bn.running_mean.zero_()
        model.bn.running_var.fill_(1.0)
    return model


@generated_once
def ensure_flux2_vae() -> Path:
    """The Flux.2 VAE file (VAELoader): the quant convs under encoder. / decoder., as ComfyUI expects them in
    Flux.2 VAE files (it renames them on load), and no batch-norm step count."""
    import torch

    target = fixture_path("tiny_flux2_vae")
    if target.is_file():
        return target
    renames = {"quant_conv.": "encoder.quant_conv.", "post_quant_conv.": "decoder.post_quant_conv."}
    state = {}
    for key, value in tiny_flux2_vae().state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue
        prefix = next((old for old in renames if key.startswith(old)), None)
        state[renames[prefix] + key[len(prefix):] if prefix else key] = value
    return _save(target, state, torch.float16)
