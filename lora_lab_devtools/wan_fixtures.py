"""Tiny random-weight Wan video fixtures that ComfyUI's own detection and stock loaders recognise: the
diffusion models (Wan 2.1 T2V, Wan 2.2 TI2V 5B, Wan 2.2 A14B's T2V and I2V experts), a UMT5-XXL text
encoder in a reduced configuration, and the Wan 2.1 and 2.2 VAEs. Never committed: generated on demand
into the fixtures cache with flow_fixtures.py's helpers (same naming, seed and saving), an existing file
is reused; the files are the same in ComfyUI 0.3.75 and 0.33.

* Diffusion models: a skeleton holding only the tensors ComfyUI's detection reads (``head.modulation``:
  the width; ``blocks.N.ffn.0``: the FFN width and the block count; ``patch_embedding``: the input
  channels; ``head.head``: the output channels) goes through ``comfy.model_detection``, which configures
  ``comfy.ldm.wan.model.WanModel``. Reduced: width 128 (ComfyUI reads heads = width / 128, so one head of
  the real 128), FFN 256, 2 blocks (~1 M parameters); the text width is ComfyUI's fixed 4096 (UMT5-XXL's
  d_model). Saved in fp16 as the real "_fp16" files are, loaded by UNETLoader. Variants
  (:data:`WAN_VARIANTS`):

  - ``wan21_t2v``: 16 -> 16 channels, detected as ``supported_models.WAN21_T2V`` (``model_base.WAN21``,
    latent format Wan21). The same class stands for Wan 2.1 T2V 1.3B / 14B and for each of Wan 2.2
    T2V A14B's two experts (high noise, low noise: two seeds of this variant).
  - ``wan22_ti2v``: 48 -> 48 channels (Wan 2.2 TI2V 5B), detected as ``WAN22_T2V`` (``model_base.WAN22``,
    latent format Wan22: the 48-channel latents of the Wan 2.2 VAE).
  - ``wan22_i2v``: 36 -> 16 channels and no ``img_emb`` (Wan 2.2 I2V A14B's experts: no CLIP-vision
    input). ComfyUI has no class of its own for it: without ``img_emb`` it is a "t2v" model, detected as
    ``WAN21_T2V`` (``model_base.WAN21`` with image_to_video False) whose 20 extra input channels its
    ``concat_cond`` fills with 4 mask channels and the 16-channel start-image latent, from the
    ``concat_latent_image`` / ``concat_mask`` that WanImageToVideo puts in the conditioning.

* Text encoder: ComfyUI's own Wan text-encoder classes (``wan.te()``, WanT5Model, UMT5XXlModel, its T5
  with UMT5's per-layer relative position bias) in a reduced configuration (:data:`REDUCED_UMT5`):
  d_model 4096 (what the diffusion model's text_embedding reads), 2 layers (each with its own position
  bias, what tells UMT5 from T5), 2 heads of 64, gated-GELU FFN 256. The real one has 24 layers of 64
  heads and FFN 10240: 5.7 B parameters. Loaded by the stock CLIPLoader (type "wan") where
  ``UMT5XXlModel.__init__`` is :func:`reduced_umt5_init` (tests/support/reduced_text_encoders in the e2e
  servers; :func:`reduced_umt5` in-process). Two things the real file decides:

  - The tokenizer. ComfyUI ships no UMT5 tokenizer: a Wan text-encoder file carries its SentencePiece
    model as a uint8 tensor "spiece_model", which CLIPLoader hands to UMT5XXlTokenizer. The real
    UMT5 model (256,000 pieces; pad 0, eos 1, bos 2, unk 3; table 256384) is not available offline, so
    the file holds T5 v1.1's English SentencePiece model (32,000 pieces; pad 0, eos 1, unk 2), rebuilt
    from the tokenizer.json ComfyUI ships for T5-XXL (pieces, scores and the nmt_nfkc normaliser:
    it tokenises exactly as that tokenizer does), and the table is T5's 32128 rows. What UMT5's code
    uses of its tokenizer is the same (pad 0, eos 1 appended, padding to 512 tokens); only the ids of
    the pieces differ. The full UMT5 table at width 4096 would be 1.05 B parameters (2.1 GB in bf16).
  - Detection. Both ComfyUIs tell UMT5-XXL / T5-XXL from other encoders by the 24th block's gated FFN
    (``encoder.block.23.layer.1.DenseReluDense.wi_1.weight``: 0.3.75 checks its input width 4096,
    0.33 its output width 10240). The file carries that one tensor at its real shape [10240, 4096]
    (zeros, 84 MB in bf16) beside the reduced encoder's weights; the reduced encoder has no block 23,
    so ComfyUI's load reports it as unexpected (a debug message) and leaves it.

  Saved in bf16 (the dtype ComfyUI then runs the encoder in, read from the file's final norm).

* VAEs: the Wan 2.1 VAE is qwen_fixtures.py's (ComfyUI's ``comfy.ldm.wan.vae.WanVAE`` at dim 4; Wan 2.1
  and Wan 2.2 A14B use it: 16 channels, 8 x spatial and 4 x temporal compression). The Wan 2.2 VAE
  (``comfy.ldm.wan.vae2_2.WanVAE``: 48 channels, 16 x spatial compression) is real-size: both ComfyUIs
  build it with fixed widths (encoder dim 160, decoder 256; nothing is read from the file but the keys
  that mark it), so a smaller one does not load. 0.70 B parameters, saved in fp16 (1.4 GB, as the real
  wan2.2_vae.safetensors); on this machine's CPU it encodes 9 frames of 64 x 64 in about 1.5 s and
  decodes them in about 5 s.

What this covers: ComfyUI's detection and stock loaders for Wan 2.1 / 2.2 (UNETLoader, CLIPLoader type
wan, VAELoader), the model classes and their conditioning (``extra_conds``: cross attention, the I2V
concat of mask and start-image latent), a forward pass on 5-D video latents, the video VAEs' latent
geometry, and ComfyUI's UMT5 encoder and tokenizer code (512-token padding, attention masks, padded
positions zeroed). What it does not: the real depths and widths of the diffusion models and the text
encoder (so not their memory or speed), UMT5's own vocabulary, CLIP-vision inputs (Wan 2.1 I2V / FLF),
or any learned behaviour (the weights are random).
"""
from __future__ import annotations

import contextlib
import functools
import struct
from pathlib import Path

from .environment import generated_once
from .flow_fixtures import SEED, _save, _zeros, detected_model, example_files, fixture_path, vae_model_from_skeleton
from .qwen_fixtures import ensure_wan21_vae, initialise_wan_norms
from .tiny_checkpoint import _import_comfy, _initialise, write_atomically

WAN_DIM = 128                   # ComfyUI reads num_heads = dim // 128: one head of the real width 128
WAN_FFN = 256
WAN_LAYERS = 2
WAN_TEXT_WIDTH = 4096           # fixed by ComfyUI's WanModel (text_dim): UMT5-XXL's d_model
WAN_TEXT_TOKENS = 512           # UMT5XXlTokenizer pads every prompt to 512 tokens
# in_dim / out_dim per variant, and the seed offset of its weights.
WAN_VARIANTS = {
    "wan21_t2v": {"in_dim": 16, "out_dim": 16, "seed": 31},    # Wan 2.1 T2V; Wan 2.2 T2V A14B's experts
    "wan22_ti2v": {"in_dim": 48, "out_dim": 48, "seed": 32},   # Wan 2.2 TI2V 5B
    "wan22_i2v": {"in_dim": 36, "out_dim": 16, "seed": 33},    # Wan 2.2 I2V A14B's experts: 16 + 4 mask + 16 image
    # The GPU benchmark's Wan-sized model (scripts/bench.py): Wan 2.1 T2V 14B's / one Wan 2.2 A14B expert's real
    # layout (width 5120: 40 heads, FFN 13824, 40 blocks; 14 B parameters, 28 GB in bf16), random weights
    "wan14b_full": {"in_dim": 16, "out_dim": 16, "seed": 36, "dim": 5120, "ffn": 13824, "layers": 40},
}
# Wan 2.2 A14B's two experts: the same architecture, different weights (here: different seeds).
WAN_EXPERTS = {None: 0, "high_noise": 1, "low_noise": 2}
WAN_VAE_OF = {"wan21_t2v": "wan21", "wan22_i2v": "wan21", "wan22_ti2v": "wan22"}
# comfy/text_encoders/umt5_config_xxl.json with smaller depth, heads, FFN and table (see the module docstring).
REDUCED_UMT5 = {"d_ff": 256, "d_kv": 64, "d_model": WAN_TEXT_WIDTH, "dense_act_fn": "gelu_pytorch_tanh",
                "is_gated_act": True, "layer_norm_epsilon": 1e-6, "model_type": "umt5", "num_heads": 2,
                "num_layers": 2, "relative_attention_num_buckets": 32, "vocab_size": 32128, "eos_token_id": 1,
                "pad_token_id": 0}
# The tensor ComfyUI's detect_te_model reads to tell a UMT5-XXL / T5-XXL file, at its real shape.
UMT5_DETECTION_KEY = "encoder.block.23.layer.1.DenseReluDense.wi_1.weight"
UMT5_DETECTION_SHAPE = (10240, WAN_TEXT_WIDTH)
UMT5_SPIECE_PIECES = 32000      # T5 v1.1's SentencePiece model (its tokenizer.json adds 100 <extra_id_n>)
SEEDS = {"umt5": SEED + 34, "wan22_vae": SEED + 35}
# role: (models/ folder, the name of the real file, the function here that makes it)
EXAMPLE_FILES = {
    "wan21_t2v": ("diffusion_models", "wan2.1_t2v_1.3B_fp16.safetensors", "wan21_t2v_file"),
    "wan22_ti2v": ("diffusion_models", "wan2.2_ti2v_5B_fp16.safetensors", "wan22_ti2v_file"),
    "wan22_t2v_high_noise": ("diffusion_models", "wan2.2_t2v_high_noise_14B_fp16.safetensors",
                             "wan22_t2v_high_noise_file"),
    "wan22_t2v_low_noise": ("diffusion_models", "wan2.2_t2v_low_noise_14B_fp16.safetensors",
                            "wan22_t2v_low_noise_file"),
    "wan22_i2v_high_noise": ("diffusion_models", "wan2.2_i2v_high_noise_14B_fp16.safetensors",
                             "wan22_i2v_high_noise_file"),
    "wan22_i2v_low_noise": ("diffusion_models", "wan2.2_i2v_low_noise_14B_fp16.safetensors",
                            "wan22_i2v_low_noise_file"),
    "umt5": ("text_encoders", "umt5_xxl_bf16.safetensors", "umt5_file"),
    "wan21_vae": ("vae", "wan_2.1_vae.safetensors", "ensure_wan21_vae"),
    "wan22_vae": ("vae", "wan2.2_vae.safetensors", "wan22_vae_file"),
}


def _check_variant(variant: str) -> dict:
    if variant not in WAN_VARIANTS:
        raise ValueError(f"unknown Wan variant {variant!r} (known: {', '.join(WAN_VARIANTS)})")
    return WAN_VARIANTS[variant]


def wan_skeleton(variant: str) -> dict:
    """The tensors ComfyUI's detection reads for a Wan model: head.modulation marks Wan and gives the width,
    head.head the output channels (x 2 x 2 patch), patch_embedding the input channels, blocks.N.ffn.0 the
    FFN width and (counted) the blocks. No img_emb: a "t2v" model type."""
    spec = _check_variant(variant)
    dim, ffn, layers = spec.get("dim", WAN_DIM), spec.get("ffn", WAN_FFN), spec.get("layers", WAN_LAYERS)
    skeleton = {"head.modulation": _zeros(1, 2, dim), "head.head.weight": _zeros(spec["out_dim"] * 4, dim),
                "patch_embedding.weight": _zeros(dim, spec["in_dim"], 1, 2, 2)}
    for index in range(layers):   # detection reads block 0's shape and counts the others
        skeleton[f"blocks.{index}.ffn.0.weight"] = _zeros(ffn, dim) if index == 0 else _zeros(1)
    return skeleton


def build_wan_model(variant: str, dtype=None, expert: str | None = None):
    """(model config, comfy.model_base object) as ComfyUI's detection configures :func:`wan_skeleton`, with
    seeded weights (`expert`: "high_noise" / "low_noise" for Wan 2.2 A14B's two experts: other seeds)."""
    import torch

    spec = _check_variant(variant)
    if expert not in WAN_EXPERTS:
        raise ValueError(f"unknown expert {expert!r} (known: high_noise, low_noise)")
    config, base_model = detected_model(variant, wan_skeleton(variant), dtype)
    generator = torch.Generator().manual_seed(SEED + spec["seed"] + 100 * WAN_EXPERTS[expert])
    _initialise(base_model.diffusion_model, generator)
    return config, base_model


@generated_once
def wan_model_file(variant: str, expert: str | None = None) -> Path:
    """The diffusion-model-only file (UNETLoader) of a :data:`WAN_VARIANTS` entry, in fp16."""
    import torch

    _check_variant(variant)
    target = fixture_path(f"tiny_{variant}{'_' + expert if expert else ''}_unet")
    if target.is_file():
        return target
    full_size = "dim" in WAN_VARIANTS[variant]   # built and saved in bf16 (the benchmark's 14 B model)
    _, base_model = build_wan_model(variant, torch.bfloat16 if full_size else torch.float32, expert)
    return _save(target, base_model.diffusion_model.state_dict(), torch.bfloat16 if full_size else torch.float16)


@functools.cache
def umt5_tokenizer_model() -> bytes:
    """A serialised SentencePiece model (what a Wan text-encoder file holds as "spiece_model"): T5 v1.1's
    English unigram model, rebuilt from the tokenizer.json that ComfyUI ships for T5-XXL (its 32,000
    pieces and scores, its precompiled nmt_nfkc normaliser; pad 0, eos 1, unk 2, no bos, as UMT5's pad
    and eos). Written as protobuf by hand: the protobuf package is not one of ComfyUI's requirements."""
    import base64
    import json

    _import_comfy()
    import comfy.text_encoders.sd3_clip

    # Where ComfyUI's T5XXLTokenizer reads it from.
    source = Path(comfy.text_encoders.sd3_clip.__file__).parent / "t5_tokenizer" / "tokenizer.json"
    tokenizer = json.loads(source.read_text(encoding="utf-8"))
    normalizers = tokenizer["normalizer"]["normalizers"]
    charsmap = base64.b64decode(next(n for n in normalizers if n["type"] == "Precompiled")["precompiled_charsmap"])
    vocabulary = tokenizer["model"]["vocab"][:UMT5_SPIECE_PIECES]
    if [piece for piece, _ in vocabulary[:3]] != ["<pad>", "</s>", "<unk>"] or len(vocabulary) != UMT5_SPIECE_PIECES:
        raise RuntimeError(f"{source} is not T5's vocabulary (<pad>, </s>, <unk>, then {UMT5_SPIECE_PIECES - 3} "
                           f"pieces): {vocabulary[:3]}, {len(vocabulary)} pieces")
    kinds = {0: 3, 1: 3, 2: 2}    # SentencePiece piece types: CONTROL, CONTROL, UNKNOWN; the rest NORMAL (1)
    pieces = b"".join(_field(1, _field(1, piece.encode("utf-8")) + _float_field(2, score) + _field(3, kinds.get(i, 1)))
                      for i, (piece, score) in enumerate(vocabulary))
    # TrainerSpec: model_type UNIGRAM (3), vocab_size (4), unk_id (40), bos_id (41), eos_id (42), pad_id (43).
    trainer = (_field(3, 1) + _field(4, len(vocabulary)) + _field(40, 2) + _field(41, -1) + _field(42, 1)
               + _field(43, 0))
    # NormalizerSpec: name, precompiled_charsmap, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces.
    normalizer = _field(1, b"nmt_nfkc") + _field(2, charsmap) + _field(3, 1) + _field(4, 1) + _field(5, 1)
    return pieces + _field(2, trainer) + _field(3, normalizer)


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1     # negative int32 fields are written as 10-byte two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value) -> bytes:
    """One protobuf field: bytes as length-delimited, an int as a varint."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _float_field(number: int, value: float) -> bytes:
    return _varint(number << 3 | 5) + struct.pack("<f", value)


def _spiece_tensor():
    import torch

    return torch.tensor(list(umt5_tokenizer_model()), dtype=torch.uint8)


def check_umt5_vocabulary(spiece_model, vocab_size: int = REDUCED_UMT5["vocab_size"]) -> None:
    """Raise if a SentencePiece model (bytes or the uint8 tensor) can give ids the reduced table has no row
    for: the table holds T5's 32128 rows, the real UMT5 model has 256,300 ids."""
    import sentencepiece

    if hasattr(spiece_model, "numpy"):
        spiece_model = spiece_model.numpy().tobytes()
    size = sentencepiece.SentencePieceProcessor(model_proto=spiece_model).get_piece_size()
    if size > vocab_size:
        raise ValueError(f"this SentencePiece model has {size} pieces, but the reduced UMT5's table has "
                         f"{vocab_size} rows: ids >= {vocab_size} would index past it. The reduced encoder is "
                         f"built for the tokenizer of wan_fixtures.umt5_tokenizer_model() (T5's 32,000 pieces); "
                         f"UMT5's own (256,300 ids) needs REDUCED_UMT5['vocab_size'] = 256384.")


def reduced_umt5_init(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options={}):
    """ComfyUI's UMT5XXlModel.__init__ (its SDClipModel settings: last layer, end 1, pad 0, attention masks,
    padded positions zeroed) with :data:`REDUCED_UMT5` instead of umt5_config_xxl.json; installed as that
    class's initialiser by tests/support/reduced_text_encoders (e2e servers) and :func:`reduced_umt5`."""
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    comfy.sd1_clip.SDClipModel.__init__(
        self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(REDUCED_UMT5), dtype=dtype,
        special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5, enable_attention_masks=True,
        zero_out_masked=True, model_options=model_options)


@contextlib.contextmanager
def reduced_umt5():
    """While active, ComfyUI builds UMT5-XXL with :func:`reduced_umt5_init` (so the stock CLIPLoader, type
    wan, loads :func:`umt5_file`); the previous initialiser is put back after."""
    _import_comfy()
    import comfy.text_encoders.wan

    model_class = comfy.text_encoders.wan.UMT5XXlModel
    original = model_class.__dict__["__init__"]
    model_class.__init__ = reduced_umt5_init
    try:
        yield
    finally:
        model_class.__init__ = original


def reduced_umt5_text_encoder(device="cpu", dtype=None, model_options=None):
    """ComfyUI's Wan text-encoder model (the class ``wan.te()`` makes, as CLIPLoader builds it) around the
    reduced UMT5-XXL; weights not initialised (ComfyUI's layers skip it)."""
    import torch

    _import_comfy()
    import comfy.text_encoders.wan

    with reduced_umt5():
        return comfy.text_encoders.wan.te(dtype_t5=dtype or torch.bfloat16)(device=device, dtype=dtype,
                                                                           model_options=dict(model_options or {}))


def _initialise_umt5(model, generator) -> None:
    """_initialise, with T5's RMS norms (T5LayerNorm, a class _initialise does not recognise) as norm gains ~1:
    otherwise every normalised activation would shrink 50-fold."""
    import torch
    import comfy.text_encoders.t5

    _initialise(model, generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, comfy.text_encoders.t5.T5LayerNorm):
                module.weight.copy_(1.0 + 0.02 * torch.randn(module.weight.shape, generator=generator))


@generated_once
def umt5_file() -> Path:
    """The reduced UMT5-XXL as a Wan text-encoder file (the encoder's own keys: shared.weight, encoder.*; the
    tokenizer as "spiece_model"; the detection tensor), in bf16, as CLIPLoader (type wan) reads
    umt5_xxl_fp16.safetensors. It loads where UMT5XXlModel is built reduced: :func:`reduced_umt5`,
    tests/support/reduced_text_encoders."""
    import safetensors.torch
    import torch

    target = fixture_path("tiny_umt5_xxl")
    if target.is_file():
        return target
    model = reduced_umt5_text_encoder(dtype=torch.float32)
    _initialise_umt5(model, torch.Generator().manual_seed(SEEDS["umt5"]))
    prefix = "umt5xxl.transformer."
    state = {key[len(prefix):]: value.to(torch.bfloat16).contiguous() for key, value in model.state_dict().items()
             if key.startswith(prefix)}
    del model
    state[UMT5_DETECTION_KEY] = torch.zeros(UMT5_DETECTION_SHAPE, dtype=torch.bfloat16)
    state["spiece_model"] = _spiece_tensor()
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda temporary: safetensors.torch.save_file(
        state, temporary, metadata={"lora_lab_fixture": target.name}))
    return target


def wan_clip(weights: dict | None = None, model_options: dict | None = None):
    """The comfy.sd.CLIP the stock CLIPLoader (type wan) makes of :func:`umt5_file` (or of `weights`, a state
    dict of that layout): ComfyUI's own load_text_encoder_state_dicts, with UMT5-XXL built reduced."""
    _import_comfy()
    import comfy.sd
    import comfy.utils

    if weights is None:
        weights = comfy.utils.load_torch_file(str(umt5_file()), safe_load=True)
    if "spiece_model" in weights:
        check_umt5_vocabulary(weights["spiece_model"])
    with reduced_umt5():
        return comfy.sd.load_text_encoder_state_dicts([dict(weights)], clip_type=comfy.sd.CLIPType.WAN,
                                                      model_options=dict(model_options or {}))


def wan22_vae_skeleton() -> dict:
    """The keys comfy.sd.VAE reads to build the Wan 2.2 VAE (it reads no size: the widths are fixed). It loads
    what it is given, so each has its real shape (decoder width 256 x 4)."""
    return {"decoder.middle.0.residual.0.gamma": _zeros(1024, 1, 1, 1),
            "decoder.upsamples.0.upsamples.0.residual.2.weight": _zeros(1024, 1024, 3, 3, 3)}


def tiny_wan22_vae():
    """ComfyUI's Wan 2.2 VAE model (comfy.ldm.wan.vae2_2.WanVAE) as comfy.sd.VAE configures it, with seeded
    weights (its RMS-norm gains ~1, as for Wan 2.1's)."""
    import torch

    model = vae_model_from_skeleton(wan22_vae_skeleton())
    generator = torch.Generator().manual_seed(SEEDS["wan22_vae"])
    _initialise(model, generator)
    initialise_wan_norms(model, generator)
    return model


@generated_once
def wan22_vae_file() -> Path:
    """The Wan 2.2 VAE file (VAELoader), real-size (0.70 B parameters) in fp16: 1.4 GB."""
    import torch

    target = fixture_path("tiny_wan22_vae")
    if target.is_file():
        return target
    return _save(target, tiny_wan22_vae().state_dict(), torch.float16)


def wan_vae_file(variant: str) -> Path:
    """The VAE file of "wan21" / "wan22", or of a :data:`WAN_VARIANTS` model (Wan 2.2 A14B uses Wan 2.1's)."""
    kind = WAN_VAE_OF.get(variant, variant)
    if kind == "wan21":
        return ensure_wan21_vae()
    if kind == "wan22":
        return wan22_vae_file()
    raise ValueError(f"unknown Wan VAE {variant!r} (known: wan21, wan22, {', '.join(WAN_VARIANTS)})")


def wan21_t2v_file() -> Path:
    return wan_model_file("wan21_t2v")


def wan22_ti2v_file() -> Path:
    return wan_model_file("wan22_ti2v")


def wan22_t2v_high_noise_file() -> Path:
    return wan_model_file("wan21_t2v", "high_noise")


def wan22_t2v_low_noise_file() -> Path:
    return wan_model_file("wan21_t2v", "low_noise")


def wan22_i2v_high_noise_file() -> Path:
    return wan_model_file("wan22_i2v", "high_noise")


def wan22_i2v_low_noise_file() -> Path:
    return wan_model_file("wan22_i2v", "low_noise")


def wan_example_files(models_root: Path | str, roles=None) -> dict[str, Path]:
    """Link the Wan fixtures into a ComfyUI models folder under the real files' names (diffusion_models/,
    text_encoders/, vae/; :data:`EXAMPLE_FILES`), generating them in a child process (the e2e tier does
    not import ComfyUI itself); `roles` limits them (e.g. ["wan21_t2v", "umt5", "wan21_vae"]: the Wan 2.2
    VAE is the one big file). Returns {role: the linked path}."""
    import shutil

    roles = list(EXAMPLE_FILES) if roles is None else list(roles)
    unknown = [role for role in roles if role not in EXAMPLE_FILES]
    if unknown:
        raise ValueError(f"unknown Wan example files {unknown} (known: {', '.join(EXAMPLE_FILES)})")
    sources = example_files("wan_fixtures", {role: EXAMPLE_FILES[role][2] for role in roles})
    linked = {}
    for role in roles:
        folder, name, _ = EXAMPLE_FILES[role]
        target = Path(models_root) / folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            target.symlink_to(sources[role])
        except OSError:   # Windows without developer mode
            shutil.copy2(sources[role], target)
        linked[role] = target
    return linked
