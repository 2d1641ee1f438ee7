"""The family table, the flow-matching sigma samplers and the target rules (training/families/table.py,
training/families/sigmas.py, training/network/targets.py, training/run/loop.py)."""
from __future__ import annotations

import dataclasses

import math

import pytest
import torch

from lora_lab.training.families import sigmas as families
from lora_lab.training.families.sigmas import (SIGMA_SAMPLERS, TIMESTEP_SAMPLINGS, draw_flow_sigmas,
                                               flux_resolution_shift, sampling_for, shifted)
from lora_lab.training.families.table import (CONDITIONING_EXTRAS, FAMILIES, FLUX_TARGETS, check_family_settings,
                                              family_labels)
from lora_lab.training.network.targets import TARGETS, dit_block_of, dit_target_paths, dit_targets_by_structure
from lora_lab.training.run import loop


def test_the_generic_entry_is_complete():
    """One entry trains every other model: objective, targets and sigma default come from the model
    (Family.resolved), the conditioning from its extra_conds, keys in ComfyUI's native style; it is not
    listed among the first-class families."""
    generic = [entry for entry in FAMILIES.values() if entry.structural]
    assert len(generic) == 1
    entry = generic[0]
    assert not entry.objective_known and entry.dit is None and not entry.text_encoders and entry.frozen_text
    assert entry.conditioning == ("model_conds",) and entry.key_style == "comfy" and entry.key_style_reason
    assert entry.exact_length_text and entry.sampling_source and entry.modelspec_implementation
    assert entry.label not in family_labels()
    targets = FLUX_TARGETS
    flow = entry.resolved("Lumina2", "flow", targets, 6.0)
    assert flow.flow and flow.dit is targets and (flow.sampling, flow.sampling_shift) == ("shift", 6.0)
    assert flow.base_model_version.endswith("lumina2") and flow.model_name == "Lumina2"
    assert entry.resolved("Chroma", "flow", targets, 1.0).sampling == "logit_normal"   # shift 1: no shift
    discrete = entry.resolved("PixArt", "discrete", targets, None)
    assert not discrete.flow and discrete.sampling == "uniform"
    with pytest.raises(ValueError, match="min_snr_gamma = 5 does not apply to Lumina2 \\(generic path\\)"):
        check_family_settings(flow, 0.0, 5.0, "auto")
    check_family_settings(entry, 0.0, 5.0, "shift")   # unresolved: checked once the model resolves it
    check_family_settings(discrete, 0.05, 5.0, "auto")


class _Attention(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)


class _Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.attn = _Attention(width)
        self.img_mlp = torch.nn.Sequential(torch.nn.Linear(width, 4 * width), torch.nn.GELU(),
                                           torch.nn.Linear(4 * width, width))
        self.adaLN_modulation = torch.nn.Linear(width, 6 * width)


class _FusedBlock(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.linear1, self.linear2 = torch.nn.Linear(width, 7 * width), torch.nn.Linear(5 * width, width)


class _Model(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.x_embedder = torch.nn.Linear(4, width)
        self.embedders = torch.nn.ModuleList([torch.nn.Linear(4, width), torch.nn.Linear(4, width)])
        self.helpers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(width, width)) for _ in range(2)])
        self.double_blocks = torch.nn.ModuleList([_Block(width) for _ in range(2)])
        self.single_blocks = torch.nn.ModuleList([_FusedBlock(width) for _ in range(3)])
        self.norms = torch.nn.ModuleList([torch.nn.LayerNorm(width) for _ in range(2)])


def test_generic_targets_are_found_by_structure():
    """The repeated blocks that hold the weight (double + single here; not the small helpers, the bare
    Linear list or the norms), in definition order; attention = linears under an attn part (a fused
    block with none: all its linears), attention_ff adds the mlp, all = every linear in the blocks."""
    model = _Model()
    targets = dit_targets_by_structure(model)
    assert targets.call_order == ("double_blocks", "single_blocks")
    assert targets.blocks == ("double_blocks.", "single_blocks.")
    attention = dit_target_paths(model, targets, "attention")
    assert "double_blocks.0.attn.qkv" in attention and "single_blocks.2.linear1" in attention
    assert not any("mlp" in path or "adaLN" in path for path in attention)
    attention_ff = dit_target_paths(model, targets, "attention_ff")
    assert set(attention_ff) - set(attention) == {f"double_blocks.{index}.img_mlp.{layer}"
                                                  for index in range(2) for layer in (0, 2)}
    everything = dit_target_paths(model, targets, "all_linear_conv")
    assert everything == dit_target_paths(model, targets, "kohya_default")
    assert "double_blocks.1.adaLN_modulation" in everything and not any(
        path.startswith(("x_embedder", "embedders", "helpers")) for path in everything)
    blocks = dit_block_of(targets, everything)   # block weights: thirds of the 5 blocks in call order
    assert blocks["double_blocks.0.attn.qkv"] == "down" and blocks["single_blocks.2.linear2"] == "up"
    with pytest.raises(ValueError, match="no list of repeated blocks"):
        dit_targets_by_structure(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_every_family_entry_is_complete():
    for key, entry in FAMILIES.items():
        if entry.structural:   # test_the_generic_entry_is_complete
            continue
        assert entry.key == key and entry.objective in ("discrete", "flow") and entry.label
        assert entry.base_model_version and entry.modelspec_architecture and entry.modelspec_implementation
        # the encoders its CLIP holds; or one of several (Flux.2: Mistral-3 for dev, Qwen3 for Klein)
        assert (entry.encoders or entry.optional_encoders) and entry.clip_loader and entry.sampling in SIGMA_SAMPLERS
        assert entry.key_style in ("kohya", "diffusers") and entry.unet_key_names in ("ldm", "diffusers")
        assert set(entry.conditioning) <= set(CONDITIONING_EXTRAS)
        for text in entry.text_encoders:   # a trained encoder is one the CLIP holds, with its own key prefix
            assert text.encoder in entry.encoders and text.key_prefix
            assert entry.text_encoder(text.part) is text
        assert len({text.key_prefix for text in entry.text_encoders}) == len(entry.text_encoders)
        assert entry.text_encoders or entry.frozen_text   # which encoders train, or in words which stay frozen
        if entry.flow:
            assert entry.sampling_source and entry.dit is not None and entry.dit.kohya_default_source
            assert entry.key_style_reason and entry.frozen_text
        if entry.dit is not None:
            assert entry.dit.call_order
            for target in TARGETS:   # every `target` option means something on the DiT
                assert entry.dit.suffixes(target)
        else:
            assert not entry.flow and entry.text_encoders


def test_no_runtime_module_outside_the_table_branches_on_a_family_name():
    """A family is one table entry: code reads its fields, it never asks which family it is. Any
    quoted family key in a runtime module (training/, nodes/) outside the table and the detection
    mapping is a branch, a per-family dict or a default that belongs in the entry."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    allowed = {root / "training" / "families" / "table.py", root / "nodes" / "comfy" / "detect.py"}
    found = []
    for path in sorted([*(root / "training").rglob("*.py"), *(root / "nodes").rglob("*.py")]):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in FAMILIES:
                found.append(f"{path.relative_to(root)}:{node.lineno}: {node.value!r}")
    assert not found, "family names outside the table:\n" + "\n".join(found)


def test_every_node_choice_of_timestep_sampling_has_a_sampler():
    assert set(TIMESTEP_SAMPLINGS) - {"auto"} <= set(SIGMA_SAMPLERS)
    assert all(entry.sampling in SIGMA_SAMPLERS for entry in FAMILIES.values())


def test_auto_sampling_is_the_family_default_and_explicit_choices_win():
    flux, sd3, zimage = FAMILIES["flux"], FAMILIES["sd3"], FAMILIES["zimage"]
    assert sampling_for(flux, "auto", 3.0) == ("flux_shift", 3.0)
    assert sampling_for(sd3, "auto", 3.0)[0] == "logit_normal"
    assert sampling_for(zimage, "auto", 7.0) == ("shift", 3.0)
    assert sampling_for(zimage, "shift", 7.0) == ("shift", 7.0)
    assert sampling_for(flux, "uniform", 3.0) == ("uniform", 3.0)


def test_flux_shift_follows_the_token_count():
    assert flux_resolution_shift(32, 32) == pytest.approx(math.exp(0.5))      # 256 tokens (512 px)
    assert flux_resolution_shift(128, 128) == pytest.approx(math.exp(1.15))   # 4096 tokens (1024 px)
    assert shifted(torch.tensor(0.5), 3.0) == pytest.approx(0.75)
    assert shifted(torch.tensor(0.5), 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("kind", ["uniform", "logit_normal", "shift", "flux_shift"])
def test_sigma_samplers_stay_in_range_and_are_reproducible(kind):
    draw = lambda: draw_flow_sigmas(kind, 3.0, 4000, (4000, 16, 64, 64), torch.Generator().manual_seed(1))  # noqa: E731
    sigmas = draw()
    assert torch.equal(sigmas, draw())
    assert sigmas.dtype == torch.float32 and sigmas.min() >= families.SIGMA_FLOOR and sigmas.max() <= 1.0
    mean = float(sigmas.mean())
    expected = {"uniform": (0.45, 0.55), "logit_normal": (0.45, 0.55), "shift": (0.65, 0.8), "flux_shift": (0.58, 0.68)}   # 1024 tokens: shift 1.88
    assert expected[kind][0] < mean < expected[kind][1], mean
    if kind == "logit_normal":   # mass in the middle: fewer extremes than uniform
        assert float(((sigmas < 0.1) | (sigmas > 0.9)).float().mean()) < 0.1


@pytest.mark.parametrize("noise_range,inside", [("high_noise", (0.875, 1.0)), ("low_noise", (families.SIGMA_FLOOR, 0.875))])
def test_an_expert_range_keeps_the_distribution_shape_inside_it(noise_range, inside):
    """Wan 2.2 A14B: each expert trains only its side of the boundary (0.875 = the wan entry's, noise_boundary 0),
    by rejection sampling, so the density inside the range is the unrestricted one, renormalised."""
    from lora_lab.training.families.sigmas import noise_range_sigmas

    wan = FAMILIES["wan"]
    sigma_range = noise_range_sigmas(wan, noise_range, 0.0)
    assert sigma_range == (0.875, 1.0) if noise_range == "high_noise" else sigma_range == (0.0, 0.875)
    drawn = draw_flow_sigmas("shift", 3.0, 4000, (1, 16, 3, 8, 8), torch.Generator().manual_seed(2), sigma_range)
    assert drawn.shape == (4000,) and inside[0] <= float(drawn.min()) and float(drawn.max()) <= inside[1]
    reference = draw_flow_sigmas("shift", 3.0, 200000, (1, 16, 3, 8, 8), torch.Generator().manual_seed(3))
    reference = reference[(reference >= inside[0]) & (reference <= inside[1])]
    assert abs(float(drawn.mean()) - float(reference.mean())) < 0.01   # the same shape, not rescaled
    again = draw_flow_sigmas("shift", 3.0, 4000, (1, 16, 3, 8, 8), torch.Generator().manual_seed(2), sigma_range)
    assert torch.equal(drawn, again)
    assert noise_range_sigmas(wan, "high_noise", 0.9) == (0.9, 1.0)   # image-to-video's boundary, set by hand
    assert noise_range_sigmas(FAMILIES["flux"], "all", 0.0) == (0.0, 1.0)


def test_noise_ranges_that_cannot_apply_are_refused_with_the_fix():
    from lora_lab.training.families.sigmas import noise_range_sigmas

    with pytest.raises(ValueError, match="noise_range = high_noise needs a boundary.*Set noise_boundary"):
        noise_range_sigmas(FAMILIES["flux"], "high_noise", 0.0)
    assert noise_range_sigmas(FAMILIES["flux"], "low_noise", 0.5) == (0.0, 0.5)   # any flow model, by hand
    with pytest.raises(ValueError, match="noise_range = low_noise applies to flow-matching models.*Set all"):
        noise_range_sigmas(FAMILIES["sdxl"], "low_noise", 0.5)


def test_flow_prediction_recovers_the_velocity_from_a_perfect_denoiser():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([0.3, 0.9])
    objective = loop.DiffusionObjective(
        sigmas=torch.linspace(0.001, 1, 1000), prediction_type="flow",
        denoise=lambda xt, s, cond: x0,   # the exact x0: the loss must be 0
        noise_scaling=lambda s, n, x: s.reshape(-1, 1, 1, 1) * n + (1 - s.reshape(-1, 1, 1, 1)) * x,
        sigma_sampler=lambda batch, shape, generator: torch.full((batch,), 0.5))
    assert float(loop.loss_at_sigma(objective, x0, {}, noise, sigma)) < 1e-10
    assert objective.draw_sigmas(x0, torch.Generator()).tolist() == [0.5, 0.5]
    assert objective.validation_sigmas(4).tolist() == [0.125, 0.375, 0.625, 0.875]
    expert = dataclasses.replace(objective, sigma_range=(0.5, 1.0))   # validation measures the trained range
    assert expert.validation_sigmas(2).tolist() == [0.625, 0.875]


def test_dit_block_weights_split_the_blocks_in_thirds_in_depth_order():
    paths = [f"double_blocks.{i}.img_attn.qkv" for i in range(3)] + [f"single_blocks.{i}.linear1" for i in range(3)]
    groups = dit_block_of(FLUX_TARGETS, paths)
    assert [groups[path] for path in paths] == ["down", "down", "mid", "mid", "up", "up"]


def test_settings_a_flow_model_cannot_use_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="min_snr_gamma = 5 does not apply to Flux.1.*Set min_snr_gamma to 0"):
        check_family_settings("flux", 0.0, 5.0, "auto")
    with pytest.raises(ValueError, match="noise_offset = 0.05 does not apply to Z-Image"):
        check_family_settings("zimage", 0.05, 0.0, "auto")
    with pytest.raises(ValueError, match="timestep_sampling = shift applies to flow-matching models.*SDXL"):
        check_family_settings("sdxl", 0.0, 0.0, "shift")
    check_family_settings("sdxl", 0.05, 5.0, "uniform")   # the epsilon tools still work on SD
    check_family_settings("sd3", 0.0, 0.0, "logit_normal")


def test_captions_of_an_llm_encoder_keep_their_lengths_in_a_batch():
    """CLIP conds of different lengths are repeated to a common length (as ComfyUI batches them); an
    encoder whose tokens carry positions (Z-Image's Qwen3: exact_length) keeps each caption separate."""
    from lora_lab.training.data.feeder import concat_conditioning

    short, long = torch.ones(1, 2, 4), torch.ones(1, 3, 4) * 2
    clip = concat_conditioning([{"c_crossattn": short, "pooled": torch.zeros(1, 4)},
                                {"c_crossattn": long, "pooled": torch.ones(1, 4)}])
    assert clip["c_crossattn"].shape == (2, 6, 4) and clip["pooled"].shape == (2, 4)
    llm = concat_conditioning([{"c_crossattn": short, "exact_length": True},
                               {"c_crossattn": long, "exact_length": True}])
    assert [sample["c_crossattn"].shape[1] for sample in llm["samples"]] == [2, 3]
    same = concat_conditioning([{"c_crossattn": short, "exact_length": True},
                                {"c_crossattn": short * 3, "exact_length": True}])
    assert same["c_crossattn"].shape == (2, 2, 4) and same["exact_length"] is True
