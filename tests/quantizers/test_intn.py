"""intn: the grid, the bit stream, exact bytes, aliases, and GPTQ (against RTN, through calibration)."""

from __future__ import annotations

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.quantizers import bitpack
from qtoolkit.quantizers.intn import gptq, quant_params


def build(spec, w=None):
    q = quantizers.build(spec)
    if w is not None:
        q.init_from_weight(w)
    return q


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 13, 64, 1001])
def test_uint_stream_round_trips_without_waste(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    v = torch.randint(0, 2**bits, (n,), generator=g)
    packed = bitpack.pack_uint(v, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * bits // 8)
    assert torch.equal(bitpack.unpack_uint(packed, n, bits).long(), v)


def test_uint_stream_layout_is_lsb_first():
    # codes 1..8 at 3 bits: stream 100 010 110 001 101 011 111 000 (LSB first per code)
    packed = bitpack.pack_uint(torch.tensor([1, 2, 3, 4, 5, 6, 7, 0]), 3)
    bits = "".join(f"{int(b):08b}"[::-1] for b in packed)  # each byte, bit 0 first
    assert bits == "100" "010" "110" "001" "101" "011" "111" "000"


@pytest.mark.parametrize("shape", [(7, 13), (3, 130), (1, 1), (5, 129), (704, 256)])
@pytest.mark.parametrize("bits", [2, 3, 5, 7])
@pytest.mark.parametrize("symmetric", [False, True])
def test_exact_bytes_for_odd_shapes(shape, bits, symmetric):
    rows, cols = shape
    groups = -(-cols // 128)
    q = build({"name": "intn", "bits": bits, "symmetric": symmetric})
    expected = -(-rows * cols * bits // 8) + rows * groups * 2 + (0 if symmetric else rows * groups)
    assert q.nbytes(shape) == expected
    if rows * cols <= 1000:
        w = torch.randn(shape)
        packed = q.pack(q.quantize(w))
        assert sum(t.numel() * t.element_size() for t in packed.values()) == expected


def test_int4_alias_is_intn_4_bits_group_128_and_its_bits_per_weight():
    spec = quantizers.canonical("int4")
    assert spec["name"] == "intn" and spec["bits"] == 4 and spec["group_size"] == 128 and spec["rounding"] == "rtn"
    assert quantizers.canonical({"name": "int4", "symmetric": True})["symmetric"] is True
    assert quantizers.canonical("gptq3")["rounding"] == "gptq"
    assert quantizers.alias_of(spec) == "int4"
    q = build("int4")
    assert float(q.bits_per_weight((256, 256))) == 4 + 16 / 128 + 8 / 128
    assert "int4" in quantizers.aliases()


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_error_halves_with_every_bit(bits):
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    rel = ((w - build({"name": "intn", "bits": bits})(w)).norm() / w.norm()).item()
    assert rel <= 0.6 * 2.0 ** (2 - bits)


def test_asymmetric_grid_represents_a_shifted_group_exactly_at_its_ends():
    w = torch.linspace(1.0, 2.5, 16).reshape(1, 16)  # all positive: the asymmetric range is [0, 2.5]
    s, z = quant_params(w.reshape(1, 1, 16), 4, False, "fp32")
    assert float(z) == -8  # zero maps to the lowest code
    q = build({"name": "intn", "bits": 4, "scale_dtype": "fp32"})
    qt = q.quantize(w)
    assert int(qt.codes.max()) == 7 and int(qt.codes.min()) > -8
    assert torch.allclose(q(w), w, atol=float(s) / 2 + 1e-6)


def test_fp16_scales_are_stored_exactly():
    torch.manual_seed(1)
    w = torch.randn(9, 300) * 0.02
    q = build({"name": "intn", "bits": 3})
    qt = q.quantize(w)
    assert torch.equal(qt.scales.half().float(), qt.scales)
    packed = q.pack(qt)
    assert packed["scales"].dtype == torch.float16
    assert torch.equal(q.dequantize(q.unpack(packed, (9, 300))), q(w))


def correlated_layer(rows=48, cols=96, n=2048, seed=0):
    """A weight and inputs whose features are strongly correlated (a few latent factors plus noise,
    and features of very different scales), the case where GPTQ's error feedback pays off."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 8, generator=g)
    mix = torch.randn(8, cols, generator=g)
    x = z @ mix + 0.1 * torch.randn(n, cols, generator=g)
    x = x * torch.linspace(0.2, 3.0, cols)
    w = torch.randn(rows, cols, generator=g) / cols**0.5
    return w, x


@pytest.mark.parametrize("spec", [
    {"bits": 3, "group_size": 32},
    {"bits": 4, "granularity": "channel"},
    {"bits": 2, "group_size": 32, "act_order": True},
    {"bits": 3, "group_size": 32, "symmetric": True, "act_order": True},
])
def test_gptq_beats_rtn_on_layer_output_error(spec):
    w, x = correlated_layer()
    rtn = build({"name": "intn", **spec, "act_order": False})
    g = build({"name": "intn", **spec, "rounding": "gptq"}, w)
    for chunk in x.split(512):  # streaming statistics, as the calibration driver feeds them
        g.observe(chunk)
    w_gptq = g.calibrate(w)
    assert w_gptq.shape == w.shape and not torch.equal(w_gptq, w)
    # the returned latent weight is on the fitted grid: re-quantizing it changes nothing
    assert torch.equal(g(w_gptq), w_gptq)
    err_rtn = (x @ (rtn(w) - w).T).square().sum()
    err_gptq = (x @ (w_gptq - w).T).square().sum()
    assert err_gptq < 0.5 * err_rtn, (float(err_gptq), float(err_rtn))
    # the weight error itself is larger: GPTQ trades weight error for output error
    assert (w_gptq - w).norm() >= 0.9 * (rtn(w) - w).norm()


def test_gptq_state_packs_and_the_uncalibrated_default_is_rtn():
    w, x = correlated_layer(rows=8, cols=40, n=256)
    g = build({"name": "gptq4", "group_size": 16}, w)
    assert torch.equal(g(w), build({"name": "int4", "group_size": 16})(w))  # before calibration: RTN
    g.observe(x)
    w2 = g.calibrate(w)
    packed = g.pack(g.quantize(w2))
    assert torch.equal(g.dequantize(g.unpack(packed, (8, 40))), w2)
    assert set(dict(g.named_buffers())) == {"scale", "zero"}


def test_gptq_function_with_identity_hessian_is_rtn():
    """With H = I the columns are uncorrelated: no error to spread, GPTQ reduces to RTN."""
    torch.manual_seed(3)
    w = torch.randn(6, 20)
    cfg = build({"name": "intn", "bits": 3, "granularity": "channel", "damp": 0.0}).config
    q, s, z = gptq(w, torch.eye(20), cfg)
    assert torch.equal(q.float(), build({"name": "intn", "bits": 3, "granularity": "channel"})(w))


def test_gptq_calibrates_through_the_driver_and_round_trips_through_a_packed_checkpoint(tmp_path):
    from qtoolkit.calibration import calibrate_model
    from qtoolkit.checkpoint import load_checkpoint, save_checkpoint
    from qtoolkit.config import ModelConfig
    from qtoolkit.model import DecoderLM
    from qtoolkit.pack import model_from_checkpoint, pack_checkpoint
    from qtoolkit.policy import apply_policy

    torch.manual_seed(0)
    model = DecoderLM(ModelConfig.from_name("tiny", n_layers=2)).eval()
    policy = {"_default": {"name": "gptq3", "group_size": 32}, "embed": "int8", "lm_head": "int8"}
    coverage = apply_policy(model, policy)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, 512, (2, 16), generator=g) for _ in range(3)]
    before = model.blocks[0].attn.q_proj.weight.detach().clone()
    report = calibrate_model(model, data)
    assert "blocks.0.attn.q_proj" in report.layers
    assert not torch.equal(model.blocks[0].attn.q_proj.weight, before)
    state = {"kind": "train", "model_config": model.config.to_dict(), "recipe": {}, "policy": policy,
             "coverage": coverage.to_dict(), "tokenizer": "", "model": model.state_dict(), "step": 0}
    save_checkpoint(state, tmp_path / "ckpt.pt")
    pack_checkpoint(tmp_path / "ckpt.pt", tmp_path / "packed.safetensors")
    packed, _ = model_from_checkpoint(load_checkpoint(tmp_path / "packed.safetensors"))
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(packed(x), model(x), rtol=0, atol=0)


def test_bad_options_name_the_key():
    from qtoolkit.schema import SchemaError

    with pytest.raises(SchemaError) as e:
        quantizers.build({"name": "intn", "bits": 9, "act_order": True}, path="policy.x")
    assert {p for p, _ in e.value.errors} == {"policy.x.bits", "policy.x.act_order"}
