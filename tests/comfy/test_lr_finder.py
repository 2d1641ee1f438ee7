"""The stable validation loss (Train LoRA's validate_every_n_steps) and the LR Finder node, on the tiny
SD1.5 checkpoint through the stock loader: the mechanics the issue asks for. Whether the suggestion is
*good* is measured by scripts/lr_finder_bench.py (make lr-finder-bench), not here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from .test_train import (checkpoint, clip_outputs, dataset, loaded, probe, rates, read_lora, schedule,  # noqa: F401
                         train, unet_outputs)


def find(comfy, loaded, dataset, learning_rates=None, **widgets):
    """Call the LR Finder node the way ComfyUI's executor does (inside inference_mode)."""
    model, clip, vae = loaded
    values = dict(min_lr=1e-5, max_lr=1e-1, steps=12, rank=4, alpha=4.0, batch_size=2, precision="fp32",
                  training_seed=0)
    values.update(widgets)
    with torch.inference_mode():
        output = comfy.call_node("LoRALabLRFinder", model=model, clip=clip, vae=vae, dataset=dataset,
                                 learning_rates=learning_rates, **values)
    return output["result"]


def sweep_lines(comfy, summary: str) -> list[dict]:
    path = summary.rsplit("Steps: ", 1)[1].strip()
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_validation_loss_of_the_same_weights_is_bit_identical(comfy, loaded, dataset):
    pack = comfy.pack
    bridge = pack.nodes.comfy
    model, clip, vae = loaded
    with torch.inference_mode():
        access = bridge.model_access(model, clip, vae, bridge.check_compatible(model, clip, vae))
        feeder = pack.training.data.feeder.BatchFeeder(dataset, access, False,
                                                       pack.training.run.train_settings.TrainSettings(),
                                                       comfy.output_dir / "unused")
        validation = pack.training.run.validation.ValidationSet(feeder, access.objective, "fp32", access.device)
        first, second = validation.loss(), validation.loss()
    assert validation.size == 4 * 8   # the tiny dataset has 4 images: all of them, 8 timesteps each
    assert first == second and 0.0 < first < 100.0


def test_train_logs_val_loss_and_trains_the_same_lora_with_or_without_it(comfy, loaded, dataset):
    learning_rates = rates(comfy, learning_rate=1e-3, text_encoder_lr=1e-4)
    _, _, plain, _ = train(comfy, loaded, dataset, learning_rates, schedule(comfy), steps=5, lora_name="val_off")
    _, _, validated, _ = train(comfy, loaded, dataset, learning_rates, schedule(comfy), steps=5,
                               lora_name="val_on", validate_every_n_steps=2)
    plain_tensors, _ = read_lora(comfy, plain)
    validated_tensors, metadata = read_lora(comfy, validated)
    assert plain_tensors.keys() == validated_tensors.keys()
    assert all(torch.equal(plain_tensors[key], validated_tensors[key]) for key in plain_tensors)
    lines = [json.loads(line) for line in (comfy.output_dir / "lora_lab" / "val_on" / "log.jsonl").open()]
    assert [line["step"] for line in lines if "val_loss" in line] == [1, 3, 4]   # every 2 steps, and the last
    assert all(0.0 < line["val_loss"] < 100.0 for line in lines if "val_loss" in line)
    assert json.loads(metadata["lora_lab_settings"])["train"]["validate_every_n_steps"] == 2


def test_finder_sweeps_exponentially_suggests_reproducibly_and_leaves_the_model(comfy, loaded, dataset, probe):
    latent, context = probe
    model = loaded[0]
    before = unet_outputs(model, latent, context)
    loras_before = sorted((comfy.models_dir / "loras").rglob("*.safetensors"))
    learning_rates, suggested, chart, summary = find(comfy, loaded, dataset)
    assert torch.equal(unet_outputs(model, latent, context), before)
    assert sorted((comfy.models_dir / "loras").rglob("*.safetensors")) == loras_before   # no file written
    lines = sweep_lines(comfy, summary)
    assert [line["step"] for line in lines] == list(range(len(lines)))
    for line in lines:
        assert line["lr"] == pytest.approx(1e-5 * (1e-1 / 1e-5) ** (line["step"] / 11), rel=1e-9)
    assert any(line["val_loss"] is not None for line in lines)
    assert 1e-5 <= suggested <= 1e-1 and "Suggested rate" in summary
    assert learning_rates.resolved()["unet"] == pytest.approx(suggested)
    assert learning_rates.resolved()["text_encoder"] == 0.0
    assert chart.shape[0] == 1 and chart.shape[-1] == 3
    again = find(comfy, loaded, dataset)
    assert again[1] == suggested
    assert [line["val_loss"] for line in sweep_lines(comfy, again[3])] == [line["val_loss"] for line in lines]


def test_finder_stops_early_on_divergence(comfy, loaded, dataset):
    _, suggested, _, summary = find(comfy, loaded, dataset, min_lr=1e-3, max_lr=10.0, steps=60)
    lines = sweep_lines(comfy, summary)
    assert "stopped early" in summary and len(lines) < 60, summary
    assert 1e-3 <= suggested <= 10.0


def test_finder_keeps_the_given_ratios_and_its_rates_feed_train_lora(comfy, loaded, dataset):
    given = rates(comfy, learning_rate=2e-4, text_encoder_lr=5e-5)
    learning_rates, suggested, _, _ = find(comfy, loaded, dataset, learning_rates=given, steps=10)
    resolved = learning_rates.resolved()
    assert resolved["unet"] == pytest.approx(suggested)
    assert resolved["text_encoder"] / resolved["unet"] == pytest.approx(5e-5 / 2e-4)
    _, _, name, _ = train(comfy, loaded, dataset, learning_rates, schedule(comfy), steps=2, lora_name="from_finder")
    lines = [json.loads(line) for line in (comfy.output_dir / "lora_lab" / "from_finder" / "log.jsonl").open()]
    assert lines[0]["lr"]["unet"] == pytest.approx(suggested)
    tensors, _ = read_lora(comfy, name)
    assert any(key.startswith("lora_te_") for key in tensors)


def test_finder_refuses_bad_input_before_any_sweep_with_train_loras_message(comfy, loaded, dataset):
    sweeps = comfy.output_dir / "lora_lab" / "lr_finder"
    before = sorted(sweeps.glob("sweep_*")) if sweeps.exists() else []
    with pytest.raises(ValueError, match=r"Train LoRA: batch_size = 9 is larger than the dataset's largest bucket"):
        find(comfy, loaded, dataset, batch_size=9)
    with pytest.raises(ValueError, match="every learning rate resolves to 0"):
        find(comfy, loaded, dataset, learning_rates=rates(comfy, learning_rate=0.0, text_encoder_lr=0.0))
    assert (sorted(sweeps.glob("sweep_*")) if sweeps.exists() else []) == before   # no run folder, no sweep


def test_finder_live_records_are_the_loops_with_the_rate_applied_to_each_part(comfy, loaded, dataset):
    given = rates(comfy, learning_rate=2e-4, text_encoder_lr=5e-5)
    seen = []
    model, clip, vae = loaded
    finder = comfy.pack.training.lr.finder
    bridge = comfy.pack.nodes.comfy
    settings = finder.FinderSettings.from_values(dict(min_lr=1e-5, max_lr=1e-2, steps=10, rank=4, alpha=4.0,
                                                      batch_size=2, precision="fp32"))
    with torch.inference_mode():
        access = bridge.model_access(model, clip, vae, bridge.check_compatible(model, clip, vae))
        result = finder.find_lr(settings, access, dataset, given, comfy.output_dir,
                                on_record=lambda record, total: seen.append(record))
    assert seen == result.records and [record.step for record in seen] == list(range(len(seen)))
    for record in seen:   # the sweep moves every part by the same factor: the UNet's rate is the swept one
        assert record.lr["unet"] == pytest.approx(settings.rate(record.step))
        assert record.lr["text_encoder"] / record.lr["unet"] == pytest.approx(5e-5 / 2e-4)


def refine_lines(summary: str) -> list[dict]:
    path = summary.split("Confirmation runs: ", 1)[1].splitlines()[0].strip()
    return [json.loads(line) for line in open(path, encoding="utf-8")]


def test_refine_picks_the_confirmation_run_with_the_lowest_validation_loss_within_its_budget(
        comfy, loaded, dataset, probe, monkeypatch):
    finder = comfy.pack.training.lr.finder
    latent, context = probe
    model, clip, _ = loaded
    before = unet_outputs(model, latent, context)
    clip_before = clip_outputs(clip)
    loras_before = sorted((comfy.models_dir / "loras").rglob("*.safetensors"))
    given_back = []
    monkeypatch.setattr(finder, "give_back_host_memory", lambda: given_back.append("host"))
    plain = find(comfy, loaded, dataset)                                    # refine off: today's finder
    assert "Refine" not in plain[3] and "Confirmation runs" not in plain[3] and not given_back
    learning_rates, suggested, chart, summary = find(comfy, loaded, dataset, refine_runs=3, refine_steps=5)
    runs = refine_lines(summary)
    # The sweep is the same as without refine; the candidates start at its suggestion and end at its minimum.
    assert [line["val_loss"] for line in sweep_lines(comfy, summary)] == \
           [line["val_loss"] for line in sweep_lines(comfy, plain[3])]
    settings = finder.FinderSettings(min_lr=1e-5, max_lr=1e-1, steps=12, refine_runs=3, refine_steps=5)
    minimum = float(summary.split("Minimum of the smoothed validation loss at ", 1)[1].split()[0])
    candidates = finder.refine_candidates(plain[1], minimum, 3, settings)
    assert [line["lr"] for line in runs] == pytest.approx(candidates, rel=1e-2)   # the minimum: 3 digits
    assert runs[0]["lr"] == plain[1] or candidates[0] < plain[1]   # the suggestion, unless widened below it
    # The choice: the lowest recorded final validation loss, flagged, and the node's outputs follow it.
    finite = [line for line in runs if line["val_loss"] is not None]
    best = min(finite, key=lambda line: (line["val_loss"], line["lr"]))
    assert [line["chosen"] for line in runs] == [line is best for line in runs]
    assert suggested == best["lr"] and learning_rates.resolved()["unet"] == pytest.approx(best["lr"])
    assert f"the sweep's suggestion was {plain[1]:.3g}" in summary and "<- chosen" in summary
    # The cost as stated: refine_runs runs of refine_steps steps each, one validation after the last step.
    assert [line["steps"] for line in runs] == [5, 5, 5] and "Refine cost: 3 x 5 = 15 training steps" in summary
    run_dir = Path(summary.split("Confirmation runs: ", 1)[1].splitlines()[0].strip()).parent
    for index, line in enumerate(runs, start=1):   # each run's own log: refine_steps steps at its rate (cosine)
        logged = [json.loads(text) for text in open(run_dir / f"refine_{index:02d}" / "log.jsonl", encoding="utf-8")]
        assert [record["step"] for record in logged] == list(range(5))
        assert logged[0]["lr"]["unet"] == pytest.approx(line["lr"]) and logged[-1]["lr"]["unet"] < line["lr"]
    assert len(given_back) >= 3   # host memory given back before each confirmation run
    assert chart.shape[0] == 1 and chart.shape[-1] == 3
    # The inputs are untouched and nothing is written to models/loras.
    assert torch.equal(unet_outputs(model, latent, context), before)
    assert torch.equal(clip_outputs(clip), clip_before)
    assert sorted((comfy.models_dir / "loras").rglob("*.safetensors")) == loras_before


@pytest.mark.parametrize("network", [dict(network="lokr", lokr_factor=4, lokr_decompose_both=True, rank=2, alpha=1.0),
                                     dict(network="loha", loha_rank=2, loha_alpha=1.0)], ids=["lokr", "loha"])
def test_the_finder_sweeps_the_network_train_lora_trains(comfy, loaded, dataset, network):
    """network (and its options) appended to the LR Finder: the sweep trains exactly the layers Train LoRA
    trains with the same settings (the summary's parameter count equals the file's), not LoRA's."""
    target = comfy.pack.training.lr.finder.FinderSettings().target
    _, suggested, _, summary = find(comfy, loaded, dataset, steps=10, target=target, **network)
    words = {"lokr": "Network: LoKr (factor 4, decompose_both), rank 2, alpha 1",
             "loha": "Network: LoHa, rank 2, alpha 1"}[network["network"]]
    line = next(line for line in summary.splitlines() if line.startswith("Network: "))
    assert line.startswith(words), line
    swept = int(line.rsplit(", ", 1)[1].split()[0].replace(",", ""))
    _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=suggested, text_encoder_lr=0.0),
                          schedule(comfy), steps=1, target=target, lora_name=f"finder_{network['network']}",
                          **{"rank": 4, "alpha": 4.0, **network})
    tensors, _ = read_lora(comfy, name)
    assert any(".lokr_w" in key or ".hada_w" in key for key in tensors)
    assert swept == sum(tensor.numel() for key, tensor in tensors.items() if not key.endswith(".alpha"))
    _, _, _, lora_summary = find(comfy, loaded, dataset, steps=10, target=target)
    assert "Network: LoRA, rank 4, alpha 4" in lora_summary
