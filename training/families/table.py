"""The model families Train LoRA trains: one entry each (ComfyUI-agnostic).

Everything that differs between families lives in FAMILIES: the training objective and its
timestep/sigma sampler default (with its source), which text encoders can train, which layers each
`target` option trains, how blocks group for block weights, the file's key style and metadata, and
preview defaults. The trainer and the bridge read the entry; adding a family (Qwen-Image, Wan) is
one entry here plus its detection in nodes/comfy_bridge.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# --------------------------------------------------------------------------------------------
# Timestep / sigma sampling (flow matching)
# --------------------------------------------------------------------------------------------

TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal", "shift")
SIGMA_FLOOR = 1e-3   # flow sigmas are clamped to [SIGMA_FLOOR, 1]: the prediction divides by sigma


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3 / Flux (sigma = s t / (1 + (s - 1) t)); s > 1 moves mass to high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flux_resolution_shift(latent_height: int, latent_width: int) -> float:
    """Flux's resolution-dependent shift: exp(mu), mu linear in the image token count from 0.5 at 256
    tokens to 1.15 at 4096 (BFL's flux sampling `get_lin_function`, diffusers' FluxPipeline
    `calculate_shift`, sd-scripts' `--timestep_sampling flux_shift`); a token is a 2x2 latent patch."""
    tokens = (latent_height // 2) * (latent_width // 2)
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    return math.exp(mu)


def draw_flow_sigmas(kind: str, shift: float, batch: int, latent_shape: tuple[int, ...],
                     generator: torch.Generator) -> torch.Tensor:
    """`batch` sigmas in [SIGMA_FLOOR, 1] (on the generator's device, fp32).

    uniform: t ~ U(0, 1). logit_normal: t = sigmoid(N(0, 1)) (SD3 paper's rf/lognorm(0, 1)).
    shift: a logit-normal t shifted by `shift` (sd-scripts' `--timestep_sampling shift`).
    flux_shift: as shift, with Flux's resolution-dependent value (flux_resolution_shift).
    """
    device = generator.device
    if kind == "uniform":
        t = torch.rand(batch, generator=generator, device=device)
    else:
        t = torch.sigmoid(torch.randn(batch, generator=generator, device=device))
        if kind == "shift":
            t = shifted(t, shift)
        elif kind == "flux_shift":
            t = shifted(t, flux_resolution_shift(latent_shape[-2], latent_shape[-1]))
        elif kind != "logit_normal":
            raise ValueError(f"unknown sigma sampling {kind!r}")
    return t.float().clamp(SIGMA_FLOOR, 1.0)




# --------------------------------------------------------------------------------------------
# Which layers train
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DitTargets:
    """LoRA targets of a DiT family, as module-path rules relative to ComfyUI's diffusion_model.

    blocks: path prefixes of the transformer blocks, in depth order (block weights group by depth).
    Per `target` option, the Linear layers whose path (inside a block) ends with one of the suffixes;
    "all" = every Linear in the blocks.
    """

    blocks: tuple[str, ...]
    attention: tuple[str, ...]
    feed_forward: tuple[str, ...]
    kohya_default: tuple[str, ...] | str   # suffixes, or "all"
    kohya_default_source: str = ""

    def suffixes(self, target: str) -> tuple[str, ...] | str:
        return {"attention": self.attention, "attention_ff": self.attention + self.feed_forward,
                "all_linear_conv": "all", "kohya_default": self.kohya_default}[target]


def dit_target_paths(diffusion_model: torch.nn.Module, targets: DitTargets, target: str) -> list[str]:
    """Module paths of the Linear layers `target` trains in a DiT (relative to diffusion_model)."""
    rule = targets.suffixes(target)
    paths = []
    for path, module in diffusion_model.named_modules():
        if not isinstance(module, torch.nn.Linear) or not path.startswith(targets.blocks):
            continue
        if rule == "all" or path.endswith(tuple(rule)):
            paths.append(path)
    return paths


def dit_block_of(targets: DitTargets, paths: list[str]) -> dict[str, str]:
    """Block weights on a DiT: "down" / "mid" / "up" = the first, middle and last third of its
    transformer blocks in depth order (Flux: the double blocks, then the single blocks)."""
    blocks: list[str] = []
    for path in paths:
        for prefix in targets.blocks:
            if path.startswith(prefix):
                index = path[len(prefix):].split(".")[0]
                block = f"{prefix}{index}"
                if block not in blocks:
                    blocks.append(block)
    order = sorted(blocks, key=lambda block: (next(i for i, prefix in enumerate(targets.blocks)
                                                    if block.startswith(prefix)), int(block.rsplit(".", 1)[-1])))
    thirds = {}
    for position, block in enumerate(order):
        thirds[block] = ("down", "mid", "up")[min(2, position * 3 // max(1, len(order)))]
    result = {}
    for path in paths:
        for block, group in thirds.items():
            if path.startswith(block + "."):
                result[path] = group
    return result


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Family:
    key: str
    label: str
    objective: str                          # "discrete" (epsilon / v, ComfyUI's EPS / V_PREDICTION) | "flow" (CONST)
    sampling: str = "uniform"               # what timestep_sampling "auto" means
    sampling_shift: float | None = None     # the shift "auto" uses (sampling "shift")
    sampling_source: str = ""
    text_parts: tuple[str, ...] = ()        # text encoders whose LoRA can train (CLIPs)
    frozen_text: str = ""                   # encoders that always stay frozen, in words (for errors and logs)
    dit: DitTargets | None = None           # None: a UNet (training/network/lora.py's TARGETS)
    key_style: str = "kohya"                # "kohya" (lora_unet_/lora_te*_) | "diffusers" (transformer./text_encoder*.)
    key_style_reason: str = ""
    base_model_version: str = ""            # kohya's ss_base_model_version
    modelspec_architecture: str = ""
    modelspec_implementation: str = ""
    training_guidance: float | None = None  # guidance-distilled models: the guidance input while training
    preview_cfg: float = 7.0
    preview_guidance: float | None = None
    preview_steps: int = 20

    @property
    def flow(self) -> bool:
        return self.objective == "flow"


FLUX_TARGETS = DitTargets(
    blocks=("double_blocks.", "single_blocks."),
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
    attention=("attn.qkv", "attn.proj", "attn2.qkv", "attn2.proj"),
    feed_forward=("mlp.fc1", "mlp.fc2"),
    kohya_default="all",
    kohya_default_source="sd-scripts networks/lora_sd3.py: every Linear of the MMDiT joint blocks "
                         "(attention, MLP and adaLN modulation)",
)
ZIMAGE_TARGETS = DitTargets(
    blocks=("layers.", "noise_refiner.", "context_refiner."),
    attention=("attention.qkv", "attention.out"),
    feed_forward=("feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    kohya_default=("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
    kohya_default_source="ai-toolkit's and musubi-tuner's Z-Image default: attention and feed-forward "
                         "linears of every transformer block (refiners included), adaLN modulation left out",
)

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "SD1.x", "discrete", text_parts=("text_encoder",), base_model_version="sd_v1",
                  modelspec_architecture="stable-diffusion-v1", modelspec_implementation="diffusers"),
    "sd2": Family("sd2", "SD2.x", "discrete", text_parts=("text_encoder",), base_model_version="sd_v2",
                  modelspec_architecture="stable-diffusion-v2-512", modelspec_implementation="diffusers"),
    "sdxl": Family("sdxl", "SDXL", "discrete", text_parts=("text_encoder", "text_encoder_2"),
                   base_model_version="sdxl_base_v1-0", modelspec_architecture="stable-diffusion-xl-v1-base",
                   modelspec_implementation="https://github.com/Stability-AI/generative-models"),
    "flux": Family(
        "flux", "Flux.1", "flow", sampling="flux_shift",
        sampling_source="Flux's resolution-dependent shift exp(mu), mu 0.5 at 256 to 1.15 at 4096 image tokens, "
                        "over a logit-normal t (sd-scripts --timestep_sampling flux_shift; BFL's sampler)",
        frozen_text="CLIP-L and T5-XXL", dit=FLUX_TARGETS, key_style="kohya",
        key_style_reason="sd-scripts' lora_unet_<block path> names: ComfyUI's LoraLoader maps them to the "
                         "model directly and diffusers' FluxLoraLoaderMixin converts every one of them "
                         "(_convert_kohya_flux_lora_to_diffusers)",
        base_model_version="flux1", modelspec_architecture="flux-1-dev",
        modelspec_implementation="https://github.com/black-forest-labs/flux",
        training_guidance=1.0, preview_cfg=1.0, preview_guidance=3.5, preview_steps=20),
    "sd3": Family(
        "sd3", "SD3 / SD3.5", "flow", sampling="logit_normal",
        sampling_source="logit-normal t = sigmoid(N(0, 1)): the SD3 paper's rf/lognorm(0.00, 1.00) and "
                        "diffusers' train_dreambooth_lora_sd3 default weighting_scheme",
        text_parts=("text_encoder", "text_encoder_2"), frozen_text="T5-XXL", dit=SD3_TARGETS,
        key_style="diffusers",
        key_style_reason="diffusers' SD3LoraLoaderMixin has no converter for sd-scripts' lora_unet_joint_blocks "
                         "names, while ComfyUI's LoraLoader maps diffusers' transformer.transformer_blocks.N.attn."
                         "to_q/k/v onto the slices of its fused qkv: so the diffusers/peft layout "
                         "(lora_A/lora_B, alpha folded into the weights) is the one both load",
        base_model_version="sd3", modelspec_architecture="stable-diffusion-v3-medium",
        modelspec_implementation="https://github.com/Stability-AI/sd3.5",
        preview_cfg=5.0, preview_steps=20),
    "zimage": Family(
        "zimage", "Z-Image", "flow", sampling="shift", sampling_shift=3.0,
        sampling_source="shift 3.0 over a logit-normal t: the shift ComfyUI's ZImage model samples with "
                        "(supported_models.ZImage sampling_settings) and Z-Image's scheduler config",
        frozen_text="the Qwen3 LLM text encoder", dit=ZIMAGE_TARGETS, key_style="kohya",
        key_style_reason="lora_unet_<block path> names: ComfyUI's LoraLoader maps them to the model directly and "
                         "diffusers' ZImageLoraLoaderMixin converts every one (splitting the fused qkv)",
        base_model_version="z_image", modelspec_architecture="z-image-turbo",
        modelspec_implementation="https://github.com/Tongyi-MAI/Z-Image",
        preview_cfg=1.0, preview_steps=8),
}


def sampling_for(family_key: str, timestep_sampling: str, timestep_shift: float) -> tuple[str, float]:
    """(sampler kind, shift) that a run uses: `auto` is the family's default."""
    entry = FAMILIES[family_key]
    if timestep_sampling == "auto":
        return entry.sampling, entry.sampling_shift if entry.sampling_shift is not None else timestep_shift
    return timestep_sampling, timestep_shift


def check_family_settings(family_key: str, noise_offset: float, min_snr_gamma: float, timestep_sampling: str) -> None:
    """Settings a family cannot use: ValueError naming the input, the value and the fix."""
    entry = FAMILIES[family_key]
    if entry.flow:
        if min_snr_gamma > 0:
            raise ValueError(f"Train LoRA: min_snr_gamma = {min_snr_gamma:g} does not apply to {entry.label}: it is a "
                             "flow-matching model, whose loss has no SNR weighting of that kind. Set min_snr_gamma to 0 "
                             "(the timestep_sampling input shapes which noise levels train).")
        if noise_offset > 0:
            raise ValueError(f"Train LoRA: noise_offset = {noise_offset:g} does not apply to {entry.label}: noise offset "
                             "corrects the epsilon schedule's bias toward mid brightness, which a flow-matching model "
                             "(trained to reach pure noise) does not have. Set noise_offset to 0.")
    elif timestep_sampling not in ("auto", "uniform"):
        raise ValueError(f"Train LoRA: timestep_sampling = {timestep_sampling} applies to flow-matching models (Flux, "
                         f"SD3, Z-Image); {entry.label} samples its 1000 timesteps uniformly. Set auto or uniform.")
