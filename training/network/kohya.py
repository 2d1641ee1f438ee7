"""kohya-format LoRA files: key names, ss_* metadata, and safe atomic saving into models/loras.

Key names are the ones kohya sd-scripts writes and ComfyUI / A1111 / Forge / diffusers read:
    SD1.x/2.x UNet  lora_unet_<diffusers path>   e.g. lora_unet_down_blocks_0_attentions_0_..._to_q
    SDXL UNet       lora_unet_<ldm path>         e.g. lora_unet_input_blocks_4_1_..._to_q
    text encoders   lora_te_ (SD1/2), lora_te1_ / lora_te2_ (SDXL)
    Flux / Z-Image  lora_unet_<ComfyUI path>     e.g. lora_unet_double_blocks_0_img_attn_qkv
each with ``.lora_down.weight`` (peft's A), ``.lora_up.weight`` (B), ``.alpha`` (scale =
alpha / rank) and, with DoRA, ``.dora_scale``. SD3 files use diffusers/peft names instead
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``; training/families/table.py says why):
``diffusers_unet_names``, ``file_entries`` and ``lora_state_dict`` write them. A model trained through
the generic path gets ComfyUI's native names (key style "comfy", ``comfy_unet_names``):
``diffusion_model.<ComfyUI path>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``, which
comfy.lora's key map holds for every weight of every model ComfyUI loads.

LyCORIS LoKr / LoHa files (``network``) carry LyCORIS's tensor names under the same stems:
``<stem>.lokr_w1`` (or ``.lokr_w1_a`` / ``.lokr_w1_b``), ``.lokr_w2`` (or ``.lokr_w2_a`` / ``.lokr_w2_b``),
``<stem>.hada_w1_a`` / ``.hada_w1_b`` / ``.hada_w2_a`` / ``.hada_w2_b``, and ``.alpha``. SD3's diffusers
names cannot carry them (they split the fused qkv into row slices, and a slice of a Kronecker or
Hadamard product is not one): its LoKr / LoHa files use sd-scripts' SD3 names, ``lora_unet_<ComfyUI
path>`` and ``lora_te1_`` / ``lora_te2_`` (``network_key_style``), which ComfyUI maps to the whole layer.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch

from . import lycoris

logger = logging.getLogger("lora_lab")

LORA_EXTENSION = ".safetensors"

def kohya_unet_names(weight_key_map: Mapping[str, str], module_paths: list[str], style: str) -> dict[str, str]:
    """UNet module path (relative to diffusion_model) -> kohya key stem.

    `weight_key_map` is ComfyUI's own LoRA key map (``comfy.lora.model_lora_keys_unet``: kohya stem ->
    ``diffusion_model.<path>.weight``), so every name we write is one ComfyUI's loader matches. `style`
    is the family entry's ``unet_key_names``: "diffusers" for SD1.x/2.x, whose kohya names are
    diffusers-style (``lora_unet_down_blocks_...``); "ldm" for SDXL and the DiTs, whose names are their
    ldm / ComfyUI module paths (``lora_unet_input_blocks_...``).
    """
    by_weight: dict[str, list[str]] = {}
    for stem, weight in weight_key_map.items():
        if stem.startswith("lora_unet_"):
            by_weight.setdefault(weight, []).append(stem)
    names = {}
    for path in module_paths:
        ldm_stem = "lora_unet_" + path.replace(".", "_")
        candidates = by_weight.get(f"diffusion_model.{path}.weight", [])
        if style == "ldm":
            chosen = ldm_stem if ldm_stem in candidates else None
        else:
            diffusers_style = [stem for stem in candidates if stem != ldm_stem]
            chosen = diffusers_style[0] if diffusers_style else None
        if chosen is None:
            raise ValueError(f"ComfyUI's LoRA key map has no kohya name for UNet layer {path}")
        names[path] = chosen
    return names


def comfy_unet_names(weight_key_map: Mapping[str, str], module_paths: list[str]) -> dict[str, str]:
    """Module path (relative to diffusion_model) -> ComfyUI's native key stem ``diffusion_model.<path>``:
    comfy.lora.model_lora_keys_unet maps that stem to the layer's weight for every model."""
    names = {}
    for path in module_paths:
        stem = f"diffusion_model.{path}"
        if weight_key_map.get(stem) != f"{stem}.weight":
            raise ValueError(f"ComfyUI's LoRA key map has no native name for layer {path}")
        names[path] = stem
    return names


def kohya_text_names(weight_key_map: Mapping[str, str], root_prefix: str, module_paths: list[str],
                     prefix: str) -> dict[str, str]:
    """Text-encoder module path (relative to the encoder root, e.g. ``clip_l``) -> key stem starting
    with `prefix` (the family entry's TextEncoder.key_prefix, e.g. ``lora_te1_``).

    `weight_key_map` is ``comfy.lora.model_lora_keys_clip``'s map (stem -> ``clip_l.<path>.weight``).
    """
    by_weight: dict[str, str] = {}
    for stem, weight in weight_key_map.items():
        if stem.startswith(prefix):
            by_weight[weight] = stem
    names = {}
    for path in module_paths:
        stem = by_weight.get(f"{root_prefix}.{path}.weight")
        if stem is None:
            raise ValueError(f"ComfyUI's LoRA key map has no {prefix}* name for text-encoder layer {path}")
        names[path] = stem
    return names


def diffusers_unet_names(weight_key_map: Mapping[str, object], module_paths: list[str],
                         prefix: str = "transformer.") -> dict[str, list[tuple]]:
    """Diffusion-model module path -> [(diffusers module name, output rows or None, row transform or None)],
    from ComfyUI's key map. Its diffusers entries map a name to a weight; or to (weight, (dim, offset,
    size)) where diffusers splits a fused layer (SD3's to_q/to_k/to_v are row slices of ComfyUI's qkv);
    or to (weight, rows, function) where diffusers orders the rows differently (SD3's last context
    block: scale and shift swapped). Those functions swap halves, their own inverse, so the same one
    turns our rows into diffusers' order."""
    by_weight: dict[str, list[tuple]] = {}
    for stem, target in weight_key_map.items():
        if not stem.startswith(prefix):
            continue
        if not isinstance(target, tuple):
            by_weight.setdefault(target, []).append((stem, None, None))
            continue
        weight, rows = target[0], (target[1] if len(target) > 1 else None)
        transform = target[2] if len(target) > 2 else None
        if rows is not None:
            dim, offset, size = rows
            if dim != 0:
                continue
            rows = (offset, size)
        by_weight.setdefault(weight, []).append((stem, rows, transform))
    names = {}
    for path in module_paths:
        candidates = by_weight.get(f"diffusion_model.{path}.weight")
        if not candidates:
            raise ValueError(f"ComfyUI's LoRA key map has no diffusers name for layer {path}")
        names[path] = sorted(candidates, key=lambda item: item[1][0] if item[1] else 0)
    return names


# The text encoders' kohya prefixes (sd-scripts' SD3 / SDXL names) for a family whose own are diffusers-style.
KOHYA_TEXT_PREFIXES = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def network_key_style(key_style: str, network: str) -> str:
    """The key style a file of `network` is written in: the family's, except LoKr / LoHa on a
    "diffusers" family (SD3), whose files take kohya names (module docstring)."""
    return "kohya" if key_style == "diffusers" and network != "lora" else key_style


def text_key_prefix(prefix: str, part: str, key_style: str) -> str:
    """The text encoder's stem prefix in `key_style`: the family's (`prefix`), or sd-scripts' lora_te1_ /
    lora_te2_ where the family's is diffusers-style and the file is written with kohya names."""
    if key_style == "kohya" and not prefix.startswith("lora_"):
        return KOHYA_TEXT_PREFIXES[part]
    return prefix


def file_entries(name, weights: dict[str, torch.Tensor]) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """[(key stem, weights)] for one trained layer. `name` is a stem, or [(stem, rows, transform)] where
    the file splits a fused layer into row slices (every slice keeps A; B and the DoRA scale are cut) or
    orders its rows differently (the transform reorders B and the DoRA scale). A LoKr / LoHa layer takes
    a stem only."""
    if isinstance(name, str):
        return [(name, weights)]
    if lycoris.is_lycoris_entry(weights):
        raise ValueError("a LoKr / LoHa layer cannot be split into row slices; write it with kohya names "
                         "(network_key_style)")
    entries = []
    for stem, rows, transform in name:
        part = dict(weights)
        if rows is not None:
            offset, size = rows
            part["up"] = weights["up"][offset:offset + size]
            if "magnitude" in weights:
                part["magnitude"] = weights["magnitude"][offset:offset + size]
        if transform is not None:
            part["up"] = transform(part["up"])
            if "magnitude" in part:
                part["magnitude"] = transform(part["magnitude"])
        entries.append((stem, {key: value.contiguous() for key, value in part.items()}))
    return entries


def lora_state_dict(entries: list[tuple[str, dict[str, torch.Tensor]]], alpha: float, dtype: torch.dtype,
                    key_style: str) -> dict[str, torch.Tensor]:
    """The file's tensors in the family's key style: "kohya" and "comfy" (lora_down/lora_up/alpha; their
    stems differ) or "diffusers"
    (peft's lora_A/lora_B with the alpha / rank scale folded into B: diffusers rejects non-LoRA keys
    such as .alpha, and ComfyUI then applies scale 1)."""
    if key_style in ("kohya", "comfy"):
        return kohya_state_dict(entries, alpha, dtype)
    if any(lycoris.is_lycoris_entry(weights) for _, weights in entries):
        raise ValueError("LoKr / LoHa tensors have no diffusers names; write them with kohya names (network_key_style)")
    dtype = file_dtype(entries, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for stem, weights in entries:
        scale = float(alpha) / weights["down"].shape[0]
        # a fused layer's slices share A: each key gets its own copy (safetensors refuses shared memory)
        tensors[f"{stem}.lora_A.weight"] = weights["down"].to(dtype).clone()
        tensors[f"{stem}.lora_B.weight"] = (weights["up"].float() * scale).to(dtype).contiguous()
        if "magnitude" in weights:
            magnitude = weights["magnitude"].to(dtype)
            tensors[f"{stem}.dora_scale"] = magnitude.reshape(-1, *([1] * (weights["up"].ndim - 1))).contiguous()
    return tensors


def kohya_state_dict(entries: list[tuple[str, dict[str, torch.Tensor]]], alpha: float,
                     dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """[(kohya stem, {"down", "up"[, "magnitude"]})] -> the file's tensors.

    DoRA: peft's magnitude vector (one value per output feature) is written as ``dora_scale``
    shaped [out, 1] (ComfyUI's `weight_decompose` normalises per output row in that layout).

    A LoKr / LoHa entry ({"lokr_w1": ..., "alpha": ...}, lycoris.file_tensors) is written under its own
    names, with its own alpha (`alpha` is LoRA's).
    """
    dtype = file_dtype(entries, dtype)
    tensors: dict[str, torch.Tensor] = {}
    for stem, weights in entries:
        if lycoris.is_lycoris_entry(weights):
            for name, tensor in weights.items():
                tensors[f"{stem}.{name}"] = tensor.to(dtype).contiguous()
            continue
        tensors[f"{stem}.lora_down.weight"] = weights["down"].to(dtype).contiguous()
        tensors[f"{stem}.lora_up.weight"] = weights["up"].to(dtype).contiguous()
        tensors[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
        if "magnitude" in weights:
            magnitude = weights["magnitude"].to(dtype)
            tensors[f"{stem}.dora_scale"] = magnitude.reshape(-1, *([1] * (weights["up"].ndim - 1))).contiguous()
    return tensors


def file_dtype(entries: list[tuple[str, dict[str, torch.Tensor]]], dtype: torch.dtype) -> torch.dtype:
    """The dtype to write: `dtype`, or fp32 where fp16/bf16 would turn finite weights into inf (a run that
    was diverging: such a file breaks every image it touches; keep the values)."""
    if dtype != torch.float32 and not fits_dtype(entries, dtype):
        logger.warning("LoRA Lab: the trained weights exceed %s's range; this file is saved in fp32 instead", dtype)
        return torch.float32
    return dtype


def fits_dtype(entries: list[tuple[str, dict[str, torch.Tensor]]], dtype: torch.dtype) -> bool:
    """True when every finite weight stays finite in `dtype`."""
    for _, weights in entries:
        for tensor in weights.values():
            if not torch.isfinite(tensor.to(dtype)).all() and torch.isfinite(tensor).all():
                return False
    return True


# ModelSpec (modelspec.*), as sd-scripts writes it for LoRAs (library/sai_model_spec.py).
MODELSPEC_VERSION = "1.0.1"
MODELSPEC_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v"}   # flow-matching files carry none


def modelspec_metadata(family, prediction_type: str, title: str, resolution: int, timestamp: float,
                       clip_skip: int | None, guidance_input: bool = False) -> dict[str, str]:
    """The modelspec.* keys of a LoRA: architecture "<base>/lora" (the family entry's, or its variant for
    this prediction type / guidance input, e.g. SD2-v, flux-1-schnell), implementation, title,
    resolution, date (ISO, local time, as sd-scripts), prediction type and, with clip skip, the
    encoder layer."""
    base = family.architecture(prediction_type, guidance_input)
    metadata = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{base}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
    }
    if prediction_type in MODELSPEC_PREDICTIONS:
        metadata["modelspec.prediction_type"] = MODELSPEC_PREDICTIONS[prediction_type]
    if clip_skip is not None:
        metadata["modelspec.encoder_layer"] = str(clip_skip)
    return metadata


def safetensors_hashes(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> dict[str, str]:
    """sshs_model_hash / sshs_legacy_hash, the hashes sd-webui-additional-networks (and A1111) index
    LoRAs by, computed as sd-scripts precalculates them: over the file as written with only its ss_*
    metadata; the model hash covers the tensor bytes after the header, the legacy one 64 KiB at 1 MiB."""
    from safetensors.torch import save

    data = save(tensors, {key: value for key, value in metadata.items() if key.startswith("ss_")})
    header_end = 8 + int.from_bytes(data[:8], "little")
    return {"sshs_model_hash": hashlib.sha256(data[header_end:]).hexdigest(),
            "sshs_legacy_hash": hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]}


def kohya_metadata(fields: Mapping[str, object], settings: Mapping[str, object]) -> dict[str, str]:
    """ss_* metadata with kohya's value conventions (every value a string; dicts as JSON) plus our
    full settings as JSON under ``lora_lab_settings``."""
    metadata: dict[str, str] = {}
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, (dict, list)):
            metadata[key] = json.dumps(value)
        elif isinstance(value, bool):
            metadata[key] = "True" if value else "False"
        else:
            metadata[key] = str(value)
    metadata["lora_lab_settings"] = json.dumps(dict(settings), sort_keys=True, default=str)
    return metadata


_UNSAFE_CHARACTERS = re.compile(r'[<>:"|?*\x00-\x1f\x7f]')
# Names Windows reserves for devices, with or without an extension ("nul.safetensors" is the device).
_RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"com{digit}" for digit in "123456789¹²³"),
                   *(f"lpt{digit}" for digit in "123456789¹²³")}
# Longest file-name part we accept: file systems allow 255, and suffixes (_interrupted, _step00001,
# _2, .safetensors) are added.
MAX_NAME_PART = 200


def sanitize_lora_name(lora_name: str) -> str:
    """A relative path (forward slashes) without extension that cannot leave the loras folder.

    Sub-folders are allowed ("characters/alice"); "..", absolute paths, drive letters and
    characters Windows forbids are not. Raises ValueError naming the value and the fix.
    """
    text = lora_name.strip().replace("\\", "/")
    if text.lower().endswith(LORA_EXTENSION):
        text = text[: -len(LORA_EXTENSION)]
    parts = [part.strip() for part in text.split("/")]
    fix = 'Use a plain name such as "my_style" or a sub-folder such as "styles/my_style".'
    if not text or text.startswith("/") or re.match(r"^[A-Za-z]:", text):
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r} is empty or absolute. {fix}")
    if any(part in ("", ".", "..") for part in parts):
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r} may not contain '..', '.' or empty "
                         f"folder names (it must stay inside models/loras). {fix}")
    if any(part.startswith(".") for part in parts):
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r}: names starting with '.' are hidden files "
                         f"(and LoRA Lab's own cache folders). {fix}")
    if any(_UNSAFE_CHARACTERS.search(part) for part in parts):
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r} contains a character file systems "
                         f"forbid (<>:\"|?* or control characters). {fix}")
    reserved = [part for part in parts if part.split(".")[0].strip().lower() in _RESERVED_NAMES]
    if reserved:
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r}: {reserved[0]!r} is a device name on Windows "
                         f"(CON, PRN, AUX, NUL, COM1-9, LPT1-9), not a file. {fix}")
    if any(part.endswith(".") for part in parts):
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r}: a name may not end with '.' (Windows drops "
                         f"it, so the file would get another name). {fix}")
    if any(len(part) > MAX_NAME_PART for part in parts):
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r} has a part longer than {MAX_NAME_PART} "
                         f"characters. {fix}")
    return "/".join(parts)


def free_lora_path(loras_dir: Path, lora_name: str) -> Path:
    """models/loras/<name>.safetensors, or <name>_2, _3, ... when taken. Never an existing file."""
    relative = sanitize_lora_name(lora_name)
    base = (loras_dir / relative).resolve()
    root = loras_dir.resolve()
    if root not in base.parents:
        raise ValueError(f"Train LoRA: lora_name = {lora_name!r} resolves outside {root}.")
    candidate = base.with_name(base.name + LORA_EXTENSION)
    counter = 2
    while candidate.exists():
        candidate = base.with_name(f"{base.name}_{counter}{LORA_EXTENSION}")
        counter += 1
    return candidate


class SaveError(RuntimeError):
    """A file could not be written (disk full, folder not writable, ...); nothing half-written is left."""

    def __init__(self, message: str, errno_code: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_code


# What to do about a failed write, by errno (anything else gets the generic advice).
_WRITE_FIXES = {
    errno.ENOSPC: "The disk is full: free some space on it (or move the folder to another drive with "
                  "ComfyUI's extra_model_paths.yaml / --output-directory) and run again.",
    errno.EDQUOT: "Your disk quota is used up: free some space and run again.",
    errno.EACCES: "The folder is not writable by ComfyUI: fix its permissions, or pick another folder.",
    errno.EPERM: "The folder is not writable by ComfyUI: fix its permissions, or pick another folder.",
    errno.EROFS: "The drive is read-only: point ComfyUI's folder at a writable drive.",
    errno.ENOTDIR: "Part of the path is a file, not a folder: rename that file or pick another lora_name.",
    errno.EEXIST: "Part of the path is a file, not a folder: rename that file or pick another lora_name.",
}


def write_error(path: Path, error: OSError) -> SaveError:
    """A SaveError naming the file, the system's reason and the fix."""
    reason = error.strerror or str(error)
    fix = _WRITE_FIXES.get(error.errno, "Check that the folder exists, is writable and has free space.")
    return SaveError(f"LoRA Lab: could not write {path}: {reason}. {fix} Nothing was left half-written.",
                     error.errno)


@contextlib.contextmanager
def temporary_file(folder: Path) -> Iterator[str]:
    """A fresh temp file name in `folder` (same file system, so a rename into place is atomic); the
    file is removed afterwards unless it was renamed away. ComfyUI lists no ``.tmp`` files."""
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".lora_lab_", suffix=".tmp")
    os.close(handle)
    try:
        yield temporary
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be made in it (before any heavy work)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with temporary_file(folder):
            pass
    except OSError as error:
        raise write_error(folder, error) from None


def save_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], loras_dir: Path,
              lora_name: str) -> Path:
    """Write atomically (temp file in the same folder + rename) to a free name; returns the path.

    The name is chosen when the file is complete, so a file that appeared meanwhile is never
    replaced: the rename is ``os.link`` (fails on an existing name, then the next free name is
    tried); on file systems without hard links the name is first claimed with an exclusive create.
    A failed write (disk full, no permission) raises SaveError and leaves no temp file behind.
    """
    import safetensors.torch

    target = free_lora_path(loras_dir, lora_name)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with temporary_file(target.parent) as temporary:
            safetensors.torch.save_file(dict(tensors), temporary, metadata=dict(metadata))
            os.chmod(temporary, 0o644)
            target = _claim_name(temporary, loras_dir, lora_name)
    except OSError as error:
        raise write_error(target, error) from None
    logger.info("LoRA Lab: saved %s", target)
    return target


def _claim_name(temporary: str, loras_dir: Path, lora_name: str) -> Path:
    """Give the finished temp file the first free name; never replaces a file someone else made."""
    for _ in range(1000):
        target = free_lora_path(loras_dir, lora_name)
        try:
            os.link(temporary, target)
            return target
        except FileExistsError:
            continue
        except OSError:
            pass
        # No hard links here (FAT/exFAT, some network shares): claim the name with an exclusive create,
        # then move the finished file over our own placeholder.
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            continue
        os.replace(temporary, target)
        return target
    raise FileExistsError(errno.EEXIST, f"no free name for {lora_name} after 1000 tries")


def lora_name_for(path: Path, loras_dir: Path) -> str:
    """The name LoraLoader lists for a file (relative path with forward slashes)."""
    return path.resolve().relative_to(loras_dir.resolve()).as_posix()
