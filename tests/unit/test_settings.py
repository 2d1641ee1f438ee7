"""Settings dataclasses are the one source of each widget: their fields validate themselves, with
errors that name the node, the input, the value and the fix, as SettingError."""
from __future__ import annotations

import pytest

from lora_lab.training.data.dataset import DatasetOptions
from lora_lab.training.lr.finder import FinderSettings
from lora_lab.training.lr.rates import LearningRates
from lora_lab.training.lr.schedules import ScheduleSettings
from lora_lab.training.run.train_settings import RunOptions, TrainSettings
from lora_lab.training.settings import SettingError, specs


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, r"Train LoRA: steps = 0 must be at least 1\."),
    ({"steps": 2_000_000}, r"steps = 2000000 must be at most 1e\+06"),
    ({"alpha": 0.0}, r"alpha = 0\.0 must be at least 0\.01 \(alpha = rank gives scale 1\)"),
    ({"alpha": float("nan")}, r"alpha = nan must be a finite number"),
    ({"rank": 2.5}, r"rank = 2\.5 must be a whole number"),
    ({"target": "everything"}, r"target = 'everything' is unknown\. Use one of: attention, attention_ff"),
    ({"optimizer": "Adam"}, r"optimizer = 'Adam' is unknown\. Use one of: AdamW"),
    ({"precision": "fp8"}, r"precision = 'fp8' is unknown\. Use one of: bf16, fp16, fp32"),
    ({"save_precision": "int8"}, r"save_precision = 'int8' is unknown"),
    ({"use_dora": "yes"}, r"use_dora = 'yes' must be true or false"),
    ({"weight_decay": -0.1}, r"weight_decay = -0\.1 must be at least 0"),
    ({"max_grad_norm": float("inf")}, r"max_grad_norm = inf must be a finite number"),
    ({"lora_name": "../escape"}, r"lora_name"),
])
def test_train_settings_refuse_bad_values_naming_input_value_and_fix(values, message):
    with pytest.raises(ValueError, match=message):
        TrainSettings(**values)


def test_every_setting_has_help_and_its_default_passes_its_own_checks():
    for cls in (TrainSettings, RunOptions, LearningRates, ScheduleSettings, DatasetOptions):
        declared = specs(cls)
        assert declared, cls
        for name, (default, spec) in declared.items():
            assert spec.help.strip(), (cls.__name__, name)
            if spec.choices is not None:
                assert default in spec.choices, (cls.__name__, name)
            if spec.min is not None and isinstance(default, (int, float)):
                assert spec.min <= default <= spec.max, (cls.__name__, name)
    TrainSettings(), RunOptions(), LearningRates(), ScheduleSettings(), DatasetOptions()


@pytest.mark.parametrize("values, message", [
    ({"unet_lr": -0.5}, r"unet_lr = -0\.5 is not allowed\. Use -1 to inherit, 0 to freeze"),
    ({"text_encoder_lr": -3.0}, r"text_encoder_lr = -3\.0 is not allowed\. Use -1 to inherit"),
    ({"learning_rate": -1.0}, r"learning_rate = -1\.0 must be at least 0 \(1e-4 is a common LoRA rate\)"),
    ({"lora_plus_ratio": 0.0}, r"lora_plus_ratio = 0\.0 must be at least 0\.01 \(1 = off"),
    ({"unet_block_weights": "down=x"}, r"unet_block_weights = 'down=x': 'x' is not a number"),
    ({"learning_rate": "fast"}, r"UNet/TE Learning Rates: learning_rate = 'fast' must be a number \(default 0\.0001\)"),
])
def test_rates_errors_are_setting_errors(values, message):
    with pytest.raises(SettingError, match=message):
        LearningRates.from_values(values)


def test_inherit_and_freeze_values_pass():
    rates = LearningRates(learning_rate=1e-4, unet_lr=-1.0, text_encoder_lr=0.0, text_encoder_2_lr=-1.0)
    assert rates.resolved() == {"unet": 1e-4, "text_encoder": 0.0, "text_encoder_2": 0.0}


NODE_SETTINGS = [(TrainSettings, "Train LoRA", "steps", 7), (RunOptions, "Train LoRA", "sample_every_n_steps", 3),
                 (FinderSettings, "LR Finder", "steps", 20), (LearningRates, "UNet/TE Learning Rates", "learning_rate", 2e-4),
                 (ScheduleSettings, "LR Schedule", "num_cycles", 2), (DatasetOptions, "LoRA Dataset", "repeats", 4)]


@pytest.mark.parametrize("cls, title, name, value", NODE_SETTINGS)
def test_from_values_takes_defaults_for_missing_values_and_converts_numbers(cls, title, name, value):
    assert cls.from_values({}) == cls()
    assert cls.from_values({name: None}) == cls()   # a linked widget that gave nothing
    assert getattr(cls.from_values({name: value}), name) == value
    assert getattr(cls.from_values({name: str(value)}), name) == value   # a number in an HTTP body's text
    converted = cls.from_values({name: float(value)})
    assert getattr(converted, name) == value and type(getattr(converted, name)) is type(getattr(cls(), name))


@pytest.mark.parametrize("cls, title, name, value", NODE_SETTINGS)
def test_from_values_refuses_an_unknown_input_and_a_non_number_naming_them(cls, title, name, value):
    with pytest.raises(SettingError, match=rf"^{title}: stpes = 5 is not an input of this node\. Use one of: .*{name}"):
        cls.from_values({"stpes": 5})
    assert cls.from_values({name: value, "stpes": 5}, others=["stpes"]) == cls.from_values({name: value})
    with pytest.raises(SettingError, match=rf"^{title}: {name} = 'many' must be a number \(default "):
        cls.from_values({name: "many"})


def test_from_values_leaves_wrong_types_to_the_settings_checks():
    with pytest.raises(SettingError, match=r"Train LoRA: rank = 2\.5 must be a whole number"):
        TrainSettings.from_values({"rank": 2.5})
    with pytest.raises(SettingError, match=r"Train LoRA: use_dora = 1 must be true or false"):
        TrainSettings.from_values({"use_dora": 1})
    with pytest.raises(SettingError, match=r"LR Finder: batch_size = True must be a number"):
        FinderSettings.from_values({"batch_size": True})
    with pytest.raises(SettingError, match=r"LR Schedule: scheduler = 'cosin' is unknown\. Use one of: "):
        ScheduleSettings.from_values({"scheduler": "cosin"})
