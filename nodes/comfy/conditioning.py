"""The conditioning a family's model takes beside the text sequence: one function per name of
training/families/table.py CONDITIONING_EXTRAS, chosen by the family entry's `conditioning`.

Each takes (ComfyUI's model object, the cached text conditioning of one batch, the per-sample size
records, the device) and returns the keyword arguments it adds to ``apply_model``.
"""
from __future__ import annotations

from typing import Callable

import torch


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


EXTRAS: dict[str, Callable[[object, dict, list[dict], object], dict]] = {
    "size_embedding": size_embedding, "pooled_y": pooled_y, "token_count": token_count,
}
