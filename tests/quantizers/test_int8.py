from __future__ import annotations

import torch

from qtoolkit import quantizers


def test_per_channel_symmetric_scales_and_codes():
    w = torch.tensor([[0.5, -1.27, 0.0], [2.54, 1.0, -2.54]])
    qt = quantizers.build("int8").quantize(w)
    assert torch.allclose(qt.scales.squeeze(1), torch.tensor([0.01, 0.02]))
    assert qt.codes.tolist() == [[50, -127, 0], [127, 50, -127]]


def test_int8_error_is_at_most_half_a_step():
    w = torch.randn(16, 64)
    q = quantizers.build("int8")
    step = w.abs().amax(dim=1, keepdim=True) / 127
    assert ((q(w) - w).abs() <= step / 2 + 1e-7).all()


def test_weight_only_by_default():
    x = torch.randn(4, 8)
    assert quantizers.build("int8").quantize_input(x) is x
    assert not torch.equal(quantizers.build({"name": "int8", "activations": "int8"}).quantize_input(x), x)
