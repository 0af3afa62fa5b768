"""Ternary weights {-1, 0, +1} times a scale, trained with a straight-through estimator.

This is the TernaryLM / BitNet b1.58 quantizer. For a weight W split into scale groups G (the whole
tensor, one output row, or `group_size` consecutive inputs of a row — see `granularity`):

alpha: absmean (default; BitNet b1.58's rule, the paper's "adaptive per-layer scale")
    forward     gamma_G = max(mean_{i in G} |W_i|, 1e-5)
                Wt_i    = clamp(round(W_i / gamma_G), -1, 1)          (integer codes)
                What_i  = gamma_G * Wt_i
    backward    dL/dW_i = dL/dWhat_i                                    (identity STE; no gradient
                                                                        flows through gamma)

alpha: learned (LSQ-style trainable scale s_G, initialised to the absmean gamma_G of the initial W)
    forward     s       = max(s_G, 1e-5);  v_i = W_i / s
                Wt_i    = clamp(round(v_i), -1, 1);  What_i = s * Wt_i
    backward    dL/dW_i = dL/dWhat_i * [ |v_i| <= 1 ]                   (clipped STE)
                dL/ds_G = g * sum_{i in G} dL/dWhat_i * ( Wt_i - v_i  if |v_i| <= 1
                                                          sign(v_i)   otherwise )
                g       = 1 / sqrt(|G| * Q_P),  Q_P = 1                 (LSQ gradient scale)

activations: int8 (default, as in BitNet) quantizes the layer input per token (last dim):
    forward     s_t = 127 / max(max_j |x_tj|, 1e-5);  xhat_tj = clamp(round(x_tj * s_t), -128, 127) / s_t
    backward    identity STE
(`none`, `int4` and `elastic` are the other choices every quantizer shares: see `activations.py`.)

The layer then computes  y = xhat @ What^T.  Because What = gamma * Wt with Wt in {-1, 0, 1}, the
deployed layer needs only additions of int8 activations and one multiply per output by
gamma / s_t (see the inference runtime).

Storage (`layout`): "codes", uint8 (ceil(numel / k),) with the codes packed flat in row-major order,
k = 4 for `packing: 2bit`, 5 for `packing: base3` (bit layouts drawn in `bitpack.py`); "scales",
float32 (scale_rows, scales_per_row), one per group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from qtoolkit.quantizers import bitpack, register
from qtoolkit.quantizers.activations import ActivationOptions
from qtoolkit.quantizers.base import (
    QTensor,
    ScaledIntQuantizer,
    TensorLayout,
    group_counts,
    grouped,
    num_groups,
    ungrouped,
)

EPS = 1e-5


@dataclass(frozen=True)
class TernaryConfig(ActivationOptions):
    activations: Literal["none", "int8", "int4", "elastic"] = "int8"
    alpha: Literal["absmean", "learned"] = "absmean"
    granularity: Literal["tensor", "channel", "group"] = "tensor"
    group_size: int = 128
    packing: Literal["2bit", "base3"] = "2bit"

    def check(self) -> list[tuple[str, str]]:
        errors = super().check()
        if self.group_size < 1:
            errors.append(("group_size", f"must be >= 1, got {self.group_size}"))
        return errors


def absmean_scales(w: Tensor, cfg: TernaryConfig) -> Tensor:
    """gamma per scale group, shaped (scale_rows, scales_per_row, 1)."""
    g = grouped(w, cfg.granularity, cfg.group_size)
    counts = group_counts(tuple(w.shape), cfg.granularity, cfg.group_size, device=w.device)
    return (g.abs().sum(dim=-1, keepdim=True) / counts).clamp_min(EPS)


class _LearnedScaleFakeQuant(torch.autograd.Function):
    """LSQ forward/backward for ternary codes (formulas in the module docstring)."""

    @staticmethod
    def forward(ctx, w: Tensor, alpha: Tensor, cfg: TernaryConfig) -> Tensor:
        s = alpha.clamp_min(EPS)
        v = grouped(w, cfg.granularity, cfg.group_size) / s
        codes = v.round().clamp_(-1, 1)
        ctx.save_for_backward(v, codes, alpha)
        ctx.cfg, ctx.shape = cfg, tuple(w.shape)
        return ungrouped(codes * s, ctx.shape)

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, codes, alpha = ctx.saved_tensors
        cfg, shape = ctx.cfg, ctx.shape
        g = grouped(grad, cfg.granularity, cfg.group_size)
        inside = v.abs() <= 1
        grad_w = ungrouped(g * inside, shape)
        counts = group_counts(shape, cfg.granularity, cfg.group_size, device=grad.device)
        dv = torch.where(inside, codes - v, torch.sign(v))  # padding: v = 0 -> contributes 0
        grad_s = (g * dv).sum(dim=-1, keepdim=True) / counts.sqrt()  # g = 1/sqrt(|G| * 1)
        grad_s = grad_s * (alpha > EPS)  # clamp_min: no gradient below the floor
        return grad_w, grad_s, None


@register("ternary")
class TernaryQuantizer(ScaledIntQuantizer):
    Config = TernaryConfig
    config: TernaryConfig
    qmax = 1

    def init_from_weight(self, weight: Tensor) -> None:
        if self.config.alpha == "learned":
            with torch.no_grad():
                init = absmean_scales(weight.detach().float(), self.config)
            self.alpha = nn.Parameter(init.to(weight.dtype))

    def scales(self, w: Tensor) -> Tensor:
        """The scale of each group, shaped (scale_rows, scales_per_row, 1)."""
        if self.config.alpha == "learned":
            return self.alpha.detach().clamp_min(EPS)
        return absmean_scales(w.detach(), self.config)

    def forward(self, w: Tensor) -> Tensor:
        if self.config.alpha == "learned":
            return _LearnedScaleFakeQuant.apply(w, self.alpha, self.config)
        return super().forward(w)

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        n = bitpack.packed_len(math.prod(shape), self.config.packing)
        return {
            "codes": TensorLayout(torch.uint8, (n,)),
            "scales": TensorLayout(torch.float32, num_groups(shape, self.config.granularity, self.config.group_size)),
        }

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        return {"codes": bitpack.pack(q.codes, self.config.packing), "scales": q.scales}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        codes = bitpack.unpack(tensors["codes"], math.prod(shape), self.config.packing)
        return QTensor(codes.reshape(shape), tensors["scales"], shape)
