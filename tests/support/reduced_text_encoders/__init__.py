"""Test-only ComfyUI custom node package (no nodes): makes ComfyUI build T5-XXL with the reduced
configuration of lora_lab_devtools/flow_fixtures.py, so that the stock DualCLIPLoader loads the tiny
reduced T5 file in the e2e server that runs the Flux example workflow. Installed only there
(tests/e2e/test_example_workflows.py); never part of the pack.

What stays real: ComfyUI's DualCLIPLoader, its Flux CLIP class and T5 implementation and tokenizer.
What changes: T5's width and depth (64 wide, 2 layers), as the test machine cannot hold the real 4.7 B.
"""
import sys
from pathlib import Path

import comfy.sd1_clip
import comfy.text_encoders.sd3_clip
import comfy.text_encoders.t5

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))   # the checkout (this folder is linked in)
from lora_lab_devtools.flow_fixtures import REDUCED_T5  # noqa: E402


def _reduced_t5_init(self, device="cpu", layer="last", layer_idx=None, dtype=None, attention_mask=False,
                     model_options={}):
    comfy.sd1_clip.SDClipModel.__init__(
        self, device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(REDUCED_T5), dtype=dtype,
        special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
        enable_attention_masks=attention_mask, return_attention_masks=attention_mask,
        model_options={**model_options, "model_name": "t5xxl"})


comfy.text_encoders.sd3_clip.T5XXLModel.__init__ = _reduced_t5_init
NODE_CLASS_MAPPINGS = {}
