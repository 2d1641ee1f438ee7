"""Block streaming on small real torch modules (CPU: host and device are one memory, the copies are
real): same gradients as resident, weights given back, the device ledger bounded by the plan's window."""
from __future__ import annotations

import pytest
import torch

from lora_lab.training.network.lora import checkpointed_forward, inject_lora, patched_forwards
from lora_lab.training.run.memory_plan import MEMORY_MODES, plan_memory
from lora_lab.training.run.streaming import BlockStreamer, DeviceLedger, frozen_bytes


class Block(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.fc1 = torch.nn.Linear(width, width * 2)
        self.fc2 = torch.nn.Linear(width * 2, width)
        self.register_buffer("scale", torch.full((width,), 0.5))

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x)))) * self.scale


class Net(torch.nn.Module):
    def __init__(self, width: int = 16, depth: int = 5) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.head = torch.nn.Linear(width, 8)

    def forward(self, x):
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def train(stream: bool, dora: bool = False, steps: int = 3):
    torch.manual_seed(0)
    net = Net()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    originals = {name: tensor.clone() for name, tensor in net.state_dict().items()}
    objects = {name: id(tensor) for name, tensor in net.state_dict(keep_vars=True).items()}
    paths = [f"blocks.{index}.{name}" for index in range(5) for name in ("fc1", "fc2")]
    ledger = DeviceLedger(resident=frozen_bytes(net.embed) + frozen_bytes(net.head))
    streamer = BlockStreamer(list(net.blocks), torch.device("cpu"), ledger=ledger)
    patches = [(block, checkpointed_forward(block, streamer.forward(block) if stream else None))
               for block in net.blocks]
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 8, generator=generator) for _ in range(steps)]
    with patched_forwards(patches):
        lora = inject_lora(net, "unet", paths, 4, 4.0, use_dora=dora, init_seed=3)
        optimizer = torch.optim.AdamW(list(lora.parameters()), lr=1e-2)
        with streamer.active(lora.parameters()):
            for x in inputs:
                loss = (net(x) - x).pow(2).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
        weights = [parameter.detach().clone() for parameter in lora.parameters()]
        lora.remove()
    assert all(torch.equal(originals[name], tensor) for name, tensor in net.state_dict().items())
    assert {name: id(tensor) for name, tensor in net.state_dict(keep_vars=True).items()} == objects
    return weights, ledger, net, streamer


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_streamed_training_equals_resident_bit_for_bit(dora):
    resident, *_ = train(stream=False, dora=dora)
    streamed, ledger, net, _ = train(stream=True, dora=dora)
    assert all(torch.equal(a, b) for a, b in zip(resident, streamed))
    assert ledger.copies > 0 and ledger.streamed == 0          # every copy made was freed again
    block = frozen_bytes(net.blocks[0])
    # The plan's window (the running block + the prefetched one) bounds what was on the device.
    assert ledger.resident < ledger.peak <= ledger.resident + 2 * block


def test_prefetch_follows_the_recorded_call_order():
    _, ledger, _, streamer = train(stream=True, steps=3)
    # Each step lends 5 blocks in forward and 5 in backward's recompute. The order is learned in the
    # first step; from then on every call finds its copies made ahead of use (but the second step's
    # first call: what follows the last recompute is learned there), and a block that runs
    # twice in a row (the last forward block, then its recompute) reuses its copies: fewer copies than
    # calls (7 frozen tensors per block).
    assert streamer.lends == 3 * 10
    assert streamer.prefetched == 2 * 10 - 1
    assert ledger.copies < streamer.lends * 7


def test_plan_modes_and_the_refusal():
    blocks = [100] * 8
    assert plan_memory("auto", "cuda:0", 0, 50, blocks, 10, 20).mode == "resident"
    assert plan_memory("stream", "cpu", 0, 50, blocks, 10, 20).streamed == tuple(range(8))
    auto = plan_memory("auto", "cuda:0", 500, 50, blocks, 10, 20)
    assert auto.mode == "stream" and 0 < len(auto.streamed) < 8
    assert auto.estimated_peak <= 500
    fewer = plan_memory("auto", "cuda:0", 600, 50, blocks, 10, 20)
    assert len(fewer.streamed) < len(auto.streamed)
    with pytest.raises(ValueError, match="memory = resident.*budget is .*Set memory to auto"):
        plan_memory("resident", "cuda:0", 500, 50, blocks, 10, 20)
    with pytest.raises(ValueError, match="Even with every block streamed"):
        plan_memory("stream", "cuda:0", 200, 50, blocks, 10, 20)
    assert MEMORY_MODES[0] == "auto"
    assert "blocks stream from host memory" in auto.summary()


@pytest.mark.parametrize("network, optimizer", [("lora", "AdamW"), ("loha", "Prodigy"), ("lokr", "AdamW"),
                                                ("lora-dora", "SGD")])
def test_the_plans_training_state_is_the_networks_trained_values_with_the_optimizers_state(network, optimizer):
    """The plan sizes the training state from the adapter the run injects (counted on meta-device layers of
    the same shapes), so LoHa's two pairs and LoKr's small factors count as they train, and from the
    optimizer's own state per value; checked against the network injected for real."""
    from types import SimpleNamespace

    from lora_lab.training.lr.optimizers import OPTIMIZERS
    from lora_lab.training.run.memory_plan import training_state_bytes

    name, dora = network.split("-")[0], network.endswith("dora")
    settings = SimpleNamespace(network=name, rank=4, alpha=4.0, loha_rank=3, loha_alpha=3.0, use_dora=dora,
                               lokr_factor=-1, lokr_decompose_both=False, optimizer=optimizer)
    net = Net(width=24)
    paths = ["embed", "head"] + [f"blocks.{index}.{name}" for index in range(5) for name in ("fc1", "fc2")]
    estimate = training_state_bytes([net.get_submodule(path) for path in paths], settings)
    lora = inject_lora(net, "unet", paths, 3 if name == "loha" else 4, 4.0, use_dora=dora, network=name)
    values = sum(parameter.numel() for parameter in lora.parameters())
    lora.remove()
    assert estimate == values * (8 + OPTIMIZERS[optimizer].state_bytes)
