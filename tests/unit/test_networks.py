"""LyCORIS LoKr / LoHa (Train LoRA's `network`) on plain torch modules, no ComfyUI: the layers peft
injects take LyCORIS's shapes, what the file holds rebuilds the trained delta under ComfyUI's rules
(written out below from comfy/weight_adapter/lokr.py and loha.py) and under LyCORIS's own code
(lycoris-lora, a test-only package), the key and metadata layout, and what is refused."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from lora_lab.training.lr import optimizers
from lora_lab.training.network import kohya, lora, lycoris

NETWORKS = [  # (network, rank, alpha, lokr_factor, lokr_decompose_both)
    pytest.param("lokr", 4, 3.0, -1, False, id="lokr"),
    pytest.param("lokr", 2, 3.0, 8, True, id="lokr-factor8-both"),
    pytest.param("lokr", 64, 3.0, -1, False, id="lokr-full"),
    pytest.param("loha", 4, 3.0, -1, False, id="loha"),
]


class Toy(torch.nn.Module):
    """A Linear, a 3x3 and a 1x1 convolution (every layer kind a target can pick)."""

    def __init__(self, dtype=torch.float32) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(64, 128, dtype=dtype)
        self.conv = torch.nn.Conv2d(16, 32, 3, padding=1, dtype=dtype)
        self.pointwise = torch.nn.Conv2d(32, 16, 1, dtype=dtype)

    def forward(self, x, image):
        return self.linear(x), self.pointwise(self.conv(image))


PATHS = ["linear", "conv", "pointwise"]


def inject(toy, network, rank, alpha, factor, both, seed=0):
    return lora.inject_lora(toy, "unet", PATHS, rank, alpha, init_seed=seed, network=network, lokr_factor=factor,
                            lokr_decompose_both=both)


def trained(network, rank, alpha, factor, both):
    """(toy, injected, inputs) after three SGD steps: every factor moved away from its initial value."""
    torch.manual_seed(0)
    toy = Toy()
    injected = inject(toy, network, rank, alpha, factor, both)
    optimizer = torch.optim.SGD(list(injected.parameters()), lr=0.5)
    inputs = (torch.randn(3, 5, 64), torch.randn(2, 16, 6, 6))
    for _ in range(3):
        linear, conv = toy(*inputs)
        ((linear - 1).square().mean() + (conv - 1).square().mean()).backward()
        optimizer.step()
        optimizer.zero_grad()
    return toy, injected, inputs


def comfy_delta(weights: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """ComfyUI's LoKr / LoHa adapters' calculate_weight at strength 1, minus the base (0.3.75 and 0.33 alike)."""
    alpha = weights.get("alpha")
    if "hada_w1_a" in weights:
        scale = float(alpha) / weights["hada_w1_b"].shape[0]
        m1 = weights["hada_w1_a"] @ weights["hada_w1_b"]
        m2 = weights["hada_w2_a"] @ weights["hada_w2_b"]
        return scale * (m1 * m2).reshape(shape)
    dim = None
    w1 = weights.get("lokr_w1")
    if w1 is None:
        dim = weights["lokr_w1_b"].shape[0]
        w1 = weights["lokr_w1_a"] @ weights["lokr_w1_b"]
    w2 = weights.get("lokr_w2")
    if w2 is None:
        dim = weights["lokr_w2_b"].shape[0]
        w2 = weights["lokr_w2_a"] @ weights["lokr_w2_b"]
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    scale = float(alpha) / dim if alpha is not None and dim is not None else 1.0
    return scale * torch.kron(w1, w2).reshape(shape)


def lycoris_delta(weights: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """LyCORIS's functional rebuild (lycoris.functional.lokr / loha diff_weight) from the file's tensors."""
    from lycoris.functional import loha as functional_loha
    from lycoris.functional import lokr as functional_lokr

    if "hada_w1_a" in weights:
        gamma = float(weights["alpha"]) / weights["hada_w1_b"].shape[0]
        return functional_loha.diff_weight(weights["hada_w1_b"], weights["hada_w1_a"], weights["hada_w2_b"],
                                           weights["hada_w2_a"], None, None, gamma=gamma).reshape(shape)
    names = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
    return functional_lokr.diff_weight(*(weights.get(name) for name in names), None,
                                       gamma=float(weights["alpha"])).reshape(shape)


@pytest.mark.parametrize("network, rank, alpha, factor, both", NETWORKS)
def test_layers_take_lycoris_shapes_and_the_file_rebuilds_the_trained_delta(network, rank, alpha, factor, both):
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    toy, injected, inputs = trained(network, rank, alpha, factor, both)
    with torch.no_grad():
        outputs = toy(*inputs)
    for module in injected.modules:
        base = module.layer.get_base_layer()
        # the shapes LyCORIS's own module makes for this layer and these inputs
        reference = (LokrModule("x", base, lora_dim=rank, alpha=alpha, factor=factor, decompose_both=both)
                     if network == "lokr" else LohaModule("x", base, lora_dim=rank, alpha=alpha))
        expected = {name: tuple(tensor.shape) for name, tensor in reference.named_parameters()
                    if name in lycoris.FACTOR_NAMES[network]}
        assert {name: tuple(tensor.shape) for name, tensor in module.factors.items()} == expected, module.path
        weights = lora.lora_weights(module, torch.float32)
        assert float(weights["alpha"]) == pytest.approx(float(reference.alpha))   # LyCORIS's alpha buffer
        assert set(weights) == set(expected) | {"alpha"}
        with torch.no_grad():
            trained_delta = lycoris.delta_weight(module.layer, lora.ADAPTER_NAME)
            assert float(trained_delta.abs().max()) > 1e-4, module.path
            comfy = comfy_delta(weights, base.weight.shape)
            torch.testing.assert_close(comfy, trained_delta, rtol=1e-5, atol=1e-7, msg=module.path)
            torch.testing.assert_close(lycoris_delta(weights, base.weight.shape), comfy, rtol=1e-5, atol=1e-7)
            # What LyCORIS's module applies (its forward's rebuild) from the file's tensors. Linear layers only:
            # from a convolution's flattened lokr_w2_b (its own module's layout, ComfyUI's too) LyCORIS 4.1.3's
            # make_module_from_state_dict infers the wrong factor.
            if not isinstance(base, torch.nn.Linear):
                continue
            if network == "lokr":
                rebuilt = LokrModule.make_module_from_state_dict(
                    "x", base, *(weights.get(name) for name in lycoris.FACTOR_NAMES["lokr"]), None, None,
                    weights["alpha"], None)
            else:
                rebuilt = LohaModule.make_module_from_state_dict(
                    "x", base, *(weights[name] for name in lycoris.FACTOR_NAMES["loha"]), None, None,
                    weights["alpha"], None)
            torch.testing.assert_close(rebuilt.get_weight(base.weight.shape), comfy, rtol=1e-5, atol=1e-7)
    # The trained forward is the base layer with ComfyUI's delta added.
    with torch.no_grad():
        deltas = {module.path: comfy_delta(lora.lora_weights(module, torch.float32),
                                           module.layer.get_base_layer().weight.shape) for module in injected.modules}
        injected.remove()
        linear = torch.nn.functional.linear(inputs[0], toy.linear.weight + deltas["linear"], toy.linear.bias)
        conv = torch.nn.functional.conv2d(inputs[1], toy.conv.weight + deltas["conv"], toy.conv.bias, padding=1)
        conv = torch.nn.functional.conv2d(conv, toy.pointwise.weight + deltas["pointwise"], toy.pointwise.bias)
    torch.testing.assert_close(outputs[0], linear, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outputs[1], conv, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("network, rank, alpha, factor, both", NETWORKS)
def test_removal_restores_the_module_and_initial_delta_is_zero(network, rank, alpha, factor, both):
    toy = Toy()
    state = {name: tensor.clone() for name, tensor in toy.state_dict().items()}
    classes = {name: type(module) for name, module in toy.named_modules()}
    inputs = (torch.randn(2, 64), torch.randn(1, 16, 4, 4))
    before = toy(*inputs)
    injected = inject(toy, network, rank, alpha, factor, both, seed=3)
    assert all(tensor.dtype == torch.float32 and tensor.requires_grad for tensor in injected.parameters())
    assert not any(parameter.requires_grad for name, parameter in toy.named_parameters() if "base_layer" in name)
    after = toy(*inputs)   # LyCORIS's initialisation: one factor zero, so the model starts unchanged
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    torch.testing.assert_close(after[1], before[1], rtol=0, atol=0)
    again = inject(Toy(), network, rank, alpha, factor, both, seed=3)
    assert all(torch.equal(first, second) for first, second in zip(injected.parameters(), again.parameters()))
    injected.remove()
    assert {name: type(module) for name, module in toy.named_modules()} == classes
    assert all(torch.equal(tensor, state[name]) for name, tensor in toy.state_dict().items())
    assert all(parameter.requires_grad for parameter in toy.parameters())


@pytest.mark.parametrize("factor, both, rank", [(-1, False, 4), (8, True, 2), (-1, False, 64)])
def test_lokr_linear_forward_never_builds_the_delta_and_matches_it(factor, both, rank):
    """The LoKr Linear forward (w1 @ X @ w2ᵀ on the folded input) equals F.linear with the built delta, in
    value and in every factor's gradient."""
    torch.manual_seed(1)
    layer = torch.nn.Linear(96, 160)
    injected = lora.inject_lora(torch.nn.Sequential(layer), "unet", ["0"], rank, 5.0, network="lokr",
                                lokr_factor=factor, lokr_decompose_both=both)
    module = injected.modules[0]
    with torch.no_grad():
        for tensor in module.factors.values():
            tensor.normal_()
    x = torch.randn(2, 7, 96)
    shortcut = lycoris.kron_linear(x, module.factors, module.layer.scaling[lora.ADAPTER_NAME])
    shortcut.square().sum().backward()
    grads = {name: tensor.grad.clone() for name, tensor in module.factors.items()}
    for tensor in module.factors.values():
        tensor.grad = None
    built = torch.nn.functional.linear(x, lycoris.delta_weight(module.layer, lora.ADAPTER_NAME))
    built.square().sum().backward()
    torch.testing.assert_close(shortcut, built, rtol=1e-4, atol=1e-4)
    for name, tensor in module.factors.items():
        torch.testing.assert_close(grads[name], tensor.grad, rtol=1e-4, atol=1e-3, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "fp8"])
@pytest.mark.parametrize("network", ["lokr", "loha"])
def test_factors_are_fp32_over_half_and_fp8_bases(network, dtype):
    toy = Toy()
    toy.linear.to(dtype)
    injected = lora.inject_lora(toy, "unet", ["linear"], 4, 4.0, network=network)
    assert all(tensor.dtype == torch.float32 for tensor in injected.parameters())
    assert float(sum(tensor.detach().abs().sum() for tensor in injected.parameters())) > 0   # initialised in fp32
    injected.remove()
    assert toy.linear.weight.dtype == dtype and type(toy.linear) is torch.nn.Linear


def test_file_keys_alpha_and_dtype_layout():
    entries = [("lora_unet_a", {"lokr_w1": torch.ones(4, 4), "lokr_w2_a": torch.ones(8, 2),
                                "lokr_w2_b": torch.ones(2, 4), "alpha": torch.tensor(3.0)}),
               ("lora_te_b", {"hada_w1_a": torch.ones(6, 2), "hada_w1_b": torch.ones(2, 5), "hada_w2_a": torch.ones(6, 2),
                              "hada_w2_b": torch.ones(2, 5), "alpha": torch.tensor(1.5)}),
               ("lora_te_c", {"down": torch.ones(2, 5), "up": torch.ones(6, 2)})]
    tensors = kohya.kohya_state_dict(entries, alpha=8.0, dtype=torch.bfloat16)
    assert set(tensors) == {"lora_unet_a.lokr_w1", "lora_unet_a.lokr_w2_a", "lora_unet_a.lokr_w2_b", "lora_unet_a.alpha",
                            "lora_te_b.hada_w1_a", "lora_te_b.hada_w1_b", "lora_te_b.hada_w2_a", "lora_te_b.hada_w2_b",
                            "lora_te_b.alpha", "lora_te_c.lora_down.weight", "lora_te_c.lora_up.weight", "lora_te_c.alpha"}
    assert all(tensor.dtype == torch.bfloat16 for tensor in tensors.values())
    assert (tensors["lora_unet_a.alpha"].item(), tensors["lora_te_b.alpha"].item(), tensors["lora_te_c.alpha"].item()) \
        == (3.0, 1.5, 8.0)   # each network's own alpha; LoRA's from the input
    assert tensors["lora_unet_a.alpha"].shape == ()
    assert kohya.lora_state_dict(entries[:2], 8.0, torch.float32, "comfy").keys() == \
        kohya.kohya_state_dict(entries[:2], 8.0, torch.float32).keys()
    with pytest.raises(ValueError, match="no diffusers names"):
        kohya.lora_state_dict(entries[:1], 8.0, torch.float32, "diffusers")
    with pytest.raises(ValueError, match="cannot be split into row slices"):
        kohya.file_entries([("transformer.x.to_q", (0, 4), None)], entries[0][1])


def test_sd3_lycoris_files_take_kohya_names():
    """LoKr / LoHa on a diffusers-style family (SD3): sd-scripts' kohya names, lora_unet_ and lora_te1_ / lora_te2_;
    every other family and LoRA keep their key style."""
    assert kohya.network_key_style("diffusers", "lokr") == "kohya" == kohya.network_key_style("diffusers", "loha")
    assert kohya.network_key_style("diffusers", "lora") == "diffusers"
    assert kohya.network_key_style("comfy", "lokr") == "comfy" and kohya.network_key_style("kohya", "loha") == "kohya"
    assert kohya.text_key_prefix("text_encoder.", "text_encoder", "kohya") == "lora_te1_"
    assert kohya.text_key_prefix("text_encoder_2.", "text_encoder_2", "kohya") == "lora_te2_"
    assert kohya.text_key_prefix("lora_te2_", "text_encoder_2", "kohya") == "lora_te2_"
    assert kohya.text_key_prefix("text_encoder.", "text_encoder", "diffusers") == "text_encoder."
    key_map = {"lora_unet_joint_blocks_0_x_block_attn_qkv": "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"}
    assert kohya.kohya_unet_names(key_map, ["joint_blocks.0.x_block.attn.qkv"], "ldm") == {
        "joint_blocks.0.x_block.attn.qkv": "lora_unet_joint_blocks_0_x_block_attn_qkv"}


def settings(**values):
    defaults = dict(network="lokr", rank=16, alpha=8.0, lokr_factor=-1, lokr_decompose_both=False, loha_rank=8,
                    loha_alpha=4.0, use_dora=False)
    return SimpleNamespace(**{**defaults, **values})


def test_metadata_names_lycoris_and_its_arguments():
    fields = lycoris.network_fields(settings(lokr_factor=8, lokr_decompose_both=True), conv_trained=False)
    assert fields["ss_network_module"] == "lycoris.kohya"
    assert (fields["ss_network_dim"], fields["ss_network_alpha"]) == (16, 8.0)
    assert fields["ss_network_args"] == {"algo": "lokr", "factor": "8", "decompose_both": "True"}
    fields = lycoris.network_fields(settings(network="loha"), conv_trained=True)
    assert (fields["ss_network_dim"], fields["ss_network_alpha"]) == (8, 4.0)   # loha_rank / loha_alpha
    assert fields["ss_network_args"] == {"algo": "loha", "conv_dim": "8", "conv_alpha": "4.0"}
    metadata = kohya.kohya_metadata(fields, {})
    assert json.loads(metadata["ss_network_args"])["algo"] == "loha" and metadata["ss_network_dim"] == "8"
    assert lycoris.rank_and_alpha(settings(network="lora")) == (16, 8.0)


def test_dora_and_lora_plus_are_refused_naming_both_inputs():
    with pytest.raises(ValueError, match=r"use_dora = True with network = 'lokr'.*Turn use_dora off, or set network to lora"):
        lycoris.check_network("lokr", use_dora=True)
    with pytest.raises(ValueError, match=r"lora_plus_ratio = 4 .*network = 'loha'.*Set lora_plus_ratio to 1, or network"):
        lycoris.check_network("loha", lora_plus_ratio=4.0)
    lycoris.check_network("lora", use_dora=True, lora_plus_ratio=4.0)   # LoRA: both are LoRA's own
    with pytest.raises(ValueError, match="use_dora = True with network = 'loha'"):
        lora.inject_lora(Toy(), "unet", ["linear"], 4, 4.0, use_dora=True, network="loha")


def test_param_groups_put_the_factors_in_the_part_groups_and_report_their_rates():
    toy = Toy()
    injected = lora.inject_lora(toy, "unet", PATHS, 4, 4.0, network="loha")
    layers = [optimizers.TrainedLayer(part="unet", block="up" if module.path == "conv" else "down", down=module.down,
                                      up=module.up, factors=tuple(module.factors.values()))
              for module in injected.modules]
    groups = optimizers.build_param_groups(layers, {"unet": 1e-4, "text_encoder": 0.0, "text_encoder_2": 0.0}, 1.0,
                                           lambda block: 2.0 if block == "up" else 1.0)
    assert [(group["name"], group["matrix"], group["lr"], len(group["params"])) for group in groups] == [
        ("unet/down/A", "A", 1e-4, 8), ("unet/up/A", "A", 2e-4, 4)]
    optimizer = torch.optim.AdamW(groups, lr=1e-4)
    assert optimizers.applied_rates(optimizer) == pytest.approx({"unet": 2e-4})
    with pytest.raises(ValueError, match="lora_plus_ratio = 2 .*Set lora_plus_ratio to 1"):
        optimizers.build_param_groups(layers, {"unet": 1e-4}, 2.0, lambda block: 1.0)

