"""Sherry: ternary weights with 3:4 fine-grained sparsity, 1.25 bits per weight (plus scales).

Source: "Sherry: Hardware-Efficient 1.25-Bit Ternary Quantization via Fine-grained Sparsification"
(Tencent AngelSlim, arXiv 2601.07892, 2026). Code read for this implementation (not copied): the
AngelSlim Sherry release as mirrored in WYYAHYT/AngelSlim, Sherry/models/utils_quant.py (`NMQuant`:
N:M top-k mask, sign codes, mean-of-kept scale, identity backward; `Arenas`: the residual and its
warmup-then-cosine schedule) and Sherry/README.md (group sizes, N=3, M=4).

Every row of a weight W (rows, cols) is cut into groups of 4 consecutive weights (a short last
group is padded; the padding is never stored). In every group exactly one weight is zero:

forward (fake quantization)
    z_g     = argmin_{i in g} |W_i|          the smallest magnitude (the first of equal minima; in a
                                             padded group, the first padding position)
    T_i     = 0 if i = z_g, else sign(W_i)   (sign(0) = +1, so a kept weight is never 0)
    alpha_S = sum_{i in S, T_i != 0} |W_i| / #{i in S : T_i != 0}   one fp32 scale per scale group S
                                             (the tensor, a row, or `group_size` columns of a row)
    What_i  = alpha_S * T_i
    A group of 4 therefore has 4 (zero position) x 2^3 (signs of the 3 others) = 32 states: 5 bits.

Arenas (annealing residual synapse), training only. The layer uses W_used = What + r(p) * W, i.e.
y = x What^T + r(p) x W^T as in the paper, with p the training progress (`set_progress`; the trainer
sets p = (step + 1) / steps) and the schedule (w = `arenas_warmup`, e = `arenas_end`, m = `arenas_max`):
    r(p) = m * p / w                               for 0 < p <= w        (linear warmup)
         = m * (1 + cos(pi (p - w) / (e - w))) / 2 for w < p < e         (`arenas: cosine`)
           m * (e - p) / (e - w)                                           (`arenas: linear`)
         = 0                                       for p >= e, in eval mode, or when no progress is set
so the trained model is pure 1.25-bit: the residual is exactly 0 from p = e on (e = 1: the last
step), and the evaluated and packed model never has it.

backward
    dL/dW = (1 + r(p)) * dL/dW_used      (identity STE through What, plus the residual's own path)

Storage (`layout`):
    "codes"   uint8 (ceil(5 * G / 8),), G = rows * ceil(cols / 4) groups in row-major order, one 5-bit
              symbol per group:   s = z + 4 * (b0 + 2 b1 + 4 b2)
              z = position of the zero (0..3); b_k = 1 when the k-th nonzero weight of the group (in
              position order) is -1. Symbols are a little-endian bit stream, symbol j in bits
              5j .. 5j + 4; 8 symbols (32 weights) fill 5 bytes:

              byte 0:  s1[2:0] s0[4:0]        (bit 7 ... bit 0)
              byte 1:  s3[0]   s2[4:0] s1[4:3]
              byte 2:  s4[3:0] s3[4:1]
              byte 3:  s6[1:0] s5[4:0] s4[4]
              byte 4:  s7[4:0] s6[4:2]

              The tail of the last byte is zero bits; a padded group's padding decodes to nothing.
    "scales"  fp32 (scale_rows, scales_per_row), as ternary's.
    Bits per weight: 5/4 = 1.25 for the codes (cols % 4 == 0) + 32 / group_size for the scales
    (1.5 at the default group of 128), against 2 (2-bit) or 1.6 (base-3) for ternary.

Activations: weight-only by default, as in the paper (`activations` takes the shared options).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from qtoolkit.quantizers import register
from qtoolkit.quantizers.activations import ActivationOptions
from qtoolkit.quantizers.base import (
    QTensor,
    ScaledIntQuantizer,
    TensorLayout,
    grouped,
    num_groups,
)

EPS = 1e-5
M = 4  # weights per sparsity group (one of them zero)
_SHIFT5 = torch.arange(0, 40, 5, dtype=torch.int64)  # bit offsets of 8 symbols in 5 bytes
_SHIFT8 = torch.arange(0, 40, 8, dtype=torch.int64)


@dataclass(frozen=True)
class SherryConfig(ActivationOptions):
    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int = 128
    arenas: Literal["cosine", "linear", "none"] = "cosine"
    arenas_max: float = 1.0  # peak residual weight
    arenas_warmup: float = 0.1  # fraction of training over which r rises from 0 to arenas_max
    arenas_end: float = 1.0  # fraction of training from which r is exactly 0

    def check(self) -> list[tuple[str, str]]:
        errors = super().check()
        if self.group_size < 1:
            errors.append(("group_size", f"must be >= 1, got {self.group_size}"))
        if not (math.isfinite(self.arenas_max) and self.arenas_max >= 0):
            errors.append(("arenas_max", f"must be a finite number >= 0, got {self.arenas_max}"))
        if not 0 <= self.arenas_warmup < self.arenas_end <= 1:
            errors.append(("arenas_warmup", "needs 0 <= arenas_warmup < arenas_end <= 1, got "
                           f"{self.arenas_warmup} and {self.arenas_end}"))
        return errors


def arenas_weight(progress: float | None, cfg: SherryConfig) -> float:
    """r(p) of the module docstring (0 when progress is None)."""
    if progress is None or cfg.arenas == "none" or progress <= 0 or progress >= cfg.arenas_end:
        return 0.0
    w, e, m = cfg.arenas_warmup, cfg.arenas_end, cfg.arenas_max
    if progress <= w:
        return m * progress / w
    t = (progress - w) / (e - w)
    return m * 0.5 * (1 + math.cos(math.pi * t)) if cfg.arenas == "cosine" else m * (1 - t)


def keep_mask(w: Tensor) -> Tensor:
    """bool (rows, cols): False at the smallest |w| of every group of 4 (module docstring)."""
    rows, cols = w.shape
    n = -(-cols // M)
    a = w.detach().abs()
    if n * M != cols:  # padding is smaller than any magnitude, so a padded group drops padding
        a = F.pad(a, (0, n * M - cols), value=-1.0)
    a = a.reshape(rows, n, M)
    keep = torch.ones_like(a, dtype=torch.bool).scatter_(-1, a.argmin(dim=-1, keepdim=True), False)
    return keep.reshape(rows, n * M)[:, :cols]


# ------------------------------------------------------------------------------ bit layout


def _sign_weights() -> Tensor:
    """(4, 4): the value of the sign bit of position i when the zero is at z (0 at z itself)."""
    t = torch.zeros(M, M, dtype=torch.int64)
    for z in range(M):
        for i in range(M):
            if i != z:
                t[z, i] = 1 << (i if i < z else i - 1)
    return t


def _decode_table() -> Tensor:
    """(32, 4) int8: the codes of each 5-bit symbol."""
    t = torch.zeros(32, M, dtype=torch.int8)
    for s in range(32):
        z, b = s % M, s // M
        kept = [i for i in range(M) if i != z]
        for k, i in enumerate(kept):
            t[s, i] = -1 if (b >> k) & 1 else 1
    return t


_SIGNS, _DECODE = _sign_weights(), _decode_table()


def codes_to_symbols(codes: Tensor) -> Tensor:
    """int8 codes (rows, cols) with one zero per group of 4 -> uint8 symbols (rows * ceil(cols/4),)."""
    rows, cols = codes.shape
    n = -(-cols // M)
    c = codes.to(torch.int64)
    if c.numel() and int(c.abs().max()) > 1:
        raise ValueError("sherry codes must be in {-1, 0, +1}")
    if n * M != cols:  # padding: the first padding position is the group's zero, the rest +1
        c = F.pad(c, (0, n * M - cols), value=1)
        c[:, cols] = 0
    g = c.reshape(rows, n, M)
    zero = g == 0
    if not bool((zero.sum(dim=-1) == 1).all()):
        raise ValueError("sherry codes need exactly one zero in every group of 4 consecutive weights of a row")
    z = zero.to(torch.int64).argmax(dim=-1)
    b = ((g < 0).to(torch.int64) * _SIGNS.to(c.device)[z]).sum(dim=-1)
    return (z + M * b).to(torch.uint8).reshape(-1)


def symbols_to_codes(symbols: Tensor, shape: tuple[int, ...]) -> Tensor:
    rows, cols = shape
    n = -(-cols // M)
    return _DECODE.to(symbols.device)[symbols.long()].reshape(rows, n * M)[:, :cols]


def packed_len(n_symbols: int) -> int:
    return -(-5 * n_symbols // 8)


def pack_symbols(symbols: Tensor) -> Tensor:
    """uint8 symbols < 32 -> the 5-bit stream (module docstring), ceil(5 n / 8) bytes."""
    n = symbols.numel()
    s = F.pad(symbols.reshape(-1).to(torch.int64), (0, (-n) % 8)).reshape(-1, 8)
    v = (s << _SHIFT5.to(s.device)).sum(dim=1, keepdim=True)  # 40 bits per 8 symbols
    return ((v >> _SHIFT8.to(s.device)) & 0xFF).to(torch.uint8).reshape(-1)[:packed_len(n)]


def unpack_symbols(packed: Tensor, n: int) -> Tensor:
    b = F.pad(packed.reshape(-1).to(torch.int64), (0, (-packed.numel()) % 5)).reshape(-1, 5)
    v = (b << _SHIFT8.to(b.device)).sum(dim=1, keepdim=True)
    return ((v >> _SHIFT5.to(b.device)) & 31).to(torch.uint8).reshape(-1)[:n]


# ------------------------------------------------------------------------------ the quantizer


@register("sherry")
class SherryQuantizer(ScaledIntQuantizer):
    Config = SherryConfig
    config: SherryConfig
    qmax = 1
    needs_progress = True

    def scales(self, w: Tensor) -> Tensor:
        """alpha per scale group, shaped (scale_rows, scales_per_row, 1): mean |W| of the kept weights."""
        w = w.detach()
        keep = keep_mask(w).to(w.dtype)
        cfg = self.config
        total = grouped(w.abs() * keep, cfg.granularity, cfg.group_size).sum(dim=-1, keepdim=True)
        count = grouped(keep, cfg.granularity, cfg.group_size).sum(dim=-1, keepdim=True).clamp_min(1)
        return (total / count).clamp_min(EPS)

    def grouped_codes(self, w: Tensor, scale: Tensor) -> Tensor:
        w = w.detach()
        codes = torch.where(w >= 0, 1.0, -1.0).to(w.dtype) * keep_mask(w)
        return grouped(codes, self.config.granularity, self.group_size)

    def residual_weight(self) -> float:
        """r(p) now: 0 outside training (module docstring)."""
        return arenas_weight(self.progress, self.config) if self.training else 0.0

    def forward(self, w: Tensor) -> Tensor:
        w_hat = super().forward(w)
        r = self.residual_weight()
        return w_hat if r == 0.0 else w_hat + r * w

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        rows, cols = shape
        return {
            "codes": TensorLayout(torch.uint8, (packed_len(rows * -(-cols // M)),)),
            "scales": TensorLayout(torch.float32, num_groups(shape, self.config.granularity, self.group_size)),
        }

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        return {"codes": pack_symbols(codes_to_symbols(q.codes)), "scales": q.scales}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        rows, cols = shape
        symbols = unpack_symbols(tensors["codes"], rows * -(-cols // M))
        return QTensor(symbols_to_codes(symbols, shape), tensors["scales"], shape)

    def stats(self, q: QTensor) -> dict[str, Any]:
        """Zero fraction, share of groups with exactly one zero, and where the zero sits."""
        rows, cols = q.shape
        full = cols // M
        g = q.codes[:, :full * M].reshape(rows, full, M) == 0
        out = super().stats(q)
        out["zero_fraction"] = float((q.codes == 0).double().mean())
        if full:
            out["groups_with_one_zero"] = float((g.sum(dim=-1) == 1).double().mean())
            out["zero_position"] = [float(x) for x in g.double().mean(dim=(0, 1))]
        return out
