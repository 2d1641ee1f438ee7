"""The LR Finder's pure parts: the exponential sweep, the validation budget, the suggestion rule, the
rates it hands to Train LoRA, and the fixed validation choices. The sweep itself runs in
tests/comfy/test_lr_finder.py."""
from __future__ import annotations

import math

import pytest

from lora_lab.training.lr.finder import (FORWARDS_PER_TRAINING_IMAGE, VALIDATION_BUDGET, FinderSettings, scaled_rates,
                                         smoothed_curve, suggest, validate_every)
from lora_lab.training.lr.rates import LearningRates
from lora_lab.training.run.train_settings import TrainSettings
from lora_lab.training.run.validation import validation_indices, validation_timesteps
from lora_lab.training.settings import SettingError, specs


def test_the_sweep_is_exponential_between_the_bounds():
    settings = FinderSettings(min_lr=1e-6, max_lr=1e-2, steps=101)
    rates = [settings.rate(step) for step in range(settings.steps)]
    assert rates[0] == pytest.approx(1e-6, rel=1e-12) and rates[-1] == pytest.approx(1e-2, rel=1e-12)
    ratios = [b / a for a, b in zip(rates, rates[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-9) == pytest.approx(10 ** (4 / 100), rel=1e-9)


def test_bounds_must_be_ordered_and_the_lora_widgets_are_train_loras():
    with pytest.raises(SettingError, match=r"LR Finder: min_lr = 0.01 must be below max_lr = 0.001"):
        FinderSettings(min_lr=1e-2, max_lr=1e-3)
    with pytest.raises(SettingError, match=r"LR Finder: optimizer = 'Adam' is unknown"):
        FinderSettings(optimizer="Adam")
    finder, train = specs(FinderSettings), specs(TrainSettings)
    for name in ("rank", "alpha", "target", "optimizer", "batch_size", "precision", "training_seed"):
        assert finder[name] == train[name], name


@pytest.mark.parametrize("size, batch", [(8, 1), (8, 4), (32, 1), (1, 16)])
def test_validation_costs_at_most_half_the_training(size, batch):
    settings = FinderSettings(batch_size=batch, steps=100)
    every = validate_every(size, settings)
    training = FORWARDS_PER_TRAINING_IMAGE * batch * every
    assert size <= VALIDATION_BUDGET * training
    assert every == 1 or size > VALIDATION_BUDGET * FORWARDS_PER_TRAINING_IMAGE * batch * (every - 1)


def test_suggestion_is_the_steepest_descent_before_the_minimum():
    settings = FinderSettings(min_lr=1e-6, max_lr=1e-1)
    rates = [10 ** (-6 + index * 0.5) for index in range(11)]                  # 1e-6 .. 1e-1
    losses = [1.0, 0.99, 0.97, 0.9, 0.7, 0.5, 0.45, 0.44, 0.6, 1.2, 3.0]        # fastest fall 1e-4 -> 3e-4
    suggestion, lowest, steepest = suggest(list(zip(rates, losses)), settings)
    assert lowest == rates[7]
    assert steepest == pytest.approx(math.sqrt(rates[3] * rates[4])) and suggestion == steepest
    assert settings.min_lr <= suggestion <= settings.max_lr
    # A curve that never falls: the minimum (its first point) / 10, kept inside the sweep.
    assert suggest([(1e-6, 0.5), (1e-5, 0.9)], settings)[0] == settings.min_lr
    assert suggest([(1e-4, 0.5), (1e-3, 0.9)], settings) == (pytest.approx(1e-5), 1e-4, None)
    assert suggest([(1e-6, 0.5)], settings) == (settings.min_lr, None, None)


def test_the_sweep_also_stops_when_the_gain_over_no_lora_is_given_back():
    from lora_lab.training.lr.finder import gave_back

    assert gave_back(1.1, lowest=0.4, baseline=1.2)          # 0.4 + 0.75 x 0.8 = 1.0 < 1.1
    assert not gave_back(0.9, lowest=0.4, baseline=1.2)
    assert not gave_back(1.25, lowest=1.19, baseline=1.2)   # no meaningful gain yet: not a stop


def test_smoothing_is_a_centred_average():
    curve = smoothed_curve([(1, 3.0), (2, 0.0), (3, 3.0), (4, 6.0)])
    assert curve == [(1, 1.5), (2, 2.0), (3, 3.0), (4, 4.5)]


def test_suggested_rates_keep_the_ratios_between_parts():
    given = LearningRates(learning_rate=1e-4, unet_lr=-1.0, text_encoder_lr=5e-5, text_encoder_2_lr=0.0,
                          lora_plus_ratio=4.0)
    scaled = scaled_rates(given, 3.0)
    assert scaled.resolved() == pytest.approx({"unet": 3e-4, "text_encoder": 1.5e-4, "text_encoder_2": 0.0})
    assert scaled.lora_plus_ratio == 4.0 and scaled.unet_lr == -1.0


def test_validation_images_and_timesteps_are_fixed_and_spread():
    assert validation_timesteps(1000, 8) == [62, 187, 312, 437, 562, 687, 812, 937]
    assert validation_timesteps(1000, 4) == [125, 375, 625, 875]
    chosen = validation_indices(10, 4)
    assert chosen == validation_indices(10, 4) and len(chosen) == 4 and chosen == sorted(set(chosen))
    assert validation_indices(3, 4) == [0, 1, 2]
