"""Tequila: ternary weights whose dead-zone weights live on as a dynamic bias.

Source: "Tequila: Trapping-free Ternary Quantization for Large Language Models" (Huang et al.,
Tencent, arXiv 2509.23809, ICLR 2026). Code read for this implementation (not copied): the
AngelSlim `tequila` release (github.com/Tencent/AngelSlim/tree/tequila/TernaryQuant) as mirrored in
imleoo/AngelSlim, TernaryQuant/models/utils_quant.py (`UltraQuantV2` and `UltraQuantLinear`, the
variant its training script run_train_deepspeed_sample_uqv2_lrud.sh uses: per_group, group_size 128,
--eps 1e-3 = lambda).

Ternary quantization leaves many weights in the dead zone |W / alpha| < 1/2, quantized to 0; their
STE gradient carries almost no information about whether they should leave it ("deadzone
trapping"). Tequila keeps the ternary weights ternary and lets the dead-zone weights act as a
per-output bias, so they shape the output and receive a direct gradient.

forward, for a weight W (rows, cols) with scale groups G (default: 128 consecutive inputs of a row)
    alpha_G = max(mean_{i in G} |W_i|, 1e-5)                       (absmean, per group)
    T_i     = clamp(round(W_i / alpha_G), -1, 1)                   (ternary codes)
    D_r     = {j : T_rj = 0}                                       (the dead zone of row r)
    b_r     = lambda * sum_{j in D_r} W_rj                          (the dynamic bias)
    y_tr    = sum_j x_tj alpha_G(r,j) T_rj  +  b_r
            = (x What^T)_tr + lambda * (1 W_D^T)_r                  (the code's linear(ones, B))

backward
    dL/dW_rj = sum_t dL/dy_tr x_tj                                  (identity STE through What)
             + [j in D_r] * lambda * sum_t dL/dy_tr                  (the bias path: a real gradient
                                                                    for exactly the dead-zone weights)
    (no gradient through alpha or the choice of D, as in the reference code)

`alpha: learned`, the other granularities and `packing` work as for `ternary`; activations are not
quantized by default (the reference code is weight-only).

Inference cost. The bias does not depend on the input, so it is computed once, offline, and stored:
    bytes       codes and scales as ternary (rows * cols / 4 + 4 * rows * cols / 128 at the default
                group of 128) + 4 * rows for the fp32 bias "dead_bias" (rows,): 16 / cols of the code
                bytes (6.3% at cols = 256, 2.1% at cols = 768), 0.125 bits per weight at cols = 256
    operations  one addition per output per token (rows adds on top of the ternary layer's
                additions); no multiplications, the dead-zone weights themselves are not stored
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qtoolkit.quantizers import register
from qtoolkit.quantizers.base import QTensor, TensorLayout, ungrouped
from qtoolkit.quantizers.ternary import TernaryConfig, TernaryQuantizer


@dataclass(frozen=True)
class TequilaConfig(TernaryConfig):
    activations: Literal["none", "int8", "int4", "elastic"] = "none"
    granularity: Literal["tensor", "channel", "group"] = "group"
    group_size: int = 128
    lam: float = 1e-3  # Tequila's lambda: the weight of the dead-zone bias

    def check(self) -> list[tuple[str, str]]:
        errors = super().check()
        if not (math.isfinite(self.lam) and self.lam >= 0):
            errors.append(("lam", f"must be a finite number >= 0, got {self.lam}"))
        return errors


@register("tequila")
class TequilaQuantizer(TernaryQuantizer):
    Config = TequilaConfig
    config: TequilaConfig

    @property
    def has_output_term(self) -> bool:
        return True

    def dead_zone(self, w: Tensor) -> Tensor:
        """bool (rows, cols): the weights quantized to 0."""
        with torch.no_grad():
            return ungrouped(self.grouped_codes(w.detach(), self.scales(w)) == 0, tuple(w.shape))

    def dead_zone_bias(self, w: Tensor) -> Tensor:
        """b = lambda * sum of each row's dead-zone weights, (rows,); differentiable in w."""
        return self.config.lam * (w * self.dead_zone(w)).sum(dim=1)

    def extras(self, w: Tensor) -> dict[str, Tensor]:
        return {**super().extras(w), "dead_bias": self.dead_zone_bias(w)}

    def extras_layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        return {**super().extras_layout(shape), "dead_bias": TensorLayout(torch.float32, (shape[0],))}

    def output_term(self, x: Tensor, extras: dict[str, Tensor]) -> Tensor:
        return extras["dead_bias"]  # broadcast over (..., rows)

    def stats(self, q: QTensor) -> dict[str, Any]:
        """Dead-zone fraction and the bias's magnitude (absolute, and per dead-zone weight)."""
        b = q.extras["dead_bias"].double().abs()
        dead = q.codes == 0
        return {
            **super().stats(q),
            "dead_zone": float(dead.double().mean()),
            "bias_abs_mean": float(b.mean()),
            "bias_abs_max": float(b.max()),
        }
