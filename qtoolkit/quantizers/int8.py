"""Symmetric INT8 weights, one fp32 scale per output channel (row), trained with an STE.

    forward     s_r    = max(max_j |W_rj|, 1e-8) / 127
                Wq_rj  = clamp(round(W_rj / s_r), -127, 127)     (int8 codes; -128 is never used)
                What_rj = s_r * Wq_rj
    backward    dL/dW = dL/dWhat                                  (identity STE)

`granularity: tensor` uses one scale for the whole weight. `activations: int8` additionally
fake-quantizes the layer input per token exactly as the ternary quantizer does (W8A8); the default
is weight-only (W8A16/W8A32); `int4` and `elastic` are the other shared choices (`activations.py`).

Storage (`layout`): "codes", int8 (rows, cols); "scales", float32 (rows, 1) (or (1, 1)).
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
    ScaledIntQuantizer,
    TensorLayout,
    grouped,
    num_groups,
)

EPS = 1e-8


@dataclass(frozen=True)
class Int8Config(ActivationOptions):
    granularity: Literal["channel", "tensor"] = "channel"


@register("int8")
class Int8Quantizer(ScaledIntQuantizer):
    Config = Int8Config
    config: Int8Config
    qmax = 127

    def scales(self, w: Tensor) -> Tensor:
        g = grouped(w.detach(), self.config.granularity, 0)
        return g.abs().amax(dim=-1, keepdim=True).clamp_min(EPS) / 127.0

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        return {
            "codes": TensorLayout(torch.int8, tuple(shape)),
            "scales": TensorLayout(torch.float32, num_groups(shape, self.config.granularity, 0)),
        }

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        return {"codes": q.codes, "scales": q.scales}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        return QTensor(tensors["codes"], tensors["scales"], shape)
