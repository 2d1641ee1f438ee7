"""Resume state pieces without ComfyUI: the data order and optimizer survive a save/load exactly."""
from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch

from lora_lab.training.data import feeder
from lora_lab.training.run import resume


class TwoBuckets:
    """8 samples in two buckets, 2 repeats: epochs of 16 with leftovers."""

    def __init__(self):
        self.samples = [SimpleNamespace(bucket=(64, 64) if index < 5 else (64, 96), repeats=2) for index in range(8)]

    def epoch_indices(self, rng):
        indices = [index for index, sample in enumerate(self.samples) for _ in range(sample.repeats)]
        rng.shuffle(indices)
        return indices

    def buckets(self):
        grouped = {}
        for index, sample in enumerate(self.samples):
            grouped.setdefault(sample.bucket, []).append(index)
        return grouped


@pytest.mark.parametrize("taken", [0, 1, 5, 7, 13])
def test_batch_order_continues_exactly_from_a_saved_position(taken):
    dataset = TwoBuckets()
    running = feeder.bucket_batches(dataset, 3, random.Random(4))
    for _ in range(taken):
        next(running)
    saved = json.loads(json.dumps(running.state()))          # through JSON, as on disk
    restored = feeder.bucket_batches(dataset, 3, random.Random(999))
    restored.load_state(saved)
    assert [next(restored) for _ in range(20)] == [next(running) for _ in range(20)]


def test_batch_order_is_the_one_the_trainer_always_had():
    """The same batches as the generator it replaced: epochs reshuffled, leftovers dropped."""
    dataset, rng = TwoBuckets(), random.Random(4)
    expected = []
    while len(expected) < 12:
        pending = {}
        for index in dataset.epoch_indices(rng):
            bucket = pending.setdefault(dataset.samples[index].bucket, [])
            bucket.append(index)
            if len(bucket) == 3:
                expected.append(list(bucket))
                bucket.clear()
    batches = feeder.bucket_batches(dataset, 3, random.Random(4))
    assert [next(batches) for _ in range(12)] == expected[:12]


def test_optimizer_state_and_generators_round_trip_through_the_files(tmp_path):
    weight = torch.nn.Parameter(torch.randn(4, 3))
    optimizer = torch.optim.AdamW([{"params": [weight], "lr": 1e-2, "base_lr": 1e-2, "part": "unet"}])
    for _ in range(2):
        weight.grad = torch.randn(4, 3)
        optimizer.step()
    generator = torch.Generator().manual_seed(3)
    torch.randn(5, generator=generator)
    progress = resume.Progress(step=2, data={"order": [3, 1, 2]}, generators={"noise": generator.get_state()},
                               scaler={"scale": 1024.0, "_growth_tracker": 3})
    path = resume.save_state(tmp_path, {"settings": {"rank": 4}}, progress, {"unet/a/down": weight},
                             optimizer.state_dict())
    loaded = resume.load_state(path)
    assert loaded.step == 2 and loaded.data == {"order": [3, 1, 2]} and loaded.scaler["scale"] == 1024.0
    assert torch.equal(loaded.weights["unet/a/down"], weight.detach())
    assert torch.equal(loaded.generators["noise"], generator.get_state())
    assert loaded.optimizer["param_groups"][0]["betas"] == optimizer.param_groups[0]["betas"]   # a tuple again
    fresh = torch.optim.AdamW([{"params": [weight], "lr": 1.0, "base_lr": 1.0, "part": "unet"}])
    fresh.load_state_dict(loaded.optimizer)
    for key, value in optimizer.state[weight].items():
        assert torch.equal(fresh.state[weight][key], value)
    assert sorted(item.name for item in tmp_path.iterdir()) == ["resume_state.json", "resume_state_step00002.safetensors"]
    # A later checkpoint replaces the earlier one.
    resume.save_state(tmp_path, {}, resume.Progress(step=4, data={}, generators={}), {}, {"state": {}, "param_groups": []})
    assert sorted(item.name for item in tmp_path.iterdir()) == ["resume_state.json", "resume_state_step00004.safetensors"]


def test_differences_name_each_setting_with_both_values():
    saved = resume.run_identity({"rank": 4, "lora_name": "a", "steps": 10}, {"learning_rate": 1e-4}, {}, {}, {})
    current = resume.run_identity({"rank": 8, "lora_name": "b", "steps": 10}, {"learning_rate": 1e-4}, {}, {}, {})
    assert resume.identity_differences(saved, current) == ["settings.rank: saved 4, now 8"]   # lora_name may differ


def test_resume_from_accepts_a_run_name_a_folder_or_a_file(tmp_path):
    runs = tmp_path / "lora_lab"
    (runs / "styles" / "alice").mkdir(parents=True)
    state = runs / "styles" / "alice" / resume.STATE_FILE
    state.write_text("{}")
    for given in ("styles/alice", str(state.parent), f' "{state}" ', str(state.parent / "resume_state_step00003.safetensors")):
        assert resume.resolve_state_path(given, runs) == state
    with pytest.raises(ValueError, match="resume_from = 'styles/bob'.*Leave it empty"):
        resume.resolve_state_path("styles/bob", runs)
    (state.parent / "resume_state_step00001.safetensors").write_bytes(b"not tensors")
    state.write_text(json.dumps({"format": 1, "step": 1, "tensor_file": "resume_state_step00001.safetensors"}))
    with pytest.raises(ValueError, match="not a readable LoRA Lab resume checkpoint"):
        resume.load_state(state)


def test_save_precision_may_change_on_resume_and_older_checkpoints_lack_it():
    """The file's dtype does not change the computation: a checkpoint saved before the setting
    existed (no key) or with another value resumes."""
    saved = resume.run_identity({"rank": 4, "steps": 10}, {}, {}, {}, {})
    current = resume.run_identity({"rank": 4, "steps": 10, "save_precision": "fp32"}, {}, {}, {}, {})
    assert resume.identity_differences(saved, current) == []
