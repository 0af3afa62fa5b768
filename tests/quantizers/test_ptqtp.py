"""ptqtp: two trit-planes beat one, the fit's stopping rule, the plane codes and their storage."""

from __future__ import annotations

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.quantizers.ptqtp import PTQTPQuantizer, fit


def rel_err(spec, w):
    q = quantizers.build(spec)
    return ((w - q(w)).norm() / w.norm()).item()


@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_two_planes_beat_one_ternary_plane(granularity):
    torch.manual_seed(0)
    w = torch.randn(64, 384) * torch.rand(64, 1)  # rows of different scales
    two = rel_err({"name": "ptqtp", "granularity": granularity, "scale_dtype": "fp32"}, w)
    one = rel_err({"name": "ternary", "granularity": "channel" if granularity == "channel" else "group",
                   "group_size": 128}, w)
    assert two < 0.6 * one, (two, one)
    # and the alternating refinement improves on the progressive start
    start = rel_err({"name": "ptqtp", "granularity": granularity, "max_iters": 0, "scale_dtype": "fp32"}, w)
    assert two < start


def test_the_fit_never_increases_the_error_and_stops_by_its_rule():
    torch.manual_seed(1)
    g = torch.randn(16, 1, 128)
    errs = []
    for iters in range(0, 8):
        t1, t2, a1, a2, it = fit(g, 128.0, iters, 0.0, "fp32")
        assert it == iters  # tol 0: runs every iteration it is allowed
        errs.append(float((g - a1 * t1 - a2 * t2).square().sum()))
    assert all(b <= a * (1 + 1e-6) for a, b in zip(errs, errs[1:], strict=False))
    _, _, _, _, it = fit(g, 128.0, 100, 1e-4, "fp32")
    assert it < 100  # converges well before the cap


def test_codes_hold_both_planes_and_scales_are_positive():
    torch.manual_seed(2)
    w = torch.randn(10, 70)
    q = quantizers.build({"name": "ptqtp", "group_size": 32})
    qt = q.quantize(w)
    t1, t2 = PTQTPQuantizer.planes(qt.codes)
    assert set(t1.unique().tolist()) <= {-1, 0, 1} and set(t2.unique().tolist()) <= {-1, 0, 1}
    assert torch.equal(3 * t1 + t2, qt.codes)
    assert qt.scales.shape == (10, 2 * 3) and (qt.scales > 0).all()
    packed = q.pack(qt)
    assert set(packed) == {"plane1", "plane2", "scales"}
    assert packed["plane1"].numel() == -(-700 // 5)  # base3 by default


def test_planes_decode_every_code():
    c = torch.arange(-4, 5, dtype=torch.int8)
    t1, t2 = PTQTPQuantizer.planes(c)
    assert t1.tolist() == [-1, -1, -1, 0, 0, 0, 1, 1, 1] and t2.tolist() == [-1, 0, 1] * 3


def test_bits_per_weight_defaults():
    q = quantizers.build("ptqtp")
    assert float(q.bits_per_weight((128, 1280))) == pytest.approx(2 * 8 / 5 + 2 * 16 / 128)
    q2 = quantizers.build({"name": "ptqtp", "packing": "2bit"})
    assert float(q2.bits_per_weight((128, 1280))) == 4 + 2 * 16 / 128


def test_collinear_planes_keep_finite_scales():
    """T2 = +-T1 on a group makes the 2x2 system singular (in float32 its determinant cancels to 0;
    this gave NaN scales on a real layer): the relative ridge in float64 keeps it regular."""
    from qtoolkit.quantizers.ptqtp import _scales

    torch.manual_seed(4)
    t = torch.randint(-1, 2, (8, 3, 16)).float()
    g = 0.7 * t + 0.01 * torch.randn(8, 3, 16)
    for t2 in (t, -t):
        a1, a2 = _scales(g, t, t2)
        assert torch.isfinite(a1).all() and torch.isfinite(a2).all()
        fit_ = a1 * t + a2 * t2  # the fitted combination is the one-plane least squares
        torch.testing.assert_close(fit_, (g * t).sum(-1, keepdim=True) / (t * t).sum(-1, keepdim=True) * t,
                                   rtol=1e-3, atol=1e-4)
    w = torch.tensor([[1.0, -1.0, 1.0, 0.0] * 4, [0.0] * 16, [2.0] * 16])  # two-level, all-zero, constant rows
    q = quantizers.build({"name": "ptqtp", "group_size": 8})
    qt = q.quantize(w)
    assert torch.isfinite(qt.scales).all() and (qt.scales > 0).all()
    assert torch.allclose(q.dequantize(qt), w, atol=1e-2)


def test_the_fit_is_reused_until_the_weight_changes():
    torch.manual_seed(5)
    w = torch.randn(6, 40)
    q = quantizers.build({"name": "ptqtp", "group_size": 16})
    first = q(w)
    assert q._fit(w)[0] is q._cache[2][0]  # same tensor, unmodified: the cached fit
    with torch.no_grad():
        w.mul_(2)  # in place: a new version, refitted
    second = q(w)
    assert torch.equal(second, quantizers.build({"name": "ptqtp", "group_size": 16})(w.clone()))
    assert not torch.equal(first, second)
