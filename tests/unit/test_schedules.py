"""Every schedule at its boundaries and against the diffusers / transformers reference."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers.optimization import get_scheduler
from transformers.optimization import (get_cosine_with_min_lr_schedule_with_warmup, get_inverse_sqrt_schedule,
                                       get_wsd_schedule)

from lora_lab.training.schedules import SCHEDULER_NAMES, ScheduleSettings, parse_step_rules, settings_from_values

TOTAL = 100


def reference_curve(build, total: int = TOTAL) -> list[float]:
    """Step a real optimizer under a library scheduler and record the lr it applies (lr = 1)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build(optimizer)
    values = []
    for _ in range(total):
        values.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return values


def settings(name: str, **overrides) -> ScheduleSettings:
    return ScheduleSettings(scheduler=name, **{"warmup": 10, "warmup_unit": "steps", **overrides})


@pytest.mark.parametrize("name,build", [
    ("constant_with_warmup", lambda o: get_scheduler("constant_with_warmup", o, num_warmup_steps=10)),
    ("linear", lambda o: get_scheduler("linear", o, num_warmup_steps=10, num_training_steps=TOTAL)),
    ("cosine", lambda o: get_scheduler("cosine", o, num_warmup_steps=10, num_training_steps=TOTAL)),
    ("cosine_with_min_lr", lambda o: get_cosine_with_min_lr_schedule_with_warmup(
        o, num_warmup_steps=10, num_training_steps=TOTAL, min_lr_rate=0.0)),
    ("inverse_sqrt", lambda o: get_inverse_sqrt_schedule(o, num_warmup_steps=10)),
])
def test_matches_library_reference(name, build):
    assert settings(name).multipliers(TOTAL) == pytest.approx(reference_curve(build), abs=1e-12)


@pytest.mark.parametrize("cycles", [1, 2, 3])
def test_cosine_with_restarts_matches_diffusers_hard_restarts(cycles):
    expected = reference_curve(lambda o: get_scheduler("cosine_with_restarts", o, num_warmup_steps=10,
                                                       num_training_steps=TOTAL, num_cycles=cycles))
    ours = settings("cosine_with_restarts", num_cycles=cycles).multipliers(TOTAL)
    assert ours == pytest.approx(expected, abs=1e-12)
    # Each cycle restarts at the full rate: count the jumps back up.
    restarts = sum(1 for before, after in zip(ours[10:], ours[11:]) if after > before + 0.5)
    assert restarts == cycles - 1


@pytest.mark.parametrize("power", [0.5, 1.0, 2.0])
def test_polynomial_matches_diffusers_within_its_lr_end(power):
    expected = reference_curve(lambda o: get_scheduler("polynomial", o, num_warmup_steps=10,
                                                       num_training_steps=TOTAL, power=power))
    assert settings("polynomial", power=power).multipliers(TOTAL) == pytest.approx(expected, abs=1e-7)


def test_warmup_stable_decay_matches_transformers():
    expected = reference_curve(lambda o: get_wsd_schedule(o, num_warmup_steps=10, num_decay_steps=20,
                                                          num_training_steps=TOTAL))
    ours = settings("warmup_stable_decay", decay_ratio=0.2).multipliers(TOTAL)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert ours[10:80] == [1.0] * 70  # the stable phase
    assert ours[81] < 1.0


def test_piecewise_constant_matches_diffusers():
    rules = "1:10,0.1:20,0.01"
    expected = reference_curve(lambda o: get_scheduler("piecewise_constant", o, step_rules=rules))
    ours = ScheduleSettings(scheduler="piecewise_constant", step_rules=rules).multipliers(TOTAL)
    assert ours == pytest.approx(expected, abs=1e-12)
    assert ours[9] == 1.0 and ours[10] == pytest.approx(0.1) and ours[20] == pytest.approx(0.01)


def test_constant_ignores_warmup_and_says_so():
    schedule = ScheduleSettings(scheduler="constant", warmup=10)
    assert schedule.multipliers(TOTAL) == [1.0] * TOTAL
    assert schedule.warmup_steps(TOTAL) == 0
    assert "constant_with_warmup" in schedule.ignored_note()


def test_rex_formula_after_warmup():
    curve = settings("rex").multipliers(TOTAL)
    for step in (10, 40, 70, 99):
        progress = (step - 10) / 90
        assert curve[step] == pytest.approx((1 - progress) / (1 - progress / 2))
    assert curve[10] == 1.0 and curve[99] < 0.03  # like diffusers, the last step is one short of the end


@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if n not in ("constant", "piecewise_constant")])
def test_boundaries_step0_end_of_warmup(name):
    curve = settings(name).multipliers(TOTAL)
    assert curve[0] == 0.0                        # warmup starts at 0
    assert curve[5] == pytest.approx(0.5)         # linear ramp
    assert curve[10] == pytest.approx(1.0)        # full rate right after warmup
    assert all(0.0 <= value <= 1.0 + 1e-12 for value in curve)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr",
                                  "warmup_stable_decay", "rex"])
def test_min_lr_ratio_floor(name):
    base = settings(name).multipliers(TOTAL)
    floored = settings(name, min_lr_ratio=0.25).multipliers(TOTAL)
    assert floored[:10] == base[:10]                        # warmup untouched
    for plain, lifted in zip(base[10:], floored[10:]):
        assert lifted == pytest.approx(0.25 + 0.75 * plain, abs=1e-6)
    assert min(floored[10:]) >= 0.25 - 1e-9


def test_warmup_percent_rounds_half_up():
    schedule = ScheduleSettings(scheduler="linear", warmup=5, warmup_unit="percent")
    assert schedule.warmup_steps(1000) == 50
    assert schedule.warmup_steps(10) == 1     # 0.5 -> 1
    assert schedule.warmup_steps(9) == 0      # 0.45 -> 0


def test_last_step_and_out_of_range_steps_are_clamped():
    schedule = settings("cosine")
    assert schedule.multiplier(TOTAL - 1, TOTAL) == schedule.multipliers(TOTAL)[-1]
    assert schedule.multiplier(TOTAL + 50, TOTAL) == schedule.multipliers(TOTAL)[-1]
    assert schedule.multiplier(-3, TOTAL) == 0.0


@pytest.mark.parametrize("values,fragment", [
    ({"min_lr_ratio": 1.5}, "min_lr_ratio = 1.5"),
    ({"min_lr_ratio": -0.1}, "min_lr_ratio = -0.1"),
    ({"num_cycles": 0}, "num_cycles = 0"),
    ({"warmup": 150, "warmup_unit": "percent"}, "warmup = 150.0%"),
    ({"warmup": -1}, "warmup = -1"),
    ({"scheduler": "piecewise_constant", "step_rules": "1:10,oops"}, "step_rules"),
    ({"scheduler": "piecewise_constant", "step_rules": "1:20,0.5:10,0.1"}, "steps must increase"),
    ({"scheduler": "piecewise_constant", "step_rules": ""}, "step_rules is empty"),
    ({"scheduler": "cosine_annealing"}, "scheduler = 'cosine_annealing'"),
    ({"power": 0}, "power = 0"),
])
def test_invalid_settings_name_the_input_value_and_fix(values, fragment):
    with pytest.raises(ValueError) as raised:
        settings_from_values(values)
    message = str(raised.value)
    assert message.startswith("LR Schedule:") and fragment in message
    assert any(word in message for word in ("Use", "Write", "Pick", "must", "Lower"))


def test_warmup_longer_than_training():
    schedule = ScheduleSettings(scheduler="cosine", warmup=200, warmup_unit="steps")
    with pytest.raises(ValueError, match=r"warmup = 200 steps is longer than training \(100 steps\)"):
        schedule.multipliers(100)
    assert len(schedule.multipliers(200)) == 200


def test_parse_step_rules():
    assert parse_step_rules("1:10, 0.1:20, 0.01") == ([(1.0, 10), (0.1, 20)], 0.01)
    assert parse_step_rules("0.5") == ([], 0.5)
    with pytest.raises(ValueError, match="last item"):
        parse_step_rules("1:10,0.1:20")


def test_inverse_sqrt_without_warmup_uses_10000_timescale():
    curve = ScheduleSettings(scheduler="inverse_sqrt", warmup=0, warmup_unit="steps").multipliers(20000)
    assert curve[0] == 1.0
    assert curve[19999] == pytest.approx(1 / math.sqrt(19999 / 10000 + 1))
