"""The only module of the pack that imports ComfyUI (comfy.*, folder_paths, server).

It adapts ComfyUI's objects (ModelPatcher, model_sampling, CLIP, VAE, ProgressBar, interrupt,
folder paths, LoRA loading) to the plain torch modules and callables that training/ works with.
ComfyUI is imported inside the functions: the pack always runs inside ComfyUI, and this keeps the
module importable by tools that only inspect the pack.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..training.data.feeder import concat_conditioning
from ..training.data.image_tensors import image_to_pil
from ..training.families.table import FAMILIES, draw_flow_sigmas, sampling_for
from ..training.network import kohya
from ..training.run.host import ModelAccess
from ..training.run.loop import DiffusionObjective, StepRecord
from ..training.run.memory import check_fits
from ..training.run.sampling import PreviewSampler, SamplePrompt
from . import comfy_quantize

logger = logging.getLogger("lora_lab")

PREVIEW_SECONDS = 3.0
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction", "FLUX": "flow", "FLOW": "flow"}
# Text encoders whose LoRA can train, inside ComfyUI's cond_stage_model, per family: part -> attribute.
TEXT_ENCODER_ROOTS = {
    "sd1": {"text_encoder": "clip_l"},
    "sd2": {"text_encoder": "clip_h"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "flux": {},
    "sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    "zimage": {},
}
# The encoders a family's CLIP must hold (and may hold) in cond_stage_model.
ENCODERS = {"sd1": ("clip_l",), "sd2": ("clip_h",), "sdxl": ("clip_l", "clip_g"), "flux": ("clip_l", "t5xxl"),
            "sd3": ("clip_l", "clip_g"), "zimage": ("qwen3_4b",)}
OPTIONAL_ENCODERS = {"sd3": ("t5xxl",)}
KNOWN_ENCODERS = ("clip_l", "clip_h", "clip_g", "t5xxl", "qwen3_4b")
# Families whose text sequence cannot be repeated to batch captions of different lengths (an LLM
# encoder whose tokens carry positions): such captions run through the model one by one.
EXACT_LENGTH_TEXT = ("zimage",)
# Containers of the transformer blocks a DiT calls one by one (checkpointed units).
DIT_BLOCK_CONTAINERS = {"flux": ("double_blocks", "single_blocks"), "sd3": ("joint_blocks",),
                        "zimage": ("noise_refiner", "context_refiner", "layers")}


def _detect_family(base_model) -> str | None:
    """One test per family, on ComfyUI's model classes and detected unet_config."""
    import comfy.model_base as model_base

    config = base_model.model_config.unet_config
    if isinstance(base_model, model_base.SDXL):
        return "sdxl"
    if type(base_model) in (model_base.BaseModel, model_base.SD21UNCLIP):
        return {768: "sd1", 1024: "sd2"}.get(config.get("context_dim"))
    if type(base_model) is model_base.Flux and config.get("image_model") == "flux":
        return "flux"
    if type(base_model) is model_base.SD3:
        return "sd3"
    if type(base_model) is model_base.Lumina2 and config.get("image_model") == "lumina2" and config.get("dim") == 3840:
        return "zimage"
    return None


def model_family(model) -> str:
    """A key of training/families/table.FAMILIES for a MODEL, or ValueError for anything this trainer does
    not support."""
    family = _detect_family(model.model)
    if family is None:
        name = type(model.model.model_config).__name__
        raise ValueError(f"Train LoRA: model is {name}, which this trainer does not support. Load an SD1.x, SD2.x, "
                         "SDXL, Flux.1 (dev or schnell), SD3/SD3.5 or Z-Image model.")
    return family


def _encoders_present(stage) -> list[str]:
    return [attribute for attribute in KNOWN_ENCODERS if getattr(stage, attribute, None) is not None]


def _text_roots(clip, family: str) -> dict[str, tuple[str, torch.nn.Module]]:
    stage = clip.cond_stage_model
    return {part: (attribute, getattr(stage, attribute))
            for part, attribute in TEXT_ENCODER_ROOTS[family].items() if getattr(stage, attribute, None) is not None}


def check_compatible(model, clip, vae) -> str:
    """Cheap checks that MODEL, CLIP and VAE belong together; returns the family."""
    if model is None or clip is None or vae is None:
        raise ValueError("Train LoRA: model, clip and vae must all be connected (from Load Checkpoint, or Load "
                         "Diffusion Model + the family's CLIP loader + Load VAE).")
    family = model_family(model)
    label = FAMILIES[family].label
    stage = clip.cond_stage_model
    present = _encoders_present(stage)
    required, optional = ENCODERS[family], OPTIONAL_ENCODERS.get(family, ())
    if not set(required) <= set(present) or not set(present) <= set(required) | set(optional):
        raise ValueError(f"Train LoRA: clip has text encoder(s) {present or type(stage).__name__} but model is "
                         f"{label}, which needs {list(required)}{f' (optionally {list(optional)})' if optional else ''}. "
                         "Connect the CLIP output of the same Load Checkpoint node as the MODEL, or the family's CLIP "
                         "loader (Flux: DualCLIPLoader type flux; SD3: TripleCLIPLoader; Z-Image: CLIPLoader type "
                         "lumina2).")
    if FAMILIES[family].dit is None:
        widths = sum(getattr(stage, attribute).transformer.text_model.final_layer_norm.weight.shape[0]
                     for attribute in present)
        context = model.model.model_config.unet_config.get("context_dim")
        if widths != context:
            raise ValueError(f"Train LoRA: clip produces {widths}-wide text embeddings but model expects "
                             f"{context}. Connect the CLIP of the same checkpoint as the MODEL.")
    latent_channels = getattr(vae, "latent_channels", 4)
    if latent_channels != model.model.model_config.unet_config.get("in_channels", 4):
        raise ValueError(f"Train LoRA: vae makes {latent_channels}-channel latents but model takes "
                         f"{model.model.model_config.unet_config.get('in_channels')}. Connect the VAE of the "
                         "same checkpoint (Flux, SD3 and Z-Image use 16-channel VAEs).")
    prediction = model.model.model_type.name
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"Train LoRA: model predicts {prediction}; only epsilon, v-prediction and flow-matching "
                         "models can be trained.")
    return family


def is_dynamic(patcher) -> bool:
    """True for a model that ComfyUI streams to the GPU per forward (ModelPatcherDynamic: dynamic VRAM,
    the NVIDIA default since ComfyUI 0.3x of 2026-02). Older ComfyUI has no such patcher."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(callable(check) and check())


@contextlib.contextmanager
def training_models(model, clip, train_text: bool, memory: str = "auto"):
    """The MODEL and CLIP the training run injects into: (model, clip), given back in `finally`.

    A model loaded for dynamic VRAM cannot take peft layers: ``ModelPatcherDynamic.load`` re-creates
    every parameter of a module without ``comfy_cast_weights`` as a frozen ``nn.Parameter``, so
    lora_A/lora_B would be swapped for copies the optimizer never sees, and the base weights are not
    resident. So a dynamic MODEL (and a dynamic CLIP whose encoders train) is trained on a private,
    non-dynamic copy: ``clone(disable_dynamic=True)`` reloads the same checkpoint through the
    loader's ``cached_patcher_init`` (the user's patches, object patches and model options come
    along), the copy is loaded whole onto the GPU for the run, and afterwards it is unloaded through
    ComfyUI's model management and dropped, which gives its memory back after success, error and
    Cancel alike. The user's MODEL/CLIP are never touched and stay dynamic; the returned ones are
    theirs with the saved file applied, which dynamic VRAM streams like any LoRA.

    Any other model (ComfyUI before dynamic VRAM, --highvram, the CPU) is trained in place exactly as
    before: the same module, with every injection undone by the trainer. A frozen CLIP is only used to
    encode captions, which works on a dynamic one, so it is never copied.

    Chosen over ComfyUI's per-forward weight path (weight wrappers / bypass hooks, what its own
    trainer does): that path would replace peft's layers and our exact kohya export, and it gains
    only for models larger than the card, which SD1.x/SDXL never are on a card that can train them.
    """
    private = []
    for name, patcher in (("model", model), ("clip", clip.patcher if train_text else None)):
        if patcher is not None and is_dynamic(patcher) and getattr(patcher, "cached_patcher_init", None) is None:
            raise ValueError(f"Train LoRA: {name} is loaded for dynamic VRAM and ComfyUI cannot make a resident copy "
                             "of it to train (it was not loaded from a file by a stock loader node). Connect the "
                             f"{name.upper()} output of Load Checkpoint (or Load Diffusion Model / Load CLIP), or start "
                             "ComfyUI with --disable-dynamic-vram.")
    try:
        if is_dynamic(model):
            model = model.clone(disable_dynamic=True)
            private.append(model)
        if train_text and is_dynamic(clip.patcher):
            clip = clip.clone(disable_dynamic=True)
            # CLIP.clone keeps cond_stage_model pointing at the user's encoder: use the reloaded one.
            clip.cond_stage_model = clip.patcher.model
            private.append(clip.patcher)
        if private:
            logger.info("LoRA Lab: dynamic VRAM: training on a private resident copy of %s",
                        ", ".join(type(patcher.model).__name__ for patcher in private))
            if memory == "resident":   # otherwise the trainer's memory plan decides what stays and what streams
                check_private_copies_fit(private)
        # ComfyUI 0.33's quantized checkpoints: their Linear layers trained as Linears (comfy_quantize.py).
        with comfy_quantize.linear_views(model.model.diffusion_model):
            yield model, clip
    finally:
        if private:
            release_models(private)
            del model, clip
            private.clear()
            gc.collect()
            release_models([])


def check_private_copies_fit(patchers: list) -> None:
    """Before loading the private copies: make room as ComfyUI would, then refuse clearly if they
    still cannot fit (sizes, free memory, what to change)."""
    import comfy.model_management

    device = patchers[0].load_device
    if torch.device(device).type == "cpu":
        return
    sizes = {type(patcher.model).__name__: patcher.model_size() for patcher in patchers}
    reserve = comfy.model_management.minimum_inference_memory()
    comfy.model_management.free_memory(sum(sizes.values()) + reserve, device)
    check_fits(sizes, reserve, comfy.model_management.get_free_memory(device), str(device))


def model_access(model, clip, vae, family: str, timestep_sampling: str = "auto",
                 timestep_shift: float = 3.0) -> ModelAccess:
    """Describe MODEL and CLIP for training/; the trainer loads them through `load` once its memory plan
    is made (nothing is loaded here)."""
    import comfy.lora

    entry = FAMILIES[family]
    base_model = model.model
    device = model.load_device
    model_sampling = model.get_model_object("model_sampling")
    sigmas = model_sampling.sigmas.detach().clone().float()
    transformer_options = dict(model.model_options.get("transformer_options", {}))
    roots = _text_roots(clip, family)
    unet = base_model.diffusion_model
    unet_config = base_model.model_config.unet_config
    guidance_embed = bool(unet_config.get("guidance_embed"))
    training_guidance = entry.training_guidance if guidance_embed else None
    conditioning_keys = ("c_crossattn", "pooled", "exact_length", "samples")

    def denoise(xt: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        if "samples" in cond:   # captions that cannot share a batch: one forward each, as ComfyUI does
            return torch.cat([denoise(xt[index:index + 1], sigma[index:index + 1], sample)
                              for index, sample in enumerate(cond["samples"])])
        extra = {key: value for key, value in cond.items() if key not in conditioning_keys}
        return base_model.apply_model(xt, sigma, c_crossattn=cond["c_crossattn"],
                                      transformer_options=transformer_options, **extra)

    def noise_scaling(sigma, noise, x0):
        return model_sampling.noise_scaling(sigma, noise, x0)

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(pixels[:, :, :, :3])
        return base_model.process_latent_in(latent.clone()).to(device, torch.float32)

    def encode_caption(caption: str) -> dict:
        tokens = clip.tokenize(caption)
        if entry.dit is None:
            cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
            return {"c_crossattn": cond.to(device), "pooled": pooled.to(device) if pooled is not None else None}
        output = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        pooled = output.get("pooled_output")
        encoded = {"c_crossattn": output["cond"].to(device), "pooled": pooled.to(device) if pooled is not None else None}
        mask = output.get("attention_mask")
        if mask is not None and int(mask.sum()) != mask.numel():   # padding inside: the model needs the mask
            encoded["attention_mask"] = mask.to(device)
        if family in EXACT_LENGTH_TEXT:
            encoded["exact_length"] = True
        return encoded

    def encode_captions(captions: list[str]) -> dict:
        return concat_conditioning([encode_caption(caption) for caption in captions])

    def extra_conditioning(cond: dict, sizes: list[dict]) -> dict:
        if "samples" in cond:
            return {"samples": [extra_conditioning(sample, [size]) for sample, size in zip(cond["samples"], sizes)]}
        result = {"c_crossattn": cond["c_crossattn"].to(device)}
        batch = result["c_crossattn"].shape[0]
        if family == "sdxl":
            rows = []
            for index, size in enumerate(sizes):
                width, height = size["original_size"]
                left, top = size["crop_offset"]
                target_width, target_height = size["target_size"]
                rows.append(base_model.encode_adm(pooled_output=cond["pooled"][index:index + 1], width=width,
                                                  height=height, crop_w=left, crop_h=top, target_width=target_width,
                                                  target_height=target_height))
            result["y"] = torch.cat(rows).to(device)
        elif family in ("flux", "sd3") and cond.get("pooled") is not None:
            result["y"] = cond["pooled"].to(device)
        if training_guidance is not None:   # Flux-dev: the distilled guidance input (families/table.py says which value)
            result["guidance"] = torch.full((batch,), float(training_guidance), device=device)
        if family == "zimage":   # Lumina 2's forward takes the caption's token count (and a mask with padding)
            result["num_tokens"] = int(cond["attention_mask"].sum(dim=-1).max()) if "attention_mask" in cond \
                else result["c_crossattn"].shape[1]
            if "attention_mask" in cond:
                result["attention_mask"] = cond["attention_mask"].to(device)
        return result

    unet_key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    clip_key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})

    def unet_kohya_names(paths: list[str]) -> dict:
        if entry.key_style == "diffusers":
            return kohya.diffusers_unet_names(unet_key_map, paths)
        return kohya.kohya_unet_names(unet_key_map, paths, family)

    def text_kohya_names(part: str, paths: list[str]) -> dict:
        return kohya.kohya_text_names(clip_key_map, roots[part][0], paths, family, part)

    if entry.dit is not None:
        # A DiT calls its transformer blocks one by one: each block is a checkpointed unit.
        blocks = [block for name in DIT_BLOCK_CONTAINERS[family] for block in getattr(unet, name, [])]
    else:
        # Checkpointed units: the layers inside each block (ResBlock, SpatialTransformer, Up/Downsample).
        # ComfyUI never calls a block (TimestepEmbedSequential) itself: forward_timestep_embed iterates
        # over its layers, so a forward patched onto the block would never run.
        blocks = [layer for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks] for layer in block]
    sampler = None
    sampling = ("uniform", 0.0)
    if entry.flow:
        sampling = sampling_for(family, timestep_sampling, timestep_shift)
        kind, shift = sampling
        sampler = lambda batch, shape, generator: draw_flow_sigmas(kind, shift, batch, shape, generator)  # noqa: E731
    latent_key = f"{type(base_model.latent_format).__name__}:{vae_fingerprint(vae)}"
    architecture = ""
    if family == "flux":
        architecture = "flux-1-dev" if guidance_embed else "flux-1-schnell"
    return ModelAccess(
        family=family, device=torch.device(device), unet=unet, unet_blocks=blocks,
        text_encoders={part: module for part, (_, module) in roots.items()},
        text_layers={part: list(module.transformer.text_model.encoder.layers) for part, (_, module) in roots.items()},
        objective=DiffusionObjective(sigmas=sigmas.to(device), prediction_type=PREDICTION_TYPES[base_model.model_type.name],
                                     denoise=denoise, noise_scaling=noise_scaling, sigma_sampler=sampler),
        encode_pixels=encode_pixels, encode_captions=encode_captions, extra_conditioning=extra_conditioning,
        unet_kohya_names=unet_kohya_names, text_kohya_names=text_kohya_names, latent_key=latent_key,
        # On a GPU the user's frozen weights wait in ComfyUI's offload device (RAM) while the trainable
        # clones use the card: one copy on the GPU, not two. On the CPU there is nothing to gain.
        offload_device=(torch.device(model.offload_device) if torch.device(device).type != "cpu" else None),
        weights_key=lambda: weights_fingerprint(unet, clip.cond_stage_model),
        # CLIP Set Last Layer's -2 is kohya's clip_skip 2.
        clip_skip=-clip.layer_idx if getattr(clip, "layer_idx", None) is not None else None,
        release_encoders=lambda vae_done, text_done: release_models(
            ([vae.patcher] if vae_done else []) + ([clip.patcher] if text_done else [])),
        dora_norm=dora_norm_of_loader(),
        sampling=sampling, training_guidance=training_guidance, architecture=architecture,
        in_place_blocks=entry.dit is not None, training_mode=comfy_training_mode,
        load=lambda stream: loaded_for_training(model, clip, stream),
        device_memory=lambda wanted: device_memory(model.load_device, wanted),
        quantizable_layers=lambda: comfy_quantize.quantizable_layers(unet),
        cast_per_forward=comfy_quantize.cast_per_forward,
    )


@contextlib.contextmanager
def loaded_for_training(model, clip, stream: bool):
    """MODEL and CLIP loaded through ComfyUI's model management, patches applied, for the run.

    Resident: both fully onto the compute device (what sampling would do). Streaming: the model's
    weights into host memory instead, through a clone of the patcher whose load device is the offload
    device, so ComfyUI applies the user's patches there and knows where the weights are; the block
    streamer lends them to the GPU per block, and the clone is unloaded afterwards (unpatched,
    weights as before). The CLIP is loaded as for a resident run: a trained text encoder stays on the
    device, a frozen one only encodes the captions and is released before training."""
    import comfy.model_management

    if not stream:
        comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
        yield
        return
    loader = model.clone()
    loader.load_device = model.offload_device
    try:
        comfy.model_management.load_models_gpu([loader, clip.patcher], force_full_load=True)
        yield
    finally:
        release_models([loader])


def device_memory(device, wanted: int) -> tuple[int, int]:
    """(free bytes on `device` once ComfyUI unloaded what it can toward `wanted`, ComfyUI's working
    reserve); (0, 0) on a CPU: no limit to plan for."""
    import comfy.model_management

    if torch.device(device).type == "cpu":
        return 0, 0
    reserve = comfy.model_management.minimum_inference_memory()
    comfy.model_management.free_memory(wanted + reserve, device)
    return comfy.model_management.get_free_memory(device), reserve


@contextlib.contextmanager
def comfy_training_mode():
    """ComfyUI's own "a trainer runs" switch, as its built-in trainer sets it: in 0.33 its DiTs then use
    plain torch ops where they would call fused comfy_kitchen kernels that have no backward (Flux's and
    Z-Image's RoPE). Older ComfyUI has no switch: nothing to do."""
    import comfy.model_management

    if not hasattr(comfy.model_management, "in_training"):
        yield
        return
    previous = comfy.model_management.in_training
    comfy.model_management.in_training = True
    try:
        yield
    finally:
        comfy.model_management.in_training = previous


def dora_norm_of_loader() -> str:
    """Which norm this ComfyUI's LoRA loader divides a per-output-row ``dora_scale`` by: "original"
    (|W|: ComfyUI up to at least 0.33) or "updated" (|W + dW|: the DoRA paper, peft, LyCORIS,
    diffusers; what ComfyUI PR #15458 proposes). Asked of the loader itself on a 2x2 weight, so a
    ComfyUI that changes the rule gets files written for the new rule."""
    from comfy.weight_adapter.base import weight_decompose

    weight = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    diff = torch.tensor([[3.0, 4.0], [0.0, 0.0]])     # row 0: |W| = 5, |W + dW| = 10
    result = weight_decompose(torch.ones(2, 1), weight.clone(), diff.clone(), 1.0, 1.0, torch.float32,
                              lambda tensor: tensor)
    row = float(result[0].norm())
    if abs(row - 2.0) < 1e-4:
        return "original"
    if abs(row - 1.0) < 1e-4:
        return "updated"
    raise RuntimeError(f"LoRA Lab: this ComfyUI's DoRA loader gives a row norm of {row} on a probe "
                       "(expected 2 or 1); DoRA files could not be written to load as trained. "
                       "Please report your ComfyUI version.")


def release_models(patchers: list) -> None:
    """Unload these models from the compute device through ComfyUI's model management (so ComfyUI
    knows, and loads them again itself when they are used next)."""
    import comfy.model_management

    loaded = comfy.model_management.current_loaded_models
    for index in range(len(loaded) - 1, -1, -1):
        if any(loaded[index].model is patcher for patcher in patchers):
            if loaded[index].model_unload():
                loaded.pop(index)
    comfy.model_management.soft_empty_cache()


def sample_previewer(model, vae, access: ModelAccess, prompts: list[SamplePrompt], every_n_steps: int,
                     total_steps: int, node_id: str | None) -> Callable[[int, Path], None] | None:
    """Every `every_n_steps` steps, draw the sample prompts with the model being trained, save them as
    `<run folder>/samples/stepNNNNN_K.png` and show them as the node's progress preview."""
    import comfy.utils

    if not prompts or every_n_steps <= 0:
        return None
    base_model = model.model

    def encode(text: str, width: int, height: int) -> dict:
        cond = access.encode_captions([text])
        size = {"original_size": (width, height), "crop_offset": (0, 0), "target_size": (width, height)}
        conditioning = access.extra_conditioning(cond, [size])
        if "guidance" in conditioning and FAMILIES[access.family].preview_guidance is not None:
            # previews of a guidance-distilled model use its usual guidance (ComfyUI's FluxGuidance default)
            conditioning["guidance"] = torch.full_like(conditioning["guidance"], FAMILIES[access.family].preview_guidance)
        return conditioning

    def decode(latent: torch.Tensor) -> torch.Tensor:
        return vae.decode(base_model.process_latent_out(latent.float()).cpu())

    sampler = PreviewSampler(objective=access.objective, encode=encode, decode=decode, device=access.device,
                             latent_channels=base_model.latent_format.latent_channels, check_cancel=check_cancel)

    def on_sample(done: int, run_dir: Path) -> None:
        if done % every_n_steps:
            return
        folder = run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        for index, sample in enumerate(prompts):
            image = sampler(sample)
            picture = image_to_pil(image[0])
            path = folder / f"step{done:05d}_{index}.png"
            picture.save(path)
            comfy.utils.ProgressBar(total_steps).update_absolute(done, total_steps, ("JPEG", picture, 512))
            send_event("lora_lab.train_sample", {"node": node_id, "step": done, "index": index,
                                                 "prompt": sample.prompt, "path": str(path)})
            logger.info("LoRA Lab: sample at step %d: %s", done, path)

    return on_sample


def vae_fingerprint(vae) -> str:
    """A cheap content key of the VAE weights."""
    return weights_fingerprint(vae.first_stage_model)


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap content key of module weights (sum and norm of every tensor, in order)."""
    import hashlib

    digest = hashlib.sha256()
    with torch.no_grad():
        for module in modules:
            for name, tensor in module.state_dict().items():
                values = tensor.detach().float()
                digest.update(f"{name}:{tuple(values.shape)}:{float(values.sum()):.6e}:{float(values.norm()):.6e};".encode())
    return digest.hexdigest()[:24]


def device_type(model) -> str:
    return torch.device(model.load_device).type


def loras_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_folder_paths("loras")[0])


def output_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_output_directory())


def input_dir() -> Path:
    import folder_paths
    return Path(folder_paths.get_input_directory())


def prompt_server():
    """ComfyUI's running PromptServer, or None (no server: in-process use, tests, tools)."""
    try:
        import server
    except ImportError:
        return None
    return getattr(server.PromptServer, "instance", None)


def apply_lora_file(model, clip, path: Path) -> tuple[Any, Any]:
    """MODEL and CLIP with the saved file applied through ComfyUI's own LoRA loading."""
    import comfy.sd
    import comfy.utils

    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    return comfy.sd.load_lora_for_models(model, clip, lora, 1.0, 1.0)


def check_cancel() -> None:
    import comfy.model_management
    comfy.model_management.throw_exception_if_processing_interrupted()


def is_cancel(error: BaseException) -> bool:
    import comfy.model_management
    return isinstance(error, comfy.model_management.InterruptProcessingException)


def progress_reporter(total: int, node_id: str | None, chart: Callable[[list[StepRecord]], Any],
                      label: str = "Train LoRA") -> Callable[[StepRecord, int], None]:
    """ComfyUI progress bar (with a chart preview now and then), a websocket event, a console bar."""
    import comfy.utils
    from tqdm import tqdm

    bar = comfy.utils.ProgressBar(total)
    console = tqdm(total=total, desc=label, unit="step", leave=False)
    records: list[StepRecord] = []
    last_preview = [time.monotonic()]

    def report(record: StepRecord, steps: int) -> None:
        records.append(record)
        done = record.step + 1
        console.update(1)
        console.set_postfix(loss=f"{record.loss:.4f}")
        preview = None
        # A chart costs ~0.1 s to draw: at most one every PREVIEW_SECONDS (and the last step).
        if time.monotonic() - last_preview[0] >= PREVIEW_SECONDS or done == steps:
            last_preview[0] = time.monotonic()
            try:
                preview = ("PNG", chart(records), 512)
            except Exception as error:  # a chart failure must not stop training
                logger.debug("LoRA Lab: chart preview failed: %s", error)
        bar.update_absolute(done, steps, preview)
        send_event("lora_lab.train_progress", {"node": node_id, "step": record.step, "total": steps,
                                               "loss": record.loss, "lr": record.lr, "val_loss": record.val_loss})
        if done == steps:
            console.close()

    return report


def send_event(event: str, data: dict) -> None:
    """A custom websocket event, when a PromptServer runs (not in in-process tests)."""
    instance = prompt_server()
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))
