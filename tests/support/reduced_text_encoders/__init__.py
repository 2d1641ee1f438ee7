"""Test-only ComfyUI custom node package (no nodes): makes ComfyUI build T5-XXL, Qwen-Image's
Qwen2.5-VL-7B and Wan's UMT5-XXL with the reduced configurations of lora_lab_devtools/flow_fixtures.py,
qwen_fixtures.py and wan_fixtures.py, so that the stock DualCLIPLoader / CLIPLoader load the tiny
reduced files in the e2e servers that run the Flux, Qwen-Image and Wan example workflows. Installed
only there (tests/e2e/test_example_workflows.py); never part of the pack.

What stays real: ComfyUI's loaders, their detection of the encoder from the file, its CLIP classes,
T5, UMT5 and Qwen2.5-VL implementations, tokenizers and chat templates.
What changes: the encoders' width and depth (T5: 64 wide, 2 layers; Qwen2.5-VL: 2 layers, a 64-wide
vision tower; UMT5-XXL: 2 layers of 2 heads, FFN 256, T5's 32128-row table), as the test machine cannot
hold the real 4.7 B, 8 B and 5.7 B.
"""
import sys
from pathlib import Path

import comfy.sd1_clip
import comfy.text_encoders.qwen_image
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.t5
import comfy.text_encoders.wan

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))   # the checkout (this folder is linked in)
from lora_lab_devtools import qwen_fixtures, wan_fixtures  # noqa: E402
from lora_lab_devtools.flow_fixtures import REDUCED_T5  # noqa: E402


def _reduced_t5_init(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False,
                     model_options={}):
    comfy.sd1_clip.SDClipModel.__init__(
        self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(REDUCED_T5), dtype=dtype,
        special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
        enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
        model_options={**model_options, "model_name": "t5xxl"})


comfy.text_encoders.sd3_clip.T5XXLModel.__init__ = _reduced_t5_init
comfy.text_encoders.qwen_image.Qwen25_7BVLIModel.__init__ = qwen_fixtures.reduced_qwen25_7b_init
comfy.text_encoders.wan.UMT5XXlModel.__init__ = wan_fixtures.reduced_umt5_init
NODE_CLASS_MAPPINGS = {}
