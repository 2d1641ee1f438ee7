"""trainable_copies: trainable clones of inference tensors while training; the originals come back."""
from __future__ import annotations

import torch

from lora_lab.training.network.lora import trainable_copies


def inference_model() -> torch.nn.Module:
    with torch.inference_mode():
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.GroupNorm(2, 8), torch.nn.Linear(8, 2))
        model.register_buffer("scale", torch.tensor(2.0))
    return model


def test_backward_works_inside_and_the_exact_originals_return():
    model = inference_model()
    originals = {name: tensor for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
    values = {name: tensor.clone() for name, tensor in originals.items()}
    inputs = torch.randn(3, 4)
    for offload in (None, torch.device("cpu")):
        with trainable_copies(model, offload_device=offload):
            extra = torch.nn.Parameter(torch.zeros(2))
            loss = ((model(inputs) + extra) * model.scale).pow(2).mean()
            loss.backward()  # fails with inference tensors: "Inference tensors cannot be saved for backward"
            assert extra.grad is not None and all(not parameter.is_inference() for parameter in model.parameters())
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            assert tensor is originals[name] and tensor.is_inference()
            assert torch.equal(tensor, values[name])


def test_originals_return_when_training_fails():
    model = inference_model()
    first = model[0].weight
    try:
        with trainable_copies(model, offload_device=torch.device("cpu")):
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert model[0].weight is first


def test_a_tensor_that_stays_on_its_device_is_not_copied():
    """On the run's own device (a CPU run, or a model already where it trains) the normal tensors are views of
    the originals' memory: the model is not held twice."""
    model = inference_model()
    pointers = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    with trainable_copies(model):
        inside = {name: tensor for name, tensor in model.state_dict(keep_vars=True).items()}
        assert all(not tensor.is_inference() and tensor.data_ptr() == pointers[name] for name, tensor in inside.items())
    with trainable_copies(model, offload_device=torch.device("cpu")):    # already on the offload device
        assert all(tensor.data_ptr() == pointers[name] for name, tensor in model.state_dict().items())
