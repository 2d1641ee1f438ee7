"""What the user sees while a run trains: ComfyUI's progress bar with chart previews, sample images,
websocket events, the console bar, and Cancel."""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

import torch

from ...training.data.image_tensors import image_to_pil
from ...training.run.host import ModelAccess
from ...training.run.loop import StepRecord
from ...training.run.sampling import PreviewSampler, SamplePrompt

logger = logging.getLogger("lora_lab")

PREVIEW_SECONDS = 3.0
DEFAULT_FPS = 16.0


def save_animation(frames: list, path: Path, fps: float) -> None:
    """Frames (PIL images) as a looping, lossless animated WebP at `fps`, written atomically."""
    temporary = path.with_name(f".{path.name}.partial")
    frames[0].save(temporary, format="WEBP", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0, lossless=True)
    temporary.replace(path)


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
                                               "loss": record.loss, "lr": record.lr, "val_loss": record.val_loss,
                                               "effective_lr": record.effective_lr})
        if done == steps:
            console.close()

    return report


def sample_previewer(model, vae, access: ModelAccess, prompts: list[SamplePrompt], every_n_steps: int,
                     total_steps: int, node_id: str | None, start_image=None) -> Callable | None:
    """Every `every_n_steps` steps, draw the sample prompts with the model being trained, save them as
    `<run folder>/samples/stepNNNNN_K.png` and show them as the node's progress preview. A video model's
    clip is saved beside its first frame as an animated `stepNNNNN_K.webp` (at the family's frame rate).
    An image-to-video model starts each clip from `start_image` (a PIL image, cropped to the prompt's size)."""
    import comfy.utils

    if not prompts or every_n_steps <= 0:
        return None
    base_model = model.model

    def encode(text: str, width: int, height: int, frames: int = 1) -> dict:
        cond = access.encode_captions([text])
        if start_image is not None:
            cond = {**cond, **start_conditioning(access, base_model, start_image, width, height, frames)}
        size = {"original_size": (width, height), "crop_offset": (0, 0), "target_size": (width, height)}
        conditioning = access.extra_conditioning(cond, [size])
        if "guidance" in conditioning and access.entry.preview_guidance is not None:
            # previews of a guidance-distilled model use its usual guidance (ComfyUI's FluxGuidance default)
            conditioning["guidance"] = torch.full_like(conditioning["guidance"], access.entry.preview_guidance)
        return conditioning

    def decode(latent: torch.Tensor) -> torch.Tensor:
        images = vae.decode(base_model.process_latent_out(latent.float()).cpu())
        # a video VAE gives [B, T, H, W, 3]: frames as images, as VAEDecode does
        return images.reshape(-1, *images.shape[-3:]) if images.ndim == 5 else images

    sampler = PreviewSampler(objective=access.objective, encode=encode, decode=decode, device=access.device,
                             latent_shape=latent_shape_of(base_model, vae), check_cancel=check_cancel)

    def on_sample(done: int, run_dir: Path, weights: Callable[[], ContextManager]) -> None:
        if done % every_n_steps:
            return
        folder = run_dir / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        with weights():   # the weights that are saved (a schedule-free optimizer's average)
            for index, sample in enumerate(prompts):
                image = sampler(sample)
                picture = image_to_pil(image[0])
                path = folder / f"step{done:05d}_{index}.png"
                picture.save(path)
                if image.shape[0] > 1:   # a clip: every frame, as an animation
                    save_animation([image_to_pil(frame) for frame in image], path.with_suffix(".webp"),
                                   access.entry.preview_fps or DEFAULT_FPS)
                comfy.utils.ProgressBar(total_steps).update_absolute(done, total_steps, ("JPEG", picture, 512))
                send_event("lora_lab.train_sample", {"node": node_id, "step": done, "index": index,
                                                     "prompt": sample.prompt, "path": str(path)})
                logger.info("LoRA Lab: sample at step %d: %s", done, path)

    return on_sample


def start_conditioning(access: ModelAccess, base_model, image, width: int, height: int, frames: int) -> dict:
    """An image-to-video preview's start image: `image` fitted to width x height, followed by grey frames,
    as the latent and mask the feeder gives a training clip (training/data/feeder.py START_LATENT)."""
    from PIL import ImageOps

    from ...training.data.feeder import GREY, START_LATENT, START_MASK
    from ...training.data.image_tensors import pil_to_image

    first = pil_to_image(ImageOps.fit(image.convert("RGB"), (width, height)))
    pixels = torch.full((frames, height, width, 3), GREY)
    pixels[:1] = first
    latent = access.encode_pixels(pixels)
    mask = torch.ones((1, 1, *latent.shape[2:]), dtype=latent.dtype, device=latent.device)
    mask[:, :, :1] = 0.0
    return {START_LATENT: latent, START_MASK: mask}


def latent_shape_of(base_model, vae) -> Callable[[int, int, int], tuple[int, ...]]:
    """(height, width, frames) -> the latent shape of one image or clip for this model: its latent format's
    channels at the VAE's spatial compression (8, or 16 for Flux.2's and Wan 2.2's), with a frame axis for
    a model on video latents (latent_dimensions 3: Wan, Qwen-Image): 1 + (frames - 1) / the VAE's temporal
    compression (4 for Wan's VAEs: 17 frames are 5 latent frames)."""
    channels = base_model.latent_format.latent_channels
    ratio = int(vae.spacial_compression_encode())
    video = getattr(base_model.latent_format, "latent_dimensions", 2) == 3

    def shape(height: int, width: int, frames: int = 1) -> tuple[int, ...]:
        if not video:
            return (1, channels, height // ratio, width // ratio)
        temporal = int(vae.temporal_compression_decode() or 1)
        return (1, channels, 1 + (frames - 1) // temporal, height // ratio, width // ratio)

    return shape


def prompt_server():
    """ComfyUI's running PromptServer, or None (no server: in-process use, tests, tools)."""
    try:
        import server
    except ImportError:
        return None
    return getattr(server.PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """A custom websocket event, when a PromptServer runs (not in in-process tests)."""
    instance = prompt_server()
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))
