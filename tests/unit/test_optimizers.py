"""The optimizers Train LoRA offers (training/lr/optimizers.py), without ComfyUI: the appended ones build and
train a toy LoRA, an adaptive optimizer's effective rate (d x lr) and its cap, schedule-free evaluation
weights, the schedule check, and the effective rate in the log line and on the chart."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from lora_lab.training.charts.training_chart import training_chart
from lora_lab.training.lr import optimizers
from lora_lab.training.lr.schedules import ScheduleSettings
from lora_lab.training.run.loop import StepRecord

FIRST_RELEASE = ["AdamW", "AdamW8bit", "Lion8bit", "Prodigy", "Adafactor", "SGD"]
APPENDED = ["AdamWScheduleFree", "ProdigyPlusScheduleFree", "CAME", "Lion"]
# Each CPU optimizer with a rate it trains the toy at (the adaptive ones near 1, as their docs ask).
CPU_RATES = {"AdamW": 1e-2, "SGD": 1.0, "Prodigy": 1.0, "Adafactor": 1e-2, "AdamWScheduleFree": 1e-2,
             "ProdigyPlusScheduleFree": 1.0, "CAME": 1e-2, "Lion": 1e-3}


def toy_layers(seed: int = 0):
    """One LoRA layer (A random, B zero, as injected) and the product it should learn."""
    generator = torch.Generator().manual_seed(seed)
    down = torch.nn.Parameter(torch.randn(4, 16, generator=generator) * 0.1)
    up = torch.nn.Parameter(torch.zeros(16, 4))
    return [optimizers.TrainedLayer("unet", "down", down, up)], torch.randn(16, 16, generator=generator)


def train_toy(name: str, rate: float, steps: int = 40, cap: float = 0.0, lora_plus_ratio: float = 1.0):
    """(losses, effective rates per step, optimizer, layer) of `steps` updates on the toy."""
    layers, target = toy_layers()
    layer = layers[0]
    groups = optimizers.build_param_groups(layers, {"unet": rate, "text_encoder": 0.0, "text_encoder_2": 0.0},
                                           lora_plus_ratio, lambda block: 1.0)
    optimizer = optimizers.build_optimizer(name, groups, 0.0, cap)
    losses, effective = [], []
    for _ in range(steps):
        loss = ((layer.up @ layer.down - target) ** 2).mean()
        loss.backward()
        losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        effective.append(optimizers.effective_rates(optimizer))
    return losses, effective, optimizer, layer


def installed(name: str) -> bool:
    return importlib.util.find_spec(optimizers.OPTIMIZERS[name].module) is not None


def test_appended_optimizers_come_after_the_first_release_in_the_combo():
    assert list(optimizers.OPTIMIZERS) == FIRST_RELEASE + APPENDED


@pytest.mark.parametrize("name,package", [("AdamWScheduleFree", "schedulefree"),
                                          ("ProdigyPlusScheduleFree", "prodigy-plus-schedule-free"),
                                          ("CAME", "came-pytorch"), ("Lion", "lion-pytorch"),
                                          ("Prodigy", "prodigyopt")])
def test_a_missing_package_is_refused_naming_the_pip_package(monkeypatch, name, package):
    real = importlib.util.find_spec
    module = optimizers.OPTIMIZERS[name].module
    monkeypatch.setattr(importlib.util, "find_spec", lambda wanted, *args: None if wanted == module else real(wanted))
    with pytest.raises(ValueError, match=f"optimizer = '{name}' needs the package '{package}'") as error:
        optimizers.check_optimizer(name, "cpu")
    assert f"pip install {package}" in str(error.value)


@pytest.mark.parametrize("name", list(CPU_RATES))
def test_every_cpu_optimizer_trains_the_toy_lora(name):
    if not installed(name):
        pytest.skip(f"{optimizers.OPTIMIZERS[name].package} is not installed")
    optimizers.check_optimizer(name, "cpu")
    losses, _, _, layer = train_toy(name, CPU_RATES[name], steps=60)
    assert torch.isfinite(layer.down).all() and torch.isfinite(layer.up).all()
    assert layer.up.abs().max() > 0                      # B left zero: it moved
    assert losses[-1] < 0.995 * losses[0], (losses[0], losses[-1])


@pytest.mark.parametrize("name", list(CPU_RATES))
def test_the_memory_plan_counts_each_optimizers_state_as_it_is(name):
    """OptimizerSpec.state_bytes (the memory plan's bytes of optimizer state per trained value) against the
    state the optimizer really keeps (its per-value tensors) after two steps of LoRA-shaped tensors (rank 16 of a 3072-wide layer,
    and a DoRA-magnitude-like vector): at most the spec, and within a byte of it."""
    if not installed(name):
        pytest.skip(f"{optimizers.OPTIMIZERS[name].package} is not installed")
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in ((16, 3072), (3072, 16), (3072,))]
    optimizer = optimizers.OPTIMIZERS[name].build([{"params": tensors, "lr": 1e-4}], 0.01)
    for _ in range(2):
        for tensor in tensors:
            tensor.grad = torch.randn(tensor.shape, generator=generator)
        optimizer.step()
    kept = sum(value.numel() * value.element_size() for state in optimizer.state.values()
               for value in state.values() if torch.is_tensor(value) and value.numel() > 1)   # not step counters
    per_value = kept / sum(tensor.numel() for tensor in tensors)
    assert optimizers.OPTIMIZERS[name].state_bytes - 1.0 <= per_value <= optimizers.OPTIMIZERS[name].state_bytes, per_value


@pytest.mark.parametrize("name", ["AdamW", "SGD", "AdamWScheduleFree", "CAME", "Lion"])
def test_optimizers_that_step_at_the_set_rate_have_no_effective_rate(name):
    if not installed(name):
        pytest.skip(f"{optimizers.OPTIMIZERS[name].package} is not installed")
    _, effective, optimizer, _ = train_toy(name, CPU_RATES[name], steps=2)
    assert effective == [None, None] and not optimizers.adapts_its_rate(optimizer)


@pytest.mark.parametrize("name", ["Prodigy", "ProdigyPlusScheduleFree"])
def test_the_effective_rate_is_the_d_each_step_applied_times_lr(name):
    """d changes inside step(): the chart's rate is the d the step used (read before it), not the next one."""
    if not installed(name):
        pytest.skip(f"{optimizers.OPTIMIZERS[name].package} is not installed")
    layers, target = toy_layers()
    layer = layers[0]
    groups = optimizers.build_param_groups(layers, {"unet": 0.5, "text_encoder": 0.0, "text_encoder_2": 0.0}, 1.0,
                                           lambda block: 1.0)
    optimizer = optimizers.build_optimizer(name, groups, 0.0)
    for _ in range(20):
        ((layer.up @ layer.down - target) ** 2).mean().backward()
        used = optimizer.param_groups[0]["d"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        assert optimizers.effective_rates(optimizer) == {"unet": pytest.approx(used * 0.5, rel=1e-12)}
    assert optimizer.param_groups[0]["d"] > optimizer.param_groups[0]["d0"]   # it adapted: not lr, not d0 x lr


@pytest.mark.parametrize("name", ["Prodigy", "ProdigyPlusScheduleFree"])
def test_max_effective_lr_caps_d_times_lr_and_changes_nothing_below_it(name):
    if not installed(name):
        pytest.skip(f"{optimizers.OPTIMIZERS[name].package} is not installed")
    _, free, _, _ = train_toy(name, 1.0)
    peak = max(rates["unet"] for rates in free)
    cap = peak / 3
    losses, capped, _, _ = train_toy(name, 1.0, cap=cap)
    assert max(rates["unet"] for rates in capped) == pytest.approx(cap, rel=1e-9)
    assert all(rates["unet"] <= cap * (1 + 1e-12) for rates in capped)
    assert all(np.isfinite(losses))
    # Until the free run's rate first passes the cap, the capped run is the same run.
    first = next(step for step, rates in enumerate(free) if rates["unet"] > cap)
    assert [rates["unet"] for rates in capped[:first]] == [rates["unet"] for rates in free[:first]]
    _, loose, _, _ = train_toy(name, 1.0, cap=peak * 10)
    assert loose == free


def test_the_cap_keeps_lora_plus_ratios_between_groups():
    """ProdigyPlusScheduleFree (one d here) steps B at ratio x A's rate; the cap bounds the part's (A) rate."""
    if not installed("ProdigyPlusScheduleFree"):
        pytest.skip("prodigy-plus-schedule-free is not installed")
    _, capped, optimizer, _ = train_toy("ProdigyPlusScheduleFree", 1.0, cap=1e-5, lora_plus_ratio=4.0)
    assert max(rates["unet"] for rates in capped) == pytest.approx(1e-5)
    steps = {group["matrix"]: group[optimizers.APPLIED_D] * group["lr"] for group in optimizer.param_groups}
    assert steps["B"] == pytest.approx(4.0 * steps["A"])


def test_the_cap_on_an_optimizer_that_is_not_adaptive_is_ignored_with_a_warning(caplog):
    with caplog.at_level("WARNING", logger="lora_lab"):
        _, effective, _, _ = train_toy("AdamW", 1e-2, steps=2, cap=1e-4)
    assert effective == [None, None]
    assert "max_effective_lr = 0.0001 is ignored" in caplog.text and "Prodigy" in caplog.text


def test_prodigy_refuses_groups_at_different_rates_before_training():
    if not installed("Prodigy"):
        pytest.skip("prodigyopt is not installed")
    with pytest.raises(ValueError, match="applies one rate to every trained group.*lora_plus_ratio 1.*"
                                         "ProdigyPlusScheduleFree"):
        train_toy("Prodigy", 1.0, steps=1, lora_plus_ratio=4.0)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "ProdigyPlusScheduleFree"])
def test_eval_weights_hold_the_schedule_free_average_then_give_y_back_bit_for_bit(name):
    if not installed(name):
        pytest.skip(f"{optimizers.OPTIMIZERS[name].package} is not installed")
    _, _, optimizer, layer = train_toy(name, CPU_RATES[name], steps=15)
    assert optimizers.is_schedule_free(optimizer)
    beta1 = optimizer.param_groups[0]["betas"][0]
    y = layer.down.detach().clone()
    z = optimizer.state[layer.down]["z"].float()
    with optimizers.eval_weights(optimizer):
        x = layer.down.detach().clone()
        with optimizers.eval_weights(optimizer):   # nested (already in eval mode): nothing more happens
            assert torch.equal(layer.down, x)
    torch.testing.assert_close(x, y + (1 - 1 / beta1) * (z - y), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(x, y)
    assert torch.equal(layer.down, y) and all(group["train_mode"] for group in optimizer.param_groups)


def test_eval_weights_change_nothing_for_other_optimizers():
    _, _, optimizer, layer = train_toy("AdamW", 1e-2, steps=3)
    before = layer.down.detach().clone()
    with optimizers.eval_weights(optimizer):
        assert torch.equal(layer.down, before)
    assert not optimizers.is_schedule_free(optimizer)


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "ProdigyPlusScheduleFree"])
def test_schedule_free_optimizers_refuse_a_falling_rate_naming_the_fix(name):
    with pytest.raises(ValueError, match=f"optimizer = '{name}' is schedule-free.*scheduler = 'cosine' lowers the "
                                         "rate from step 6 of 100.*constant_with_warmup"):
        optimizers.check_schedule(name, ScheduleSettings(scheduler="cosine", warmup=5.0), 100)
    for fine in (ScheduleSettings(scheduler="constant_with_warmup", warmup=10.0),
                 ScheduleSettings(scheduler="constant"),
                 ScheduleSettings(scheduler="linear", min_lr_ratio=1.0),            # floored at 1: flat
                 ScheduleSettings(scheduler="warmup_stable_decay", decay_ratio=0.0),
                 ScheduleSettings(scheduler="piecewise_constant", step_rules="0.5:10,1")):   # rises
        optimizers.check_schedule(name, fine, 100)


def test_optimizers_with_a_schedule_take_any_schedule():
    for name in ("AdamW", "Prodigy", "CAME", "Lion"):
        optimizers.check_schedule(name, ScheduleSettings(scheduler="cosine"), 100)


def test_the_log_line_carries_the_effective_rate_only_where_there_is_one():
    plain = json.loads(StepRecord(step=0, loss=0.5, lr={"unet": 1.0}).as_json())
    assert "effective_lr" not in plain
    adaptive = json.loads(StepRecord(step=0, loss=0.5, lr={"unet": 1.0}, effective_lr={"unet": 2e-4}).as_json())
    assert adaptive["effective_lr"] == {"unet": 2e-4}
    assert StepRecord(**adaptive) == StepRecord(step=0, loss=0.5, lr={"unet": 1.0}, effective_lr={"unet": 2e-4})


def test_the_training_chart_draws_the_effective_rate_beside_the_set_one():
    records = [StepRecord(step=step, loss=1.0 / (1 + step), lr={"unet": 1.0 * min(1.0, step / 5)})
               for step in range(30)]
    adaptive = [StepRecord(step=record.step, loss=record.loss, lr=record.lr,
                           effective_lr={"unet": 1e-6 * 1.5 ** record.step * record.lr["unet"]}) for record in records]
    plain_image, adaptive_image = np.asarray(training_chart(records)), np.asarray(training_chart(adaptive))
    assert plain_image.shape == adaptive_image.shape
    assert np.abs(plain_image.astype(int) - adaptive_image.astype(int)).mean() > 0.5
