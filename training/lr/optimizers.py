"""Parameter groups and optimizers (ComfyUI-agnostic): one group per part (and LoRA+ half, UNet
block and DoRA magnitude), each with its own base rate, and the optimizers Train LoRA offers."""
from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

logger = logging.getLogger("lora_lab")

@dataclass(frozen=True)
class TrainedLayer:
    """One LoRA layer's trainable tensors and where it sits (for grouping)."""

    part: str                          # "unet" | "text_encoder" | "text_encoder_2"
    block: str                         # "down" | "mid" | "up" for the UNet, "" for encoders
    down: torch.nn.Parameter | None    # A (None for LoKr / LoHa)
    up: torch.nn.Parameter | None      # B (None for LoKr / LoHa)
    magnitude: torch.nn.Parameter | None = None   # DoRA magnitude (A rate, no weight decay)
    factors: tuple[torch.nn.Parameter, ...] = ()  # LoKr / LoHa tensors: the A group (part rate), no LoRA+


def build_param_groups(layers: list[TrainedLayer], part_rates: dict[str, float], lora_plus_ratio: float,
                       block_weight: Callable[[str], float]) -> list[dict[str, Any]]:
    """One group per (part, UNet block, A/B/M). Base rate = part rate x block weight (x LoRA+ ratio for B).

    "M" holds the DoRA magnitudes: trained at the A rate, with no weight decay (a per-row norm, like
    a normalisation scale: decay would pull every layer's norm toward zero, not the update toward 0).
    LoKr / LoHa factors join the "A" groups (part rate x block weight); LoRA+ has no B matrix to
    scale there, so a ratio other than 1 is refused.
    Every group carries "base_lr" (rate before the schedule) and "part"/"block"/"matrix" tags.
    """
    if lora_plus_ratio != 1.0 and any(layer.factors for layer in layers):
        raise ValueError(f"Train LoRA: lora_plus_ratio = {lora_plus_ratio:g} (UNet/TE Learning Rates) with a LoKr / "
                         "LoHa network: LoRA+ speeds up LoRA's B (lora_up) matrices, which these networks do not "
                         "have. Set lora_plus_ratio to 1, or network to lora.")
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for layer in layers:
        rate = part_rates[layer.part] * (block_weight(layer.block) if layer.part == "unet" else 1.0)
        magnitudes = [layer.magnitude] if layer.magnitude is not None else []
        first = [layer.down] if layer.down is not None else []
        second = [layer.up] if layer.up is not None else []
        for matrix, tensors in (("A", first + list(layer.factors)), ("B", second), ("M", magnitudes)):
            if not tensors:
                continue
            base = rate * (lora_plus_ratio if matrix == "B" else 1.0)
            key = (layer.part, layer.block, matrix)
            group = groups.setdefault(key, {"params": [], "lr": base, "base_lr": base, "part": layer.part,
                                            "block": layer.block, "matrix": matrix,
                                            "name": "/".join(filter(None, key))})
            if matrix == "M":
                group["weight_decay"] = 0.0
            group["params"].extend(tensors)
    return list(groups.values())


@dataclass(frozen=True)
class OptimizerSpec:
    module: str                 # importable module that must exist
    install_hint: str           # what to tell the user when it does not
    needs_cuda: bool            # bitsandbytes 8-bit optimizers run on CUDA only
    build: Callable[[list[dict], float], torch.optim.Optimizer]
    adaptive: bool = False      # sets its own step size (D-adaptation's d x lr): the cap applies, the chart shows it
    schedule_free: bool = False   # evaluates and saves its averaged weights (optimizer.eval()); wants a flat rate
    state_bytes: float = 8.0    # its state per trained value (the memory plan): AdamW's two fp32 moments

    @property
    def package(self) -> str:
        """The pip package the install hint names ("" for torch's own)."""
        return self.install_hint.split()[-1] if self.install_hint else ""


def _adamw(groups, weight_decay):
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _sgd(groups, weight_decay):
    return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, weight_decay=weight_decay)


def _adamw8bit(groups, weight_decay):
    import bitsandbytes
    return bitsandbytes.optim.AdamW8bit(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _lion8bit(groups, weight_decay):
    import bitsandbytes
    return bitsandbytes.optim.Lion8bit(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _prodigy(groups, weight_decay):
    import prodigyopt
    _one_rate("Prodigy", groups)
    return prodigyopt.Prodigy(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _one_rate(name: str, groups: list[dict]) -> None:
    """prodigyopt steps every group at one rate (it raises at the first step when two differ): say so
    before training, naming the groups and the fix."""
    rates = {group.get("name", str(index)): group["lr"] for index, group in enumerate(groups) if group["lr"] > 0}
    if len(set(rates.values())) > 1:
        listed = ", ".join(f"{group} {rate:g}" for group, rate in rates.items())
        raise ValueError(f"Train LoRA: optimizer = {name!r} (prodigyopt) applies one rate to every trained group, "
                         f"and these differ: {listed}. Give every trained part the same rate (UNet/TE Learning "
                         "Rates: text encoder rates at -1 inherit learning_rate), lora_plus_ratio 1 and no UNet "
                         "block weights, or pick ProdigyPlusScheduleFree, which keeps a rate per group.")


def _adamw_schedule_free(groups, weight_decay):
    # warmup_steps 0: the LR Schedule's warmup sets the rate it sees (constant_with_warmup ramps it up as
    # its own warmup would), so the chart shows the warmup that trains.
    import schedulefree
    optimizer = schedulefree.AdamWScheduleFree(groups, lr=groups[0]["lr"], weight_decay=weight_decay, warmup_steps=0)
    optimizer.train()   # made in eval mode; it steps only in train mode
    return optimizer


def _prodigy_plus_schedule_free(groups, weight_decay):
    # One d for all groups (split_groups=False, Prodigy's own behaviour): our groups split each part into
    # A / B matrices and UNet blocks, which a d per group would adapt apart; with one d, the rates set per
    # part (and LoRA+, block weights) stay the ratios between the groups' steps.
    from prodigyplus import ProdigyPlusScheduleFree
    return ProdigyPlusScheduleFree(groups, lr=groups[0]["lr"], weight_decay=weight_decay, split_groups=False)


def _came(groups, weight_decay):
    from came_pytorch.CAME import CAME   # the package's __init__ exports nothing
    return CAME(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _lion(groups, weight_decay):
    from lion_pytorch import Lion
    return Lion(groups, lr=groups[0]["lr"], weight_decay=weight_decay)


def _adafactor(groups, weight_decay):
    # Fixed rates (no relative step) so our schedule drives the rate, as kohya does with an explicit lr.
    from transformers.optimization import Adafactor
    return Adafactor(groups, lr=groups[0]["lr"], weight_decay=weight_decay, relative_step=False,
                     scale_parameter=False, warmup_init=False)


OPTIMIZERS: dict[str, OptimizerSpec] = {
    "AdamW": OptimizerSpec("torch", "", False, _adamw),
    "AdamW8bit": OptimizerSpec("bitsandbytes", "pip install bitsandbytes", True, _adamw8bit, state_bytes=2.0),
    "Lion8bit": OptimizerSpec("bitsandbytes", "pip install bitsandbytes", True, _lion8bit, state_bytes=1.0),
    "Prodigy": OptimizerSpec("prodigyopt", "pip install prodigyopt", False, _prodigy, adaptive=True,
                             state_bytes=16.0),
    "Adafactor": OptimizerSpec("transformers", "pip install transformers", False, _adafactor, state_bytes=0.5),
    "SGD": OptimizerSpec("torch", "", False, _sgd, state_bytes=4.0),
    # Appended (the order is the node's combo order, which saved workflows rely on).
    "AdamWScheduleFree": OptimizerSpec("schedulefree", "pip install schedulefree", False, _adamw_schedule_free,
                                       schedule_free=True),
    "ProdigyPlusScheduleFree": OptimizerSpec("prodigyplus", "pip install prodigy-plus-schedule-free", False,
                                             _prodigy_plus_schedule_free, adaptive=True, schedule_free=True,
                                             state_bytes=5.0),
    "CAME": OptimizerSpec("came_pytorch", "pip install came-pytorch", False, _came, state_bytes=5.0),
    "Lion": OptimizerSpec("lion_pytorch", "pip install lion-pytorch", False, _lion, state_bytes=4.0),
}


def check_optimizer(name: str, device_type: str, schedule=None, steps: int = 0) -> None:
    """Raise ValueError when `name` cannot run here (unknown, package missing, no CUDA) or, given the
    run's LR Schedule and steps, when it cannot train under that schedule (:func:`check_schedule`)."""
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ValueError(f"Train LoRA: optimizer = {name!r} is unknown. Pick one of: {', '.join(OPTIMIZERS)}.")
    if importlib.util.find_spec(spec.module) is None:
        module = f" (module {spec.module})" if spec.module != spec.package else ""
        raise ValueError(f"Train LoRA: optimizer = {name!r} needs the package '{spec.package}'{module}, which is "
                         f"not installed in ComfyUI's Python. Run `{spec.install_hint}` with ComfyUI's Python and "
                         "restart ComfyUI, or pick AdamW.")
    if spec.needs_cuda and device_type != "cuda":
        raise ValueError(f"Train LoRA: optimizer = {name!r} runs on NVIDIA GPUs only and this ComfyUI runs "
                         f"on {device_type}. Pick AdamW (or Adafactor to save memory).")
    if schedule is not None and steps > 0:
        check_schedule(name, schedule, steps)


def check_schedule(name: str, schedule, steps: int) -> None:
    """Refuse a schedule-free optimizer under a rate that falls. Such an optimizer evaluates and saves
    the average of its iterates, which is what a decay is for: both packages ask for a constant rate
    after warmup (warmup is fine: the LR Schedule's ramps the rate as schedulefree's own warmup_steps
    would). They run under a decay, but it does not anneal what is saved as the chart suggests
    (schedulefree weights every iterate of the average by the largest rate seen, so the late small steps
    count fully), and it is nearly always the LR Schedule's default (cosine) left in place: refused before
    anything loads, with the fix. `schedule`: ScheduleSettings."""
    spec = OPTIMIZERS.get(name)
    if spec is None or not spec.schedule_free:
        return
    multipliers = schedule.multipliers(steps)
    falls = next((step for step in range(1, steps) if multipliers[step] < multipliers[step - 1]), None)
    if falls is None:
        return
    raise ValueError(f"Train LoRA: optimizer = {name!r} is schedule-free (it averages its weights itself, which "
                     f"does what a decaying rate does), but LR Schedule's scheduler = {schedule.scheduler!r} lowers "
                     f"the rate from step {falls} of {steps}. Set scheduler to constant_with_warmup (its warmup is "
                     "the optimizer's warmup) or constant, or pick AdamW / Prodigy to train with a decaying schedule.")


APPLIED_D = "lora_lab_d"   # param-group key: the d an adaptive optimizer's last step applied


def adapts_its_rate(optimizer: torch.optim.Optimizer) -> bool:
    """D-adaptation style optimizers (Prodigy, ProdigyPlusScheduleFree, D-Adaptation) keep their step
    size estimate d in every param group: they step by d x lr, not lr."""
    return bool(optimizer.param_groups) and all("d" in group for group in optimizer.param_groups)


def _step_d(group: dict) -> float:
    """The d a group's next step applies (ProdigyPlusScheduleFree's split_groups_mean: the shared one)."""
    shared = group.get("shared_d")
    return float(shared if shared is not None and group.get("split_groups") and group.get("split_groups_mean")
                 else group["d"])


def _cap_and_record_d(max_effective_lr: float) -> Callable:
    """A step pre-hook (it runs once the loop has set this step's rates): clamp d so that d x the largest
    A-matrix rate (the part rates as set, with block weights: what effective_rates charts) stays at most
    `max_effective_lr` (0 = no cap), the groups' ratios kept (LoRA+ B matrices step ratio x that); then
    record the d the step applies (an adaptive optimizer updates d inside step(), so afterwards the group
    holds the next step's)."""
    def before_step(optimizer, args, kwargs) -> None:
        groups = optimizer.param_groups
        top = max(group["lr"] for group in ([g for g in groups if g.get("matrix", "A") == "A"] or groups))
        if max_effective_lr > 0 and top > 0:
            limit = max_effective_lr / top
            for group in groups:
                group["d"] = min(group["d"], limit)
                if group.get("shared_d") is not None:
                    group["shared_d"] = min(group["shared_d"], limit)
        for group in groups:
            group[APPLIED_D] = _step_d(group)
    return before_step


def build_optimizer(name: str, groups: list[dict], weight_decay: float,
                    max_effective_lr: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer over `groups`. An adaptive one's step size d x lr is capped at `max_effective_lr`
    (0 = uncapped) and recorded for :func:`effective_rates`; other optimizers ignore the cap (warned)."""
    optimizer = OPTIMIZERS[name].build(groups, weight_decay)
    if adapts_its_rate(optimizer):
        optimizer.register_step_pre_hook(_cap_and_record_d(max_effective_lr))
    elif max_effective_lr > 0:
        logger.warning("LoRA Lab: max_effective_lr = %g is ignored: optimizer %s steps at the rate you set (the cap "
                       "bounds the step size of adaptive ones: %s).", max_effective_lr, name,
                       ", ".join(key for key, spec in OPTIMIZERS.items() if spec.adaptive))
    return optimizer


def effective_rates(optimizer: torch.optim.Optimizer) -> dict[str, float] | None:
    """The step size an adaptive optimizer really applied per trained part, d x lr, read as applied_rates
    reads the set rate (A-matrix groups, the largest block). Prodigy's d is one for all groups;
    ProdigyPlusScheduleFree's is the group's (shared, split_groups=False, as built here). None for an
    optimizer that steps at the rate it is given."""
    if not adapts_its_rate(optimizer):
        return None
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        if group.get("matrix") == "A":
            d = group.get(APPLIED_D, _step_d(group))
            rates[group["part"]] = max(rates.get(group["part"], 0.0), float(d) * float(group["lr"]))
    return rates


def is_schedule_free(optimizer: torch.optim.Optimizer | None) -> bool:
    """Schedule-free optimizers (schedulefree, ProdigyPlusScheduleFree) train at y and evaluate at x, and
    switch the parameters between them with train() / eval(); their groups carry "train_mode"."""
    return (optimizer is not None and callable(getattr(optimizer, "eval", None)) and bool(optimizer.param_groups)
            and all("train_mode" in group for group in optimizer.param_groups))


@contextlib.contextmanager
def eval_weights(optimizer: torch.optim.Optimizer | None):
    """Within the block, the parameters hold the weights to evaluate and save: a schedule-free optimizer's
    averaged x (optimizer.eval()). After it the training point y is put back bit for bit (eval() then
    train() would round), so validating, sampling or saving never changes what trains. A no-op for
    other optimizers, and when already in eval mode."""
    if not is_schedule_free(optimizer) or not all(group["train_mode"] for group in optimizer.param_groups):
        yield
        return
    parameters = [parameter for group in optimizer.param_groups for parameter in group["params"]]
    with torch.no_grad():
        training = [parameter.detach().clone() for parameter in parameters]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for parameter, value in zip(parameters, training):
                parameter.copy_(value)


def applied_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Rate per trained part read back from the optimizer: its A-matrix groups' rate (with UNet block
    weights, the largest block rate, which is the UNet rate itself when no block is up-weighted)."""
    rates: dict[str, float] = {}
    for group in optimizer.param_groups:
        if group.get("matrix") == "A":
            rates[group["part"]] = max(rates.get(group["part"], 0.0), float(group["lr"]))
    return rates
