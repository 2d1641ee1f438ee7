"""Generate a tiny, random-weight checkpoint that ComfyUI's CheckpointLoaderSimple detects as SD1.5.

Never committed: generated on demand and cached in ``$LORA_LAB_CACHE/fixtures/`` (default
``~/.cache/lora_lab/fixtures/``); an existing file is reused.

Layout (see shared/COMFYUI_NOTES.md, "Small models for tests"):
* UNet: model_channels 320, context_dim 768, conv (non-linear) proj_in, channel_mult [1], one res
  block per level, one transformer block per level (~26M parameters). Detection keys on
  model_channels / context_dim / use_linear_in_transformer only.
* Text encoder: the full CLIP-L config (its shape is fixed), every weight written.
* VAE: TAESD layout, so VAE encode/decode is cheap.

ComfyUI's ops skip weight initialisation, so every tensor is initialised here from one seeded
generator: the file is bit-identical on every machine for a given ``FIXTURE_VERSION``.

Needs ComfyUI (set ``LORA_LAB_COMFYUI_DIR`` or let scripts/setup_env.py find it). From tests
(ComfyUI already imported): ``ensure_tiny_sd15(path=None) -> Path``. The command line is
``scripts/make_tiny_checkpoint.py [--vega | --full-sd15] [PATH]`` (prints the path); a process
without ComfyUI loaded gets the file through it with ``tiny_checkpoint()``.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .environment import REPO_ROOT, SETUP_SCRIPT, fixtures_dir, generated_once

FIXTURE_VERSION = 1
FIXTURE_NAME = f"lora_lab_tiny_sd15_v{FIXTURE_VERSION}.safetensors"
GENERATOR_SEED = 20240607
# The command line that generates a checkpoint in a process of its own (see tiny_checkpoint()).
MAKER_SCRIPT = REPO_ROOT / "scripts" / "make_tiny_checkpoint.py"

TINY_SD15_UNET = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "num_res_blocks": [1],
    "channel_mult": [1],
    "transformer_depth": [1],
    "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1],
    "use_spatial_transformer": True,
    "use_linear_in_transformer": False,
    "context_dim": 768,
    "num_heads": 8,
    "num_head_channels": -1,
    "legacy": False,
    "adm_in_channels": None,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}


def _comfyui_dir() -> Path:
    configured = os.environ.get("LORA_LAB_COMFYUI_DIR") or os.environ.get("COMFYUI_DIR")
    if configured:
        return Path(configured)
    printed = subprocess.run([sys.executable, str(SETUP_SCRIPT), "print", "comfyui-dir"],
                             check=True, capture_output=True, text=True)
    return Path(printed.stdout.strip())


def _import_comfy() -> None:
    """Make `comfy` importable; when ComfyUI is not loaded yet, load it CPU-only (no GPU needed)."""
    if "comfy.model_management" in sys.modules:
        return
    comfyui_dir = _comfyui_dir()
    if str(comfyui_dir) not in sys.path:  # ComfyUI is a folder of top-level modules, not a package
        sys.path.insert(0, str(comfyui_dir))
    saved_argv = sys.argv
    sys.argv = [saved_argv[0], "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu now)
    finally:
        sys.argv = saved_argv


def _initialise(module, generator) -> None:
    """Small, sane random values: finite outputs that still depend on every weight.

    Norm layers get weight ~1 and bias ~0; every other matrix/kernel gets N(0, 1/fan_in) (so
    activations keep their scale), and every other vector small noise.
    """
    import torch

    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    with torch.no_grad():
        for submodule in module.modules():
            # RMSNorm-style layers (DiT q/k norms) are norms too, whatever class implements them
            is_norm = isinstance(submodule, norm_types) or "RMSNorm" in type(submodule).__name__
            for name, parameter in submodule.named_parameters(recurse=False):
                noise = torch.randn(parameter.shape, generator=generator)
                if is_norm:
                    parameter.copy_((1.0 if name == "weight" else 0.0) + 0.02 * noise)
                elif parameter.ndim >= 2:
                    parameter.copy_(noise / math.sqrt(math.prod(parameter.shape[1:])))
                else:
                    parameter.copy_(0.02 * noise)


# The real SD1.5 UNet layout (comfy/model_detection.py's SD15 config), random weights: for the GPU
# benchmark, where speed and memory must be those of a real-size model (~860M UNet parameters).
FULL_SD15_UNET = {
    **TINY_SD15_UNET, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
}
FULL_SD15_FIXTURE_NAME = f"lora_lab_random_sd15_v{FIXTURE_VERSION}.safetensors"


def build_tiny_sd15_state_dict(unet_config: dict | None = None):
    """The full checkpoint state dict (fp16), built with ComfyUI's own module classes (tiny UNet
    unless another SD1.5-family `unet_config` is given)."""
    _import_comfy()
    import torch
    import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel
    import comfy.sd1_clip
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(GENERATOR_SEED)
    state_dict: dict[str, torch.Tensor] = {}

    unet = openaimodel.UNetModel(**(unet_config or TINY_SD15_UNET), dtype=torch.float32)
    _initialise(unet, generator)
    state_dict.update({f"model.diffusion_model.{key}": value for key, value in unet.state_dict().items()})

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    _initialise(clip.transformer, generator)
    for key, value in clip.transformer.state_dict().items():
        if key.startswith("text_model."):
            if key.endswith("position_ids"):
                continue
            state_dict[f"cond_stage_model.transformer.{key}"] = value

    taesd = comfy.taesd.taesd.TAESD()
    _initialise(taesd, generator)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    state_dict.update({f"first_stage_model.{key}": value for key, value in taesd.state_dict().items()})

    return {key: value.detach().to(torch.float16).contiguous() for key, value in state_dict.items()}


@generated_once
def ensure_tiny_sd15(path: Path | str | None = None, unet_config: dict | None = None,
                     fixture_name: str = FIXTURE_NAME) -> Path:
    """Return the tiny SD1.5 checkpoint, generating it (atomically) when it is not there yet."""
    target = Path(path) if path is not None else fixtures_dir() / fixture_name
    if target.is_file():
        return target
    import safetensors.torch

    target.parent.mkdir(parents=True, exist_ok=True)
    state_dict = build_tiny_sd15_state_dict(unet_config)
    write_atomically(target, lambda name: safetensors.torch.save_file(
        state_dict, name, metadata={"lora_lab_fixture": fixture_name}))
    return target


def ensure_full_sd15(path: Path | str | None = None) -> Path:
    """A random-weight checkpoint with the real SD1.5 UNet size (~1.7 GB fp16), for the GPU benchmark."""
    return ensure_tiny_sd15(path, FULL_SD15_UNET, FULL_SD15_FIXTURE_NAME)


def write_atomically(target: Path, write) -> None:
    """write(temporary_name) next to target, then rename into place: no half-written fixture."""
    handle, temporary_name = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    os.close(handle)
    try:
        write(temporary_name)
        os.chmod(temporary_name, 0o644)
        os.replace(temporary_name, target)
    finally:
        if os.path.exists(temporary_name):
            os.unlink(temporary_name)


VEGA_FIXTURE_NAME = f"lora_lab_vega_sdxl_v{FIXTURE_VERSION}.safetensors"
# Segmind-Vega-shaped SDXL UNet: the smallest layout ComfyUI 0.3.75 detects as SDXL-family
# (supported_models.Segmind_Vega keys on transformer_depth [0, 0, 1, 1, 2, 2]); ~745M parameters.
VEGA_SDXL_UNET = {
    "image_size": 32, "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4], "transformer_depth": [0, 0, 1, 1, 2, 2],
    "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2],
    "use_linear_in_transformer": True, "context_dim": 2048, "adm_in_channels": 2816,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


# The real SDXL base UNet layout (comfy/model_detection.py's SDXL config, ~2.6B parameters).
FULL_SDXL_UNET = {**VEGA_SDXL_UNET, "transformer_depth": [0, 0, 2, 2, 10, 10], "transformer_depth_middle": 10,
                  "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "num_head_channels": 64}
FULL_SDXL_FIXTURE_NAME = f"lora_lab_random_sdxl_v{FIXTURE_VERSION}.safetensors"


def ensure_vega_sdxl(path: Path | str | None = None) -> Path:
    """A random-weight, Segmind-Vega-shaped SDXL checkpoint (full CLIP-L + CLIP-G, TAESD VAE, fp16,
    ~3 GB), written by ComfyUI's own ``save_checkpoint`` so its key layout is what real SDXL files use."""
    return ensure_sdxl_family(path, "Segmind_Vega", VEGA_SDXL_UNET, VEGA_FIXTURE_NAME, GENERATOR_SEED + 1)


def ensure_full_sdxl(path: Path | str | None = None) -> Path:
    """A random-weight checkpoint with the real SDXL base size (~5 GB fp16), for the GPU benchmark."""
    return ensure_sdxl_family(path, "SDXL", FULL_SDXL_UNET, FULL_SDXL_FIXTURE_NAME, GENERATOR_SEED + 2)


@generated_once
def ensure_sdxl_family(path: Path | str | None, config_name: str, unet_config: dict, fixture_name: str,
                       seed: int) -> Path:
    """Build and save an SDXL-family checkpoint (`config_name` in comfy.supported_models) once."""
    target = Path(path) if path is not None else fixtures_dir() / fixture_name
    if target.is_file():
        return target
    _import_comfy()
    import torch
    import comfy.model_patcher
    import comfy.sd
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.supported_models_base
    import comfy.taesd.taesd

    generator = torch.Generator().manual_seed(seed)
    config = getattr(comfy.supported_models, config_name)(unet_config)
    config.set_inference_dtype(torch.float16, None)
    base_model = config.get_model({})
    _initialise(base_model, generator)
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=torch.device("cpu"),
                                             offload_device=torch.device("cpu"))
    clip_target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    clip = comfy.sd.CLIP(clip_target, model_options={"dtype": torch.float16})
    _initialise(clip.cond_stage_model, generator)
    taesd = comfy.taesd.taesd.TAESD()
    _initialise(taesd, generator)
    with torch.no_grad():
        taesd.vae_scale.fill_(1.0)
        taesd.vae_shift.fill_(0.0)
    vae = comfy.sd.VAE(sd={key: value.half() for key, value in taesd.state_dict().items()})

    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, lambda name: comfy.sd.save_checkpoint(
        name, model, clip=clip, vae=vae, metadata={"lora_lab_fixture": fixture_name}))
    return target


def link_checkpoint(source: Path, checkpoints_dir: Path) -> str:
    """Make source visible to the loader that reads `checkpoints_dir` (models/checkpoints for
    CheckpointLoaderSimple; any models/ subfolder likewise): symlink, copy where links are not allowed."""
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    target = checkpoints_dir / source.name
    if target.is_symlink() or target.exists():
        if target.exists() and target.resolve() == source.resolve():
            return source.name
        target.unlink()
    try:
        target.symlink_to(source)
    except OSError:  # Windows without developer mode
        shutil.copy2(source, target)
    return source.name


def tiny_checkpoint(checkpoints_dir: Path, *options: str) -> Path:
    """The generated tiny SD1.5 checkpoint, or with "--vega" the SDXL-family one (needs ComfyUI
    importable, so in a child process)."""
    fixture = subprocess.run([sys.executable, str(MAKER_SCRIPT), *options],
                             check=True, capture_output=True, text=True).stdout.strip()
    return checkpoints_dir / link_checkpoint(Path(fixture), checkpoints_dir)
