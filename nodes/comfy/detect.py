"""Which family a MODEL is, and whether MODEL, CLIP and VAE belong together (before any heavy work).

DETECTION is the one place that maps ComfyUI's model classes to the family table
(training/families/table.py); everything else about a family is read from its entry. Any other model
ComfyUI samples falls back to the generic entry (GENERIC) when the generic path can train it, or gets a
ValueError naming its class and why not (generic_refusal).
"""
from __future__ import annotations

import math
from typing import NamedTuple

from ...training.families.table import FAMILIES, family_labels


class Detection(NamedTuple):
    model_class: str                  # a class of comfy.model_base
    config: dict                      # unet_config values it must have
    family: str                       # a key of FAMILIES
    subclasses: bool = False          # also its subclasses (SDXL's variants)


DETECTION: tuple[Detection, ...] = (
    Detection("SDXL", {}, "sdxl", subclasses=True),
    Detection("BaseModel", {"context_dim": 768}, "sd1"),
    Detection("SD21UNCLIP", {"context_dim": 768}, "sd1"),
    Detection("BaseModel", {"context_dim": 1024}, "sd2"),
    Detection("SD21UNCLIP", {"context_dim": 1024}, "sd2"),
    Detection("Flux", {"image_model": "flux"}, "flux"),
    Detection("SD3", {}, "sd3"),
    Detection("Lumina2", {"image_model": "lumina2", "dim": 3840}, "zimage"),
    Detection("QwenImage", {"image_model": "qwen_image"}, "qwen_image"),
    Detection("Flux2", {"image_model": "flux2"}, "flux2"),
    Detection("Chroma", {"image_model": "chroma"}, "chroma"),
    # Wan 2.1 T2V 1.3B / 14B and each Wan 2.2 A14B T2V expert (16 latent channels in, no image input)
    Detection("WAN21", {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 16}, "wan"),
    # Wan 2.2 TI2V 5B (its own 48-channel VAE; text-to-video without a start image)
    Detection("WAN22", {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 48}, "wan"),
    # Wan 2.2 I2V A14B's experts: 16 noisy + 4 mask + 16 start-image channels, no CLIP-vision input (Wan 2.1
    # I2V 14B, model_type i2v, needs CLIP vision: not a first-class family)
    Detection("WAN21", {"image_model": "wan2.1", "model_type": "t2v", "in_dim": 36}, "wan_i2v"),
)
# Every other model: the generic path (targets by structure, objective from model_sampling, conditioning
# from extra_conds).
GENERIC = "generic"
# ComfyUI's model_type names -> the loss's prediction types (training/run/loop.py PREDICTIONS)
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction", "FLUX": "flow", "FLOW": "flow"}


def model_shift(model_sampling) -> float | None:
    """The time shift a flow model_sampling samples with: ModelSamplingDiscreteFlow's `shift`, or
    exp(shift) for ModelSamplingFlux (which stores mu; flux_time_shift(mu, 1, t) is a shift of exp(mu)).
    None for anything else."""
    import comfy.model_sampling as sampling

    if isinstance(model_sampling, sampling.ModelSamplingFlux):
        return math.exp(float(model_sampling.shift))
    if isinstance(model_sampling, sampling.ModelSamplingDiscreteFlow):
        return float(model_sampling.shift)
    return None


def generic_refusal(model) -> str | None:
    """Why the generic path cannot train this MODEL (None: it can). Cheap: a concat_cond probe on a
    zero latent of 8 x 8 and a walk over the module tree."""
    import comfy.model_sampling as sampling

    from ...training.network.targets import dit_targets_by_structure

    base_model = model.model
    prediction = base_model.model_type.name
    if prediction not in PREDICTION_TYPES:
        return (f"its model_sampling is {prediction}; the loss handles epsilon (EPS), v-prediction (V_PREDICTION) "
                "and flow matching (FLOW / FLUX, CONST noise scaling)")
    model_sampling = model.get_model_object("model_sampling")
    usable = (sampling.ModelSamplingDiscreteFlow, sampling.ModelSamplingFlux) if PREDICTION_TYPES[prediction] == "flow" \
        else (sampling.ModelSamplingDiscrete,)
    if not isinstance(model_sampling, usable):
        return (f"its model_sampling ({type(model_sampling).__name__}) has no schedule the loss can draw from "
                f"(it needs {' or '.join(kind.__name__ for kind in usable)})")
    latent_format = base_model.latent_format
    dimensions = getattr(latent_format, "latent_dimensions", 2)
    if dimensions != 2:
        return (f"it works on {dimensions}-D latents (video or audio) and is not one of the video models Train LoRA "
                "knows (Wan 2.1 T2V, Wan 2.2 T2V A14B / TI2V 5B / I2V A14B); video variants that take other inputs "
                "(CLIP-vision features: Wan 2.1 I2V and FLF2V; VACE, camera, sound, pose) are not supported")
    concat = concat_refusal(base_model)
    if concat is not None:
        return concat
    try:
        dit_targets_by_structure(base_model.diffusion_model)
    except ValueError as error:
        return str(error)
    return None


def concat_refusal(base_model) -> str | None:
    """Why a model that takes extra input latents beside the noisy one (c_concat: inpainting, Flux Fill,
    instruct-pix2pix) cannot train on images and captions; None when it takes none. A probe on a zero
    latent of 8 x 8 (with a frame axis for a model on video latents)."""
    import torch

    latent_format = base_model.latent_format
    frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()
    probe = torch.zeros((1, latent_format.latent_channels, *frames, 8, 8))
    try:
        concat = base_model.concat_cond(noise=probe, latent_image=probe, device=probe.device)
    except Exception:   # a model whose concat input cannot be built from nothing
        concat = True
    if concat is None:
        return None
    return ("it takes extra input latents beside the noisy one (c_concat: a reference, control, mask or "
            "source image), which a LoRA Dataset of images and captions does not have")


def detect_family(base_model) -> str | None:
    """The first DETECTION row that matches ComfyUI's model object (its class and detected unet_config)."""
    import comfy.model_base as model_base

    config = base_model.model_config.unet_config
    for row in DETECTION:
        model_class = getattr(model_base, row.model_class, None)
        if model_class is None:
            continue
        matches_class = isinstance(base_model, model_class) if row.subclasses else type(base_model) is model_class
        if matches_class and all(config.get(key) == value for key, value in row.config.items()):
            return row.family
    return None


def model_family(model) -> str:
    """A key of FAMILIES for a MODEL: its DETECTION row, else the generic path; ValueError naming the
    model class and the reason for a model the generic path cannot train either."""
    family = detect_family(model.model)
    if family is not None:
        return family
    reason = generic_refusal(model)
    if reason is not None:
        name = f"{type(model.model).__name__} ({type(model.model.model_config).__name__})"
        raise ValueError(f"Train LoRA: model is {name}, which is not one of the first-class families "
                         f"({family_labels()}) and cannot train through the generic path: {reason}.")
    return GENERIC


def encoders_present(stage) -> list[str]:
    """The text encoders a CLIP's cond_stage_model holds, among those any family uses."""
    known = dict.fromkeys(name for entry in FAMILIES.values() for name in entry.encoders + entry.optional_encoders)
    return [attribute for attribute in known if getattr(stage, attribute, None) is not None]


def check_compatible(model, clip, vae) -> str:
    """Cheap checks that MODEL, CLIP and VAE belong together; returns the family."""
    if model is None or clip is None or vae is None:
        raise ValueError("Train LoRA: model, clip and vae must all be connected (from Load Checkpoint, or Load "
                         "Diffusion Model + the family's CLIP loader + Load VAE).")
    family = model_family(model)
    entry = FAMILIES[family]
    if entry.structural:   # any CLIP the user loaded for it (frozen); the latent width must match
        return check_generic_latents(model, vae, family)
    stage = clip.cond_stage_model
    present = encoders_present(stage)
    required, optional = entry.encoders, entry.optional_encoders
    if (not set(required) <= set(present) or not set(present) <= set(required) | set(optional)
            or not present):   # a family whose encoder is one of several (Flux.2: Mistral-3 or Qwen3) needs one
        loaders = "; ".join(f"{other.label}: {other.clip_loader}" for other in FAMILIES.values() if other.dit is not None)
        raise ValueError(f"Train LoRA: clip has text encoder(s) {present or type(stage).__name__} but model is "
                         f"{entry.label}, which needs {list(required)}{f' (optionally {list(optional)})' if optional else ''}. "
                         "Connect the CLIP output of the same Load Checkpoint node as the MODEL, or the family's CLIP "
                         f"loader ({loaders}).")
    if entry.dit is None:
        widths = sum(getattr(stage, attribute).transformer.text_model.final_layer_norm.weight.shape[0]
                     for attribute in present)
        context = model.model.model_config.unet_config.get("context_dim")
        if widths != context:
            raise ValueError(f"Train LoRA: clip produces {widths}-wide text embeddings but model expects "
                             f"{context}. Connect the CLIP of the same checkpoint as the MODEL.")
    if entry.dit is None:   # a UNet's input width (an inpainting UNet takes 9 channels)
        expected = model.model.model_config.unet_config.get("in_channels", 4)
    else:
        expected = model.model.latent_format.latent_channels
    latent_channels = getattr(vae, "latent_channels", 4)
    if latent_channels != expected:
        raise ValueError(f"Train LoRA: vae makes {latent_channels}-channel latents but model takes {expected}. Connect "
                         "the VAE of the same checkpoint (Flux.1, SD3, Z-Image and Chroma use the 16-channel Flux VAE, "
                         "Qwen-Image and Wan 2.1 / Wan 2.2 A14B the Wan 2.1 VAE, Wan 2.2 TI2V 5B the Wan 2.2 VAE, "
                         "Flux.2 its own).")
    prediction = model.model.model_type.name
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"Train LoRA: model predicts {prediction}; only epsilon, v-prediction and flow-matching "
                         "models can be trained.")
    # an image-to-video family's concat input is its start image (the feeder gives it)
    concat = concat_refusal(model.model) if entry.dit is not None and not entry.start_frame else None
    if concat is not None:   # Flux.1 Fill and the like
        raise ValueError(f"Train LoRA: model is {entry.label} ({type(model.model).__name__} with "
                         f"{model.model.model_config.unet_config.get('in_channels')} input channels), which cannot "
                         f"train here: {concat}. Connect the base model, not its fill/inpaint variant.")
    return family


def check_generic_latents(model, vae, family: str) -> str:
    """The generic path: the VAE's latents must be the model's latent width (its latent_format)."""
    latent_channels = getattr(vae, "latent_channels", 4)
    expected = model.model.latent_format.latent_channels
    if latent_channels != expected:
        raise ValueError(f"Train LoRA: vae makes {latent_channels}-channel latents but model "
                         f"({type(model.model).__name__}) works on {expected}-channel latents. Connect the VAE its "
                         "model card names (the one you sample it with).")
    return family
