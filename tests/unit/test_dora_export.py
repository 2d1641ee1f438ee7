"""lora_weights' dora_scale for both loader rules, checked against the loaders' own arithmetic:
peft's forward (the model as trained) and LyCORIS's module (a test-only package) for the "updated"
rule; ComfyUI's rule ("original", |W|) is checked through ComfyUI itself in
tests/comfy/test_dora_interop.py and test_train.py."""
from __future__ import annotations

import pytest
import torch

from lora_lab.training.network.lora import inject_lora, lora_weights


def trained_dora(kind: str) -> tuple[torch.nn.Module, object, torch.Tensor]:
    torch.manual_seed(0)
    layer = torch.nn.Linear(12, 6) if kind == "linear" else torch.nn.Conv2d(4, 6, 3, padding=1)
    root = torch.nn.Sequential(layer)
    injected = inject_lora(root, "unet", ["0"], rank=2, alpha=4.0, use_dora=True, init_seed=1)
    module = injected.modules[0]
    with torch.no_grad():   # as after training: B non-zero, magnitudes moved
        module.up.normal_(0, 0.3)
        module.magnitude.view(-1).mul_(torch.linspace(0.7, 1.3, module.magnitude.numel()))
    base = layer.weight.detach().clone()
    return root, module, base


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_updated_rule_writes_the_magnitude_and_lycoris_rebuilds_the_trained_weight(kind):
    from lycoris.modules.locon import LoConModule

    root, module, base = trained_dora(kind)
    weights = lora_weights(module, torch.float32, "updated")
    torch.testing.assert_close(weights["magnitude"], module.magnitude.detach().reshape(-1))
    original = root[0].get_base_layer()
    with torch.no_grad():
        copy = (torch.nn.Linear(12, 6, bias=False) if kind == "linear"
                else torch.nn.Conv2d(4, 6, 3, padding=1, bias=False))
        copy.weight.copy_(base)
        lycoris = LoConModule.make_module_from_state_dict(
            "lora_unet_x", copy, weights["up"], weights["down"], None, torch.tensor(4.0),
            weights["magnitude"].reshape(-1, *([1] * (base.ndim - 1))))
        rebuilt, _ = lycoris.get_merged_weight()
    # LyCORIS's weight in the layer's own op = the peft layer's output: the model as trained.
    inputs = torch.randn(3, 12) if kind == "linear" else torch.randn(2, 4, 5, 5)
    operation = torch.nn.functional.linear if kind == "linear" else (
        lambda x, w, b: torch.nn.functional.conv2d(x, w, b, padding=1))
    with torch.no_grad():
        torch.testing.assert_close(operation(inputs, rebuilt, original.bias), root(inputs), rtol=1e-5, atol=1e-5)
        assert (operation(inputs, base, original.bias) - root(inputs)).abs().max() > 1e-3


def test_original_rule_divides_out_the_norm_change():
    _, module, base = trained_dora("linear")
    updated = lora_weights(module, torch.float32, "updated")["magnitude"]
    original = lora_weights(module, torch.float32, "original")["magnitude"]
    delta = module.up.detach() @ module.down.detach() * 2.0
    ratio = base.norm(dim=1) / (base + delta).norm(dim=1)
    torch.testing.assert_close(original, updated * ratio)
    assert (ratio - 1).abs().max() > 1e-3


def test_unknown_rule_is_refused():
    _, module, _ = trained_dora("linear")
    with pytest.raises(ValueError, match="dora_norm"):
        lora_weights(module, torch.float32, "sideways")
