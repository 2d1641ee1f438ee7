"""Every schedule against the real diffusers / transformers schedulers, at its boundaries, and its settings.

Our schedules are plain math; the parity tests build a torch optimizer with lr = 1, step the
library's own scheduler through a run and read the rate it applied at each step. Across a grid of
totals (1 upward) and warmups (steps and percent), the values must be equal to the last bit: the
curves drive training, so any drift would change trained files.
"""
from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from diffusers.optimization import get_linear_schedule_with_warmup, get_scheduler
from transformers.optimization import (get_cosine_with_min_lr_schedule_with_warmup, get_inverse_sqrt_schedule,
                                       get_wsd_schedule)

from lora_lab.training.lr.schedules import SCHEDULER_NAMES, ScheduleSettings, parse_step_rules

REPO_ROOT = Path(__file__).resolve().parents[2]
TOTAL = 100
TOTALS = (1, 2, 3, 5, 10, 37, 100)
WARMUPS = (("steps", 0), ("steps", 1), ("steps", 3), ("steps", 10),
           ("percent", 0), ("percent", 5), ("percent", 12.5), ("percent", 50), ("percent", 100))
RATIOS = (0.0, 0.1, 0.25, 0.999)


def reference_curve(build, total: int) -> list[float]:
    """Step a real optimizer under a library scheduler and record the lr it applies (lr = 1)."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=1.0)
    scheduler = build(optimizer)
    values = [optimizer.param_groups[0]["lr"]]
    for _ in range(total - 1):  # not past the last step: diffusers' polynomial divides by zero there
        optimizer.step()
        scheduler.step()
        values.append(optimizer.param_groups[0]["lr"])
    return values


def grid(name: str, **options):
    """(settings, total, warmup steps) for every warmup x total of the grid that fits (warmup <= total)."""
    for unit, warmup in WARMUPS:
        settings = ScheduleSettings(scheduler=name, warmup=warmup, warmup_unit=unit, **options)
        for total in TOTALS:
            warmup_steps = settings.warmup_steps(total)
            if warmup_steps <= total:
                yield settings, total, warmup_steps


def assert_same_curve(ours: list[float], expected: list[float], case: str) -> None:
    """Equal step for step, bit for bit, naming the first differing step."""
    assert len(ours) == len(expected), case
    for step, (value, reference) in enumerate(zip(ours, expected)):
        assert value == reference, f"{case}, step {step}: ours {value!r}, reference {reference!r}"


def floored(ratio: float, value: float) -> float:
    """The module docstring's floor: r + (1 - r) * m."""
    return ratio + (1.0 - ratio) * value


def wsd_decay_steps(decay_ratio: float, total: int, warmup: int) -> int:
    """decay_ratio of all steps, rounded half up, at most what warmup leaves."""
    return min(int(math.floor(decay_ratio * total + 0.5)), total - warmup)


# name, our settings, and the library scheduler that defines the same curve: fn(optimizer, total, warmup).
LIBRARY_CASES = [
    ("constant", {}, lambda o, total, warmup: get_scheduler("constant", o)),
    ("constant_with_warmup", {}, lambda o, total, warmup: get_scheduler("constant_with_warmup", o,
                                                                        num_warmup_steps=warmup)),
    *[("linear", {"min_lr_ratio": ratio},  # diffusers' f_min is our floor
       lambda o, total, warmup, ratio=ratio: get_linear_schedule_with_warmup(
           o, num_warmup_steps=warmup, num_training_steps=total, f_min=ratio)) for ratio in RATIOS],
    ("cosine", {}, lambda o, total, warmup: get_scheduler("cosine", o, num_warmup_steps=warmup,
                                                          num_training_steps=total)),
    *[(name, {"min_lr_ratio": ratio},  # transformers' min_lr_rate is our floor
       lambda o, total, warmup, ratio=ratio: get_cosine_with_min_lr_schedule_with_warmup(
           o, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=ratio))
      for name in ("cosine", "cosine_with_min_lr") for ratio in RATIOS],
    *[("cosine_with_restarts", {"num_cycles": cycles},
       lambda o, total, warmup, cycles=cycles: get_scheduler(
           "cosine_with_restarts", o, num_warmup_steps=warmup, num_training_steps=total, num_cycles=cycles))
      for cycles in (1, 2, 3, 7)],
    *[("polynomial", {"power": power},
       lambda o, total, warmup, power=power: get_scheduler(
           "polynomial", o, num_warmup_steps=warmup, num_training_steps=total, power=power))
      for power in (0.5, 1.0, 2.0, 3.7)],
    *[("warmup_stable_decay", {"decay_ratio": decay_ratio},
       lambda o, total, warmup, decay_ratio=decay_ratio: get_wsd_schedule(
           o, num_warmup_steps=warmup, num_decay_steps=wsd_decay_steps(decay_ratio, total, warmup),
           num_training_steps=total))
      for decay_ratio in (0.0, 0.1, 0.2, 0.5, 1.0)],
    ("inverse_sqrt", {}, lambda o, total, warmup: get_inverse_sqrt_schedule(o, num_warmup_steps=warmup)),
    *[("piecewise_constant", {"step_rules": rules},
       lambda o, total, warmup, rules=rules: get_scheduler("piecewise_constant", o, step_rules=rules))
      for rules in ("1:10,0.1:20,0.01", "0.5", "1:1,0.3:2,0.07", " 2 : 3 , 1:50, 0 ")],
]


@pytest.mark.parametrize("name,options,build", LIBRARY_CASES,
                         ids=[f"{name}-{options}" for name, options, _ in LIBRARY_CASES])
def test_matches_library_scheduler(name, options, build):
    for settings, total, warmup in grid(name, **options):
        expected = reference_curve(lambda optimizer: build(optimizer, total, warmup), total)
        assert_same_curve(settings.multipliers(total), expected, f"{settings.describe()}, {total} steps")


@pytest.mark.parametrize("name,build", [
    ("cosine_with_restarts", lambda o, total, warmup: get_scheduler(
        "cosine_with_restarts", o, num_warmup_steps=warmup, num_training_steps=total, num_cycles=3)),
    ("polynomial", lambda o, total, warmup: get_scheduler(
        "polynomial", o, num_warmup_steps=warmup, num_training_steps=total, power=2.0)),
])
@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.999])
def test_floor_over_library_scheduler_without_one(name, build, ratio):
    """diffusers has no floor for these: ours is the library's warmup, then r + (1 - r) x the library's decay."""
    options = {"num_cycles": 3} if name == "cosine_with_restarts" else {"power": 2.0}
    for settings, total, warmup in grid(name, min_lr_ratio=ratio, **options):
        library = reference_curve(lambda optimizer: build(optimizer, total, warmup), total)
        expected = library[:warmup] + [floored(ratio, value) for value in library[warmup:]]
        assert_same_curve(settings.multipliers(total), expected, f"{settings.describe()}, {total} steps")


@pytest.mark.parametrize("ratio", [0.1, 0.25, 0.999])
@pytest.mark.parametrize("decay_ratio", [0.0, 0.2, 1.0])
def test_warmup_stable_decay_floor_matches_transformers_after_warmup(ratio, decay_ratio):
    """transformers' min_lr_ratio floors the stable and decay phases as ours does, but also lifts the warmup,
    which ours leaves at 0 -> 1."""
    for settings, total, warmup in grid("warmup_stable_decay", min_lr_ratio=ratio, decay_ratio=decay_ratio):
        def build(optimizer, floor):
            return get_wsd_schedule(optimizer, num_warmup_steps=warmup, min_lr_ratio=floor, num_training_steps=total,
                                    num_decay_steps=wsd_decay_steps(decay_ratio, total, warmup))

        unfloored = reference_curve(lambda optimizer: build(optimizer, 0.0), total)
        with_floor = reference_curve(lambda optimizer: build(optimizer, ratio), total)
        ours = settings.multipliers(total)
        case = f"{settings.describe()}, {total} steps"
        assert_same_curve(ours[:warmup], unfloored[:warmup], case)
        assert_same_curve(ours[warmup:], with_floor[warmup:], case)


@pytest.mark.parametrize("ratio", [0.0, 0.25])
def test_rex_hand_values(ratio):
    """REX has no library scheduler: (1 - z) / (1 - z / 2), z = (step - warmup) / (total - warmup), floored."""
    curve = ScheduleSettings(scheduler="rex", warmup=0, warmup_unit="steps", min_lr_ratio=ratio).multipliers(10)
    for step, value in {0: 1.0, 5: 2 / 3, 8: 1 / 3, 9: 0.1 / 0.55}.items():  # z = 0, 0.5, 0.8, 0.9
        assert curve[step] == pytest.approx(floored(ratio, value), rel=1e-12, abs=0)
    warmed = ScheduleSettings(scheduler="rex", warmup=20, warmup_unit="percent", min_lr_ratio=ratio).multipliers(10)
    assert warmed[:2] == [0.0, 0.5]                                      # 2 warmup steps, not floored
    assert warmed[2] == 1.0 and warmed[6] == pytest.approx(floored(ratio, 2 / 3), rel=1e-12, abs=0)  # z = 0.5
    assert ScheduleSettings(scheduler="rex", warmup=1, warmup_unit="steps").multipliers(1) == [0.0]


def test_rex_formula_after_warmup():
    curve = ScheduleSettings(scheduler="rex", warmup=10, warmup_unit="steps").multipliers(TOTAL)
    for step in (10, 40, 70, 99):
        progress = (step - 10) / 90
        assert curve[step] == pytest.approx((1 - progress) / (1 - progress / 2), rel=1e-12, abs=0)
    assert curve[10] == 1.0 and curve[99] < 0.03  # like diffusers, the last step is one short of the end


def settings(name: str, **overrides) -> ScheduleSettings:
    return ScheduleSettings(scheduler=name, **{"warmup": 10, "warmup_unit": "steps", **overrides})


@pytest.mark.parametrize("cycles", [1, 2, 3])
def test_cosine_with_restarts_restarts_at_full_rate(cycles):
    ours = settings("cosine_with_restarts", num_cycles=cycles).multipliers(TOTAL)
    restarts = sum(1 for before, after in zip(ours[10:], ours[11:]) if after > before + 0.5)
    assert restarts == cycles - 1


def test_polynomial_ends_at_diffusers_lr_end_not_zero():
    curve = settings("polynomial", power=1.0).multipliers(TOTAL)
    assert curve[99] == pytest.approx(1 / 90 * (1 - 1e-7) + 1e-7, rel=1e-12, abs=0)
    assert curve[10] == 1.0


def test_warmup_stable_decay_phases():
    ours = settings("warmup_stable_decay", decay_ratio=0.2).multipliers(TOTAL)
    assert ours[10:80] == [1.0] * 70  # the stable phase
    assert ours[80] == 1.0 and ours[81] < 1.0 and ours[99] < 0.01


def test_piecewise_constant_rules():
    ours = ScheduleSettings(scheduler="piecewise_constant", step_rules="1:10,0.1:20,0.01").multipliers(TOTAL)
    assert ours[9] == 1.0 and ours[10] == 0.1 and ours[19] == 0.1 and ours[20] == 0.01 and ours[99] == 0.01


def test_constant_ignores_warmup_and_says_so():
    schedule = ScheduleSettings(scheduler="constant", warmup=10)
    assert schedule.multipliers(TOTAL) == [1.0] * TOTAL
    assert schedule.warmup_steps(TOTAL) == 0
    assert "constant_with_warmup" in schedule.ignored_note()


@pytest.mark.parametrize("name", [n for n in SCHEDULER_NAMES if n not in ("constant", "piecewise_constant")])
def test_boundaries_step0_end_of_warmup(name):
    curve = settings(name).multipliers(TOTAL)
    assert curve[0] == 0.0                        # warmup starts at 0
    assert curve[5] == 0.5                        # linear ramp
    assert curve[10] == 1.0                       # full rate right after warmup
    assert all(0.0 <= value <= 1.0 for value in curve)


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "cosine_with_min_lr",
                                  "warmup_stable_decay", "rex"])
@pytest.mark.parametrize("ratio", [0.25, 0.999])
def test_min_lr_ratio_floor(name, ratio):
    base = settings(name).multipliers(TOTAL)
    lifted = settings(name, min_lr_ratio=ratio).multipliers(TOTAL)
    assert lifted[:10] == base[:10]                                          # warmup untouched
    assert lifted[10:] == [floored(ratio, value) for value in base[10:]]     # r + (1 - r) x m, bit for bit
    assert min(lifted[10:]) >= ratio


def test_warmup_percent_rounds_half_up():
    schedule = ScheduleSettings(scheduler="linear", warmup=5, warmup_unit="percent")
    assert schedule.warmup_steps(1000) == 50
    assert schedule.warmup_steps(10) == 1     # 0.5 -> 1
    assert schedule.warmup_steps(9) == 0      # 0.45 -> 0
    assert ScheduleSettings(scheduler="linear", warmup=25, warmup_unit="percent").warmup_steps(10) == 3  # 2.5 -> 3
    assert ScheduleSettings(scheduler="linear", warmup=12.5, warmup_unit="percent").warmup_steps(20) == 3


def test_warmup_stable_decay_decay_ratio_rounds_half_up():
    """decay_ratio 0.25 of 10 steps = 2.5 -> 3 decay steps (7, 8, 9), after a stable phase at exactly 1."""
    curve = ScheduleSettings(scheduler="warmup_stable_decay", warmup=0, warmup_unit="steps",
                             decay_ratio=0.25).multipliers(10)
    assert curve[:8] == [1.0] * 8
    assert curve[8] == pytest.approx(0.75, rel=1e-12, abs=0)  # 0.5 (1 + cos(pi / 3))


def test_last_step_and_out_of_range_steps_are_clamped():
    schedule = settings("cosine")
    assert schedule.multiplier(TOTAL - 1, TOTAL) == schedule.multipliers(TOTAL)[-1]
    assert schedule.multiplier(TOTAL + 50, TOTAL) == schedule.multipliers(TOTAL)[-1]
    assert schedule.multiplier(-3, TOTAL) == 0.0
    assert [schedule.multiplier(step, TOTAL) for step in range(TOTAL)] == schedule.multipliers(TOTAL)


def test_schedules_are_plain_math_without_torch_or_scheduler_libraries():
    """Training, chart and preview compute the curves with no torch, diffusers or transformers import."""
    code = textwrap.dedent(f"""
        import sys, types
        package = types.ModuleType("lora_lab")
        package.__path__ = [{str(REPO_ROOT)!r}]
        sys.modules["lora_lab"] = package
        from lora_lab.training.lr.schedules import SCHEDULER_NAMES, ScheduleSettings
        for name in SCHEDULER_NAMES:
            ScheduleSettings(scheduler=name, step_rules="1:10,0.1").multipliers(50)
        print(sorted(name for name in ("torch", "diffusers", "transformers") if name in sys.modules))
    """)
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "[]"


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
        ScheduleSettings.from_values(values)
    message = str(raised.value)
    assert message.startswith("LR Schedule:") and fragment in message
    assert any(word in message for word in ("Use", "Write", "Pick", "must", "Lower"))


def test_warmup_longer_than_training():
    schedule = ScheduleSettings(scheduler="cosine", warmup=200, warmup_unit="steps")
    with pytest.raises(ValueError, match=r"warmup = 200 steps is longer than training \(100 steps\)"):
        schedule.multipliers(100)
    with pytest.raises(ValueError, match=r"warmup = 200 steps is longer than training \(100 steps\)"):
        schedule.multiplier(0, 100)
    assert len(schedule.multipliers(200)) == 200


def test_parse_step_rules():
    assert parse_step_rules("1:10, 0.1:20, 0.01") == ([(1.0, 10), (0.1, 20)], 0.01)
    assert parse_step_rules("0.5") == ([], 0.5)
    with pytest.raises(ValueError, match="last item"):
        parse_step_rules("1:10,0.1:20")


def test_inverse_sqrt_without_warmup_uses_10000_timescale():
    curve = ScheduleSettings(scheduler="inverse_sqrt", warmup=0, warmup_unit="steps").multipliers(20000)
    assert curve[0] == 1.0
    assert curve[19999] == pytest.approx(1 / math.sqrt(19999 / 10000 + 1), rel=1e-12, abs=0)
