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

from ..charts.parts import PART_LABELS
from ..settings import NodeSettings, SettingError, setting, validate
from .schedules import ScheduleSettings

PARTS = ("unet", "text_encoder", "text_encoder_2")
BLOCKS = ("down", "mid", "up")
INHERIT = -1.0



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
            raise SettingError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: {item!r} is not "
                             f"'block=weight'. {fix}")
        if name in seen:
            raise SettingError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: {name} is given twice. {fix}")
        try:
            weight = float(value)
        except ValueError:
            raise SettingError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: {value!r} is not a "
                             f"number. {fix}") from None
        if not math.isfinite(weight) or weight < 0:
            raise SettingError(f"UNet/TE Learning Rates: unet_block_weights = {text!r}: weight {value} must be "
                             f">= 0 (0 freezes that block). {fix}")
        weights[name] = weight
        seen.add(name)
    return weights


RATE_RULE = " -1 = inherit, 0 = frozen (not trained, no keys in the file), > 0 = the rate."
RATE_WIDGET = {"min": -1.0, "max": 10.0, "step": 1e-6, "round": False}


def _inherit_rule(value: float) -> str | None:
    if value < 0 and value != INHERIT:
        return "is not allowed. Use -1 to inherit, 0 to freeze that part, or a positive rate."
    return None


def _block_weights_rule(text: str) -> None:
    parse_block_weights(text)   # raises naming the item and the syntax


@dataclass(frozen=True)
class LearningRates(NodeSettings):
    """The LORA_LEARNING_RATES socket value (the UNet/TE Learning Rates node's widgets; each field is the
    one source of its default, range and help). Rates are per optimizer step, before the schedule."""

    TITLE = "UNet/TE Learning Rates"

    learning_rate: float = setting(1e-4, "Global rate per optimizer step; UNet and TE inherit it when set to -1. "
                                         "1e-4 is a common LoRA rate with AdamW.",
                                   **{**RATE_WIDGET, "min": 0.0}, hint="(1e-4 is a common LoRA rate)")
    unet_lr: float = setting(-1.0, "UNet rate." + RATE_RULE + " -1 inherits learning_rate.", **RATE_WIDGET,
                             check=_inherit_rule)
    text_encoder_lr: float = setting(5e-5, "Text encoder rate (SDXL: CLIP-L)." + RATE_RULE + " -1 inherits "
                                           "learning_rate. Usually lower than the UNet's: the encoder overfits fast.",
                                     **RATE_WIDGET, check=_inherit_rule)
    text_encoder_2_lr: float = setting(-1.0, "SDXL's second text encoder (CLIP-G); ignored for SD1.x/2.x." + RATE_RULE
                                             + " -1 inherits text_encoder_lr.", **RATE_WIDGET, check=_inherit_rule)
    lora_plus_ratio: float = setting(1.0, "LoRA+: the B (lora_up) matrices train at this multiple of the part's "
                                          "rate. 1 = off; 16 is the paper's suggestion.", min=0.01, max=1000.0,
                                     step=0.5, hint="(1 = off; LoRA+ papers use 16)")
    unet_block_weights: str = setting("", "Scale the UNet rate per block, e.g. 'down=0.5,mid=1,up=1.5' (any subset; "
                                          "empty = all 1; 0 freezes a block).", check=_block_weights_rule)

    def __post_init__(self) -> None:
        validate(self, self.TITLE)

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

