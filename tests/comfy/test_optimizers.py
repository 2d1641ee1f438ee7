"""The appended optimizers through the real Train LoRA node (tiny SD1.5 checkpoint, fp32 on CPU, a few
steps): each trains and its file loads; an adaptive optimizer logs and charts the step it took (d x lr)
and max_effective_lr caps it; a schedule-free one saves, validates and samples its averaged weights and
refuses a decaying LR Schedule."""
from __future__ import annotations

import json

import pytest
import torch

from .test_train import (checkpoint, dataset, loaded, probe, rates, read_lora, schedule,  # noqa: F401
                         stock_lora_loader, train_outputs, unet_outputs)

APPENDED = ["AdamWScheduleFree", "ProdigyPlusScheduleFree", "CAME", "Lion"]
# A rate each moves the tiny model with in a few steps (the adaptive one near 1, as its docs ask).
RATES = {"AdamWScheduleFree": 3e-3, "ProdigyPlusScheduleFree": 1.0, "CAME": 1e-3, "Lion": 3e-4}


def log_lines(comfy, lora_name: str) -> list[dict]:
    path = comfy.output_dir / "lora_lab" / lora_name.removesuffix(".safetensors") / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def unet_only(comfy, rate: float):
    return rates(comfy, learning_rate=rate, text_encoder_lr=0.0)


@pytest.mark.parametrize("name", APPENDED)
def test_each_appended_optimizer_trains_and_its_file_loads(comfy, loaded, dataset, probe, name):
    pytest.importorskip(comfy.pack.training.lr.optimizers.OPTIMIZERS[name].module)
    latent, context = probe
    before = unet_outputs(loaded[0], latent, context)
    trained_model, _, lora_name, _, summary = train_outputs(
        comfy, loaded, dataset, unet_only(comfy, RATES[name]),
        schedule(comfy, scheduler="constant_with_warmup", warmup=1.0, warmup_unit="steps"),
        steps=6, optimizer=name, lora_name=f"optimizer_{name}", save_precision="fp32", validate_every_n_steps=1)

    tensors, metadata = read_lora(comfy, lora_name)
    assert metadata["ss_optimizer"] == name
    assert all(torch.isfinite(tensor).all() for tensor in tensors.values())
    assert max(float(tensor.abs().max()) for key, tensor in tensors.items() if key.endswith("lora_up.weight")) > 0
    _, _, warnings = stock_lora_loader(comfy, loaded, lora_name)
    assert not [line for line in warnings if "lora key not loaded" in line], warnings
    assert (unet_outputs(trained_model, latent, context) - before).abs().max() > 0   # the file changes the model
    lines = log_lines(comfy, lora_name)
    assert [line["step"] for line in lines] == list(range(6))
    assert lines[0]["lr"]["unet"] == 0.0 and lines[-1]["lr"]["unet"] == pytest.approx(RATES[name])   # the warmup ran
    # Step 0 trains at rate 0 (the warmup): its validation loss is the model's without the LoRA.
    untrained, trained = lines[0]["val_loss"], lines[-1]["val_loss"]
    if name == "ProdigyPlusScheduleFree":
        # Its d starts at 1e-6 and grows at most 2^0.25 per step: in 6 steps it adapts, it does not yet learn.
        taken = [line["effective_lr"]["unet"] for line in lines]
        steps = list(zip(taken[1:], taken[2:]))
        assert taken[1] == pytest.approx(1e-6) and taken[-1] > taken[1]
        assert all(earlier <= later <= earlier * 2 ** 0.25 * (1 + 1e-9) for earlier, later in steps)
        assert "Effective rate at the last step (d x lr): UNet" in summary
    else:
        assert all("effective_lr" not in line for line in lines)
        assert trained < untrained, (untrained, trained)   # the stable validation loss (fixed noise) fell


def test_prodigy_logs_and_charts_d_times_lr_and_max_effective_lr_caps_it(comfy, loaded, dataset):
    pytest.importorskip("prodigyopt")
    cap = 1e-5
    outputs = {}
    for label, limit in (("free", 0.0), ("capped", cap)):
        outputs[label] = train_outputs(comfy, loaded, dataset, unet_only(comfy, 1.0), schedule(comfy), steps=8,
                                       optimizer="Prodigy", max_effective_lr=limit, lora_name=f"prodigy_{label}")
    free, capped = (log_lines(comfy, outputs[label][2]) for label in ("free", "capped"))
    assert all(line["lr"] == {"unet": 1.0} for line in free + capped)      # the rate set: Prodigy's multiplier
    free_taken = [line["effective_lr"]["unet"] for line in free]
    capped_taken = [line["effective_lr"]["unet"] for line in capped]
    assert free_taken[0] == pytest.approx(1e-6) and max(free_taken) > 2 * cap   # d grew from d0 = 1e-6
    assert max(capped_taken) == pytest.approx(cap) and all(rate <= cap * (1 + 1e-9) for rate in capped_taken)
    reached = next(step for step, rate in enumerate(free_taken) if rate > cap)
    assert capped_taken[:reached] == free_taken[:reached]                   # below the cap: the same run
    summary = outputs["capped"][4]
    assert summary.splitlines()[-1] == f"Effective rate at the last step (d x lr): UNet {cap:.3g}"
    chart = outputs["capped"][3]
    assert chart.shape[0] == 1 and chart.shape[-1] == 3 and float(chart.std()) > 0.05


@pytest.mark.compat
def test_schedule_free_saves_its_averaged_weights_and_trains_the_same_with_validation(comfy, loaded, dataset,
                                                                                       monkeypatch):
    """AdamWScheduleFree trains at y and evaluates at x = y + (1 - 1/beta1)(z - y): the saved file holds x,
    and validating (at x) between steps leaves the training bit for bit as it was."""
    pytest.importorskip("schedulefree")
    trainer = comfy.pack.training.run.trainer
    original = trainer.Run.export
    checked = []

    def export(run, name, steps_done):
        beta1 = run.optimizer.param_groups[0]["betas"][0]
        (lora,) = [lora for lora in run.injected if lora.part == "unet"]
        stems = run.plan.access.unet_kohya_names([module.path for module in lora.modules])
        expected = {}
        for module in lora.modules:
            y = module.down.detach().clone()
            z = run.optimizer.state[module.down]["z"]
            expected[stems[module.path]] = (module.down, y, y + (1 - 1 / beta1) * (z - y))
        path = original(run, name, steps_done)
        tensors, _ = read_lora(comfy, path.name)
        for stem, (parameter, y, x) in expected.items():
            saved = tensors[f"{stem}.lora_down.weight"]
            torch.testing.assert_close(saved, x, rtol=1e-5, atol=1e-7)
            assert not torch.allclose(saved, y)
            assert torch.equal(parameter, y)      # training goes on from y, exactly
        checked.append(path.name)
        return path

    monkeypatch.setattr(trainer.Run, "export", export)
    widgets = dict(steps=6, optimizer="AdamWScheduleFree", save_precision="fp32")
    learning_rates = unet_only(comfy, 3e-3)
    validated = train_outputs(comfy, loaded, dataset, learning_rates, schedule(comfy), lora_name="sf_validated",
                              validate_every_n_steps=2, save_every_n_steps=3, **widgets)[2]
    assert checked == ["sf_validated_step00003.safetensors", "sf_validated.safetensors"]
    plain = train_outputs(comfy, loaded, dataset, learning_rates, schedule(comfy), lora_name="sf_plain", **widgets)[2]
    validated_tensors, plain_tensors = read_lora(comfy, validated)[0], read_lora(comfy, plain)[0]
    assert validated_tensors.keys() == plain_tensors.keys()
    assert all(torch.equal(validated_tensors[key], plain_tensors[key]) for key in plain_tensors)
    assert [line["step"] for line in log_lines(comfy, validated) if "val_loss" in line] == [1, 3, 5]


@pytest.mark.parametrize("name", ["AdamWScheduleFree", "ProdigyPlusScheduleFree"])
def test_schedule_free_refuses_a_decaying_schedule_before_training(comfy, loaded, dataset, name):
    loras_before = sorted((comfy.models_dir / "loras").rglob("*"))
    with pytest.raises(ValueError, match=f"optimizer = '{name}' is schedule-free.*scheduler = 'cosine' lowers the "
                                         "rate.*constant_with_warmup"):
        train_outputs(comfy, loaded, dataset, unet_only(comfy, 1e-3), schedule(comfy, scheduler="cosine"), steps=4,
                      optimizer=name, lora_name="refused")
    assert sorted((comfy.models_dir / "loras").rglob("*")) == loras_before
