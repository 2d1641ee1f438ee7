"""kohya file naming, saving and metadata (no ComfyUI)."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from lora_lab.training.network import kohya


@pytest.mark.parametrize("name, expected", [("my_style", "my_style"), ("styles/alice", "styles/alice"),
                                            ("styles\\alice.safetensors", "styles/alice"), (" spaced ", "spaced")])
def test_sanitize_accepts_names_and_sub_folders(name, expected):
    assert kohya.sanitize_lora_name(name) == expected


@pytest.mark.parametrize("name", ["", "../escape", "a/../../b", "/etc/passwd", "C:\\loras\\x", "a//b", "bad|name",
                                  "./here", ".hidden", "a/.latent_cache"])
def test_sanitize_refuses_names_that_escape_or_are_invalid(name):
    with pytest.raises(ValueError, match="lora_name"):
        kohya.sanitize_lora_name(name)


def test_save_never_overwrites_and_numbers_taken_names(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.ones(2, 3), "lora_unet_x.lora_up.weight": torch.zeros(3, 2),
               "lora_unet_x.alpha": torch.tensor(2.0)}
    first = kohya.save_lora(tensors, {"ss_network_dim": "2"}, tmp_path, "style")
    second = kohya.save_lora(tensors, {"ss_network_dim": "2"}, tmp_path, "style")
    third = kohya.save_lora(tensors, {}, tmp_path, "sub/style")
    assert [first.name, second.name] == ["style.safetensors", "style_2.safetensors"]
    assert third == tmp_path / "sub" / "style.safetensors"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["style.safetensors", "style_2.safetensors", "sub"]
    with safe_open(str(first), "pt") as handle:
        assert handle.metadata() == {"ss_network_dim": "2"}
        assert torch.equal(handle.get_tensor("lora_unet_x.lora_down.weight"), torch.ones(2, 3))
    assert kohya.lora_name_for(third, tmp_path) == "sub/style.safetensors"


def test_state_dict_names_shapes_and_dora_scale_layout():
    entries = [("lora_unet_a", {"down": torch.ones(4, 8), "up": torch.ones(16, 4), "magnitude": torch.ones(16)}),
               ("lora_te_b", {"down": torch.ones(4, 8, 3, 3), "up": torch.ones(6, 4, 1, 1)})]
    tensors = kohya.kohya_state_dict(entries, alpha=8.0, dtype=torch.float16)
    assert set(tensors) == {"lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
                            "lora_unet_a.dora_scale", "lora_te_b.lora_down.weight", "lora_te_b.lora_up.weight",
                            "lora_te_b.alpha"}
    assert tensors["lora_unet_a.dora_scale"].shape == (16, 1)
    assert tensors["lora_te_b.alpha"].item() == 8.0 and tensors["lora_te_b.alpha"].dtype == torch.float16


def test_metadata_values_are_strings_with_kohya_conventions():
    metadata = kohya.kohya_metadata({"ss_network_dim": 16, "ss_unet_lr": 1e-4, "ss_tag_frequency": {"a": {"cat": 2}},
                                     "ss_v2": False, "ss_unused": None}, {"rank": 16})
    assert metadata["ss_network_dim"] == "16" and float(metadata["ss_unet_lr"]) == 1e-4
    assert json.loads(metadata["ss_tag_frequency"]) == {"a": {"cat": 2}} and metadata["ss_v2"] == "False"
    assert "ss_unused" not in metadata and json.loads(metadata["lora_lab_settings"]) == {"rank": 16}


def test_unet_names_follow_kohya_per_key_style():
    key_map = {"lora_unet_input_blocks_1_1_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight",
               "lora_unet_down_blocks_0_attentions_0_proj_in": "diffusion_model.input_blocks.1.1.proj_in.weight"}
    assert kohya.kohya_unet_names(key_map, ["input_blocks.1.1.proj_in"], "diffusers") == {
        "input_blocks.1.1.proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in"}
    assert kohya.kohya_unet_names(key_map, ["input_blocks.1.1.proj_in"], "ldm") == {
        "input_blocks.1.1.proj_in": "lora_unet_input_blocks_1_1_proj_in"}
    with pytest.raises(ValueError, match="no kohya name"):
        kohya.kohya_unet_names(key_map, ["output_blocks.0.0"], "diffusers")


def test_comfy_key_style_writes_native_diffusion_model_names():
    """The generic path: ComfyUI's own key map names every weight diffusion_model.<path>; the file holds
    those stems with kohya's tensor names (lora_down / lora_up / alpha)."""
    key_map = {"diffusion_model.layers.0.attention.qkv": "diffusion_model.layers.0.attention.qkv.weight",
               "lora_unet_layers_0_attention_qkv": "diffusion_model.layers.0.attention.qkv.weight"}
    names = kohya.comfy_unet_names(key_map, ["layers.0.attention.qkv"])
    assert names == {"layers.0.attention.qkv": "diffusion_model.layers.0.attention.qkv"}
    with pytest.raises(ValueError, match="no native name for layer layers.1.attention.qkv"):
        kohya.comfy_unet_names(key_map, ["layers.1.attention.qkv"])
    entries = [(names["layers.0.attention.qkv"], {"down": torch.ones(4, 8), "up": torch.ones(24, 4)})]
    assert set(kohya.lora_state_dict(entries, 4.0, torch.float32, "comfy")) == {
        "diffusion_model.layers.0.attention.qkv.lora_down.weight", "diffusion_model.layers.0.attention.qkv.lora_up.weight",
        "diffusion_model.layers.0.attention.qkv.alpha"}


def test_weights_beyond_fp16_range_are_saved_in_fp32_not_as_inf():
    from lora_lab.training.network.kohya import kohya_state_dict

    normal = [("lora_unet_x", {"down": torch.ones(2, 3), "up": torch.ones(3, 2)})]
    assert kohya_state_dict(normal, 2.0, torch.float16)["lora_unet_x.lora_up.weight"].dtype == torch.float16
    huge = [("lora_unet_x", {"down": torch.full((2, 3), 1e6), "up": torch.ones(3, 2)})]
    tensors = kohya_state_dict(huge, 2.0, torch.float16)
    assert all(tensor.dtype == torch.float32 and torch.isfinite(tensor).all() for tensor in tensors.values())
    assert float(tensors["lora_unet_x.lora_down.weight"].max()) == 1e6


def test_diffusers_names_split_fused_layers_by_rows_and_skip_transformed_layouts():
    """ComfyUI's diffusers key map: a plain weight, a row slice of a fused qkv, or a transformed layout."""
    import torch

    from lora_lab.training.network import kohya

    key_map = {
        "transformer.transformer_blocks.0.attn.to_q": ("diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (0, 0, 4)),
        "transformer.transformer_blocks.0.attn.to_k": ("diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (0, 4, 4)),
        "transformer.transformer_blocks.0.attn.to_v": ("diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", (0, 8, 4)),
        "transformer.transformer_blocks.0.ff.net.2": "diffusion_model.joint_blocks.0.x_block.mlp.fc2.weight",
        "transformer.norm_out.linear": ("diffusion_model.final_layer.adaLN_modulation.1.weight", None,
                                        lambda t: torch.cat(list(reversed(t.chunk(2))))),
        "lora_unet_joint_blocks_0_x_block_mlp_fc2": "diffusion_model.joint_blocks.0.x_block.mlp.fc2.weight",
    }
    names = kohya.diffusers_unet_names(key_map, ["joint_blocks.0.x_block.attn.qkv", "joint_blocks.0.x_block.mlp.fc2"])
    assert names["joint_blocks.0.x_block.attn.qkv"] == [("transformer.transformer_blocks.0.attn.to_q", (0, 4), None),
                                                        ("transformer.transformer_blocks.0.attn.to_k", (4, 4), None),
                                                        ("transformer.transformer_blocks.0.attn.to_v", (8, 4), None)]
    assert names["joint_blocks.0.x_block.mlp.fc2"] == [("transformer.transformer_blocks.0.ff.net.2", None, None)]
    with pytest.raises(ValueError, match="no diffusers name for layer joint_blocks.9"):
        kohya.diffusers_unet_names(key_map, ["joint_blocks.9.x_block.mlp.fc2"])
    (swapped,) = kohya.diffusers_unet_names(key_map, ["final_layer.adaLN_modulation.1"])["final_layer.adaLN_modulation.1"]
    (entry,) = kohya.file_entries([swapped], {"down": torch.ones(1, 2), "up": torch.arange(4.0).reshape(4, 1)})
    assert entry[1]["up"].flatten().tolist() == [2.0, 3.0, 0.0, 1.0]   # diffusers' row order

    weights = {"down": torch.ones(2, 3), "up": torch.arange(24.0).reshape(12, 2), "magnitude": torch.arange(12.0)}
    entries = [entry for name in [names["joint_blocks.0.x_block.attn.qkv"]]
               for entry in kohya.file_entries(name, weights)]
    tensors = kohya.lora_state_dict(entries, alpha=1.0, dtype=torch.float32, key_style="diffusers")
    # A is shared, B and the DoRA scale are cut by rows, alpha / rank (1/2) is folded into B
    assert torch.equal(tensors["transformer.transformer_blocks.0.attn.to_k.lora_A.weight"], torch.ones(2, 3))
    assert torch.equal(tensors["transformer.transformer_blocks.0.attn.to_k.lora_B.weight"],
                       torch.arange(8.0, 16.0).reshape(4, 2) * 0.5)
    assert tensors["transformer.transformer_blocks.0.attn.to_v.dora_scale"].flatten().tolist() == [8.0, 9.0, 10.0, 11.0]
    assert not any(key.endswith(".alpha") for key in tensors)
    from safetensors.torch import save
    assert save(tensors)   # no two keys share memory (safetensors refuses that)
