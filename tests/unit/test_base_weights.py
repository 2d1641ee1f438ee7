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


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_layers_over_fp8_weights_are_made_in_fp32(use_dora):
    """peft would make A and B in the base weight's dtype (fp8: A's initial values rounded to 3 mantissa
    bits) and cannot take DoRA's norms of an fp8 weight on the CPU; over fp8 the LoRA starts exactly as
    over the full-precision weight, and DoRA's magnitude is the fp8 weight's row norms."""
    from lora_lab.training.network.lora import inject_lora

    full = torch.nn.Sequential(torch.nn.Linear(8, 16))
    rounded = torch.nn.Sequential(torch.nn.Linear(8, 16))
    rounded[0].weight.data = full[0].weight.data.to(torch.float8_e4m3fn)
    over_full = inject_lora(full, "unet", ["0"], rank=4, alpha=4.0, use_dora=use_dora, init_seed=3)
    over_fp8 = inject_lora(rounded, "unet", ["0"], rank=4, alpha=4.0, use_dora=use_dora, init_seed=3)
    (full_layer,), (fp8_layer,) = over_full.modules, over_fp8.modules
    assert all(parameter.dtype == torch.float32 for parameter in over_fp8.parameters())
    assert torch.equal(fp8_layer.down, full_layer.down) and torch.equal(fp8_layer.up, full_layer.up)
    if use_dora:
        expected = rounded[0].base_layer.weight.float().norm(dim=1)
        assert torch.allclose(fp8_layer.magnitude.detach(), expected)
    over_fp8.remove()
    assert rounded[0].weight.dtype == torch.float8_e4m3fn and isinstance(rounded[0], torch.nn.Linear)
