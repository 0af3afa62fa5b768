from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.quantizers.base import fake_quant_int8_per_token, int8_per_token_codes


def ternary(**opts):
    return quantizers.build({"name": "ternary", **opts})


def test_forward_is_minus_alpha_zero_plus_alpha_with_absmean_alpha():
    w = torch.randn(32, 64)
    out = ternary()(w)
    alpha = w.abs().mean()
    values = torch.unique(out)
    assert set(values.tolist()) <= {-alpha.item(), 0.0, alpha.item()}
    assert len(values) == 3
    assert torch.equal(out, (w / alpha).round().clamp(-1, 1) * alpha)


def test_known_codes_on_constructed_weights():
    # alpha = mean|w| = (0.1 + 0.9 + 2.0 + 1.0) / 4 = 1.0 -> round(w / 1.0) clamped
    w = torch.tensor([[0.1, -0.9, 2.0, -1.0]])
    qt = ternary().quantize(w)
    assert qt.codes.tolist() == [[0, -1, 1, -1]]
    assert qt.scales.item() == pytest.approx(1.0)


def test_channel_granularity_has_one_alpha_per_row():
    w = torch.randn(6, 20) * torch.arange(1, 7).unsqueeze(1)  # rows of very different scale
    q = ternary(granularity="channel")
    out = q(w)
    for r in range(6):
        a = w[r].abs().mean()
        assert set(torch.unique(out[r]).tolist()) <= {-a.item(), 0.0, a.item()}
    assert q.quantize(w).scales.shape == (6, 1)


def test_group_granularity_with_a_short_last_group():
    w = torch.randn(3, 10)
    q = ternary(granularity="group", group_size=4)  # groups of 4, 4, 2 per row
    qt = q.quantize(w)
    assert qt.scales.shape == (3, 3)
    assert torch.allclose(qt.scales[:, 2], w[:, 8:].abs().mean(dim=1))  # padding not averaged in
    assert torch.allclose(qt.scales[:, 0], w[:, :4].abs().mean(dim=1))


def test_zero_weight_uses_the_epsilon_floor():
    qt = ternary().quantize(torch.zeros(4, 4))
    assert qt.scales.item() == pytest.approx(1e-5)
    assert (qt.codes == 0).all()


def test_absmean_ste_is_identity():
    w = torch.randn(8, 8, requires_grad=True)
    g = torch.randn(8, 8)
    (ternary()(w) * g).sum().backward()
    assert torch.equal(w.grad, g)


def test_learned_alpha_initialises_to_absmean_and_follows_lsq():
    w = torch.tensor([[0.2, -0.5, 1.6, 0.05]])  # absmean 0.5875
    q = ternary(alpha="learned")
    q.init_from_weight(w)
    assert q.alpha.item() == pytest.approx(0.5875)
    w = w.clone().requires_grad_(True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    (q(w) * g).sum().backward()
    s = 0.5875
    v = w.detach() / s
    inside = v.abs() <= 1
    assert torch.equal(w.grad, g * inside)
    dv = torch.where(inside, v.round().clamp(-1, 1) - v, v.sign())
    expected = (g * dv).sum() / (4**0.5)  # gradient scale 1/sqrt(|G| * Q_P), Q_P = 1
    assert q.alpha.grad.item() == pytest.approx(expected.item(), rel=1e-5)


def test_learned_alpha_is_used_by_quantize():
    w = torch.randn(4, 8)
    q = ternary(alpha="learned")
    q.init_from_weight(w)
    with torch.no_grad():
        q.alpha.fill_(0.25)
    qt = q.quantize(w)
    assert qt.scales.item() == 0.25
    assert torch.equal(qt.codes.float(), (w / 0.25).round().clamp(-1, 1))


def test_int8_activation_quantization_per_token():
    x = torch.randn(2, 5, 16)
    codes, s = int8_per_token_codes(x)
    assert codes.abs().max() <= 128 and torch.equal(codes, codes.round())
    # the largest |x| of each token maps to exactly +-127
    assert torch.equal(codes.abs().amax(-1), torch.full((2, 5), 127.0))
    xq = fake_quant_int8_per_token(x)
    assert torch.allclose(xq, x, atol=x.abs().max().item() / 127)


def test_activation_ste_and_option():
    x = torch.randn(3, 8, requires_grad=True)
    ternary()(torch.randn(4, 8))
    y = ternary().quantize_input(x)
    assert not torch.equal(y, x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    assert ternary(activations="none").quantize_input(x) is x


def test_storage_bits():
    assert ternary().bits_per_weight((768, 768)) == Fraction(2) + Fraction(32, 768 * 768)
    assert ternary(packing="base3").nbytes((5, 5)) == 5 + 4
    assert ternary(granularity="group", group_size=128).nbytes((4, 256)) == 4 * 256 // 4 + 8 * 4
