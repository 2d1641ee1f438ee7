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

from ..training import kohya
from ..training.image_tensors import image_to_pil
from ..training.loop import DiffusionObjective, StepRecord
from ..training.sampling import PreviewSampler, SamplePrompt
from ..training.feeder import concat_conditioning
from ..training.host import ModelAccess
from ..training.trainer import check_fits

logger = logging.getLogger("lora_lab")

PREVIEW_SECONDS = 3.0
PREDICTION_TYPES = {"EPS": "epsilon", "V_PREDICTION": "v_prediction"}
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}
# Text-encoder roots inside ComfyUI's cond_stage_model, per family: part -> attribute.
TEXT_ENCODER_ROOTS = {
    "sd1": {"text_encoder": "clip_l"},
    "sd2": {"text_encoder": "clip_h"},
    "sdxl": {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
}


def model_family(model) -> str:
    """"sd1" | "sd2" | "sdxl" for a MODEL, or ValueError for anything this trainer does not support."""
    import comfy.model_base

    base_model = model.model
    unet_config = base_model.model_config.unet_config
    name = type(base_model.model_config).__name__
    if isinstance(base_model, comfy.model_base.SDXL):
        return "sdxl"
    if type(base_model) in (comfy.model_base.BaseModel, comfy.model_base.SD21UNCLIP):
        context = unet_config.get("context_dim")
        if context == 768:
            return "sd1"
        if context == 1024:
            return "sd2"
    raise ValueError(f"Train LoRA: model is {name}, which this trainer does not support. Load an SD1.x, "
                     "SD2.x or SDXL checkpoint.")


def _text_roots(clip, family: str) -> dict[str, tuple[str, torch.nn.Module]]:
    stage = clip.cond_stage_model
    return {part: (attribute, getattr(stage, attribute))
            for part, attribute in TEXT_ENCODER_ROOTS[family].items() if hasattr(stage, attribute)}


def check_compatible(model, clip, vae) -> str:
    """Cheap checks that MODEL, CLIP and VAE belong together; returns the family."""
    if model is None or clip is None or vae is None:
        raise ValueError("Train LoRA: model, clip and vae must all be connected (from Load Checkpoint).")
    family = model_family(model)
    expected = TEXT_ENCODER_ROOTS[family]
    stage = clip.cond_stage_model
    present = [attribute for attribute in ("clip_l", "clip_h", "clip_g") if hasattr(stage, attribute)]
    if sorted(present) != sorted(expected.values()):
        raise ValueError(f"Train LoRA: clip has text encoder(s) {present or type(stage).__name__} but model is "
                         f"{FAMILY_LABELS[family]}, which needs {sorted(expected.values())}. Connect the CLIP "
                         "output of the same Load Checkpoint node as the MODEL.")
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
                         "same checkpoint.")
    prediction = model.model.model_type.name
    if prediction not in PREDICTION_TYPES:
        raise ValueError(f"Train LoRA: model predicts {prediction}; only epsilon and v-prediction models "
                         "can be trained.")
    return family


def is_dynamic(patcher) -> bool:
    """True for a model that ComfyUI streams to the GPU per forward (ModelPatcherDynamic: dynamic VRAM,
    the NVIDIA default since ComfyUI 0.3x of 2026-02). Older ComfyUI has no such patcher."""
    check = getattr(patcher, "is_dynamic", None)
    return bool(callable(check) and check())


@contextlib.contextmanager
def training_models(model, clip, train_text: bool):
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
            check_private_copies_fit(private)
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


def model_access(model, clip, vae, family: str) -> ModelAccess:
    """Load MODEL and CLIP fully onto the compute device and describe them for training/."""
    import comfy.lora
    import comfy.model_management

    comfy.model_management.load_models_gpu([model, clip.patcher], force_full_load=True)
    base_model = model.model
    device = model.load_device
    model_sampling = model.get_model_object("model_sampling")
    sigmas = model_sampling.sigmas.detach().clone().float()
    transformer_options = dict(model.model_options.get("transformer_options", {}))
    roots = _text_roots(clip, family)
    unet = base_model.diffusion_model

    def denoise(xt: torch.Tensor, sigma: torch.Tensor, cond: dict) -> torch.Tensor:
        extra = {"y": cond["y"]} if "y" in cond else {}
        return base_model.apply_model(xt, sigma, c_crossattn=cond["c_crossattn"],
                                      transformer_options=transformer_options, **extra)

    def noise_scaling(sigma, noise, x0):
        return model_sampling.noise_scaling(sigma, noise, x0)

    def encode_pixels(pixels: torch.Tensor) -> torch.Tensor:
        latent = vae.encode(pixels[:, :, :, :3])
        return base_model.process_latent_in(latent.clone()).to(device, torch.float32)

    def encode_captions(captions: list[str]) -> dict:
        encoded = []
        for caption in captions:
            cond, pooled = clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)
            encoded.append({"c_crossattn": cond.to(device),
                            "pooled": pooled.to(device) if pooled is not None else None})
        return concat_conditioning(encoded)

    def extra_conditioning(cond: dict, sizes: list[dict]) -> dict:
        result = {"c_crossattn": cond["c_crossattn"].to(device)}
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
        return result

    unet_key_map = comfy.lora.model_lora_keys_unet(base_model, {})
    clip_key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})

    def unet_kohya_names(paths: list[str]) -> dict[str, str]:
        return kohya.kohya_unet_names(unet_key_map, paths, family)

    def text_kohya_names(part: str, paths: list[str]) -> dict[str, str]:
        return kohya.kohya_text_names(clip_key_map, roots[part][0], paths, family, part)

    # Checkpointed units: the layers inside each block (ResBlock, SpatialTransformer, Up/Downsample).
    # ComfyUI never calls a block (TimestepEmbedSequential) itself: forward_timestep_embed iterates
    # over its layers, so a forward patched onto the block would never run.
    blocks = [layer for block in [*unet.input_blocks, unet.middle_block, *unet.output_blocks] for layer in block]
    latent_key = f"{type(base_model.latent_format).__name__}:{vae_fingerprint(vae)}"
    return ModelAccess(
        family=family, device=torch.device(device), unet=unet, unet_blocks=blocks,
        text_encoders={part: module for part, (_, module) in roots.items()},
        text_layers={part: list(module.transformer.text_model.encoder.layers) for part, (_, module) in roots.items()},
        objective=DiffusionObjective(sigmas=sigmas.to(device), prediction_type=PREDICTION_TYPES[base_model.model_type.name],
                                     denoise=denoise, noise_scaling=noise_scaling),
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
    )


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
        return access.extra_conditioning(cond, [size])

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
