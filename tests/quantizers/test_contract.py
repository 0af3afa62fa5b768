"""The contract every registered quantizer honours. A new quantizer gets these tests for free:
each registered name is tested with its defaults, plus the option variants listed in VARIANTS."""

from __future__ import annotations

import math

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.errors import UnknownNameError
from qtoolkit.quantizers.base import QTensor
from qtoolkit.schema import SchemaError

CORRECTION = {"rank": 4, "gate": "scalar", "gate_init": 0.1}
VARIANTS = {
    "ternary": [
        {"granularity": "channel"},
        {"granularity": "group", "group_size": 16},
        {"alpha": "learned"},
        {"alpha": "learned", "granularity": "group", "group_size": 16},
        {"packing": "base3"},
        {"activations": "none"},
        {"activations": "int4"},
        {"activations": "elastic"},
        {"activations": "elastic", "elastic_bits": 4},
        {"correction": CORRECTION},
        {"correction": {"rank": 0, "gate": "channel", "gate_init": 0.5}},
    ],
    "int8": [{"granularity": "tensor"}, {"activations": "int8"}, {"activations": "elastic"},
             {"correction": CORRECTION}],
    "fp16": [{"activations": "int8"}],
    "binary": [{"granularity": "tensor"}, {"mean": False}, {"activations": "int8"}],
    "sherry": [
        {"granularity": "channel"},
        {"granularity": "tensor"},
        {"group_size": 8},
        {"arenas": "none"},
        {"activations": "int8"},
        {"correction": CORRECTION},
    ],
    "intn": [
        {"bits": 2}, {"bits": 3}, {"bits": 5}, {"bits": 7}, {"bits": 8},
        {"bits": 3, "symmetric": True},
        {"granularity": "channel", "scale_dtype": "fp32"},
        {"group_size": 16, "bits": 6},
        {"rounding": "gptq"},
        {"rounding": "gptq", "act_order": True, "group_size": 8, "bits": 3},
        {"activations": "int8"},
        {"correction": CORRECTION},
    ],
    "ptqtp": [
        {"granularity": "channel"},
        {"packing": "2bit", "group_size": 16},
        {"scale_dtype": "fp32"},
        {"max_iters": 0},
    ],
    "tequila": [
        {"granularity": "channel"},
        {"alpha": "learned"},
        {"packing": "base3"},
        {"lam": 0.0},
        {"correction": CORRECTION},
    ],
}
# Relative Frobenius error of W - Q(W) for Gaussian W; loose upper bounds that still catch breakage.
ERROR_BOUND = {"intn": 0.6, "ptqtp": 0.4, "binary": 0.65, "ternary": 0.65, "sherry": 0.65, "tequila": 0.65, "int8": 0.02, "fp16": 1e-3, "bf16": 1e-2,
               "fp32": 0.0}
SHAPES = [(8, 32), (7, 13), (1, 5), (3, 130), (64, 48)]


def specs():
    out = []
    for name in quantizers.available():
        out.append({"name": name})
        out += [{"name": name, **v} for v in VARIANTS.get(name, [])]
    return out


SPECS = specs()
IDS = [",".join(f"{k}={v}" for k, v in s.items()) for s in SPECS]


def make(spec, shape):
    q = quantizers.build(spec)
    w = torch.randn(shape)
    q.init_from_weight(w)
    return q, w


def test_every_builtin_is_registered():
    assert set(quantizers.available()) >= {"ternary", "int8", "fp16", "bf16", "fp32", "sherry", "tequila"}


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_equals_dequantize_quantize(spec, shape):
    q, w = make(spec, shape)
    fake = q(w)
    qt = q.quantize(w)
    assert isinstance(qt, QTensor) and qt.shape == shape
    assert qt.codes.shape == shape
    assert torch.equal(q.dequantize(qt), fake)
    assert fake.shape == w.shape and fake.dtype == w.dtype


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_codes_and_scales_types(spec):
    q, w = make(spec, (16, 40))
    qt = q.quantize(w)
    base = getattr(q, "base", q)  # a corrected layer stores its base quantizer's codes
    if qt.scales is not None:  # integer codes times scales
        assert qt.codes.dtype == torch.int8
        assert qt.scales.dtype == torch.float32 and (qt.scales > 0).all()
        assert int(qt.codes.min()) >= -base.qmax and int(qt.codes.max()) <= base.qmax  # int(): qmax may be 128
        if spec["name"] == "binary":
            assert (qt.codes.abs() == 1).all()
    else:
        assert qt.scales is None
        assert qt.codes.dtype == base.dtype
    layout = q.layout((16, 40))
    assert all(layout[k].matches(t) for k, t in qt.extras.items())


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_round_trip_error_bound(spec):
    q, w = make(spec, (64, 256))
    rel = ((w - q(w)).norm() / w.norm()).item()
    assert rel <= ERROR_BOUND[spec["name"]] + 1e-12


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_straight_through_gradient_reaches_the_weight(spec):
    q, w = make(spec, (8, 32))
    w.requires_grad_(True)
    upstream = torch.randn(8, 32)
    (q(w) * upstream).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()
    if spec.get("alpha") != "learned":  # identity STE
        assert torch.equal(w.grad, upstream)
    else:  # clipped STE: identity wherever |W / alpha| <= 1
        assert (w.grad == upstream).float().mean() > 0.5


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_nbytes_counts_codes_and_scales_exactly(spec, shape):
    q, w = make(spec, shape)
    qt = q.quantize(w)
    numel = math.prod(shape)
    layout = q.layout(shape)
    scale_bytes = 0 if qt.scales is None else qt.scales.numel() * layout["scales"].dtype.itemsize  # fp16 or fp32
    extra_bytes = sum(t.numel() * t.element_size() for t in qt.extras.values())
    two_bit = -(-numel // (5 if spec.get("packing") == "base3" else 4))
    code_bytes = {
        "ternary": two_bit,
        "tequila": two_bit,
        "sherry": -(-5 * shape[0] * -(-shape[1] // 4) // 8),  # 5 bits per group of 4
        "binary": -(-numel // 8),
        "intn": -(-numel * spec.get("bits", 4) // 8),  # b bits per code, no padding between codes
        "ptqtp": 2 * -(-numel // (4 if spec.get("packing") == "2bit" else 5)),  # two ternary planes
        "int8": numel,
        "fp16": 2 * numel,
        "bf16": 2 * numel,
        "fp32": 4 * numel,
    }[spec["name"]]
    assert q.nbytes(shape) == code_bytes + scale_bytes + extra_bytes
    assert q.bits_per_weight(shape) * numel == 8 * q.nbytes(shape)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
@pytest.mark.parametrize("shape", SHAPES + [(3, 3), (1, 1), (2, 7), (5, 9)])
def test_pack_unpack_is_bit_exact_and_matches_the_layout(spec, shape):
    q, w = make(spec, shape)
    qt = q.quantize(w)
    packed = q.pack(qt)
    layout = q.layout(shape)
    assert packed.keys() == layout.keys()
    assert all(layout[k].matches(t) for k, t in packed.items())
    assert sum(t.numel() * t.element_size() for t in packed.values()) == q.nbytes(shape)
    back = q.unpack(packed, shape)
    assert back.codes.dtype == qt.codes.dtype and torch.equal(back.codes, qt.codes)
    assert (back.scales is None) == (qt.scales is None)
    if qt.scales is not None:
        assert torch.equal(back.scales, qt.scales)
    assert torch.equal(q.dequantize(back), q(w))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_unpack_rejects_tensors_that_do_not_match_the_layout(spec):
    q, w = make(spec, (4, 8))
    packed = q.pack(q.quantize(w))
    with pytest.raises(ValueError):
        q.unpack(packed, (4, 9))
    with pytest.raises(ValueError):
        q.unpack({**packed, "extra": torch.zeros(1)}, (4, 8))


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_spec_round_trips_through_build(spec):
    q = quantizers.build(spec)
    canonical = q.spec()
    assert quantizers.build(canonical).spec() == canonical
    assert canonical["name"] == spec["name"]
    for k, v in spec.items():
        assert canonical[k] == v


def test_unknown_quantizer_lists_available():
    with pytest.raises(UnknownNameError) as e:
        quantizers.get("int9")
    for name in quantizers.available():
        assert name in str(e.value)


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        quantizers.register("ternary")(type("Dup", (quantizers.Quantizer,), {}))


def test_bad_options_report_every_error_with_its_key():
    with pytest.raises(SchemaError) as e:
        quantizers.build({"name": "ternary", "alpha": "max", "granularity": "row", "bits": 2}, path="policy.x")
    paths = {p for p, _ in e.value.errors}
    assert paths == {"policy.x.alpha", "policy.x.granularity", "policy.x.bits"}


def test_bad_spec_shape():
    with pytest.raises(ValueError, match="name"):
        quantizers.build({"alpha": "absmean"})
