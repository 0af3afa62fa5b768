"""Binary weights {-1, +1} per row, with a statistics-based scale and mean, trained with an STE.

Source: "Binary and Ternary Natural Language Generation" (Liu, Oguz, Pappu, Shi, Krishnamoorthi,
ACL 2023); code read (not copied): facebookresearch/Ternary_Binary_Transformer, quant/utils_quant.py
(`BwnQuantizer`, and `QuantizeLinear` for `weight_bits == 1`): sign codes, one absmean scale per
row, the straight-through estimator. This is the minimal form the issue-13 benchmark needs; issue 12
owns the binary format and may extend it (groups, bit layouts).

forward, for a weight W (rows, cols) (`granularity: channel`; `tensor` uses one statistic for all):
    mu_r    = mean_j W_rj                       (0 with `mean: false`)
    alpha_r = max(mean_j |W_rj - mu_r|, 1e-5)
    B_rj    = sign(W_rj - mu_r)                 (sign(0) = +1: every code is +-1)
    What_rj = alpha_r * B_rj + mu_r
backward
    dL/dW = dL/dWhat                            (identity STE)

Storage (`layout`): "codes", uint8 (ceil(numel / 8),): the codes flattened in row-major order,
8 per byte, code i in bit i % 8 of byte i // 8 (little end first), bit = 1 for +1, 0 for -1; the
tail of the last byte is 0. "scales", fp32 (rows, 1) or (1, 1): alpha. With `mean: true` (default)
also "mean", fp32 of the same shape: mu (an extra, `QTensor.extras["mean"]`). So 1 bit per weight
plus 32 (or 64) bits per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from qtoolkit.quantizers import register
from qtoolkit.quantizers.activations import ActivationOptions
from qtoolkit.quantizers.base import (
    QTensor,
    Quantizer,
    TensorLayout,
    grouped,
    num_groups,
    straight_through,
    ungrouped,
)

EPS = 1e-5
_BITS = torch.arange(8, dtype=torch.uint8)


@dataclass(frozen=True)
class BinaryConfig(ActivationOptions):
    granularity: Literal["channel", "tensor"] = "channel"
    mean: bool = True


def pack_bits(codes: Tensor) -> Tensor:
    """+-1 codes -> uint8, 8 per byte (module docstring)."""
    b = (codes.reshape(-1) > 0).to(torch.uint8)
    b = torch.cat([b, b.new_zeros((-b.numel()) % 8)]).reshape(-1, 8)
    return (b << _BITS.to(b.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    bits = (packed.reshape(-1, 1) >> _BITS.to(packed.device)) & 1
    return (bits.reshape(-1)[:n].to(torch.int8) * 2 - 1)


@register("binary")
class BinaryQuantizer(Quantizer):
    Config = BinaryConfig
    config: BinaryConfig
    qmax = 1  # codes are +-1

    def _stats(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(alpha, mu), each shaped (scale_rows, 1, 1) to broadcast over `grouped(w)`."""
        g = grouped(w.detach(), self.config.granularity, 0)
        mu = g.mean(dim=-1, keepdim=True) if self.config.mean else torch.zeros_like(g[..., :1])
        alpha = (g - mu).abs().mean(dim=-1, keepdim=True).clamp_min(EPS)
        return alpha, mu

    def _codes(self, w: Tensor, mu: Tensor) -> Tensor:
        g = grouped(w.detach(), self.config.granularity, 0)
        return torch.where(g - mu >= 0, 1.0, -1.0).to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            alpha, mu = self._stats(w)
            w_hat = ungrouped(self._codes(w, mu) * alpha + mu, tuple(w.shape))
        return straight_through(w, w_hat)

    @torch.no_grad()
    def _quantize(self, w: Tensor) -> QTensor:
        alpha, mu = self._stats(w)
        codes = ungrouped(self._codes(w, mu), tuple(w.shape)).to(torch.int8)
        return QTensor(codes, alpha.reshape(alpha.shape[:2]).float(), tuple(w.shape))

    def extras(self, w: Tensor) -> dict[str, Tensor]:
        out = super().extras(w)
        if self.config.mean:
            out["mean"] = self._stats(w)[1].reshape(-1, 1)
        return out

    def extras_layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        out = super().extras_layout(shape)
        if self.config.mean:
            out["mean"] = TensorLayout(torch.float32, num_groups(shape, self.config.granularity, 0))
        return out

    def dequantize(self, q: QTensor) -> Tensor:
        alpha = q.scales.reshape(*q.scales.shape, 1)
        mu = q.extras["mean"].float().reshape(alpha.shape) if self.config.mean else torch.zeros_like(alpha)
        g = grouped(q.codes.to(q.scales.dtype), self.config.granularity, 0)
        return ungrouped(g * alpha + mu, q.shape)

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        return {"codes": TensorLayout(torch.uint8, (-(-(shape[0] * shape[1]) // 8),)),
                "scales": TensorLayout(torch.float32, num_groups(shape, self.config.granularity, 0))}

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        return {"codes": pack_bits(q.codes), "scales": q.scales}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        codes = unpack_bits(tensors["codes"], shape[0] * shape[1]).reshape(shape)
        return QTensor(codes, tensors["scales"], shape)
