"""The contract between the trainer and the application hosting it (built by nodes/comfy/access.py):
what the trainer needs from the models (ModelAccess), how it reports (TrainCallbacks) and what it
returns (TrainingResult). ComfyUI-agnostic: plain torch modules and callables."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ContextManager

import torch

from ..families.sigmas import FULL_RANGE, sampling_for, sigma_sampler
from ..families.table import FAMILIES, Family

if TYPE_CHECKING:
    from .loop import DiffusionObjective, StepRecord


@dataclass
class ModelAccess:
    """What the trainer needs from the host application (built by nodes/comfy/access.py)."""

    family: str                                             # a key of training/families/table.FAMILIES
    device: torch.device
    unet: torch.nn.Module                                   # the diffusion model (ldm layout)
    unet_blocks: list[torch.nn.Module]                      # modules to checkpoint (each called by the UNet)
    text_encoders: dict[str, torch.nn.Module]               # part -> CLIP root (e.g. clip_l)
    text_layers: dict[str, list[torch.nn.Module]]           # part -> CLIP layers (in-place forward fix)
    objective: DiffusionObjective
    encode_pixels: Callable[[torch.Tensor], torch.Tensor]   # IMAGE [B,H,W,3] 0..1 -> model latent x0
    encode_captions: Callable[[list[str]], dict]            # captions -> {"c_crossattn", "pooled"?}
    extra_conditioning: Callable[[dict, list[dict]], dict]  # (text cond, per-sample sizes) -> cond kwargs
    # module paths -> the file's key stem per path (or [(stem, output rows)] where the file splits a fused layer)
    unet_kohya_names: Callable[[list[str]], dict]
    text_kohya_names: Callable[[str, list[str]], dict]
    latent_key: str = ""                                    # identifies VAE weights + latent format (disk cache)
    offload_device: torch.device | None = None              # where frozen originals wait while training (GPU runs)
    # Called once every latent / frozen caption encoding is cached: (VAE done, text encoders done) ->
    # the host moves those models off the GPU (they come back by themselves if a preview needs them).
    release_encoders: Callable[[bool, bool], None] | None = None
    weights_key: Callable[[], str] | None = None            # identifies the base weights (resume checks)
    clip_skip: int | None = None                            # kohya's clip_skip (2 = penultimate layer); None = last
    # The norm the host's LoRA loader divides a dora_scale by (lora.lora_weights): "original" | "updated"
    dora_norm: str = "updated"
    # Flow matching: (sampler kind, shift) the run draws sigmas with (training/families/sigmas.py), recorded in
    # the file; set by the trainer from the run's settings (with_sampling), never by the host.
    sampling: tuple[str, float] = ("uniform", 0.0)
    training_guidance: float | None = None                  # guidance-distilled models (Flux-dev): the value trained with
    # Entered for the whole run: the host's training switch (ComfyUI 0.33's model_management.in_training,
    # which routes fused kernels without a backward, e.g. comfy_kitchen's RoPE, to plain torch ops).
    training_mode: Callable[[], ContextManager] | None = None
    in_place_blocks: bool = False                           # unet_blocks update activations in place (DiTs): train them out of place
    # Loads the weights for the run (entered around it): False = resident on the device (the whole model),
    # True = into host memory, for the block streamer (training/run/streaming.py). None: already in place.
    load: Callable[[bool], ContextManager] | None = None
    # (bytes the run would keep on the device) -> (bytes free once the host made room, working reserve for
    # activations); None = no limit to plan for (a CPU run).
    device_memory: Callable[[int], tuple[int, int]] | None = None
    # base_weights (training/run/base_weights.py): the diffusion model's layers whose weight may be stored in
    # a smaller dtype for the run, and the host's switch (entered around the run) that makes those layers cast
    # their weight to the compute dtype per forward. None: the host cannot (only as_loaded then).
    quantizable_layers: Callable[[], list[torch.nn.Module]] | None = None
    cast_per_forward: Callable[[list[torch.nn.Module]], ContextManager] | None = None
    # The generic path: its table entry resolved for this model (Family.resolved: objective, targets by
    # structure, sigma default); None = the table's entry.
    resolved_entry: Family | None = None

    @property
    def entry(self) -> Family:
        """The family's table entry (training/families/table.py), as resolved for this model."""
        return self.resolved_entry if self.resolved_entry is not None else FAMILIES[self.family]

    def with_sampling(self, timestep_sampling: str, timestep_shift: float,
                      sigma_range: tuple[float, float] = FULL_RANGE) -> ModelAccess:
        """This access with the run's sigma sampler (flow families; `auto` = the family's default), drawing
        only sigmas in `sigma_range` (a Wan 2.2 expert's noise levels: its training and validation sigmas)."""
        if not self.entry.flow:
            return self
        kind, shift = sampling_for(self.entry, timestep_sampling, timestep_shift)
        objective = dataclasses.replace(self.objective, sigma_sampler=sigma_sampler(kind, shift, sigma_range),
                                        sigma_range=tuple(sigma_range))
        return dataclasses.replace(self, sampling=(kind, shift), objective=objective)


@dataclass
class TrainingResult:
    path: Path                    # the final LoRA file
    records: list[StepRecord]
    run_dir: Path
    seconds: float
    cache_bytes: dict[str, int] = field(default_factory=dict)   # in-memory caches at the end (latents, text)
    memory: str = ""                                            # the memory plan, in words
    device_peak: int = 0                                        # base-weight bytes on the device at most (ledger)
    model_note: str = ""                                        # how the model was trained, where it is not a first-class family

    def summary(self, name: str) -> str:
        """A few lines for people: the file as LoraLoader lists it (`name`), steps, time and final loss,
        and the memory plan."""
        lines = [f"LoRA: {name}",
                 f"{self.records[-1].step + 1} steps in {self.seconds:.1f} s, final loss {self.records[-1].loss:.4f}"]
        if self.memory:
            lines.append(f"Memory: {self.memory}")
        if self.model_note:
            lines.append(f"Model: {self.model_note}")
        return "\n".join(lines)


@dataclass
class TrainCallbacks:
    on_step: Callable[[StepRecord, int], None] | None = None   # (record, total steps)
    check_cancel: Callable[[], None] | None = None
    is_cancel: Callable[[BaseException], bool] = lambda error: False
    # Preview images: called after every optimizer step with (steps done, run folder, weights), the LoRA in
    # place; `with weights():` around a sample puts the weights that are saved there (a schedule-free
    # optimizer's average), entered only on the steps that sample.
    on_sample: Callable[[int, Path, Callable[[], ContextManager]], None] | None = None
