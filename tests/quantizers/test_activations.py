from __future__ import annotations

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.schema import SchemaError


@pytest.mark.parametrize("name", ["ternary", "int8", "fp16", "sherry", "tequila"])
@pytest.mark.parametrize("mode", ["none", "int8", "int4", "elastic"])
def test_every_weight_format_takes_every_activation_option(name, mode):
    q = quantizers.build({"name": name, "activations": mode})
    x = torch.randn(2, 3, 32)
    y = q.quantize_input(x)
    assert y.shape == x.shape
    if mode == "none":
        assert y is x
    else:
        assert not torch.equal(y, x)


def test_int4_per_token_codes():
    q = quantizers.build({"name": "ternary", "activations": "int4"})
    x = torch.randn(4, 64)
    y = q.quantize_input(x)
    s = 7 / x.abs().amax(-1, keepdim=True)
    codes = y * s
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.round().abs().max() <= 8
    assert len(torch.unique(codes.round())) <= 16


def test_elastic_initialises_on_the_first_training_batch_and_learns_step_and_offset():
    torch.manual_seed(0)
    q = quantizers.build({"name": "ternary", "activations": "elastic", "elastic_bits": 4})
    q.train()
    x = (torch.randn(8, 64) * 2 + 0.5).requires_grad_(True)
    y = q.quantize_input(x)
    act = q.act
    mu, sigma = x.detach().mean().item(), x.detach().std().item()
    assert act.step.item() == pytest.approx(max(abs(mu - 3 * sigma), abs(mu + 3 * sigma)) / 8, rel=1e-5)
    assert bool(act.initialized)
    codes = (y.detach() - act.offset.detach()) / act.step.detach()
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= -8 and codes.max() <= 7
    (y * torch.randn_like(y)).sum().backward()
    assert act.step.grad is not None and act.step.grad.abs() > 0
    assert act.offset.grad is not None
    inside = ((x.detach() - act.offset.detach()) / act.step.detach()).abs() <= 7
    assert (x.grad[~inside] == 0).all()


def test_elastic_gradients_match_lsq_plus():
    from qtoolkit.quantizers.activations import _ElasticFakeQuant

    x = torch.tensor([[-3.0, -0.26, 0.74, 2.9]], requires_grad=True)
    s = torch.tensor([0.5], requires_grad=True)
    b = torch.tensor([0.25], requires_grad=True)
    y = _ElasticFakeQuant.apply(x, s, b, -2, 1)  # 2 bits: codes -2..1
    v = (x.detach() - 0.25) / 0.5  # [-6.5, -1.02, 0.98, 5.3]
    assert torch.allclose(y, torch.tensor([[-2.0, -1.0, 1.0, 1.0]]) * 0.5 + 0.25)
    y.sum().backward()
    g = 1 / (4 * 1) ** 0.5
    ds = torch.tensor([-2.0, -1.0 - v[0, 1], 1.0 - v[0, 2], 1.0])
    assert torch.allclose(x.grad, torch.tensor([[0.0, 1.0, 1.0, 0.0]]))
    assert torch.allclose(s.grad, ds.sum() * g)
    assert torch.allclose(b.grad, torch.tensor([2.0 * g]))


def test_elastic_state_is_stored_and_restored():
    q = quantizers.build({"name": "int8", "activations": "elastic"})
    q.train()
    q.quantize_input(torch.randn(4, 16))
    w = torch.randn(8, 16)
    qt = q.quantize(w)
    assert set(qt.extras) == {"act_step", "act_offset"}
    fresh = quantizers.build(q.spec())
    fresh.load_extras(qt.extras)
    fresh.eval()
    x = torch.randn(4, 16)
    q.eval()
    assert torch.equal(fresh.quantize_input(x), q.quantize_input(x))


def test_option_errors():
    with pytest.raises(SchemaError, match="elastic_bits"):
        quantizers.build({"name": "ternary", "activations": "int8", "elastic_bits": 4})
    with pytest.raises(SchemaError, match="elastic_bits"):
        quantizers.build({"name": "ternary", "activations": "elastic", "elastic_bits": 9})
    with pytest.raises(SchemaError, match="activations"):
        quantizers.build({"name": "fp32", "activations": "int3"})
