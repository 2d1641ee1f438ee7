"""A stable validation loss (ComfyUI-agnostic), shared by Train LoRA and the LR Finder.

A diffusion model's training loss is dominated by each step's random timesteps and noise: two
steps of the same weights differ by more than a good and a bad learning rate do. This loss holds
all of that still: the same few dataset images (chosen by a fixed seed, centre crop, no flip, the
caption before shuffle/dropout), each paired with fixed noise at a fixed spread of timesteps
evenly spaced over the noise schedule, evaluated with no gradient. Only the weights change between
evaluations, so on the same device two evaluations of the same weights give the same number, bit
for bit (tested on CPU), and a change is the weights' doing.

The images are not held out: they are also trained on (a LoRA dataset is small; holding out a
quarter of 10 images would hurt the LoRA more than it helps the measurement). So the number says
how well the LoRA fits its data, which is what a rate sweep compares; it is not a generalisation
estimate. Drawing its noise from its own generator, it never touches the training's random state:
a run with validation trains the same LoRA as one without (tested).
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from .loop import DiffusionObjective, LoopSettings, autocast_context, loss_at_sigma, validation_timesteps  # noqa: F401

VALIDATION_IMAGES = 4         # at most this many dataset images
VALIDATION_TIMESTEPS = 8      # per image, evenly spaced over the schedule
VALIDATION_SEED = 20231101    # fixed: the same images and noise whatever the training seed


def validation_indices(sample_count: int, count: int = VALIDATION_IMAGES) -> list[int]:
    """Which dataset samples validate: `count` of them, drawn by the fixed seed, in dataset order."""
    return sorted(random.Random(VALIDATION_SEED).sample(range(sample_count), min(count, sample_count)))


@dataclass
class ValidationItem:
    x0: torch.Tensor          # [T, C, H, W] the image's latent, once per timestep (on the device)
    noise: torch.Tensor       # [T, C, H, W] fixed noise
    sigmas: torch.Tensor      # [T] fixed noise levels
    caption: str
    sizes: list[dict]         # SDXL size conditioning, one per timestep
    cond: dict | None = None  # the caption's conditioning when the text encoders are frozen
    index: int = -1           # the dataset sample, and its crop (an edit dataset's control image follows them)
    offset: tuple[int, int] = (0, 0)


class ValidationSet:
    """The fixed images, noise and timesteps; :meth:`loss` evaluates the model as it is now."""

    def __init__(self, feeder, objective: DiffusionObjective, precision: str, device: torch.device,
                 images: int = VALIDATION_IMAGES, timesteps: int = VALIDATION_TIMESTEPS) -> None:
        """Built from the run's BatchFeeder (its latent cache and encoders), before the encoders leave
        the device: latents (and, with frozen text encoders, captions) are encoded here, once."""
        self.feeder = feeder
        self.objective = objective
        # Entered around each evaluation: the weights to measure in place (the run sets it for a schedule-free
        # optimizer, whose evaluation weights are its average x)
        self.weights: Callable[[], ContextManager] = contextlib.nullcontext
        self.settings = LoopSettings(total_steps=1, precision=precision, device_type=device.type)
        dataset = feeder.dataset
        sigmas = objective.validation_sigmas(timesteps)
        generator = torch.Generator(device="cpu").manual_seed(VALIDATION_SEED)
        self.items: list[ValidationItem] = []
        for index in validation_indices(len(dataset.samples), images):
            sample = dataset.samples[index]
            offset, _ = dataset.augmentation(index, None)   # the centre crop, no flip, no rng draw
            latent = feeder.latent(index, offset, False)
            noise = torch.randn((len(sigmas), *latent.shape[1:]), generator=generator, dtype=torch.float32)
            size = {"original_size": tuple(sample.original_size), "crop_offset": tuple(int(v) for v in offset),
                    "target_size": tuple(sample.bucket)}
            item = ValidationItem(index=index, offset=tuple(offset), x0=latent.repeat(len(sigmas), *([1] * (latent.ndim - 1))).to(device), noise=noise.to(device),
                                  sigmas=sigmas.to(device), caption=dataset.base_caption(index),
                                  sizes=[size] * len(sigmas))
            if not feeder.train_text:
                item.cond = self._conditioning(item)
            self.items.append(item)

    @property
    def size(self) -> int:
        """Forward passes per evaluation (images x timesteps)."""
        return sum(item.x0.shape[0] for item in self.items)

    def _conditioning(self, item: ValidationItem) -> dict:
        with torch.no_grad():
            encoded = (self.feeder.sample_conditioning(item.index, item.offset, False, item.caption)
                       if self.feeder.controls else self.feeder.access.encode_captions([item.caption]))
        repeated = {key: value.repeat(len(item.sizes), *([1] * (value.ndim - 1))) if torch.is_tensor(value) else value
                    for key, value in encoded.items()}
        return self.feeder.access.extra_conditioning(repeated, item.sizes)

    def every(self, steps: int, total: int) -> Callable[[int], float | None]:
        """The loop's `validate`: the loss after every `steps`-th step and after the last, else None."""
        return lambda step: self.loss() if (step + 1) % steps == 0 or step + 1 == total else None

    def loss(self) -> float:
        """Mean of the (unweighted) diffusion loss over every image and timestep, with no gradient."""
        total = 0.0
        with self.weights(), torch.no_grad():
            for item in self.items:
                cond = item.cond if item.cond is not None else self._conditioning(item)
                with autocast_context(self.settings):
                    total += float(loss_at_sigma(self.objective, item.x0, cond, item.noise, item.sigmas))
        return total / len(self.items)
