"""MODEL, CLIP and VAE described for training/ (a ModelAccess): the modules to train, the loss's
view of the model, the encoders, the file's key names; nothing is loaded here."""
from __future__ import annotations

import hashlib
import logging
import math

import torch

from ...training.data.feeder import concat_conditioning
from ...training.families.table import FAMILIES, family_labels
from ...training.network import kohya
from ...training.network.targets import dit_targets_by_structure
from ...training.run.host import ModelAccess
from ...training.run.loop import DiffusionObjective
from .conditioning import EXTRAS, MODEL_INPUTS
from .detect import PREDICTION_TYPES, model_shift
from .files import dora_norm_of_loader
from .quantize import cast_per_forward, quantizable_layers
from .vram import comfy_training_mode, device_memory, loaded_for_training, release_models

logger = logging.getLogger("lora_lab")

# Keys of a cached text conditioning that are ours, not apply_model's.
_OWN_KEYS = ("c_crossattn", "pooled", "exact_length", "samples")


class ComfyModels:
    """ComfyUI's MODEL/CLIP/VAE of one family, seen through the methods the trainer calls."""

    def __init__(self, model, clip, vae, family: str):
        import comfy.lora

        self.model, self.clip, self.vae = model, clip, vae
        self.entry = FAMILIES[family]
        self.base_model = model.model
        self.device = model.load_device
        self.model_sampling = model.get_model_object("model_sampling")
        if self.entry.structural:   # the generic path: the entry resolved for this model
            self.entry = generic_entry(self.entry, self.base_model, self.model_sampling)
        self.transformer_options = dict(model.model_options.get("transformer_options", {}))
        stage = clip.cond_stage_model
        self.roots = {text.part: (text.encoder, getattr(stage, text.encoder)) for text in self.entry.text_encoders
                      if getattr(stage, text.encoder, None) is not None}
        guidance_input = bool(self.base_model.model_config.unet_config.get("guidance_embed"))
        self.training_guidance = self.entry.training_guidance if guidance_input else None
        self.unet_key_map = comfy.lora.model_lora_keys_unet(self.base_model, {})
        self.clip_key_map = comfy.lora.model_lora_keys_clip(stage, {})

    # The loss --------------------------------------------------------------------------------------
    def denoise(self, xt: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        if "samples" in cond:   # captions that cannot share a batch: one forward each, as ComfyUI does
            return torch.cat([self.denoise(xt[index:index + 1], sigma[index:index + 1], sample)
                              for index, sample in enumerate(cond["samples"])])
        extra = {key: value for key, value in cond.items() if key not in _OWN_KEYS}
        if MODEL_INPUTS in extra:   # the generic path: ComfyUI's extra_conds, built with the latent's shape
            inputs = extra.pop(MODEL_INPUTS)
            return torch.cat([self.base_model.apply_model(xt[first:end], sigma[first:end],
                                                          transformer_options=self.transformer_options,
                                                          **{**kwargs, **extra})
                              for first, end, kwargs in inputs(xt)])
        return self.base_model.apply_model(xt, sigma, c_crossattn=cond["c_crossattn"],
                                           transformer_options=self.transformer_options, **extra)

    def noise_scaling(self, sigma, noise, x0):
        return self.model_sampling.noise_scaling(sigma, noise, x0)

    # The encoders ----------------------------------------------------------------------------------
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(pixels[:, :, :, :3])
        return self.base_model.process_latent_in(latent.clone()).to(self.device, torch.float32)

    def encode_caption(self, caption: str, image: torch.Tensor | None = None) -> dict:
        """A caption's conditioning; with `image` (an edit dataset's control image, IMAGE [1, H, W, 3]) the
        text encoder sees it too, scaled to about the family's control_text_pixels (as ComfyUI's
        TextEncodeQwenImageEdit nodes pass it to the tokenizer)."""
        if image is None:
            tokens = self.clip.tokenize(caption)
        else:
            tokens = self.clip.tokenize(caption, images=[scaled_to_area(image, self.entry.control_text_pixels)])
        if self.entry.model_conditioning:   # everything the CLIP returns, for the model's own extra_conds
            output = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
            encoded = {("c_crossattn" if key == "cond" else "pooled" if key == "pooled_output" else key):
                       (value.to(self.device) if torch.is_tensor(value) else value)
                       for key, value in output.items() if value is not None}
            encoded["exact_length"] = True
            return encoded
        if self.entry.dit is None:
            cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
            return {"c_crossattn": cond.to(self.device), "pooled": pooled.to(self.device) if pooled is not None else None}
        output = self.clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        pooled = output.get("pooled_output")
        encoded = {"c_crossattn": output["cond"].to(self.device),
                   "pooled": pooled.to(self.device) if pooled is not None else None}
        mask = output.get("attention_mask")
        if mask is not None and int(mask.sum()) != mask.numel():   # padding inside: the model needs the mask
            encoded["attention_mask"] = mask.to(self.device)
        if self.entry.exact_length_text:
            encoded["exact_length"] = True
        return encoded

    def encode_captions(self, captions: list[str], images: list[torch.Tensor] | None = None) -> dict:
        return concat_conditioning([self.encode_caption(caption, image)
                                    for caption, image in zip(captions, images or [None] * len(captions))])

    def extra_conditioning(self, cond: dict, sizes: list[dict]) -> dict:
        """The model's keyword arguments for a batch: the text sequence, the family's extras
        (nodes/comfy/conditioning.py) and the guidance input of a guidance-distilled model."""
        if "samples" in cond:
            return {"samples": [self.extra_conditioning(sample, [size]) for sample, size in zip(cond["samples"], sizes)]}
        result = {"c_crossattn": cond["c_crossattn"].to(self.device)}
        for name in self.entry.conditioning:
            result.update(EXTRAS[name](self.base_model, cond, sizes, self.device))
        if self.training_guidance is not None:   # Flux-dev: the distilled guidance input (the table says which value)
            result["guidance"] = torch.full((result["c_crossattn"].shape[0],), float(self.training_guidance),
                                            device=self.device)
        return result

    # The file's key names --------------------------------------------------------------------------
    def unet_kohya_names(self, paths: list[str], key_style: str | None = None) -> dict:
        """key_style: the file's (kohya.network_key_style), when it is not the family's."""
        key_style = key_style or self.entry.key_style
        if key_style == "comfy":
            return kohya.comfy_unet_names(self.unet_key_map, paths)
        if key_style == "diffusers":
            return kohya.diffusers_unet_names(self.unet_key_map, paths)
        return kohya.kohya_unet_names(self.unet_key_map, paths, self.entry.unet_key_names)

    def text_kohya_names(self, part: str, paths: list[str], key_style: str | None = None) -> dict:
        prefix = self.entry.text_encoder(part).key_prefix
        if key_style is not None:
            prefix = kohya.text_key_prefix(prefix, part, key_style)
        return kohya.kohya_text_names(self.clip_key_map, self.roots[part][0], paths, prefix)

    # The rest of the contract ----------------------------------------------------------------------
    def unet_blocks(self) -> list[torch.nn.Module]:
        """The checkpointed (and streamable) units, in call order."""
        unet = self.base_model.diffusion_model
        if self.entry.dit is not None:   # a DiT calls its transformer blocks one by one
            # A block that is a Sequential (a UNet's TimestepEmbedSequential, found by structure on the
            # generic path) is iterated by its model, not called: its layers are the units.
            return [unit for name in self.entry.dit.call_order for block in unet.get_submodule(name)
                    for unit in (list(block) if isinstance(block, torch.nn.Sequential) else [block])]
        # The layers inside each UNet block (ResBlock, SpatialTransformer, Up/Downsample): ComfyUI never
        # calls a block (TimestepEmbedSequential) itself, forward_timestep_embed iterates over its
        # layers, so a forward patched onto the block would never run.
        return [layer for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks] for layer in block]

    def release_encoders(self, vae_done: bool, text_done: bool) -> None:
        release_models(([self.vae.patcher] if vae_done else []) + ([self.clip.patcher] if text_done else []))

    def weights_key(self) -> str:
        return weights_fingerprint(self.base_model.diffusion_model, self.clip.cond_stage_model)

    def load(self, stream: bool):
        return loaded_for_training(self.model, self.clip, stream)

    def device_memory(self, wanted: int) -> tuple[int, int]:
        return device_memory(self.model.load_device, wanted)

    def access(self) -> ModelAccess:
        device = torch.device(self.device)
        sigmas = self.model_sampling.sigmas.detach().clone().float()
        return ModelAccess(
            family=self.entry.key, device=device, unet=self.base_model.diffusion_model, unet_blocks=self.unet_blocks(),
            text_encoders={part: module for part, (_, module) in self.roots.items()},
            text_layers={part: list(module.transformer.text_model.encoder.layers)
                         for part, (_, module) in self.roots.items()},
            # The run's sigma sampler is set by the trainer (ModelAccess.with_sampling).
            objective=DiffusionObjective(sigmas=sigmas.to(device),
                                         prediction_type=PREDICTION_TYPES[self.base_model.model_type.name],
                                         denoise=self.denoise, noise_scaling=self.noise_scaling),
            encode_pixels=self.encode_pixels, encode_captions=self.encode_captions,
            extra_conditioning=self.extra_conditioning,
            unet_kohya_names=self.unet_kohya_names, text_kohya_names=self.text_kohya_names,
            latent_key=f"{type(self.base_model.latent_format).__name__}:{vae_fingerprint(self.vae)}",
            # On a GPU the user's frozen weights wait in ComfyUI's offload device (RAM) while the trainable
            # clones use the card: one copy on the GPU, not two. On the CPU there is nothing to gain.
            offload_device=torch.device(self.model.offload_device) if device.type != "cpu" else None,
            weights_key=self.weights_key,
            # CLIP Set Last Layer's -2 is kohya's clip_skip 2.
            clip_skip=-self.clip.layer_idx if getattr(self.clip, "layer_idx", None) is not None else None,
            release_encoders=self.release_encoders, dora_norm=dora_norm_of_loader(),
            training_guidance=self.training_guidance, in_place_blocks=self.entry.dit is not None,
            training_mode=comfy_training_mode, load=self.load, device_memory=self.device_memory,
            quantizable_layers=lambda: quantizable_layers(self.base_model.diffusion_model),
            cast_per_forward=cast_per_forward,
            resolved_entry=self.entry if self.entry.structural else None,
        )


def scaled_to_area(image: torch.Tensor, pixels: int) -> torch.Tensor:
    """IMAGE [B, H, W, 3] resized ("area") to about `pixels` pixels, its aspect kept, sides rounded to whole
    pixels: what ComfyUI's Qwen-Image edit nodes hand the vision encoder."""
    import comfy.utils

    samples = image.movedim(-1, 1)
    scale = math.sqrt(pixels / (samples.shape[2] * samples.shape[3]))
    width, height = round(samples.shape[3] * scale), round(samples.shape[2] * scale)
    return comfy.utils.common_upscale(samples, width, height, "area", "disabled").movedim(1, -1)


def model_access(model, clip, vae, family: str) -> ModelAccess:
    """Describe MODEL and CLIP for training/; the trainer loads them through `load` once its memory plan
    is made (nothing is loaded here)."""
    return ComfyModels(model, clip, vae, family).access()


def generic_entry(entry, base_model, model_sampling):
    """The generic entry resolved for this model (targets by structure, objective and shift from its
    model_sampling), said in the log."""
    name = type(base_model).__name__
    prediction = PREDICTION_TYPES[base_model.model_type.name]
    resolved = entry.resolved(name, "flow" if prediction == "flow" else "discrete",
                              dit_targets_by_structure(base_model.diffusion_model), model_shift(model_sampling))
    logger.info("LoRA Lab: %s is not one of the first-class families (%s): training it through the generic path "
                "(blocks %s found by structure, %s objective from its model_sampling, conditioning from its "
                "extra_conds, text encoders frozen, keys diffusion_model.<path>).", name, family_labels(),
                ", ".join(resolved.dit.call_order), prediction)
    return resolved


def vae_fingerprint(vae) -> str:
    """A cheap content key of the VAE weights."""
    return weights_fingerprint(vae.first_stage_model)


# Tensors ComfyUI allocates without initialising when a file lacks them and never uses then: an SD1.x
# checkpoint has no CLIP text projection (its pooled output is not projected), so
# cond_stage_model.clip_l.transformer.text_projection holds whatever memory it got, different in every process.
UNINITIALISED_WHEN_MISSING = ("text_projection.weight",)


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap content key of module weights (sum and norm of every tensor, in order), the same in every
    process that loads the same files (UNINITIALISED_WHEN_MISSING left out)."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for module in modules:
            for name, tensor in module.state_dict().items():
                if name.endswith(UNINITIALISED_WHEN_MISSING):
                    continue
                values = tensor.detach().float()
                digest.update(f"{name}:{tuple(values.shape)}:{float(values.sum()):.6e}:{float(values.norm()):.6e};".encode())
    return digest.hexdigest()[:24]
