"""base_weights (training/run/base_weights.py) on small real torch modules: the fp8 copies, what they
save, and the originals put back whatever happens."""
from __future__ import annotations

import pytest
import torch

from lora_lab.training.run.base_weights import BASE_WEIGHTS, bytes_saved, float8_layers, quantized_weights, to_float8


def small_model() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Conv2d(16, 4, 3), torch.nn.LayerNorm(4))


@pytest.mark.parametrize("option", ["fp8_e4m3fn", "fp8_e5m2"])
def test_layers_hold_fp8_copies_for_the_duration_and_their_own_parameters_after(option):
    dtype = BASE_WEIGHTS[option]
    model = small_model()
    layers = [model[0], model[1]]
    originals = [layer.weight for layer in layers]
    values = [weight.detach().clone() for weight in originals]
    with quantized_weights(layers, dtype) as count:
        assert count == 2
        assert all(layer.weight.dtype == dtype and not layer.weight.requires_grad for layer in layers)
        assert float8_layers(model.modules()) == layers
        assert torch.equal(model[0].weight.float(), values[0].to(dtype).float())
    assert all(layer.weight is original for layer, original in zip(layers, originals))
    assert all(torch.equal(original, value) for original, value in zip(originals, values))
    assert float8_layers(model.modules()) == []


def test_originals_come_back_after_an_error():
    model = small_model()
    original = model[0].weight
    with pytest.raises(RuntimeError, match="stop"):
        with quantized_weights([model[0]], torch.float8_e4m3fn):
            raise RuntimeError("stop")
    assert model[0].weight is original and original.dtype == torch.float32


def test_bytes_saved_counts_the_chosen_layers_and_nothing_already_fp8():
    model = small_model()
    layers = frozenset({id(model[0]), id(model[1])})
    expected = (model[0].weight.numel() + model[1].weight.numel()) * 3   # fp32 (4 bytes) -> fp8 (1 byte)
    assert bytes_saved(model, layers, torch.float8_e4m3fn) == expected
    assert bytes_saved(model, layers, None) == 0
    model[0].weight.data = model[0].weight.data.to(torch.float8_e4m3fn)
    assert bytes_saved(model, layers, torch.float8_e5m2) == model[1].weight.numel() * 3


def test_out_of_range_values_saturate_instead_of_becoming_nan():
    weight = torch.tensor([1000.0, -1000.0, 0.5])
    rounded = to_float8(weight, torch.float8_e4m3fn).float()
    assert torch.equal(rounded, torch.tensor([448.0, -448.0, 0.5]))
