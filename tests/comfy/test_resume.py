"""Resume in a real ComfyUI (tiny SD1.5 checkpoint, fp32 on CPU): a run continued from a checkpoint
gives the same LoRA, bit for bit, as the run that never stopped; a checkpoint from another run is
refused before anything trains."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from .test_train import (CAPTIONS, InterruptingDataset, checkpoint, dataset, loaded, pattern_images,  # noqa: F401
                         rates, read_lora, schedule, train)

STEPS, EVERY = 6, 3
WIDGETS = dict(steps=STEPS, save_every_n_steps=EVERY, batch_size=2, rank=4, alpha=8.0, noise_offset=0.05,
               min_snr_gamma=5.0, weight_decay=0.01, training_seed=11)


@pytest.fixture(scope="module")
def varied(dataset):  # noqa: F811
    """Flips and caption shuffles draw from the augmentation rng: its state must be resumed too."""
    return dataclasses.replace(dataset, options=dataclasses.replace(dataset.options, flip=True, shuffle_captions=True))


def learning_rates(comfy, text_encoder_lr: float = 0.0):
    return rates(comfy, learning_rate=2e-3, text_encoder_lr=text_encoder_lr)


def warm_linear(comfy):
    return schedule(comfy, scheduler="linear", warmup=2.0, warmup_unit="steps")


def log_lines(comfy, name: str) -> list[str]:
    return (comfy.output_dir / "lora_lab" / name / "log.jsonl").read_text().splitlines()


def assert_same_tensors(comfy, first: str, second: str) -> None:
    tensors, _ = read_lora(comfy, first)
    other, _ = read_lora(comfy, second)
    assert tensors.keys() == other.keys()
    different = [key for key in tensors if not torch.equal(tensors[key], other[key])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def uninterrupted(comfy, loaded, varied):  # noqa: F811
    """The reference: 6 steps straight through (UNet and text encoder), checkpoint at step 3."""
    _, _, name, _ = train(comfy, loaded, varied, learning_rates(comfy, 1e-3), warm_linear(comfy),
                          lora_name="resume_full", **WIDGETS)
    return name


def test_checkpoint_files_live_in_the_run_folder_not_in_loras(comfy, uninterrupted):
    run_dir = comfy.output_dir / "lora_lab" / "resume_full"
    state = json.loads((run_dir / "resume_state.json").read_text())
    assert state["step"] == EVERY and state["tensor_file"] == "resume_state_step00003.safetensors"
    assert (run_dir / state["tensor_file"]).is_file()
    tensors, _ = read_lora(comfy, uninterrupted)
    assert sorted(path.name for path in (comfy.models_dir / "loras").glob("resume_full*")) == [
        "resume_full.safetensors", "resume_full_step00003.safetensors"]
    assert not list((comfy.models_dir / "loras").rglob("resume_state*"))
    from safetensors import safe_open
    with safe_open(str(run_dir / state["tensor_file"]), "pt") as handle:
        saved = {key: handle.get_tensor(key) for key in handle.keys()}
    weights = [key for key in saved if key.startswith("weight/")]
    assert weights and all(saved[key].dtype == torch.float32 for key in weights)
    assert any(key.startswith("weight/text_encoder/") for key in weights)
    assert any(key.startswith("optimizer/") and key.endswith("exp_avg_sq") for key in saved)


def test_resume_from_the_step_3_checkpoint_equals_the_uninterrupted_run(comfy, loaded, varied, uninterrupted):  # noqa: F811
    _, _, name, _ = train(comfy, loaded, varied, learning_rates(comfy, 1e-3), warm_linear(comfy),
                          lora_name="resume_continued", resume_from="resume_full", **WIDGETS)
    assert name == "resume_continued.safetensors"
    assert_same_tensors(comfy, uninterrupted, name)
    # The log of the continued run holds the first run's steps 0-2 and its own 3-5: equal to the reference,
    # losses and applied rates included (the schedule position was resumed).
    assert log_lines(comfy, "resume_continued") == log_lines(comfy, "resume_full")
    _, metadata = read_lora(comfy, name)
    assert json.loads(metadata["lora_lab_settings"])["resumed_from"]["step"] == EVERY


def test_cancel_writes_a_checkpoint_and_resuming_it_equals_the_uninterrupted_run(comfy, loaded, varied):  # noqa: F811
    """UNet only (faster); the cancel lands between steps 4 and 5 (10 captions drawn, batch 2)."""
    import comfy.model_management as model_management

    widgets = {**WIDGETS, "save_every_n_steps": 0}
    _, _, reference, _ = train(comfy, loaded, varied, learning_rates(comfy), warm_linear(comfy),
                               lora_name="cancel_reference", **widgets)
    try:
        with pytest.raises(model_management.InterruptProcessingException):
            train(comfy, loaded, InterruptingDataset(varied, after=9), learning_rates(comfy), warm_linear(comfy),
                  lora_name="cancel_then_resume", **widgets)
    finally:
        model_management.interrupt_current_processing(False)
    run_dir = comfy.output_dir / "lora_lab" / "cancel_then_resume"
    stopped_at = json.loads((run_dir / "resume_state.json").read_text())["step"]
    assert 0 < stopped_at < STEPS and len(log_lines(comfy, "cancel_then_resume")) == stopped_at
    assert (comfy.models_dir / "loras" / "cancel_then_resume_interrupted.safetensors").is_file()

    _, _, name, _ = train(comfy, loaded, varied, learning_rates(comfy), warm_linear(comfy),
                          lora_name="cancel_then_resume", resume_from=str(run_dir / "resume_state.json"), **widgets)
    assert name == "cancel_then_resume.safetensors"      # same run folder: the final name was still free
    assert_same_tensors(comfy, reference, name)
    assert log_lines(comfy, "cancel_then_resume") == log_lines(comfy, "cancel_reference")


def test_a_checkpoint_from_another_run_is_refused_before_training(comfy, loaded, varied, uninterrupted):  # noqa: F811
    module = comfy.pack.training.data.dataset
    other_data = module.build_image_dataset(pattern_images(4).flip(1), CAPTIONS,
                                            module.DatasetOptions(resolution=64, bucketing=False, flip=True))
    with torch.inference_mode():
        patched_model, patched_clip = comfy.node_class("LoraLoader")().load_lora(loaded[0], loaded[1], uninterrupted,
                                                                                 0.5, 0.0)
    cases = {
        "settings.rank: saved 4, now 8": dict(widgets={"rank": 8}),
        "settings.steps: saved 6, now 9": dict(widgets={"steps": 9}),
        "learning_rates.learning_rate: saved 0.002, now 0.003": dict(rates=rates(comfy, learning_rate=3e-3,
                                                                                   text_encoder_lr=1e-3)),
        "lr_schedule.scheduler: saved 'linear', now 'cosine'": dict(schedule=schedule(comfy, scheduler="cosine",
                                                                                      warmup=2.0, warmup_unit="steps")),
        "dataset.fingerprint": dict(dataset=other_data),
        "model.weights": dict(widgets={"model": patched_model, "clip": patched_clip}),
    }
    loras_before = sorted((comfy.models_dir / "loras").rglob("*"))
    for fragment, case in cases.items():
        with pytest.raises(ValueError, match="resume_from") as caught:
            train(comfy, loaded, case.get("dataset", varied), case.get("rates", learning_rates(comfy, 1e-3)),
                  case.get("schedule", warm_linear(comfy)), lora_name="refused", resume_from="resume_full",
                  **{**WIDGETS, **case.get("widgets", {})})
        assert fragment in str(caught.value), (fragment, str(caught.value))
        assert "clear resume_from" in str(caught.value)
        assert not (comfy.output_dir / "lora_lab" / "refused").exists()
    with pytest.raises(ValueError, match="no resume_state.json there"):
        train(comfy, loaded, varied, learning_rates(comfy, 1e-3), warm_linear(comfy), lora_name="refused",
              resume_from="no_such_run", **WIDGETS)
    assert sorted((comfy.models_dir / "loras").rglob("*")) == loras_before


def test_resume_with_another_memory_mode_equals_the_uninterrupted_run(comfy, loaded, varied, uninterrupted):  # noqa: F811
    """The reference ran resident; its step-3 checkpoint continues with every block streamed."""
    _, _, name, _ = train(comfy, loaded, varied, learning_rates(comfy, 1e-3), warm_linear(comfy),
                          lora_name="resume_streamed", resume_from="resume_full", memory="stream", **WIDGETS)
    assert_same_tensors(comfy, uninterrupted, name)
    assert log_lines(comfy, "resume_streamed") == log_lines(comfy, "resume_full")


def test_a_lycoris_run_resumes_to_the_uninterrupted_one(comfy, loaded, varied, network="lokr"):  # noqa: F811
    """LoKr / LoHa checkpoints hold their factors (every tensor LoraModule.tensors() names, LoHa's alike) and
    their optimizer state: resumed from step 3, the run ends on the uninterrupted run's file, bit for bit
    (UNet and text encoder)."""
    widgets = {**WIDGETS, "network": network, "lokr_factor": 4}
    _, _, reference, _ = train(comfy, loaded, varied, learning_rates(comfy, 1e-3), warm_linear(comfy),
                               lora_name=f"{network}_full", **widgets)
    _, _, name, _ = train(comfy, loaded, varied, learning_rates(comfy, 1e-3), warm_linear(comfy),
                          lora_name=f"{network}_continued", resume_from=f"{network}_full", **widgets)
    assert_same_tensors(comfy, reference, name)
    tensors, _ = read_lora(comfy, name)
    assert any((".lokr_w" if network == "lokr" else ".hada_w") in key for key in tensors)
