"""Flow-matching sigma samplers: one registry, keyed by the `timestep_sampling` choice (ComfyUI-agnostic).

The trainer builds the run's sampler from the setting and the family's default
(``sampling_for``); the host never sees the setting. Discrete families (SD1.x/2.x/SDXL) draw a
timestep of their own schedule instead (training/run/loop.py DiffusionObjective).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

SIGMA_FLOOR = 1e-3   # flow sigmas are clamped to [SIGMA_FLOOR, 1]: the prediction divides by sigma
Sampler = Callable[[int, tuple, torch.Generator], torch.Tensor]   # (batch, latent shape, generator) -> sigmas


def shifted(t: torch.Tensor, shift: float) -> torch.Tensor:
    """The timestep shift of SD3 / Flux (sigma = s t / (1 + (s - 1) t)); s > 1 moves mass to high noise."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def flux_resolution_shift(latent_height: int, latent_width: int, patch: int = 2) -> float:
    """Flux's resolution-dependent shift: exp(mu), mu linear in the image token count from 0.5 at 256
    tokens to 1.15 at 4096 (BFL's flux sampling `get_lin_function`, diffusers' FluxPipeline
    `calculate_shift`, sd-scripts' `--timestep_sampling flux_shift`); a token is a patch x patch square
    of latent pixels (Flux.1: 2 x 2; Flux.2, whose latents are already patchified: 1, as musubi-tuner's
    `flux2_shift`)."""
    tokens = (latent_height // patch) * (latent_width // patch)
    mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
    return math.exp(mu)


def _uniform(batch: int, shift: float, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """t ~ U(0, 1)."""
    return torch.rand(batch, generator=generator, device=generator.device)


def _logit_normal(batch: int, shift: float, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """t = sigmoid(N(0, 1)): the SD3 paper's rf/lognorm(0, 1)."""
    return torch.sigmoid(torch.randn(batch, generator=generator, device=generator.device))


def _shift(batch: int, shift: float, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """A logit-normal t shifted by `shift` (sd-scripts' `--timestep_sampling shift`)."""
    return shifted(_logit_normal(batch, shift, shape, generator), shift)


def _flux_shift(batch: int, shift: float, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """As shift, with Flux's resolution-dependent value (flux_resolution_shift)."""
    return shifted(_logit_normal(batch, shift, shape, generator), flux_resolution_shift(shape[-2], shape[-1]))


def _flux2_shift(batch: int, shift: float, shape: tuple, generator: torch.Generator) -> torch.Tensor:
    """As flux_shift, one token per latent pixel (Flux.2)."""
    return shifted(_logit_normal(batch, shift, shape, generator), flux_resolution_shift(shape[-2], shape[-1], patch=1))


SIGMA_SAMPLERS: dict[str, Callable[[int, float, tuple, torch.Generator], torch.Tensor]] = {
    "uniform": _uniform, "logit_normal": _logit_normal, "shift": _shift, "flux_shift": _flux_shift,
    "flux2_shift": _flux2_shift,
}
# The node's choices (a public API: append only); "auto" is the family's default; flux_shift and
# flux2_shift are only defaults.
TIMESTEP_SAMPLINGS = ("auto", "uniform", "logit_normal", "shift")


FULL_RANGE = (0.0, 1.0)
# Rejection sampling into a noise range draws rounds of this many candidates per wanted sigma, at most
# REJECTION_ROUNDS rounds; what is still missing then (a range the distribution hardly reaches) is drawn
# uniformly inside the range.
REJECTION_BATCH = 8
REJECTION_ROUNDS = 200


def draw_flow_sigmas(kind: str, shift: float, batch: int, latent_shape: tuple[int, ...],
                     generator: torch.Generator, sigma_range: tuple[float, float] = FULL_RANGE) -> torch.Tensor:
    """`batch` sigmas in [SIGMA_FLOOR, 1] (on the generator's device, fp32), drawn by SIGMA_SAMPLERS[kind].

    sigma_range (low, high): only sigmas in [low, high] (a Wan 2.2 expert's noise levels), by rejection
    sampling, which keeps the distribution's shape inside the range (musubi-tuner's recommended
    --preserve_distribution_shape for the Wan 2.2 experts) where rescaling into the range would distort it."""
    if kind not in SIGMA_SAMPLERS:
        raise ValueError(f"unknown sigma sampling {kind!r}; known: {', '.join(SIGMA_SAMPLERS)}")
    draw = SIGMA_SAMPLERS[kind]
    if tuple(sigma_range) == FULL_RANGE:
        return draw(batch, shift, latent_shape, generator).float().clamp(SIGMA_FLOOR, 1.0)
    low, high = max(float(sigma_range[0]), SIGMA_FLOOR), min(float(sigma_range[1]), 1.0)
    kept: list[torch.Tensor] = []
    missing = batch
    for _ in range(REJECTION_ROUNDS):
        candidates = draw(batch * REJECTION_BATCH, shift, latent_shape, generator).float().clamp(SIGMA_FLOOR, 1.0)
        inside = candidates[(candidates >= low) & (candidates <= high)][:missing]
        kept.append(inside)
        missing -= inside.numel()
        if missing == 0:
            break
    if missing:
        kept.append(low + (high - low) * torch.rand(missing, generator=generator, device=generator.device))
    return torch.cat(kept).float()


def sampling_for(entry, timestep_sampling: str, timestep_shift: float) -> tuple[str, float]:
    """(sampler kind, shift) that a run of this family entry uses: `auto` is the family's default."""
    if timestep_sampling == "auto":
        return entry.sampling, entry.sampling_shift if entry.sampling_shift is not None else timestep_shift
    return timestep_sampling, timestep_shift


def sigma_sampler(kind: str, shift: float, sigma_range: tuple[float, float] = FULL_RANGE) -> Sampler:
    """The run's sampler: (batch, latent shape, generator) -> sigmas (within sigma_range)."""
    if kind not in SIGMA_SAMPLERS:
        raise ValueError(f"unknown sigma sampling {kind!r}; known: {', '.join(SIGMA_SAMPLERS)}")
    return lambda batch, shape, generator: draw_flow_sigmas(kind, shift, batch, shape, generator, sigma_range)


NOISE_RANGES = ("all", "high_noise", "low_noise")   # Train LoRA's noise_range choices (append only)


def noise_range_sigmas(entry, noise_range: str, noise_boundary: float) -> tuple[float, float]:
    """The sigmas a run trains: all, or one side of the boundary (noise_boundary, 0 = the family's expert
    boundary): the high-noise expert [boundary, 1], the low-noise expert [0, boundary]. ValueError naming
    the input, the value and the fix."""
    if noise_range not in NOISE_RANGES:
        raise ValueError(f"Train LoRA: noise_range = {noise_range!r} is not one of {', '.join(NOISE_RANGES)}.")
    if noise_range == "all":
        return FULL_RANGE
    if not entry.flow:
        raise ValueError(f"Train LoRA: noise_range = {noise_range} applies to flow-matching models (a Wan 2.2 "
                         f"expert's noise levels); {entry.label} samples its 1000 timesteps uniformly. Set all.")
    boundary = noise_boundary if noise_boundary > 0 else entry.expert_boundary
    if boundary is None:
        raise ValueError(f"Train LoRA: noise_range = {noise_range} needs a boundary: {entry.label} has no experts "
                         "that split the noise levels, so noise_boundary = 0 (the model's boundary) means nothing. "
                         "Set noise_boundary (the sigma where high noise ends, e.g. 0.875), or noise_range to all.")
    if not 0.0 < boundary < 1.0:
        raise ValueError(f"Train LoRA: noise_boundary = {boundary:g} must lie between 0 and 1 (a sigma; Wan 2.2 "
                         "text-to-video's is 0.875, image-to-video's 0.9), or be 0 for the model's own.")
    return (boundary, 1.0) if noise_range == "high_noise" else (0.0, boundary)
