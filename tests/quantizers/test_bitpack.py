from __future__ import annotations

import pytest
import torch

from qtoolkit.quantizers import bitpack


@pytest.mark.parametrize("n", [1, 3, 4, 5, 6, 7, 9, 10, 11, 97, 1000, 1001])
@pytest.mark.parametrize("packing", ["2bit", "base3"])
def test_round_trip_any_length(n, packing):
    codes = torch.randint(-1, 2, (n,), dtype=torch.int8)
    packed = bitpack.pack(codes, packing)
    assert packed.dtype == torch.uint8 and packed.numel() == bitpack.packed_len(n, packing)
    assert torch.equal(bitpack.unpack(packed, n, packing), codes)


def test_2bit_layout_is_as_drawn():
    # codes -1, 0, +1, +1 -> digits 0, 1, 2, 2 -> 0b10_10_01_00
    assert bitpack.pack_2bit(torch.tensor([-1, 0, 1, 1], dtype=torch.int8)).tolist() == [0b10100100]
    # a short tail is filled with code 0 (digit 1): -1 -> 0b01_01_01_00
    assert bitpack.pack_2bit(torch.tensor([-1], dtype=torch.int8)).tolist() == [0b01010100]


def test_base3_layout_is_as_drawn():
    # digits 2, 0, 1, 2, 1 -> 2 + 0*3 + 1*9 + 2*27 + 1*81 = 146
    assert bitpack.pack_base3(torch.tensor([1, -1, 0, 1, 0], dtype=torch.int8)).tolist() == [146]
    assert bitpack.pack_base3(torch.ones(5, dtype=torch.int8)).tolist() == [242]
    assert bitpack.packed_len(768 * 768, "base3") * 8 / (768 * 768) == pytest.approx(1.6, abs=1e-4)


def test_corrupted_base3_byte_is_rejected():
    with pytest.raises(ValueError, match="above 242"):
        bitpack.unpack_base3(torch.tensor([250], dtype=torch.uint8), 5)
