"""initial_lora: Train LoRA starts from a LoRA file's weights (tiny SD1.5, UNet and CLIP-L, fp32 on CPU).

Checks: a run at a negligible rate from a file ends on that file's weights (LoRA with and without DoRA,
LoKr, LoHa), so every tensor was read back where the export wrote it; the new file records the parent's
name and sha256; keys no trained layer takes are reported; a file of another network, rank, alpha, DoRA
setting or layer set is refused before anything trains, naming the file, what it has and the fix.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch

from .test_train import checkpoint, dataset, loaded, rates, read_lora, schedule, train  # noqa: F401

WIDGETS = dict(steps=2, rank=4, alpha=4.0, training_seed=3)


def parent(comfy, loaded, dataset, name: str, **widgets) -> str:  # noqa: F811
    """A LoRA file trained for real (UNet and text encoder)."""
    return train(comfy, loaded, dataset, rates(comfy, learning_rate=2e-3, text_encoder_lr=1e-3), schedule(comfy),
                 lora_name=name, **{**WIDGETS, **widgets})[2]


def from_file(comfy, loaded, dataset, file: str, name: str, text_encoder_lr: float = 1e-12, **widgets) -> str:  # noqa: F811
    """A run that starts from `file` at a negligible rate: it ends where it started."""
    return train(comfy, loaded, dataset, rates(comfy, learning_rate=1e-12, text_encoder_lr=text_encoder_lr),
                 schedule(comfy), lora_name=name, initial_lora=file, **{**WIDGETS, **widgets})[2]


@pytest.mark.parametrize("widgets", [{}, {"use_dora": True}, {"network": "lokr", "lokr_factor": 4},
                                     {"network": "loha"}], ids=["lora", "dora", "lokr", "loha"])
def test_a_run_starts_from_the_file_weights(comfy, loaded, dataset, widgets):  # noqa: F811
    tag = widgets.get("network", "dora" if widgets.get("use_dora") else "lora")
    first = parent(comfy, loaded, dataset, f"initial_{tag}", **widgets)
    second = from_file(comfy, loaded, dataset, first, f"initial_{tag}_child", **widgets)
    tensors, _ = read_lora(comfy, first)
    child, metadata = read_lora(comfy, second)
    assert tensors.keys() == child.keys()
    for key in tensors:   # ends where it started: every tensor went back where the export wrote it
        torch.testing.assert_close(child[key], tensors[key], rtol=1e-4, atol=1e-6)
    recorded = json.loads(metadata["lora_lab_settings"])["initial_lora"]
    digest = hashlib.sha256((comfy.models_dir / "loras" / first).read_bytes()).hexdigest()
    assert recorded == {"file": first, "sha256": digest, "keys_left_out": []}


def test_keys_no_trained_layer_takes_are_reported(comfy, loaded, dataset, caplog):  # noqa: F811
    """The parent trained the text encoder too; the child trains the UNet only: the text keys are left out and
    listed, the UNet starts from the parent's."""
    import logging

    first = parent(comfy, loaded, dataset, "initial_reported")
    with caplog.at_level(logging.WARNING, logger="lora_lab"):
        second = from_file(comfy, loaded, dataset, first, "initial_reported_child", text_encoder_lr=0.0)
    child, metadata = read_lora(comfy, second)
    left_out = json.loads(metadata["lora_lab_settings"])["initial_lora"]["keys_left_out"]
    assert left_out and all(key.startswith("lora_te_") for key in left_out)
    assert any("no trained layer takes" in record.getMessage() for record in caplog.records)
    tensors, _ = read_lora(comfy, first)
    assert child.keys() == {key for key in tensors if key.startswith("lora_unet_")}


@pytest.mark.parametrize("widgets,message", [
    ({"network": "loha"}, "is a lora file but network = 'loha'. Set network to 'lora'"),
    ({"rank": 8, "alpha": 4.0}, "has shape \\[4, .*the ranks differ \\(the node's rank is 8\\)"),
    ({"alpha": 2.0}, "has alpha 4 .*but the node's alpha is 2. Set alpha to 4"),
    ({"use_dora": True}, "has no DoRA scales but use_dora = True. Set use_dora to False"),
    ({"target": "all_linear_conv"}, "has no lora_unet_.*which the file did not train. The targets must match"),
])
def test_a_file_this_run_could_not_have_written_is_refused(comfy, loaded, dataset, widgets, message):  # noqa: F811
    first = "initial_lora.safetensors" if (comfy.models_dir / "loras" / "initial_lora.safetensors").is_file() \
        else parent(comfy, loaded, dataset, "initial_lora")
    with pytest.raises(Exception, match=message):
        from_file(comfy, loaded, dataset, first, "initial_refused", **widgets)
    assert not (comfy.models_dir / "loras" / "initial_refused.safetensors").exists()
