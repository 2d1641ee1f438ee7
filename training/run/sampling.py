"""Preview images during training: kohya-style sample prompts and a small Euler sampler.

The sampler runs the model *as it is being trained* (LoRA layers in place) through the same
`DiffusionObjective.denoise` the loss uses, so previews show exactly what the optimizer sees,
without going through ComfyUI's model management mid-run.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Callable

import torch

from .loop import DiffusionObjective

# kohya sd-scripts' sample prompt options (library/train_util.py, "--n negative --w 512 ..."), and
# musubi-tuner's --f (frames) for video models.
PROMPT_OPTIONS = {"n": "negative", "w": "width", "h": "height", "d": "seed", "l": "cfg", "s": "steps", "f": "frames"}
DEFAULT_STEPS = 20
DEFAULT_CFG = 7.0
MAX_STEPS = 150


@dataclass(frozen=True)
class SamplePrompt:
    """One preview image to draw: a prompt line with kohya's options applied."""

    prompt: str
    negative: str = ""
    width: int = 512          # pixels (multiple of 8)
    height: int = 512         # pixels (multiple of 8)
    seed: int = 0
    cfg: float = DEFAULT_CFG  # classifier-free guidance scale
    steps: int = DEFAULT_STEPS
    frames: int = 1           # a video model's clip length (1: an image)


def parse_sample_prompts(text: str, resolution: int, seed: int, cfg: float = DEFAULT_CFG,
                         steps: int = DEFAULT_STEPS, frames: int | None = None) -> list[SamplePrompt]:
    """One SamplePrompt per non-empty line; kohya options `--n --w --h --d --l --s` (and `--f`, frames, for
    a video model) may follow the prompt.

    "a cat --n blurry --w 768 --h 512 --d 42 --l 6 --s 25". Unknown or malformed options raise
    ValueError naming the line and the fix. Lines starting with # are comments. `cfg`, `steps` and
    `frames` are the defaults where a line gives none (the model family's usual values); frames None:
    an image model, which takes no --f.
    """
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, *options = line.split(" --")
        values: dict = {"prompt": head.strip(), "width": resolution, "height": resolution, "seed": seed, "cfg": cfg,
                        "steps": steps, "frames": frames or 1}
        for option in options:
            key, _, value = option.strip().partition(" ")
            if key not in PROMPT_OPTIONS:
                raise ValueError(f"Train LoRA: sample_prompt line {number}: '--{key}' is not a sample option. "
                                 f"Use --n (negative), --w/--h (size), --d (seed), --l (cfg), --s (steps)"
                                 f"{', --f (frames)' if frames else ''}.")
            if key == "f" and not frames:
                raise ValueError(f"Train LoRA: sample_prompt line {number}: '--f' (frames) applies to video models "
                                 "(Wan); this model draws images. Remove it.")
            field_name = PROMPT_OPTIONS[key]
            try:
                if field_name == "negative":
                    values[field_name] = " ".join(shlex.split(value)) if value.strip() else ""
                elif field_name == "cfg":
                    values[field_name] = float(value)
                else:
                    values[field_name] = int(value)
            except ValueError:
                raise ValueError(f"Train LoRA: sample_prompt line {number}: '--{key} {value.strip()}' needs a "
                                 f"number.") from None
        sample = SamplePrompt(**values)
        if sample.width % 8 or sample.height % 8 or min(sample.width, sample.height) < 8:
            raise ValueError(f"Train LoRA: sample_prompt line {number}: size {sample.width}x{sample.height} must "
                             "be multiples of 8 (the VAE works in 8-pixel cells).")
        if not 1 <= sample.steps <= MAX_STEPS:
            raise ValueError(f"Train LoRA: sample_prompt line {number}: --s {sample.steps} must be 1..{MAX_STEPS}.")
        if sample.frames < 1 or (sample.frames - 1) % 4:
            raise ValueError(f"Train LoRA: sample_prompt line {number}: --f {sample.frames} must be 4n+1 frames "
                             f"(1, 5, 9 ... 81: a video VAE compresses time by 4 after the first frame); use "
                             f"{max(1, (sample.frames - 1) // 4 * 4 + 1)}.")
        prompts.append(sample)
    return prompts


def sampling_sigmas(objective: DiffusionObjective, steps: int) -> torch.Tensor:
    """`steps` sigmas from the model's largest to its smallest, evenly spaced in timestep (ComfyUI's
    "simple" scheduler idea), then 0."""
    table = objective.sigmas.float()
    positions = torch.linspace(len(table) - 1, 0, steps).round().long()
    return torch.cat([table[positions], table.new_zeros(1)])


@torch.no_grad()
def euler_sample(objective: DiffusionObjective, cond: dict, uncond: dict, latent_shape: tuple[int, ...],
                 steps: int, cfg: float, generator: torch.Generator, device: torch.device,
                 check_cancel: Callable[[], None] | None = None) -> torch.Tensor:
    """Euler (Karras et al. 2022, Algorithm 2 without churn) with classifier-free guidance.

    Works for epsilon and v models alike: `denoise` returns the x0 estimate either way.
    Returns the final latent in the model's latent space.
    """
    sigmas = sampling_sigmas(objective, steps).to(device)
    noise = torch.randn(latent_shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
    x = objective.noise_scaling(sigmas[0].expand(latent_shape[0]), noise, torch.zeros_like(noise))
    for index in range(steps):
        if check_cancel is not None:
            check_cancel()
        sigma = sigmas[index].expand(latent_shape[0])
        conditional = objective.denoise(x, sigma, cond).float()
        if cfg != 1.0:
            unconditional = objective.denoise(x, sigma, uncond).float()
            denoised = unconditional + cfg * (conditional - unconditional)
        else:
            denoised = conditional
        derivative = (x - denoised) / sigmas[index]
        x = x + derivative * (sigmas[index + 1] - sigmas[index])
    return x


@dataclass
class PreviewSampler:
    """Draws the sample prompts with the model being trained (host callables from the bridge)."""

    objective: DiffusionObjective
    encode: Callable[[str, int, int, int], dict]     # (text, width, height, frames) -> model conditioning
    decode: Callable[[torch.Tensor], torch.Tensor]   # model latent -> IMAGE [B, H, W, 3] in 0..1
    device: torch.device
    # (height, width, frames) in pixels -> the model's latent shape for one image or clip: [1, C, H/r, W/r], or
    # [1, C, T, H/r, W/r] for a model on video latents (Wan; Qwen-Image's Wan VAE with one frame)
    latent_shape: Callable[[int, int, int], tuple[int, ...]] = \
        lambda height, width, frames=1: (1, 4, height // 8, width // 8)
    check_cancel: Callable[[], None] | None = None   # raises to stop (Cancel), checked every sampler step

    @torch.no_grad()
    def __call__(self, sample: SamplePrompt) -> torch.Tensor:
        cond = self.encode(sample.prompt, sample.width, sample.height, sample.frames)
        uncond = self.encode(sample.negative, sample.width, sample.height, sample.frames)
        generator = torch.Generator(device="cpu").manual_seed(sample.seed)
        shape = self.latent_shape(sample.height, sample.width, sample.frames)
        latent = euler_sample(self.objective, cond, uncond, shape, sample.steps, sample.cfg, generator, self.device,
                              self.check_cancel)
        return self.decode(latent)
