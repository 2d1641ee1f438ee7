"""DoRA files in other tools: the metadata names LyCORIS's DoRA (sd-scripts' networks.lora would drop
the magnitudes without a word), and what LyCORIS's own module makes of the file is measured against
ComfyUI's LoraLoader, layer by layer, on the UNet and the text encoder (README, "The file and other
tools").

ComfyUI (<= 0.33) divides an output-row dora_scale by the norm of the original weight |W|; the DoRA
paper, peft, LyCORIS and diffusers divide by |W + dW|. The pack asks the running ComfyUI which rule
it uses (nodes/comfy/files.py dora_norm_of_loader) and writes the scale that reproduces the trained model
there; under the "original" rule LyCORIS's result is ComfyUI's times |W| / |W + dW| per row, exactly,
and that is what this test checks with LyCORIS's code (lycoris-lora, a test-only package).
"""
from __future__ import annotations

import json

import torch

from .test_train import checkpoint, dataset, loaded, rates, read_lora, schedule, stock_lora_loader, train  # noqa: F401


def comfy_and_file_weights(comfy, loaded, name: str):
    """{kohya stem: (W, ComfyUI's patched weight, up, down, alpha, dora_scale)} for every DoRA layer."""
    from comfy import lora as comfy_lora
    from comfy import utils as comfy_utils

    tensors, _ = read_lora(comfy, name)
    model, clip, _ = stock_lora_loader(comfy, loaded, name)
    key_map = comfy_lora.model_lora_keys_unet(loaded[0].model, {})
    key_map = comfy_lora.model_lora_keys_clip(loaded[1].cond_stage_model, key_map)
    layers = {}
    for key in tensors:
        if not key.endswith(".dora_scale"):
            continue
        stem = key[: -len(".dora_scale")]
        comfy_key = key_map[stem]
        patcher = model if comfy_key in model.patches else clip.patcher
        original = comfy_utils.get_attr(patcher.model, comfy_key).detach().float().clone()
        with torch.inference_mode():
            patched = comfy_lora.calculate_weight(patcher.patches[comfy_key], original.clone(), comfy_key)
        layers[stem] = (original, patched.float(), tensors[f"{stem}.lora_up.weight"].float(),
                        tensors[f"{stem}.lora_down.weight"].float(), tensors[f"{stem}.alpha"].float(),
                        tensors[key].float())
    return layers


def test_dora_file_names_lycoris_and_lycoris_reads_it_as_documented(comfy, loaded, dataset):
    from lycoris.modules.locon import LoConModule

    pack = comfy.pack
    rule = pack.nodes.comfy.dora_norm_of_loader()
    _, _, name, _ = train(comfy, loaded, dataset, rates(comfy, learning_rate=5e-3, text_encoder_lr=5e-3),
                          schedule(comfy), steps=3, rank=4, alpha=8.0, target="attention_ff", use_dora=True,
                          save_precision="fp32", lora_name="dora_interop")
    _, metadata = read_lora(comfy, name)
    assert metadata["ss_network_module"] == "lycoris.kohya"
    arguments = json.loads(metadata["ss_network_args"])
    assert (arguments["algo"], arguments["dora_wd"], arguments["wd_on_output"]) == ("lora", "True", "True")
    assert metadata["lora_lab_dora_scale"] == pack.training.run.metadata.DORA_SCALE_RULES[rule]

    layers = comfy_and_file_weights(comfy, loaded, name)
    assert any(stem.startswith("lora_unet_") for stem in layers) and any(stem.startswith("lora_te_") for stem in layers)
    lycoris_vs_comfy, plain_vs_comfy = 0.0, 0.0
    for stem, (original, patched, up, down, alpha, dora_scale) in layers.items():
        linear = torch.nn.Linear(original.shape[1], original.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(original)
            module = LoConModule.make_module_from_state_dict(stem, linear, up, down, None, alpha, dora_scale)
            lycoris, _ = module.get_merged_weight()
        updated = original + up @ down * (float(alpha) / down.shape[0])
        norm_ratio = original.norm(dim=1, keepdim=True) / updated.norm(dim=1, keepdim=True)
        if rule == "original":
            torch.testing.assert_close(lycoris, patched * norm_ratio, rtol=1e-5, atol=1e-6, msg=stem)
        else:
            torch.testing.assert_close(lycoris, patched, rtol=1e-5, atol=1e-6, msg=stem)
        relative = lambda weight: float(((weight - patched).norm(dim=1) / patched.norm(dim=1)).max())  # noqa: E731
        lycoris_vs_comfy = max(lycoris_vs_comfy, relative(lycoris))
        plain_vs_comfy = max(plain_vs_comfy, relative(updated))   # sd-scripts' networks.lora: no dora_scale
    print(f"DoRA rule {rule}: worst row, relative to ComfyUI's weights: LyCORIS {lycoris_vs_comfy:.2e}, "
          f"plain LoRA reading {plain_vs_comfy:.2e} ({len(layers)} layers)")
    # The magnitudes trained: a reader that drops them is measurably off.
    assert plain_vs_comfy > 1e-4
    if rule == "original":
        assert lycoris_vs_comfy > 0.0


def test_the_probe_reads_this_comfyuis_rule(comfy):
    """ComfyUI 0.3.75 and 0.33 both divide by |W| (comfy/weight_adapter/base.py, weight_decompose).
    When a newer ComfyUI changes that (ComfyUI PR #15458 proposes it), the probe follows and this
    test says so."""
    assert comfy.pack.nodes.comfy.dora_norm_of_loader() == "original"
