"""Backward casts frozen weights again instead of keeping the forward's copies (training/run/recast.py):
the same gradients bit for bit, the copies not kept, and a layer whose forward makes something else than
its weight cast left as it was."""
from __future__ import annotations

import contextlib

import pytest
import torch

from lora_lab.training.network.lora import inject_lora
from lora_lab.training.run.recast import frozen_layers, recast_saved_weights


class CastLinear(torch.nn.Linear):
    """A Linear stored in a low precision that casts its weight to the input's dtype per forward (as ComfyUI's
    manual_cast ops and an fp8 base do)."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class CastConv(torch.nn.Conv2d):
    def forward(self, x):
        return self._conv_forward(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class PatchedLinear(torch.nn.Linear):
    """A forward that uses its weight plus a patch (ComfyUI's per-forward LoRA patches under partial
    loading): what autograd saves is not the weight cast, so it must be kept."""

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype) + 0.01, self.bias.to(x.dtype))


class Net(torch.nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.stem = CastConv(3, 3, 1)            # trained (LoRA)
        self.conv = CastConv(3, 8, 3, padding=1)  # frozen, no LoRA: its weight is still needed in backward
        self.square = CastLinear(8, 8)          # square: saved transposed with the weight's own shape
        self.wide = CastLinear(8, 24)
        self.patched = PatchedLinear(24, 8)
        self.head = CastLinear(8, 4)
        self.to(dtype)
        for parameter in self.parameters():
            parameter.requires_grad_(False)

    def forward(self, x):
        x = self.conv(self.stem(x)).flatten(2).transpose(1, 2)           # [B, 16, 8]
        return self.head(self.patched(torch.nn.functional.gelu(self.wide(self.square(x)))))


def train(dtype: torch.dtype, recast: bool, dora: bool = False):
    """Three steps of LoRA (or DoRA) on the frozen low-precision net, computing in fp32; the trained weights
    and the recaster (None without)."""
    torch.manual_seed(0)
    net = Net(dtype)
    lora = inject_lora(net, "unet", ["stem", "square", "wide", "head"], 4, 4.0, use_dora=dora, init_seed=3)
    optimizer = torch.optim.AdamW(list(lora.parameters()), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    with contextlib.ExitStack() as stack:
        recaster = stack.enter_context(recast_saved_weights(frozen_layers([net]))) if recast else None
        for _ in range(3):
            net(torch.randn(2, 3, 4, 4, generator=generator)).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    assert not any(layer._forward_hooks or layer._forward_pre_hooks for layer in net.modules())   # hooks removed
    return [parameter.detach().clone() for parameter in lora.parameters()], recaster, net


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_recast_trains_the_same_weights_bit_for_bit(dtype, dora):
    kept, _, _ = train(dtype, recast=False, dora=dora)
    recast, recaster, net = train(dtype, recast=True, dora=dora)
    assert all(torch.equal(a, b) for a, b in zip(kept, recast))
    verified = {}
    for (layer_id, *_), same in recaster.verified.items():
        verified.setdefault(layer_id, set()).add(same)
    # Every layer casting its weight that backward needs has its copy made again in backward (3 steps
    # each), the square one (saved transposed in its own shape) and the untrained conv included; the
    # patched layer's product is not its weight cast and is kept. (The stem's weight is never saved: its
    # input needs no gradient.)
    casting = [net.conv, net.square, net.wide, net.head]
    assert all(verified[id(layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer)] == {True}
               for layer in casting)
    assert verified[id(net.patched)] == {False}
    assert recaster.recast >= 3 * len(casting)


def test_frozen_layers_leave_out_trained_and_skipped_ones():
    net = Net(torch.float16)
    net.head.weight.requires_grad_(True)
    assert frozen_layers([net], skip=frozenset({id(net.conv)})) == [net.stem, net.square, net.wide, net.patched]
