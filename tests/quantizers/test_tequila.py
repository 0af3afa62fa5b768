from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from qtoolkit import quantizers
from qtoolkit.layers import FrozenQuantLinear, QuantLinear


def layer(spec, w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w.clone())
    return QuantLinear.from_float(lin, quantizers.build(spec))


def constructed():
    # one row per group (granularity channel): alpha = mean |W| = 1.0 for both rows
    return torch.tensor([[2.0, 0.3, -0.2, 1.5],
                         [-1.6, 0.1, -0.4, 1.9]])


def test_dead_zone_term_matches_its_formula():
    w = constructed()
    lam = 0.5
    q = layer({"name": "tequila", "granularity": "channel", "lam": lam}, w)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # alpha = 1: |W| < 0.5 is the dead zone -> codes [1, 0, 0, 1] and [-1, 0, 0, 1]
    ternary = torch.tensor([[1.0, 0, 0, 1], [-1.0, 0, 0, 1]])
    bias = lam * torch.tensor([0.3 - 0.2, 0.1 - 0.4])
    expected = x @ ternary.T + bias
    assert torch.allclose(q(x), expected)
    qt = q.quantizer.quantize(w)
    assert torch.equal(qt.codes, ternary.to(torch.int8))
    assert torch.allclose(qt.extras["dead_bias"], bias)


def test_dead_zone_weights_receive_a_real_gradient():
    w = constructed()
    lam = 0.5
    q = layer({"name": "tequila", "granularity": "channel", "lam": lam}, w)
    x = torch.zeros(3, 4)  # STE gradients x^T dL/dy vanish; only the bias path remains
    upstream = torch.tensor([[1.0, -2.0], [0.5, 1.0], [2.0, 0.0]])
    (q(x) * upstream).sum().backward()
    dead = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 0]], dtype=torch.bool)
    expected = torch.where(dead, lam * upstream.sum(0)[:, None].expand(2, 4), torch.zeros(2, 4))
    assert torch.allclose(q.weight.grad, expected)
    assert (q.weight.grad[dead] != 0).all() and (q.weight.grad[~dead] == 0).all()
    # plain ternary gives those weights nothing here
    t = layer({"name": "ternary", "granularity": "channel", "activations": "none"}, w)
    (t(x) * upstream).sum().backward()
    assert (t.weight.grad == 0).all()


def test_full_gradient_is_ste_plus_bias_path():
    torch.manual_seed(0)
    w = torch.randn(6, 32)
    q = layer({"name": "tequila", "group_size": 16, "lam": 0.01}, w)
    x = torch.randn(5, 32)
    up = torch.randn(5, 6)
    (q(x) * up).sum().backward()
    dead = q.quantizer.dead_zone(w)
    expected = up.T @ x + 0.01 * dead * up.sum(0)[:, None]
    assert torch.allclose(q.weight.grad, expected, atol=1e-5)


def test_lambda_zero_is_plain_group_ternary_and_deployed_layer_is_identical():
    torch.manual_seed(1)
    w = torch.randn(8, 40)
    x = torch.randn(3, 40)
    z = layer({"name": "tequila", "lam": 0.0, "group_size": 8}, w)
    t = layer({"name": "ternary", "granularity": "group", "group_size": 8, "activations": "none"}, w)
    assert torch.equal(z(x), t(x))
    q = layer({"name": "tequila", "group_size": 8}, w)
    qt = q.quantizer.quantize(w)
    frozen = FrozenQuantLinear(q.quantizer.dequantize(qt), quantizers.build(q.quantizer.spec()), qt.extras)
    with torch.no_grad():
        assert torch.equal(frozen(x), q(x))
        assert torch.equal(F.linear(x, q.quantizer.dequantize(qt)) + qt.extras["dead_bias"], q(x))


def test_stats_and_storage():
    q = quantizers.build("tequila")
    w = torch.randn(16, 256)
    s = q.stats(q.quantize(w))
    assert 0.2 < s["dead_zone"] < 0.5 and s["bias_abs_max"] >= s["bias_abs_mean"] > 0
    ternary = quantizers.build({"name": "ternary", "granularity": "group"})
    assert q.nbytes((16, 256)) == ternary.nbytes((16, 256)) + 4 * 16
    with pytest.raises(Exception, match="lam"):
        quantizers.build({"name": "tequila", "lam": -1.0})
