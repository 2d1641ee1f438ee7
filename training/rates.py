"""Learning rates per trained part: global / UNet / text encoder(s), LoRA+ and UNet block weights.

Rules (kohya sd-scripts' conventions, with an explicit "inherit" value):
    -1  inherit: UNet and TE from the global rate, TE2 (SDXL's second encoder) from TE
     0  frozen: the part is not trained and the LoRA file has no keys for it
    >0  the rate itself
LoRA+ (Hayou et al. 2024, "LoRA+: Efficient Low Rank Adaptation of Large Models") trains each B
(lora_up) matrix at `lora_plus_ratio` x the A (lora_down) rate; 1 turns it off.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .schedules import ScheduleSettings

PARTS = ("unet", "text_encoder", "text_encoder_2")
PART_LABELS = {"unet": "UNet", "text_encoder": "TE", "text_encoder_2": "TE2 (SDXL)"}
BLOCKS = ("down", "mid", "up")
INHERIT = -1.0

DEFAULTS = {
    "learning_rate": 1e-4, "unet_lr": -1.0, "text_encoder_lr": 5e-5, "text_encoder_2_lr": -1.0,
    "lora_plus_ratio": 1.0, "unet_block_weights": "",
}


def parse_block_weights(text: str) -> dict[str, float]:
    """Parse "down=0.5,mid=1,up=1.5" (any subset, any order) -> {"down": 0.5, "mid": 1.0, "up": 1.5}.

    Blocks left out weigh 1. Raises ValueError naming the bad item and the accepted syntax.
    """
    fix = 'Write e.g. "down=0.5,mid=1,up=1.5" (blocks: down, mid, up; weights >= 0; empty = all 1).'
    weights = {block: 1.0 for block in BLOCKS}
    seen: set[str] = set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, separator, value = (piece.strip() for piece in item.partition("="))
        if not separator or name not in BLOCKS:
            raise ValueError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: {item!r} is not "
                             f"'block=weight'. {fix}")
        if name in seen:
            raise ValueError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: {name} is given twice. {fix}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: {value!r} is not a "
                             f"number. {fix}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: weight {value} must be "
                             f">= 0 (0 freezes that block). {fix}")
        weights[name] = weight
        seen.add(name)
    return weights


@dataclass(frozen=True)
class LearningRates:
    """The LORA_LEARNING_RATES socket value. Rates are per optimizer step, before the schedule."""

    learning_rate: float = 1e-4       # global rate; UNet and TE inherit it when set to -1
    unet_lr: float = -1.0             # UNet rate (-1 inherit global, 0 frozen)
    text_encoder_lr: float = 5e-5     # text encoder (SDXL: CLIP-L) rate (-1 inherit global, 0 frozen)
    text_encoder_2_lr: float = -1.0   # SDXL's second encoder (CLIP-G) rate (-1 inherit TE, 0 frozen)
    lora_plus_ratio: float = 1.0      # B-matrix rate multiplier (LoRA+); 1 = off
    unet_block_weights: str = ""      # "down=0.5,mid=1,up=1.5" scales UNet block rates; "" = all 1

    def __post_init__(self) -> None:
        if not math.isfinite(self.learning_rate) or self.learning_rate < 0:
            raise ValueError(f"UNet/TE Learning Rates: learning_rate = {self.learning_rate} must be >= 0 "
                             "(1e-4 is a common LoRA rate).")
        for name in ("unet_lr", "text_encoder_lr", "text_encoder_2_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or (value < 0 and value != INHERIT):
                raise ValueError(f"UNet/TE Learning Rates: {name} = {value} is not allowed. Use -1 to inherit, "
                                 "0 to freeze that part, or a positive rate.")
        if not math.isfinite(self.lora_plus_ratio) or self.lora_plus_ratio <= 0:
            raise ValueError(f"UNet/TE Learning Rates: lora_plus_ratio = {self.lora_plus_ratio} must be > 0 "
                             "(1 = off; LoRA+ papers use 16).")
        parse_block_weights(self.unet_block_weights)

    def resolved(self) -> dict[str, float]:
        """Base rate of each part after the inherit rules; 0.0 means frozen."""
        unet = self.learning_rate if self.unet_lr == INHERIT else self.unet_lr
        text_encoder = self.learning_rate if self.text_encoder_lr == INHERIT else self.text_encoder_lr
        text_encoder_2 = text_encoder if self.text_encoder_2_lr == INHERIT else self.text_encoder_2_lr
        return {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}

    def trained_parts(self) -> list[str]:
        return [part for part, rate in self.resolved().items() if rate > 0]

    def block_weights(self) -> dict[str, float]:
        return parse_block_weights(self.unet_block_weights)

    def block_weight(self, block: str) -> float:
        return self.block_weights()[block]

    def part_curves(self, schedule: ScheduleSettings, total_steps: int) -> dict[str, list[float]]:
        """Absolute rate per step for each trained part (A matrices; B = x lora_plus_ratio)."""
        multipliers = schedule.multipliers(total_steps)
        return {part: [rate * multiplier for multiplier in multipliers]
                for part, rate in self.resolved().items() if rate > 0}

    def summary(self) -> str:
        """Human-readable resolution of every part (the node's STRING output)."""
        resolved = self.resolved()
        sources = {
            "unet": "inherits learning_rate" if self.unet_lr == INHERIT else "unet_lr",
            "text_encoder": "inherits learning_rate" if self.text_encoder_lr == INHERIT else "text_encoder_lr",
            "text_encoder_2": "inherits the TE rate" if self.text_encoder_2_lr == INHERIT else "text_encoder_2_lr",
        }
        lines = []
        for part in PARTS:
            rate = resolved[part]
            state = "frozen (not trained, no keys in the file)" if rate == 0 else f"{rate:.3g}"
            note = " - SDXL only; ignored for SD1.x/2.x" if part == "text_encoder_2" else ""
            lines.append(f"{PART_LABELS[part]}: {state} ({sources[part]}){note}")
        if self.lora_plus_ratio != 1.0:
            lines.append(f"LoRA+: B (lora_up) matrices train at {self.lora_plus_ratio:g}x the rates above")
        weights = self.block_weights()
        if any(weight != 1.0 for weight in weights.values()):
            lines.append("UNet block weights: " + ", ".join(f"{block} x{weight:g}" for block, weight in weights.items()))
        if not self.trained_parts():
            lines.append("Nothing is trained: every rate resolves to 0. Set learning_rate or a part's rate > 0.")
        return "\n".join(lines)


def rates_from_values(values: dict) -> LearningRates:
    """Build rates from widget values (missing keys take the node's defaults)."""
    merged = {**DEFAULTS, **{key: value for key, value in values.items() if key in DEFAULTS}}
    try:
        return LearningRates(
            learning_rate=float(merged["learning_rate"]), unet_lr=float(merged["unet_lr"]),
            text_encoder_lr=float(merged["text_encoder_lr"]), text_encoder_2_lr=float(merged["text_encoder_2_lr"]),
            lora_plus_ratio=float(merged["lora_plus_ratio"]), unet_block_weights=str(merged["unet_block_weights"]))
    except (TypeError, ValueError) as error:
        if str(error).startswith("UNet/TE"):
            raise
        raise ValueError(f"UNet/TE Learning Rates: a setting has the wrong type ({error}). Values: {values}") from None
