from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from qtoolkit import quantizers
from qtoolkit.quantizers.sherry import (
    arenas_weight,
    codes_to_symbols,
    pack_symbols,
    symbols_to_codes,
    unpack_symbols,
)


def sherry(**options):
    return quantizers.build({"name": "sherry", **options})


@pytest.mark.parametrize("shape", [(8, 32), (5, 13), (3, 4), (2, 3), (1, 1), (64, 48)])
def test_exactly_one_zero_per_group_of_four(shape):
    w = torch.randn(shape)
    codes = sherry().quantize(w).codes
    rows, cols = shape
    full = cols // 4
    groups = codes[:, :4 * full].reshape(rows, full, 4)
    assert torch.equal((groups == 0).sum(-1), torch.ones(rows, full, dtype=torch.long))
    # a short last group's zero falls on padding: its real weights are all +-1
    assert (codes[:, 4 * full:] != 0).all()
    # the zero is the smallest magnitude of the group
    a = w[:, :4 * full].reshape(rows, full, 4).abs()
    assert torch.equal((groups == 0).float().argmax(-1), a.argmin(-1))


def test_kept_weights_keep_their_sign_and_a_zero_weight_is_plus_one():
    w = torch.tensor([[0.0, 0.0, -0.5, 0.25]])  # zero position: the first 0.0; the second 0.0 -> +1
    assert sherry().quantize(w).codes.tolist() == [[0, 1, -1, 1]]


def test_scale_is_the_mean_magnitude_of_the_kept_weights():
    w = torch.tensor([[4.0, -1.0, 2.0, 3.0, -0.5, 6.0, -7.0, 8.0]])
    qt = sherry(granularity="channel").quantize(w)
    assert qt.scales.item() == pytest.approx((4 + 2 + 3 + 6 + 7 + 8) / 6)


@pytest.mark.parametrize("shape", [(4, 256), (768, 768), (7, 13)])
def test_bits_per_weight_is_one_and_a_quarter_plus_scales(shape):
    q = sherry()
    rows, cols = shape
    groups = rows * -(-cols // 4)
    assert q.nbytes(shape) == -(-5 * groups // 8) + 4 * rows * -(-cols // 128)
    if cols % 4 == 0 and (rows * cols) % 32 == 0:  # whole bytes: exactly 1.25 + 32 / 128
        assert q.bits_per_weight(shape) == Fraction(5, 4) + Fraction(32 * rows * -(-cols // 128), rows * cols)
    assert sherry(granularity="tensor").bits_per_weight((32, 32)) == Fraction(5, 4) + Fraction(32, 32 * 32)


def test_symbol_stream_layout_by_hand():
    # symbols 0..7 = zero at position s % 4, sign bits s // 4; bit j of the stream is bit j % 5 of symbol j // 5
    symbols = torch.tensor([31, 0, 1, 2, 3, 4, 5, 6], dtype=torch.uint8)
    packed = pack_symbols(symbols)
    assert packed.numel() == 5
    bits = "".join(format(b, "08b")[::-1] for b in packed.tolist())  # little end first
    expected = "".join(format(s, "05b")[::-1] for s in symbols.tolist())
    assert bits == expected
    assert torch.equal(unpack_symbols(packed, 8), symbols)
    assert pack_symbols(symbols[:3]).numel() == 2  # 15 bits -> 2 bytes


def test_every_symbol_decodes_to_a_valid_group_and_back():
    symbols = torch.arange(32, dtype=torch.uint8)
    codes = symbols_to_codes(symbols, (1, 128))
    assert ((codes.reshape(32, 4) == 0).sum(-1) == 1).all()
    assert torch.equal(codes_to_symbols(codes), symbols)


def test_invalid_codes_are_refused():
    with pytest.raises(ValueError, match="exactly one zero"):
        codes_to_symbols(torch.tensor([[1, 1, 1, 1]], dtype=torch.int8))
    with pytest.raises(ValueError, match="exactly one zero"):
        codes_to_symbols(torch.tensor([[0, 0, 1, 1]], dtype=torch.int8))


def test_arenas_schedule_shape_and_exact_zero_at_the_end():
    cfg = sherry().config  # cosine, max 1, warmup 0.1, end 1.0
    assert arenas_weight(None, cfg) == 0.0
    assert arenas_weight(0.05, cfg) == pytest.approx(0.5)
    assert arenas_weight(0.1, cfg) == pytest.approx(1.0)
    assert arenas_weight(0.55, cfg) == pytest.approx(0.5)
    assert arenas_weight(1.0, cfg) == 0.0
    early = sherry(arenas="linear", arenas_end=0.5).config
    assert arenas_weight(0.3, early) == pytest.approx(0.5) and arenas_weight(0.5, early) == 0.0
    assert arenas_weight(0.7, early) == 0.0
    assert arenas_weight(0.05, sherry(arenas="none").config) == 0.0


def test_arenas_residual_in_training_and_none_at_the_end_of_its_schedule():
    q = sherry()
    w = torch.randn(8, 32, requires_grad=True)
    pure = q.dequantize(q.quantize(w))
    q.train()
    q.set_progress(0.55)  # r = 0.5
    used = q(w)
    assert torch.allclose(used, pure + 0.5 * w.detach())
    used.sum().backward()
    assert torch.allclose(w.grad, torch.full_like(w, 1.5))  # STE (1) + residual (r)
    q.set_progress(1.0)  # the last step: the model is pure 1.25-bit
    assert q.residual_weight() == 0.0 and torch.equal(q(w), pure)
    q.set_progress(0.55)
    q.eval()  # never in evaluation
    assert torch.equal(q(w), pure)


def test_trainer_drives_the_schedule(corpus_dir, tmp_path):
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train

    seen = []
    original = quantizers.get("sherry").set_progress

    def spy(self, p):
        seen.append(p)
        original(self, p)

    quantizers.get("sherry").set_progress = spy
    try:
        r = load_recipe("sherry_all", ["model.preset=tiny", f"data.path={corpus_dir}", "train.steps=4",
                                       "train.eval_batches=1"])
        train(r, tmp_path / "run")
    finally:
        quantizers.get("sherry").set_progress = original
    per_step = len(seen) // 4
    assert per_step == 14  # every block linear of `tiny` (2 blocks x 7)
    assert [seen[i * per_step] for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert math.isclose(seen[-1], 1.0)
