"""Bit layouts of packed ternary codes.

A ternary code c in {-1, 0, +1} is stored as the digit u = c + 1 in {0, 1, 2}. Codes are taken in
row-major order of the (rows, cols) weight, flattened, so the layout does not depend on the shape;
the tail of the last byte is filled with u = 1 (code 0). Unpacking needs only the element count.

`2bit` — 4 codes per byte, code i in bits 2*(i % 4) .. 2*(i % 4) + 1 of byte i // 4 (little end first):

        byte k:   bit  7 6 | 5 4 | 3 2 | 1 0
                       u3  | u2  | u1  | u0        u_j = code[4k + j] + 1    (0b11 never occurs)

`base3` — 5 codes per byte, as the base-3 number whose least significant digit is the first code:

        byte k  =  u0 + 3*u1 + 9*u2 + 27*u3 + 81*u4      u_j = code[5k + j] + 1,  0 <= byte <= 242

    1.6 bits per weight; 3^5 = 243 <= 256, so 13 byte values are never used. Decoding goes through
    a 243 x 5 lookup table.

Both are exact: `unpack_*(pack_*(c), c.numel()) == c.flatten()` for any element count (tested).

`pack_uint` / `unpack_uint` — unsigned b-bit integers (1 <= b <= 8) as one continuous bit stream,
with no padding between codes (so 3-, 5-, 6- and 7-bit codes waste nothing). Code i occupies stream
bits i*b .. i*b + b - 1, least significant bit first, and stream bit k is bit k % 8 of byte k // 8.
For b = 3:

        byte 0:  bit  7 6 | 5 4 3 | 2 1 0        byte 1:  bit  7 | 6 5 4 | 3 2 1 | 0
                     u2.1 u2.0|  u1   |  u0                    u5.0|  u4   |  u3   | u2.2

    (u_j.k = bit k of code j). Eight codes fill exactly b bytes; the stream is ceil(n*b / 8) bytes
    long and the unused high bits of the last byte are 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

CODES_PER_BYTE = {"2bit": 4, "base3": 5}
_SHIFTS = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_POW3 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.uint8)


def packed_len(n: int, packing: str) -> int:
    """Bytes holding `n` codes."""
    return -(-n // CODES_PER_BYTE[packing])


def _digits(codes: Tensor, per_byte: int) -> Tensor:
    """codes -> digits u = c + 1 as uint8, padded with 1 to a multiple of `per_byte`, (bytes, per_byte)."""
    u = (codes.reshape(-1).to(torch.int16) + 1).to(torch.uint8)
    pad = (-u.numel()) % per_byte
    if pad:
        u = torch.cat([u, torch.ones(pad, dtype=torch.uint8, device=u.device)])
    return u.view(-1, per_byte)


def pack_2bit(codes: Tensor) -> Tensor:
    u = _digits(codes, 4)
    return (u << _SHIFTS.to(u.device)).sum(dim=1, dtype=torch.uint8)


def unpack_2bit(packed: Tensor, n: int) -> Tensor:
    u = (packed.reshape(-1, 1) >> _SHIFTS.to(packed.device)) & 3
    return (u.reshape(-1)[:n].to(torch.int8) - 1)


def pack_base3(codes: Tensor) -> Tensor:
    u = _digits(codes, 5)
    return (u * _POW3.to(u.device)).sum(dim=1, dtype=torch.uint8)


_BASE3_TABLE: Tensor | None = None


def _base3_table() -> Tensor:
    """(243, 5) int8: the five codes of every byte value."""
    global _BASE3_TABLE
    if _BASE3_TABLE is None:
        v = torch.arange(243, dtype=torch.int16).unsqueeze(1)
        _BASE3_TABLE = ((v // _POW3.to(torch.int16)) % 3 - 1).to(torch.int8)
    return _BASE3_TABLE


def unpack_base3(packed: Tensor, n: int) -> Tensor:
    if packed.numel() and int(packed.max()) > 242:
        raise ValueError("corrupted base3 data: a byte value above 242")
    table = _base3_table().to(packed.device)
    return table[packed.reshape(-1).long()].reshape(-1)[:n]


def uint_packed_len(n: int, bits: int) -> int:
    """Bytes holding `n` codes of `bits` bits each."""
    return -(-n * bits // 8)


def pack_uint(values: Tensor, bits: int) -> Tensor:
    """Integers in [0, 2^bits) -> uint8 bit stream (layout in the module docstring)."""
    v = values.reshape(-1).to(torch.int16)
    n = v.numel()
    v = torch.cat([v, v.new_zeros((-n) % 8)])
    shifts = torch.arange(bits, dtype=torch.int16, device=v.device)
    stream = ((v.unsqueeze(1) >> shifts) & 1).to(torch.uint8).reshape(-1, 8)  # (8 codes * bits) / 8 rows
    byte = (stream << torch.arange(8, dtype=torch.uint8, device=v.device)).sum(dim=1, dtype=torch.uint8)
    return byte[: uint_packed_len(n, bits)]


def unpack_uint(packed: Tensor, n: int, bits: int) -> Tensor:
    """Inverse of `pack_uint`: the first `n` codes, int16."""
    stream = (packed.reshape(-1, 1) >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    stream = stream.reshape(-1)[: n * bits].to(torch.int16).reshape(n, bits)
    return (stream << torch.arange(bits, dtype=torch.int16, device=packed.device)).sum(dim=1, dtype=torch.int16)


def pack(codes: Tensor, packing: str) -> Tensor:
    return pack_2bit(codes) if packing == "2bit" else pack_base3(codes)


def unpack(packed: Tensor, n: int, packing: str) -> Tensor:
    return unpack_2bit(packed, n) if packing == "2bit" else unpack_base3(packed, n)
