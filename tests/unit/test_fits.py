"""The up-front "does the model fit for training" check (used before a private copy is loaded)."""
from __future__ import annotations

import pytest

from lora_lab.training.run.memory import GIB, check_fits


def test_fits_when_weights_and_reserve_are_free():
    check_fits({"BaseModel": 2 * GIB}, GIB, 3 * GIB, "cuda:0")


def test_refuses_with_sizes_free_memory_and_the_way_out():
    with pytest.raises(ValueError) as raised:
        check_fits({"BaseModel": 5 * GIB, "SD1ClipModel": GIB // 4}, GIB, 4 * GIB, "cuda:0")
    message = str(raised.value)
    for expected in ("cuda:0", "6.25 GiB", "BaseModel 5.00 GiB", "SD1ClipModel 0.25 GiB", "1.00 GiB working memory",
                     "only 4.00 GiB is free", "text-encoder rates to 0"):
        assert expected in message, (expected, message)
