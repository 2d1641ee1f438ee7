"""Rate resolution rules: inherit (-1), frozen (0), explicit; LoRA+ and block weights."""
from __future__ import annotations

import pytest

from lora_lab.training.lr.rates import LearningRates, parse_block_weights
from lora_lab.training.lr.schedules import ScheduleSettings


def test_defaults_resolve_like_kohya():
    assert LearningRates().resolved() == {"unet": 1e-4, "text_encoder": 5e-5, "text_encoder_2": 5e-5}


def test_inherit_frozen_and_explicit():
    rates = LearningRates(learning_rate=2e-4, unet_lr=-1, text_encoder_lr=-1, text_encoder_2_lr=0)
    assert rates.resolved() == {"unet": 2e-4, "text_encoder": 2e-4, "text_encoder_2": 0.0}
    assert rates.trained_parts() == ["unet", "text_encoder"]
    rates = LearningRates(learning_rate=1e-4, unet_lr=3e-4, text_encoder_lr=0, text_encoder_2_lr=-1)
    assert rates.resolved() == {"unet": 3e-4, "text_encoder": 0.0, "text_encoder_2": 0.0}
    rates = LearningRates(text_encoder_lr=1e-5, text_encoder_2_lr=2e-5)
    assert rates.resolved()["text_encoder_2"] == 2e-5


@pytest.mark.parametrize("field", ["unet_lr", "text_encoder_lr", "text_encoder_2_lr"])
def test_negative_other_than_minus_one_is_an_error(field):
    with pytest.raises(ValueError, match=rf"{field} = -0.5 is not allowed. Use -1 to inherit, 0 to freeze"):
        LearningRates(**{field: -0.5})


def test_all_frozen_summary_says_nothing_trains():
    rates = LearningRates(learning_rate=0, unet_lr=-1, text_encoder_lr=0)
    assert rates.trained_parts() == []
    assert "Nothing is trained" in rates.summary()


def test_summary_names_every_part():
    summary = LearningRates(text_encoder_lr=0, lora_plus_ratio=16, unet_block_weights="up=2").summary()
    assert "UNet: 0.0001 (inherits learning_rate)" in summary
    assert "TE: frozen" in summary
    assert "LoRA+" in summary and "16x" in summary
    assert "up x2" in summary


def test_block_weights_parse():
    assert parse_block_weights("") == {"down": 1.0, "mid": 1.0, "up": 1.0}
    assert parse_block_weights("down=0.5, up=1.5") == {"down": 0.5, "mid": 1.0, "up": 1.5}
    for bad, fragment in [("middle=1", "'middle=1' is not 'block=weight'"), ("down=x", "'x' is not a number"),
                          ("down=1,down=2", "down is given twice"), ("up=-1", "must be >= 0")]:
        with pytest.raises(ValueError, match=fragment):
            parse_block_weights(bad)


def test_part_curves_follow_the_schedule():
    schedule = ScheduleSettings(scheduler="linear", warmup=2, warmup_unit="steps")
    curves = LearningRates(learning_rate=1e-4, text_encoder_lr=0).part_curves(schedule, 10)
    assert set(curves) == {"unet"}
    multipliers = schedule.multipliers(10)
    assert curves["unet"] == pytest.approx([1e-4 * value for value in multipliers])


def test_rates_from_values_takes_defaults_and_converts_numbers():
    assert LearningRates.from_values({}) == LearningRates()
    assert LearningRates.from_values({"learning_rate": "0.001"}).learning_rate == 0.001
    with pytest.raises(ValueError, match="UNet/TE Learning Rates: learning_rate = 'fast' must be a number"):
        LearningRates.from_values({"learning_rate": "fast"})
