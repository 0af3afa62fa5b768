from __future__ import annotations

import torch

from qtoolkit import quantizers


def test_casts_simulate_storage_rounding():
    w = torch.randn(8, 8)
    assert torch.equal(quantizers.build("fp16")(w), w.half().float())
    assert torch.equal(quantizers.build("bf16")(w), w.bfloat16().float())
    assert quantizers.build("fp32")(w) is w


def test_cast_storage_bytes():
    assert quantizers.build("fp16").nbytes((3, 5)) == 30
    assert quantizers.build("bf16").nbytes((3, 5)) == 30
    assert quantizers.build("fp32").nbytes((3, 5)) == 60
