"""The family table seen from ComfyUI: every entry is detected from a ComfyUI model class, and every
conditioning extra an entry names has its function (nodes/comfy/detect.py, nodes/comfy/conditioning.py)."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.compat


def test_every_family_is_detected_from_a_model_class_this_comfyui_has(comfy):
    import comfy.model_base as model_base

    families = comfy.pack.training.families.table
    detection = comfy.pack.nodes.comfy.detect.DETECTION
    # every entry but the generic one (what detection falls back to, resolved per model) has its row
    assert {row.family for row in detection} == {key for key, entry in families.FAMILIES.items()
                                                 if not entry.structural}
    assert [key for key, entry in families.FAMILIES.items() if entry.structural] == ["generic"]
    for row in detection:
        assert isinstance(getattr(model_base, row.model_class, None), type), row


def test_every_conditioning_extra_has_its_function(comfy):
    families = comfy.pack.training.families.table
    extras = comfy.pack.nodes.comfy.conditioning.EXTRAS
    assert set(extras) == set(families.CONDITIONING_EXTRAS)
    assert all(set(entry.conditioning) <= set(extras) for entry in families.FAMILIES.values())
