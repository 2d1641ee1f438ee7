"""The Train LoRA node's settings (each field the one source of its widget) and the checks of a run's
inputs that need no heavy work."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..data.feeder import largest_bucket_size
from ..families.sigmas import NOISE_RANGES, TIMESTEP_SAMPLINGS, noise_range_sigmas
from ..families.table import FAMILIES, Family, check_family_settings, family_entry
from ..lr.optimizers import OPTIMIZERS, check_optimizer
from ..network import kohya
from ..network.targets import TARGETS
from ..settings import NodeSettings, setting, validate
from .base_weights import BASE_WEIGHTS
from .memory_plan import MEMORY_MODES

TEXT_PARTS = ("text_encoder", "text_encoder_2")
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


PRECISIONS = ("bf16", "fp16", "fp32")
# TrainSettings fields that came after the node's first release: they sit in its "optional" section.
OPTIONAL_SETTINGS = ("save_precision", "validate_every_n_steps", "timestep_sampling", "timestep_shift", "memory",
                     "vram_budget_gb", "base_weights", "noise_range", "noise_boundary", "network", "lokr_factor",
                     "lokr_decompose_both", "loha_rank", "loha_alpha", "loss", "huber_c", "huber_schedule",
                     "max_effective_lr")
# Rendered by the node itself (a list of files), as the last input
NODE_RENDERED_SETTINGS = ("initial_lora",)
INITIAL_LORA_NONE = "[None]"
# Appended settings a run made before them is identical without, at their default (resume checks).
LATER_DEFAULTS = {"timestep_sampling": "auto", "timestep_shift": 3.0, "base_weights": "as_loaded",
                  "noise_range": "all", "noise_boundary": 0.0, "network": "lora", "lokr_factor": -1,
                  "lokr_decompose_both": False, "loha_rank": 8, "loha_alpha": 4.0, "loss": "mse", "huber_c": 0.1,
                  "huber_schedule": "snr", "max_effective_lr": 0.0, "initial_lora": ""}
NETWORKS = ("lora", "lokr", "loha")         # the network input's choices (append only)
LOSSES = ("mse", "huber", "smooth_l1", "l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")


def _lora_name_problem(name: str) -> None:
    kohya.sanitize_lora_name(name)   # raises naming the problem and the fix


@dataclass(frozen=True)
class TrainSettings(NodeSettings):
    """The Train LoRA node's widgets: each field is the one source of its default, range and help
    (the node's schema inputs and the README's reference are generated from it)."""

    TITLE = "Train LoRA"

    steps: int = setting(1000, "Optimizer updates. One step = batch_size x gradient_accumulation images.",
                         min=1, max=1_000_000)
    batch_size: int = setting(1, "Images per forward pass (all from one aspect-ratio bucket).", min=1, max=256)
    gradient_accumulation: int = setting(1, "Forward passes summed into one update (bigger effective batch, "
                                            "same memory).", min=1, max=1024)
    rank: int = setting(16, "LoRA rank (network_dim): capacity and file size.", min=1, max=1024)
    alpha: float = setting(16.0, "LoRA alpha: the update is scaled by alpha / rank.", min=0.01, max=1024.0,
                           step=0.5, hint="(alpha = rank gives scale 1)")
    target: str = setting("attention_ff", "Which layers get LoRA: attention only, attention + feed-forward, every "
                                          "linear and conv layer of the UNet blocks, or kohya_default: exactly "
                                          "sd-scripts' default LoRA (every linear / 1x1 conv of the UNet's "
                                          "transformers, proj_in/proj_out included; 192 modules on SD1.5, 722 on SDXL).",
                          choices=tuple(TARGETS))
    use_dora: bool = setting(False, "Weight-decomposed LoRA (DoRA).")
    optimizer: str = setting("AdamW", "AdamW is the safe choice. 8-bit ones need bitsandbytes and an NVIDIA "
                                      "GPU; the others their pip package (the error names it). Prodigy and "
                                      "ProdigyPlusScheduleFree set their own step (rates near 1.0; max_effective_lr "
                                      "caps it); the schedule-free ones want a constant LR Schedule.",
                             choices=tuple(OPTIMIZERS))
    weight_decay: float = setting(0.01, "Decoupled weight decay of the LoRA matrices. The DoRA magnitude gets "
                                        "none: it is a per-row norm, and decay would shrink every layer.",
                                  min=0.0, max=10.0, step=0.001)
    max_grad_norm: float = setting(1.0, "Clip the gradient norm to this; 0 = off.", min=0.0, max=1000.0, step=0.1)
    precision: str = setting("bf16", "Compute precision. bf16 on modern GPUs; fp16 uses loss scaling; fp32 on "
                                     "CPU (bf16 is very slow there). The file's dtype is save_precision.",
                             choices=PRECISIONS)
    gradient_checkpointing: bool = setting(True, "Recompute activations in backward: much less memory, "
                                                 "~20-30% slower.")
    training_seed: int = setting(0, "Drives data order, caption shuffle/dropout, flips, crops, noise, "
                                    "timesteps and LoRA init. Same seed + settings = same LoRA.",
                                 min=0, max=0xFFFFFFFF)
    noise_offset: float = setting(0.0, "kohya noise offset (0.05-0.1 helps very dark/bright images); 0 = off.",
                                  min=0.0, max=1.0, step=0.01)
    min_snr_gamma: float = setting(0.0, "Min-SNR loss weighting (5 is typical); 0 = off.", min=0.0, max=100.0,
                                   step=0.5)
    lora_name: str = setting("lora_lab", "File name in models/loras (sub-folders allowed). A taken name gets "
                                         "_2, _3...", check=_lora_name_problem)
    save_every_n_steps: int = setting(0, "Also save <lora_name>_stepNNNNN every N steps; 0 = off.", min=0,
                                      max=1_000_000)
    cache_latents_to_disk: bool = setting(False, "Keep encoded latents in the run folder (output/lora_lab/<name>) "
                                                 "so re-runs skip the VAE. Not possible with random crop.")
    save_precision: str = setting("fp16", "Dtype of the weights in the saved file (kohya's --save_precision): fp16 "
                                          "is what most LoRAs ship in and every loader takes; fp32 keeps the "
                                          "trained values exactly (twice the size); bf16 keeps fp32's range at "
                                          "fp16's size. Weights beyond fp16's range (a diverging run) are saved in "
                                          "fp32 rather than as inf.", choices=tuple(SAVE_DTYPES))
    validate_every_n_steps: int = setting(0, (
        "Every N steps (and at the last), measure the stable validation loss: up to 4 dataset images, each "
        "with fixed noise at 8 fixed timesteps, no gradient. Unlike the training loss it only moves when the "
        "weights do; it is drawn on the chart and logged as val_loss. Costs about 32 forward passes each "
        "time; training is the same with or without it. 0 = off."), min=0, max=1_000_000)
    timestep_sampling: str = setting("auto", (
        "Which noise levels train (flow-matching models: Flux, SD3, Z-Image). auto = the family's usual "
        "default: Flux = its resolution-dependent shift, SD3 = logit_normal, Z-Image = shift 3.0. uniform = "
        "every level alike; logit_normal = more weight on the middle levels (SD3 paper); shift = logit_normal "
        "moved toward high noise by timestep_shift. SD1.x/2.x/SDXL: auto or uniform (their 1000 timesteps "
        "uniformly)."), choices=tuple(TIMESTEP_SAMPLINGS))
    timestep_shift: float = setting(3.0, "The shift of timestep_sampling = shift (sigma = s*t / (1 + (s-1)*t)); "
                                         "> 1 trains more at high noise (composition), < 1 at low noise (detail).",
                                    min=0.1, max=20.0, step=0.05)
    memory: str = setting("auto", (
        "Where the frozen model weights live while training. auto = all on the GPU when they fit the budget "
        "with room to spare, otherwise the fewest blocks stream from system RAM (each block's weights copied "
        "to the GPU just before it runs, the next one already on its way, and recomputed in backward instead "
        "of kept). resident = all on the GPU (refused with the numbers when they cannot fit). stream = every "
        "block streams: the least GPU memory, slower. The plan (what stays, what streams, the estimated "
        "peak) is shown on the node and saved with the run. Trained text encoders stay on the GPU."),
        choices=MEMORY_MODES)
    vram_budget_gb: float = setting(0.0, "The GPU memory the run may use, in GB (GiB), for memory = auto or "
                                         "stream; 0 = what is free once ComfyUI has unloaded what it can. Set it "
                                         "to leave room for other programs.", min=0.0, max=1024.0, step=0.1)
    base_weights: str = setting("as_loaded", (
        "The frozen diffusion-model weights during the run. as_loaded = as the loader made them. fp8_e4m3fn / "
        "fp8_e5m2 = the Linear and Conv weights rounded to fp8 for the run (half the memory of bf16, a quarter "
        "of fp32; ComfyUI casts them per layer, as for a model loaded with an fp8 weight_dtype), so more stays "
        "on the GPU and auto streams less. e4m3fn keeps more precision (what fp8 checkpoints use), e5m2 more "
        "range. The LoRA trains in full precision and loads on the unquantized model; your MODEL is not "
        "changed. Weights already fp8 stay as loaded."), choices=tuple(BASE_WEIGHTS))
    noise_range: str = setting("all", (
        "Which noise levels this LoRA trains (flow-matching models). all = every level. high_noise / low_noise = "
        "only sigmas above / below noise_boundary: for Wan 2.2 A14B, whose two experts (two models) each denoise "
        "one side of the boundary, train one LoRA per expert, each Train LoRA node on its own expert with its "
        "own range, and apply each LoRA to its expert. The sampler's distribution keeps its shape inside the "
        "range (rejection sampling), and the validation loss measures the same range."), choices=NOISE_RANGES)
    noise_boundary: float = setting(0.0, (
        "The sigma where high noise ends, for noise_range high_noise / low_noise. 0 = the model's own: 0.875 "
        "for Wan 2.2 text-to-video (the boundary Wan 2.2 switches experts at; 0.9 for its image-to-video)."),
        min=0.0, max=0.999, step=0.005)
    network: str = setting("lora", (
        "The adapter trained. lora = low-rank A x B (use_dora adds DoRA's magnitude). lokr = LyCORIS LoKr: the "
        "Kronecker product of a small factor (lokr_factor) and a larger one, the larger low-rank at rank (full "
        "when rank is at least half its size; alpha / rank scales it, no scale when both are full): far fewer "
        "parameters than LoRA. loha = LyCORIS LoHa: the Hadamard product of two low-rank products (loha_rank, "
        "loha_alpha); it builds each layer's full update every step, so it trains slower. lokr and loha take "
        "neither use_dora nor lora_plus_ratio; their files carry LyCORIS's key names (lokr_*, hada_*), which "
        "ComfyUI's LoraLoader and LyCORIS read."), choices=NETWORKS)
    lokr_factor: int = setting(-1, "LoKr: the size of the Kronecker product's small factor (LyCORIS --factor); -1 = as "
                                   "square as the layer allows. 8-16 is common (smaller = more parameters).",
                               min=-1, max=1024)
    lokr_decompose_both: bool = setting(False, "LoKr: also make the small factor low-rank at rank, where rank is below "
                                               "half its size (LyCORIS decompose_both).")
    loha_rank: int = setting(8, "LoHa: the rank of each of its two low-rank products (LyCORIS: 32 or less; the "
                                "product reaches rank^2).", min=1, max=1024)
    loha_alpha: float = setting(4.0, "LoHa: the update is scaled by loha_alpha / loha_rank.", min=0.01, max=1024.0,
                                step=0.5)
    loss: str = setting("mse", (
        "The training loss. mse = mean squared error (the objective the models were trained with). huber / "
        "smooth_l1 = quadratic near 0 and linear beyond huber_c, so outlier images and noisy captions pull "
        "less (sd-scripts --loss_type); l1 = absolute error. The stable validation loss stays MSE, so runs "
        "compare."), choices=LOSSES)
    huber_c: float = setting(0.1, "huber / smooth_l1: the error where the loss turns linear (sd-scripts --huber_c).",
                             min=0.0001, max=10.0, step=0.01)
    huber_schedule: str = setting("snr", (
        "How huber_c varies with the noise level (sd-scripts --huber_schedule): constant = huber_c everywhere; "
        "exponential = from 1 at the cleanest level down to huber_c at pure noise; snr = (1 - c) / (1 + s)^2 + c with "
        "s the level's noise-to-signal ratio (sd-scripts' default; for flow models s = sigma / (1 - sigma))."),
        choices=HUBER_SCHEDULES)
    max_effective_lr: float = setting(0.0, (
        "Prodigy / ProdigyPlusScheduleFree: the most their adaptive step d x learning rate may reach (d is "
        "clamped); 0 = uncapped. Connect the LR Finder's suggested_lr (swept with AdamW) here. Other optimizers "
        "step at the rate set and ignore it."), min=0.0, max=10.0, step=1e-6, round=False)
    # Rendered by the node as a list of the files in models/loras (INITIAL_LORA_NONE first), after export_only
    initial_lora: str = setting("", (
        "Start the training from this LoRA's weights (sd-scripts' --network_weights). It must be one this node "
        "could have written for this model: the same network (and DoRA or not), the same layers (target and "
        "trained parts), rank and alpha; a mismatch is an error naming the file, what it has and what the node "
        "has. Its keys the model lacks are listed in the log. The new file records the parent's name and "
        "sha256. Not a resume: the optimizer, schedule and data order start afresh (resume_from continues a "
        "stopped run)."))

    def __post_init__(self) -> None:
        validate(self, self.TITLE)


@dataclass(frozen=True)
class RunOptions(NodeSettings):
    """Train LoRA's optional inputs that are not training settings: previews and resume."""

    TITLE = "Train LoRA"

    sample_prompt: str = setting("", (
        "Preview prompts drawn with the model being trained, one per line, kohya options allowed: "
        "'a photo of sks --n blurry --w 512 --h 512 --d 42 --l 7 --s 20' (negative, size, seed, cfg, "
        "steps; Euler sampler); video models also --f 17 (frames, 4n+1). Saved in output/lora_lab/<name>/samples/ "
        "(a clip as an animated .webp beside its first frame) and shown on this node."), multiline=True)
    sample_every_n_steps: int = setting(0, "Draw the sample prompts every N optimizer steps; 0 = off.", min=0,
                                        max=1_000_000)
    resume_from: str = setting("", (
        "Continue a stopped run from its last checkpoint: the run folder (output/lora_lab/<name>, or "
        "just <name>) or its resume_state.json. Checkpoints are written every save_every_n_steps and on "
        "Cancel. The model, dataset, rates, schedule and settings must match the saved run (lora_name, "
        "save_every_n_steps, cache_latents_to_disk, gradient_checkpointing, save_precision, memory and "
        "vram_budget_gb may change); the result equals an uninterrupted run. Empty = start a new run."))

    def __post_init__(self) -> None:
        validate(self, self.TITLE)


def part_rates_for(rates, family: str, text_parts: Iterable[str] | None = None) -> dict[str, float]:
    """Base rate per part for this model family (0 = frozen): a text encoder the family cannot train
    (TE2 outside SDXL/SD3; Flux's and Z-Image's encoders, which stay frozen) and one the model lacks
    (when `text_parts` is given) are frozen."""
    part_rates = dict(rates.resolved())
    for part in TEXT_PARTS:
        if part not in FAMILIES[family].text_parts:
            part_rates[part] = 0.0
    if text_parts is not None:
        for part in TEXT_PARTS:
            if part not in text_parts:
                part_rates[part] = 0.0
    return part_rates


def check_inputs(settings: TrainSettings, dataset, part_rates: dict[str, float], schedule,
                 access_family: str | Family, device_type: str) -> None:
    """The checks of a run's settings, dataset, rates and schedule that need no model loaded; raises
    ValueError naming input, value and fix. Called by check_run (training/run/plan.py), the one place
    a run's inputs are checked. access_family: the family's key or its entry (a generic entry resolved
    for its model: ModelAccess.entry)."""
    entry = family_entry(access_family)
    if dataset is None or not getattr(dataset, "samples", None):
        raise ValueError("Train LoRA: dataset has no images. Point the LoRA Dataset node at a folder with "
                         "images (or feed it an IMAGE batch).")
    largest = largest_bucket_size(dataset)
    if settings.batch_size > largest:
        raise ValueError(f"Train LoRA: batch_size = {settings.batch_size} is larger than the dataset's "
                         f"largest bucket ({largest} images per epoch, repeats counted, "
                         f"{len(dataset.samples)} images in {len(dataset.buckets())} bucket(s)). Lower "
                         f"batch_size to at most {largest}, add images or repeats, or turn bucketing off.")
    if not any(rate > 0 for part, rate in part_rates.items()):
        frozen = entry.frozen_text
        raise ValueError("Train LoRA: every learning rate resolves to 0, so nothing would train. Set "
                         "learning_rate (or unet_lr / text_encoder_lr) above 0 in UNet/TE Learning Rates."
                         + (f" ({entry.label}'s text encoders, {frozen}, always stay frozen: "
                            "set unet_lr.)" if frozen and not entry.text_parts else ""))
    check_family_settings(entry, settings.noise_offset, settings.min_snr_gamma, settings.timestep_sampling)
    if entry.objective_known:
        noise_range_sigmas(entry, settings.noise_range, settings.noise_boundary)
    if getattr(dataset, "has_clips", False) and not entry.video:
        raise ValueError(f"Train LoRA: dataset holds video clips but model is {entry.label}, an image model. Clips "
                         f"train video models ({', '.join(other.label for other in FAMILIES.values() if other.video)}): "
                         "leave the clips out of the dataset folder, or connect a video model.")
    if entry.start_frame:
        images = sum(1 for sample in dataset.samples if not getattr(sample, "frames", ()))
        if images:
            raise ValueError(f"Train LoRA: dataset holds {images} still image(s) but model is {entry.label}, which "
                             "starts every clip from its first frame: an image would be its own start image, with "
                             "no motion to learn. Train it on clips only (move the images out of the folder).")
    schedule.check_total(settings.steps)
    check_optimizer(settings.optimizer, device_type, schedule, settings.steps)
