"""The model families Train LoRA trains: one entry each (ComfyUI-agnostic).

Everything that differs between families lives in its `Family` entry: the training objective and
its sigma sampler default (with its source), the text encoders its CLIP holds and which of them
train (with their file key prefixes), which layers each `target` option trains and the order its
blocks run in, how the text conditioning reaches the model, the file's key style and metadata, and
preview defaults. No runtime module outside this table branches on a family's name: they read the
entry. Adding a family is one entry here plus one detection line from ComfyUI's model class
(nodes/comfy/detect.py DETECTION); tests/unit/test_families.py checks both.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..network.targets import DitTargets


@dataclass(frozen=True)
class TextEncoder:
    """A text encoder whose LoRA can train: the run's part name, the encoder inside ComfyUI's CLIP
    (cond_stage_model.<encoder>), and the file's key prefix for it."""

    part: str          # "text_encoder" | "text_encoder_2"
    encoder: str       # e.g. "clip_l"
    key_prefix: str    # e.g. "lora_te1_" (kohya) or "text_encoder." (diffusers)


# The conditioning extras a family's model takes beside the text sequence (nodes/comfy/conditioning.py
# has one function per name): SDXL's size embedding with the pooled text, the pooled text as `y`
# (Flux, SD3), Lumina 2's token count and padding mask (Z-Image). The guidance input of a
# guidance-distilled model is `training_guidance`. The generic path's `model_conds`: whatever the model's
# own extra_conds builds from the CLIP's output, as KSampler does.
CONDITIONING_EXTRAS = ("size_embedding", "pooled_y", "token_count", "model_conds")
# What a generic entry's objective is before a model resolves it (Family.resolved).
OBJECTIVE_FROM_MODEL = "model"


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    objective: str                          # "discrete" (epsilon / v, ComfyUI's EPS / V_PREDICTION) | "flow" (CONST)
                                            # | OBJECTIVE_FROM_MODEL (the generic path, until resolved)
    encoders: tuple[str, ...] = ()          # the encoders the CLIP must hold (cond_stage_model attributes)
    optional_encoders: tuple[str, ...] = ()  # and may hold
    clip_loader: str = "the CLIP output of the same Load Checkpoint node as the MODEL"   # how users load it
    text_encoders: tuple[TextEncoder, ...] = ()   # encoders whose LoRA can train
    frozen_text: str = ""                   # encoders that always stay frozen, in words (for errors and logs)
    exact_length_text: bool = False         # an LLM encoder: captions of different lengths run one by one
    conditioning: tuple[str, ...] = ()      # names of CONDITIONING_EXTRAS
    sampling: str = "uniform"               # what timestep_sampling "auto" means (families/sigmas.py)
    sampling_shift: float | None = None     # the shift "auto" uses (sampling "shift")
    sampling_source: str = ""
    dit: DitTargets | None = None           # None: a UNet (training/network/targets.py's TARGETS)
    key_style: str = "kohya"                # "kohya" (lora_unet_/lora_te*_) | "diffusers" (transformer./text_encoder*.)
                                            # | "comfy" (ComfyUI's native diffusion_model.<path>, kohya tensor names)
    key_style_reason: str = ""
    unet_key_names: str = "ldm"             # kohya stems of the diffusion model: "ldm" / ComfyUI paths | "diffusers"
    base_model_version: str = ""            # kohya's ss_base_model_version
    kohya_v2: bool = False                  # kohya's ss_v2
    modelspec_architecture: str = ""
    modelspec_by_prediction: tuple[tuple[str, str], ...] = ()   # (prediction type, architecture) variants
    modelspec_without_guidance: str = ""    # the architecture when the model has no guidance input (schnell)
    modelspec_implementation: str = ""
    training_guidance: float | None = None  # guidance-distilled models: the guidance input while training
    preview_cfg: float = 7.0
    preview_guidance: float | None = None
    preview_steps: int = 20
    # The generic path: DiT targets found by the model's structure, objective and sigma shift read from its
    # model_sampling (`resolved`), any CLIP (its encoders stay frozen).
    structural: bool = False
    model_name: str = ""                    # resolved generic entry: ComfyUI's model class
    # Edit models: a dataset's control images reach the model as reference latents through its extra_conds
    # (`reference_latents`, what ComfyUI's ReferenceLatent / TextEncodeQwenImageEdit give), and where
    # control_text_pixels > 0 the text encoder sees the control image too, scaled to about that many pixels
    reference_images: bool = False
    control_text_pixels: int = 0
    # Video models: the dataset may hold clips (else images only); previews draw `preview_frames` frames,
    # saved as an animation at `preview_fps`
    video: bool = False
    preview_frames: int = 1
    preview_fps: float = 0.0
    # Mixture-of-experts models whose experts split the noise levels (Wan 2.2 A14B): the sigma where the
    # high-noise expert hands over to the low-noise one, what Train LoRA's noise_boundary 0 means
    expert_boundary: float | None = None
    expert_boundary_source: str = ""
    # Image-to-video models: each clip's first frame is the model's start image (its VAE latent beside the
    # noisy one, with a mask of the frames given: what ComfyUI's WanImageToVideo puts on the conditioning)
    start_frame: bool = False

    @property
    def model_conditioning(self) -> bool:
        """The model's inputs come from ComfyUI's own extra_conds (fed everything the CLIP returns)."""
        return "model_conds" in self.conditioning

    @property
    def flow(self) -> bool:
        return self.objective == "flow"

    @property
    def objective_known(self) -> bool:
        return self.objective != OBJECTIVE_FROM_MODEL

    def resolved(self, model_name: str, objective: str, dit: DitTargets, model_shift: float | None) -> Family:
        """A generic entry for one model: its class name, objective ("discrete" | "flow"), the DiT targets
        found by its structure and, for flow, the default sigma sampling: logit-normal t shifted by the
        shift of the model's own model_sampling when it has one (the shift it samples with), plain
        logit-normal otherwise."""
        shifted = objective == "flow" and model_shift is not None and abs(model_shift - 1.0) > 1e-6
        return dataclasses.replace(
            self, objective=objective, dit=dit, model_name=model_name,
            sampling="shift" if shifted else ("logit_normal" if objective == "flow" else "uniform"),
            sampling_shift=model_shift if shifted else None,
            base_model_version=f"{self.base_model_version}{model_name.lower()}",
            modelspec_architecture=f"{self.modelspec_architecture}{model_name.lower()}")

    @property
    def text_parts(self) -> tuple[str, ...]:
        return tuple(text.part for text in self.text_encoders)

    def text_encoder(self, part: str) -> TextEncoder:
        return next(text for text in self.text_encoders if text.part == part)

    def architecture(self, prediction_type: str, guidance_input: bool) -> str:
        """The modelspec architecture of the base this run trains (its variant where the entry knows one)."""
        if self.modelspec_without_guidance and not guidance_input:
            return self.modelspec_without_guidance
        return dict(self.modelspec_by_prediction).get(prediction_type, self.modelspec_architecture)


FLUX_TARGETS = DitTargets(
    blocks=("double_blocks.", "single_blocks."),
    call_order=("double_blocks", "single_blocks"),
    attention=("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj",
               # a single block's attention and MLP share its two linears
               "linear1", "linear2"),
    feed_forward=("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"),
    kohya_default="all",
    kohya_default_source="sd-scripts networks/lora_flux.py: every Linear of DoubleStreamBlock and "
                         "SingleStreamBlock, modulation included (ai-toolkit's Flux default is the same set)",
)
SD3_TARGETS = DitTargets(
    blocks=("joint_blocks.",),
    call_order=("joint_blocks",),
    attention=("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj"),
    feed_forward=("mlp.fc1", "mlp.fc2"),
    kohya_default="all",
    kohya_default_source="sd-scripts networks/lora_sd3.py: every Linear of the MMDiT joint blocks "
                         "(attention, MLP and adaLN modulation)",
)
ZIMAGE_TARGETS = DitTargets(
    blocks=("layers.", "noise_refiner.", "context_refiner."),
    call_order=("noise_refiner", "context_refiner", "layers"),
    attention=("attention.qkv", "attention.out"),
    feed_forward=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    kohya_default=("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    kohya_default_source="ai-toolkit's and musubi-tuner's Z-Image default: attention and feed-forward "
                         "linears of every transformer block (refiners included), adaLN modulation left out",
)

QWEN_IMAGE_TARGETS = DitTargets(
    blocks=("transformer_blocks.",),
    call_order=("transformer_blocks",),
    attention=("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
               "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"),
    feed_forward=("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"),
    kohya_default="all",
    kohya_default_source="musubi-tuner networks/lora_qwen_image.py: every Linear of QwenImageTransformerBlock, the "
                         "img_mod/txt_mod modulation included (its `_mod_` exclude pattern never matches the dotted "
                         "module names); ai-toolkit trains the same set",
)
# Flux.2 and Chroma keep Flux.1's block layout and layer names; their blocks hold no modulation linears
# (Flux.2 modulates from shared layers outside the blocks, Chroma from its distilled guidance layer), so
# "every Linear of the blocks" is attention and MLP.
FLUX2_TARGETS = dataclasses.replace(
    FLUX_TARGETS, kohya_default_source="musubi-tuner networks/lora_flux_2.py: every Linear of DoubleStreamBlock and "
                                       "SingleStreamBlock (ai-toolkit's Flux.2 default is the same set)")
CHROMA_TARGETS = dataclasses.replace(
    FLUX_TARGETS, kohya_default_source="sd-scripts networks/lora_flux.py (flux_train_network.py --model_type chroma): "
                                       "every Linear of DoubleStreamBlock and SingleStreamBlock; ai-toolkit's Chroma "
                                       "default is the same set")

# Wan 2.1 / 2.2: ComfyUI's WanModel names. Every Linear of a WanAttentionBlock is musubi-tuner's default; its
# modulation is a plain parameter and its q/k norms are RMSNorms, so "all" is attention, cross-attention (the
# image keys/values of Wan 2.1 I2V included) and the FFN.
WAN_TARGETS = DitTargets(
    blocks=("blocks.",),
    call_order=("blocks",),
    attention=("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
               "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img", "cross_attn.v_img"),
    feed_forward=("ffn.0", "ffn.2"),
    kohya_default="all",
    kohya_default_source="musubi-tuner networks/lora_wan.py: every Linear of WanAttentionBlock (embeddings, norms "
                         "and the head excluded by its default exclude pattern, all outside the blocks)",
)

_SD_IMPLEMENTATION = "diffusers"

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", "discrete", encoders=("clip_l",),
                  text_encoders=(TextEncoder("text_encoder", "clip_l", "lora_te_"),),
                  unet_key_names="diffusers", base_model_version="sd_v1",
                  modelspec_architecture="stable-diffusion-v1", modelspec_implementation=_SD_IMPLEMENTATION),
    "sd2": Family("sd2", "SD2.x", "discrete", encoders=("clip_h",),
                  text_encoders=(TextEncoder("text_encoder", "clip_h", "lora_te_"),),
                  unet_key_names="diffusers", base_model_version="sd_v2", kohya_v2=True,
                  modelspec_architecture="stable-diffusion-v2-512",
                  # SD2's v-prediction models have their own architecture name (sd-scripts' sai_model_spec)
                  modelspec_by_prediction=(("v_prediction", "stable-diffusion-v2-768-v"),),
                  modelspec_implementation=_SD_IMPLEMENTATION),
    "sdxl": Family("sdxl", "SDXL", "discrete", encoders=("clip_l", "clip_g"),
                   text_encoders=(TextEncoder("text_encoder", "clip_l", "lora_te1_"),
                                  TextEncoder("text_encoder_2", "clip_g", "lora_te2_")),
                   conditioning=("size_embedding",),
                   base_model_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
                   modelspec_implementation="https://github.com/Stability-AI/generative-models"),
    "flux": Family(
        "flux", "Flux.1", "flow", encoders=("clip_l", "t5xxl"), clip_loader="DualCLIPLoader, type flux",
        frozen_text="CLIP-L and T5-XXL", conditioning=("pooled_y",),
        sampling="flux_shift",
        sampling_source="Flux's resolution-dependent shift exp(mu), mu 0.5 at 256 to 1.15 at 4096 image tokens, "
                        "over a logit-normal t (sd-scripts --timestep_sampling flux_shift; BFL's sampler)",
        dit=FLUX_TARGETS, key_style="kohya",
        key_style_reason="sd-scripts' lora_unet_<block path> names: ComfyUI's LoraLoader maps them to the "
                         "model directly and diffusers' FluxLoraLoaderMixin converts every one of them "
                         "(_convert_kohya_flux_lora_to_diffusers)",
        base_model_version="flux1", modelspec_architecture="flux-1-dev", modelspec_without_guidance="flux-1-schnell",
        modelspec_implementation="https://github.com/black-forest-labs/flux",
        training_guidance=1.0, preview_cfg=1.0, preview_guidance=3.5, preview_steps=20),
    "sd3": Family(
        "sd3", "SD3 / SD3.5", "flow", encoders=("clip_l", "clip_g"), optional_encoders=("t5xxl",),
        clip_loader="TripleCLIPLoader", frozen_text="T5-XXL",
        # SD3's files use diffusers names (key_style_reason)
        text_encoders=(TextEncoder("text_encoder", "clip_l", "text_encoder."),
                       TextEncoder("text_encoder_2", "clip_g", "text_encoder_2.")),
        conditioning=("pooled_y",),
        sampling="logit_normal",
        sampling_source="logit-normal t = sigmoid(N(0, 1)): the SD3 paper's rf/lognorm(0.00, 1.00) and "
                        "diffusers' train_dreambooth_lora_sd3 default weighting_scheme",
        dit=SD3_TARGETS, key_style="diffusers",
        key_style_reason="diffusers' SD3LoraLoaderMixin has no converter for sd-scripts' lora_unet_joint_blocks "
                         "names, while ComfyUI's LoraLoader maps diffusers' transformer.transformer_blocks.N.attn."
                         "to_q/k/v onto the slices of its fused qkv: so the diffusers/peft layout "
                         "(lora_A/lora_B, alpha folded into the weights) is the one both load",
        base_model_version="sd3", modelspec_architecture="stable-diffusion-v3-medium",
        modelspec_implementation="https://github.com/Stability-AI/sd3.5",
        preview_cfg=5.0, preview_steps=20),
    "zimage": Family(
        "zimage", "Z-Image", "flow", encoders=("qwen3_4b",), clip_loader="CLIPLoader, type lumina2",
        frozen_text="the Qwen3 LLM text encoder", exact_length_text=True, conditioning=("token_count",),
        sampling="shift", sampling_shift=3.0,
        sampling_source="shift 3.0 over a logit-normal t: the shift ComfyUI's ZImage model samples with "
                        "(supported_models.ZImage sampling_settings) and Z-Image's scheduler config",
        dit=ZIMAGE_TARGETS, key_style="kohya",
        key_style_reason="lora_unet_<block path> names: ComfyUI's LoraLoader maps them to the model directly and "
                         "diffusers' ZImageLoraLoaderMixin converts every one (splitting the fused qkv)",
        base_model_version="z_image", modelspec_architecture="z-image-turbo",
        modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
        preview_cfg=1.0, preview_steps=8),
    "qwen_image": Family(
        "qwen_image", "Qwen-Image", "flow", encoders=("qwen25_7b",), clip_loader="CLIPLoader, type qwen_image",
        frozen_text="the Qwen2.5-VL LLM text encoder", exact_length_text=True, conditioning=("model_conds",),
        sampling="shift", sampling_shift=2.2,
        sampling_source="shift 2.2 over a logit-normal t: musubi-tuner's Qwen-Image recommendation "
                        "(docs/qwen_image.md: --timestep_sampling shift --discrete_flow_shift 2.2, about the "
                        "resolution-dependent shift of Qwen-Image's own scheduler at 1328 px)",
        dit=QWEN_IMAGE_TARGETS, key_style="kohya",
        key_style_reason="lora_unet_<block path> names (musubi-tuner's format): ComfyUI's LoraLoader maps them to the "
                         "model directly and diffusers' QwenImageLoraLoaderMixin converts every one "
                         "(_convert_non_diffusers_qwen_lora_to_diffusers)",
        base_model_version="qwen_image", modelspec_architecture="qwen-image",
        modelspec_implementation="https://github.com/QwenLM/Qwen-Image",
        # Qwen-Image has no guidance input; previews at ComfyUI's Qwen-Image example settings (20 steps, cfg 2.5)
        preview_cfg=2.5, preview_steps=20,
        # Qwen-Image-Edit: the control image as reference latent, and seen by the Qwen2.5-VL at 384 x 384 pixels
        # (musubi-tuner's text-encoder caching and ComfyUI's TextEncodeQwenImageEditPlus: CONDITION_IMAGE_SIZE)
        reference_images=True, control_text_pixels=384 * 384),
    "flux2": Family(
        "flux2", "Flux.2", "flow", optional_encoders=("mistral3_24b", "qwen3_4b", "qwen3_8b"),
        clip_loader="CLIPLoader, type flux2", frozen_text="the Mistral-3 / Qwen3 LLM text encoder",
        exact_length_text=True, conditioning=("model_conds",),
        sampling="flux2_shift",
        sampling_source="Flux's resolution-dependent shift exp(mu), mu 0.5 at 256 to 1.15 at 4096 image tokens (one "
                        "token per Flux.2 latent pixel), over a logit-normal t: musubi-tuner's recommendation "
                        "(docs/flux_2.md --timestep_sampling flux2_shift)",
        dit=FLUX2_TARGETS, key_style="kohya",
        key_style_reason="lora_unet_<block path> names: ComfyUI's LoraLoader maps them to the model directly and "
                         "diffusers' Flux2LoraLoaderMixin converts every one (_convert_kohya_flux2_lora_to_diffusers)",
        base_model_version="flux2", modelspec_architecture="flux-2-dev", modelspec_without_guidance="flux-2-klein",
        modelspec_implementation="https://github.com/black-forest-labs/flux2",
        # dev's guidance input while training: 1.0 as musubi-tuner (flux_2_train_network.py), ai-toolkit and
        # OneTrainer pass it; Klein has no guidance input. Previews: dev at FluxGuidance 4.0 (ComfyUI's Flux.2
        # example); Klein distilled samples at cfg 1 (its base model wants --l 4 --s 50 on the prompt line)
        training_guidance=1.0, preview_cfg=1.0, preview_guidance=4.0, preview_steps=20,
        reference_images=True),   # Flux.2's multi-reference editing: reference latents only
    "chroma": Family(
        "chroma", "Chroma", "flow", encoders=("t5xxl",), clip_loader="CLIPLoader, type chroma",
        frozen_text="T5-XXL", exact_length_text=True, conditioning=("model_conds",),
        sampling="logit_normal",
        sampling_source="logit-normal t = sigmoid(N(0, 1)), unshifted: sd-scripts' Chroma recommendation "
                        "(docs/flux_train_network.md: --timestep_sampling sigmoid --guidance_scale 0.0) and "
                        "ai-toolkit's default for Chroma",
        dit=CHROMA_TARGETS, key_style="kohya",
        key_style_reason="lora_unet_<block path> names (sd-scripts' Flux layout): ComfyUI's LoraLoader maps them to "
                         "the model directly and diffusers' Flux/Chroma LoRA loader converts every one "
                         "(_convert_kohya_flux_lora_to_diffusers)",
        base_model_version="chroma", modelspec_architecture="chroma",
        modelspec_implementation="https://huggingface.co/lodestones/Chroma",
        # Chroma is not guidance-distilled: its guidance input stays 0 (ComfyUI's Chroma.extra_conds), real cfg 4
        # in previews (ComfyUI's Chroma example: 30 steps, cfg 4)
        preview_cfg=4.0, preview_steps=30),
    "wan": Family(
        "wan", "Wan 2.1 / 2.2", "flow", encoders=("umt5xxl",), clip_loader="CLIPLoader, type wan",
        frozen_text="the UMT5-XXL text encoder", exact_length_text=True, conditioning=("model_conds",),
        sampling="shift", sampling_shift=3.0,
        sampling_source="shift 3.0 over a logit-normal t: musubi-tuner's Wan training example (docs/wan.md: "
                        "--timestep_sampling shift --discrete_flow_shift 3.0, for Wan 2.1 and the Wan 2.2 experts; "
                        "its docs note the training shift need not match the inference shift, 12 for Wan 2.2 T2V)",
        dit=WAN_TARGETS, key_style="kohya",
        key_style_reason="lora_unet_<block path> names (musubi-tuner's format): ComfyUI's LoraLoader maps them to the "
                         "model directly and diffusers' WanLoraLoaderMixin converts every one "
                         "(_convert_musubi_wan_lora_to_diffusers)",
        base_model_version="wan", modelspec_architecture="wan2.1",
        modelspec_implementation="https://github.com/Wan-Video/Wan2.1",
        # ComfyUI's Wan 2.1 text-to-video example: 30 steps, cfg 6; a 17-frame clip (5 latent frames) at 16 fps
        preview_cfg=6.0, preview_steps=30, video=True, preview_frames=17, preview_fps=16.0,
        expert_boundary=0.875,
        expert_boundary_source="Wan 2.2 A14B text-to-video: the high-noise expert runs from sigma 1 down to 0.875, "
                               "the low-noise one below (Wan 2.2's boundary 0.875 x 1000 timesteps; musubi-tuner's "
                               "--timestep_boundary default for T2V)"),
    "generic": Family(
        "generic", "any other model (generic path)", OBJECTIVE_FROM_MODEL,
        clip_loader="the CLIP loader (and type) its model card names for ComfyUI",
        frozen_text="whichever CLIP is connected", exact_length_text=True, conditioning=("model_conds",),
        sampling="logit_normal",
        sampling_source="flow models: logit-normal t (SD3's rf/lognorm), shifted by the shift of the model's own "
                        "model_sampling where it has one (the shift ComfyUI samples it with); discrete models: "
                        "their 1000 timesteps uniformly",
        structural=True, key_style="comfy",
        key_style_reason="ComfyUI's native diffusion_model.<path> names (comfy.lora's key map holds one for every "
                         "weight of every model it loads), so ComfyUI's LoraLoader takes any model's file; other "
                         "tools may not read them",
        # resolved per model: "<these>" + ComfyUI's model class, lower case
        base_model_version="comfyui_", modelspec_architecture="comfyui-",
        modelspec_implementation="https://github.com/comfyanonymous/ComfyUI",
        preview_cfg=4.0, preview_steps=20),
}


# Wan 2.2 I2V A14B (its two experts; no CLIP-vision input): Wan's entry, with each clip's first frame as the
# start image and Wan 2.2 image-to-video's expert boundary
FAMILIES["wan_i2v"] = dataclasses.replace(
    FAMILIES["wan"], key="wan_i2v", label="Wan 2.2 image-to-video", start_frame=True,
    sampling_source="shift 3.0 over a logit-normal t: musubi-tuner's Wan training example (docs/wan.md: "
                    "--timestep_sampling shift --discrete_flow_shift 3.0; Wan 2.2 I2V samples at shift 5)",
    modelspec_architecture="wan2.1", preview_cfg=3.5,
    expert_boundary=0.9,
    expert_boundary_source="Wan 2.2 A14B image-to-video: the high-noise expert runs from sigma 1 down to 0.9, the "
                           "low-noise one below (Wan 2.2's I2V boundary 0.900 x 1000 timesteps; musubi-tuner's "
                           "--timestep_boundary default for I2V)")


def family_labels(flow: bool | None = None) -> str:
    """The first-class families' labels in words ("SD1.x, SD2.x, ... or Z-Image"), all or only the flow /
    discrete ones (the generic path is not one of them)."""
    labels = [entry.label for entry in FAMILIES.values()
              if not entry.structural and (flow is None or entry.flow == flow)]
    return ", ".join(labels[:-1]) + f" or {labels[-1]}" if len(labels) > 1 else "".join(labels)


def family_entry(family: str | Family) -> Family:
    """A family's entry: by key, or the entry itself (a generic entry resolved for its model)."""
    return family if isinstance(family, Family) else FAMILIES[family]


def check_family_settings(family: str | Family, noise_offset: float, min_snr_gamma: float,
                          timestep_sampling: str) -> None:
    """Settings a family cannot use: ValueError naming the input, the value and the fix. A generic entry
    is checked once resolved for its model (its objective comes from the model)."""
    entry = family_entry(family)
    if not entry.objective_known:
        return
    label = f"{entry.model_name} (generic path)" if entry.model_name else entry.label
    if entry.flow:
        if min_snr_gamma > 0:
            raise ValueError(f"Train LoRA: min_snr_gamma = {min_snr_gamma:g} does not apply to {label}: it is a "
                             "flow-matching model, whose loss has no SNR weighting of that kind. Set min_snr_gamma to 0 "
                             "(the timestep_sampling input shapes which noise levels train).")
        if noise_offset > 0:
            raise ValueError(f"Train LoRA: noise_offset = {noise_offset:g} does not apply to {label}: noise offset "
                             "corrects the epsilon schedule's bias toward mid brightness, which a flow-matching model "
                             "(trained to reach pure noise) does not have. Set noise_offset to 0.")
    elif timestep_sampling not in ("auto", "uniform"):
        raise ValueError(f"Train LoRA: timestep_sampling = {timestep_sampling} applies to flow-matching models "
                         f"({family_labels(flow=True)}); {label} samples its 1000 timesteps uniformly. Set auto "
                         "or uniform.")
