"""The conditioning a family's model takes beside the text sequence: one function per name of
training/families/table.py CONDITIONING_EXTRAS, chosen by the family entry's `conditioning`.

Each takes (ComfyUI's model object, the cached text conditioning of one batch, the per-sample size
records, the device) and returns the keyword arguments it adds to ``apply_model``; the generic path's
``model_conds`` returns a ModelInputs that the denoiser calls with the latent (ComfyUI's extra_conds
needs its shape).
"""
from __future__ import annotations

from typing import Callable

import torch

from ...training.data.feeder import REFERENCE_LATENTS, START_LATENT


def size_embedding(base_model, cond: dict, sizes: list[dict], device) -> dict:
    """SDXL: the pooled text with the original size, crop and target size of each sample (ComfyUI's
    encode_adm, as its SDXL conditioning does)."""
    rows = []
    for index, size in enumerate(sizes):
        width, height = size["original_size"]
        left, top = size["crop_offset"]
        target_width, target_height = size["target_size"]
        rows.append(base_model.encode_adm(pooled_output=cond["pooled"][index:index + 1], width=width, height=height,
                                          crop_w=left, crop_h=top, target_width=target_width,
                                          target_height=target_height))
    return {"y": torch.cat(rows).to(device)}


def pooled_y(base_model, cond: dict, sizes: list[dict], device) -> dict:
    """Flux, SD3: the pooled text embedding as `y` (when the CLIP gave one)."""
    return {"y": cond["pooled"].to(device)} if cond.get("pooled") is not None else {}


def token_count(base_model, cond: dict, sizes: list[dict], device) -> dict:
    """Lumina 2 (Z-Image): the caption's token count, and the padding mask where there is padding."""
    if "attention_mask" in cond:
        return {"num_tokens": int(cond["attention_mask"].sum(dim=-1).max()),
                "attention_mask": cond["attention_mask"].to(device)}
    return {"num_tokens": cond["c_crossattn"].shape[1]}


# The key under which model_conds hands its deferred inputs to the denoiser (ComfyModels.denoise).
MODEL_INPUTS = "lora_lab_model_inputs"
# Keys of a cached text conditioning that are the pack's own bookkeeping, not CLIP outputs.
_TEXT_KEYS = {"c_crossattn": "cross_attn", "pooled": "pooled_output"}
_BOOKKEEPING = ("exact_length", "samples")


class ModelInputs:
    """The generic path's model inputs for one batch, built by ComfyUI's own ``base_model.extra_conds``
    as KSampler builds them (comfy/samplers.py encode_model_conds + calc_cond_batch): per sample, its
    CLIP output (``cross_attn`` = the text sequence, ``pooled_output``, ``attention_mask`` and whatever
    else the encoder returned) with the latent being denoised as ``noise``, its size as width/height,
    then each CONDRegular/CONDCrossAttn/CONDConstant/... processed for a batch of one and concatenated
    with ComfyUI's own ``concat``. Deferred to the denoiser because extra_conds reads the latent's shape."""

    def __init__(self, base_model, cond: dict, sizes: list[dict], device):
        self.base_model, self.sizes, self.device = base_model, sizes, device
        batch = cond["c_crossattn"].shape[0]
        self.samples = [{_TEXT_KEYS.get(key, key): (value[index:index + 1] if torch.is_tensor(value)
                                                     and value.shape[:1] == (batch,) else value)
                         for key, value in cond.items() if key not in _BOOKKEEPING and value is not None}
                        for index in range(batch)]
        for sample in self.samples:   # an edit dataset's control latent: a list of VAE latents, as ReferenceLatent
            if REFERENCE_LATENTS in sample:    # gives them (extra_conds applies process_latent_in itself)
                sample[REFERENCE_LATENTS] = [base_model.process_latent_out(sample[REFERENCE_LATENTS])]
            if START_LATENT in sample:   # an image-to-video start image: the VAE's latent, as WanImageToVideo gives it
                sample[START_LATENT] = base_model.process_latent_out(sample[START_LATENT])

    def sample_conds(self, index: int, noise: torch.Tensor) -> dict:
        width, height = self.sizes[index]["target_size"] if index < len(self.sizes) else (None, None)
        # CLIPTextEncode's conditioning always holds pooled_output (None for an encoder without one), and
        # some extra_conds read it unconditionally (0.3.75's Flux family)
        params = {"pooled_output": None, **self.samples[index], "device": self.device, "noise": noise,
                  "latent_image": torch.zeros_like(noise), "prompt_type": "positive"}
        if width is not None:
            params.update(width=width, height=height)
        conds = self.base_model.extra_conds(**params)
        return {key: value.process_cond(batch_size=1, area=None) for key, value in conds.items()}

    def __call__(self, noise: torch.Tensor) -> list[tuple[int, int, dict]]:
        """(first, end, apply_model keyword arguments) per run of consecutive samples whose conds
        concatenate (ComfyUI batches the same way: a cond that cannot concatenate runs on its own)."""
        per_sample = [self.sample_conds(index, noise[index:index + 1]) for index in range(noise.shape[0])]
        groups: list[tuple[int, int]] = []
        for index, conds in enumerate(per_sample):
            if groups and _can_concat(per_sample[groups[-1][0]], conds):
                groups[-1] = (groups[-1][0], index + 1)
            else:
                groups.append((index, index + 1))
        result = []
        for first, end in groups:
            members = per_sample[first:end]
            result.append((first, end, {key: value.concat([other[key] for other in members[1:]])
                                        for key, value in members[0].items()}))
        return result


def _can_concat(left: dict, right: dict) -> bool:
    return left.keys() == right.keys() and all(left[key].can_concat(right[key]) for key in left)


def model_conds(base_model, cond: dict, sizes: list[dict], device) -> dict:
    """Any other model (the generic path): its inputs from its own extra_conds (ModelInputs)."""
    return {MODEL_INPUTS: ModelInputs(base_model, cond, sizes, device)}


EXTRAS: dict[str, Callable[[object, dict, list[dict], object], dict]] = {
    "size_embedding": size_embedding, "pooled_y": pooled_y, "token_count": token_count, "model_conds": model_conds,
}
