from __future__ import annotations

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.errors import PolicyError
from qtoolkit.layers import FrozenQuantLinear, QuantLinear
from qtoolkit.schema import SchemaError


def layer(spec, w):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight = torch.nn.Parameter(w.clone())
    return QuantLinear.from_float(lin, quantizers.build(spec))


@pytest.mark.parametrize("base", ["ternary", "sherry", "tequila", "int8"])
def test_rank_zero_or_gate_zero_is_the_plain_layer(base):
    torch.manual_seed(0)
    w, x = torch.randn(12, 32), torch.randn(2, 5, 32)
    plain = layer(base, w)
    zero_rank = layer({"name": base, "correction": {"rank": 0}}, w)
    assert torch.equal(zero_rank(x), plain(x))
    gated = layer({"name": base, "correction": {"rank": 4, "gate_init": 0.0}}, w)
    with torch.no_grad():
        gated.quantizer.lora_b.normal_()  # a real correction, switched off by its gate
    assert torch.equal(gated(x), plain(x))
    with torch.no_grad():
        gated.quantizer.gate.fill_(0.5)
    assert not torch.equal(gated(x), plain(x))


def test_correction_formula_fp16_storage_and_deployment():
    torch.manual_seed(1)
    w, x = torch.randn(6, 16), torch.randn(3, 16)
    q = layer({"name": "ternary", "correction": {"rank": 2, "gate": "channel", "gate_init": 0.3}}, w)
    with torch.no_grad():
        q.quantizer.lora_b.normal_()
    c = q.quantizer
    a16, b16, g16 = (t.detach().half().float() for t in (c.lora_a, c.lora_b, c.gate))
    plain = layer("ternary", w)
    assert torch.allclose(q(x), plain(x) + g16 * ((x @ a16.T) @ b16.T), atol=1e-6)
    qt = c.quantize(w)
    assert qt.extras["lora_a"].dtype == torch.float16 and qt.extras["gate"].shape == (6,)
    packed = c.pack(qt)
    back = c.unpack(packed, (6, 16))
    frozen = FrozenQuantLinear(c.dequantize(back), quantizers.build(c.spec()), back.extras)
    with torch.no_grad():
        assert torch.equal(frozen(x), q(x))  # stored fp16 values == the training forward's


def test_gradients_reach_the_factors_and_the_gate():
    torch.manual_seed(2)
    q = layer({"name": "ternary", "correction": {"rank": 3}}, torch.randn(8, 16))
    with torch.no_grad():
        q.quantizer.lora_b.normal_()
    q(torch.randn(4, 16)).pow(2).sum().backward()
    for p in (q.quantizer.lora_a, q.quantizer.lora_b, q.quantizer.gate, q.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_bytes_are_counted_exactly():
    q = quantizers.build({"name": "ternary", "correction": {"rank": 16}})
    plain = quantizers.build("ternary")
    assert q.nbytes((256, 704)) == plain.nbytes((256, 704)) + 2 * 16 * (256 + 704) + 2
    ch = quantizers.build({"name": "ternary", "correction": {"rank": 16, "gate": "channel"}})
    assert ch.nbytes((256, 704)) == plain.nbytes((256, 704)) + 2 * 16 * (256 + 704) + 2 * 256
    assert q.correction_bytes((256, 704)) == 2 * 16 * 960 + 2


def test_spec_and_errors():
    spec = quantizers.canonical({"name": "ternary", "correction": {"rank": 8}})
    assert spec["correction"] == {"rank": 8, "gate": "scalar", "gate_init": 0.1}
    assert quantizers.canonical(spec) == spec
    with pytest.raises(SchemaError) as e:
        quantizers.build({"name": "ternary", "correction": {"rank": -1, "gates": 2}}, path="policy._default")
    assert {p for p, _ in e.value.errors} == {"policy._default.correction.rank", "policy._default.correction.gates"}


def test_policy_refuses_a_correction_on_an_embedding():
    from qtoolkit.config import ModelConfig
    from qtoolkit.model import DecoderLM
    from qtoolkit.policy import Policy

    model = DecoderLM(ModelConfig.from_name("tiny"))
    with pytest.raises(PolicyError, match="embed is an embedding; a low-rank correction applies to linear"):
        Policy.load({"_default": "ternary", "embed": {"name": "int8", "correction": {"rank": 2}}}).resolve(model)
    coverage = Policy.load({"_default": {"name": "ternary", "correction": {"rank": 2}}}).resolve(model)
    assert all(a.spec["correction"]["rank"] == 2 for a in coverage.layers if a.module_type == "linear")
