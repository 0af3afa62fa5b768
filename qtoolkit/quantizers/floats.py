"""Floating-point storage formats: fp16, bf16 and fp32 (the identity).

    forward     What = float32(cast(W))      (round-to-nearest-even into the storage dtype)
    backward    dL/dW = dL/dWhat              (identity STE)

Quantization-aware training therefore sees exactly the rounding the stored weight will have. The
"codes" of a cast are the stored fp16/bf16/fp32 values themselves; there are no scales. The only
option is the `activations` option every quantizer shares (`activations.py`; default none).
Storage (`layout`): "values", the weight in the storage dtype: 2 bytes per weight (fp16, bf16) or 4 (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from qtoolkit.quantizers import register
from qtoolkit.quantizers.activations import ActivationOptions
from qtoolkit.quantizers.base import QTensor, Quantizer, TensorLayout, straight_through


@dataclass(frozen=True)
class CastConfig(ActivationOptions):
    """Casts take only the shared activation options."""


class CastQuantizer(Quantizer):
    Config = CastConfig
    dtype: ClassVar[torch.dtype]

    def forward(self, w: Tensor) -> Tensor:
        if self.dtype == w.dtype:
            return w
        with torch.no_grad():
            w_hat = w.to(self.dtype).to(w.dtype)
        return straight_through(w, w_hat)

    @torch.no_grad()
    def _quantize(self, w: Tensor) -> QTensor:
        return QTensor(w.detach().to(self.dtype), None, tuple(w.shape))

    def dequantize(self, q: QTensor) -> Tensor:
        return q.codes.to(torch.float32)

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        return {"values": TensorLayout(self.dtype, tuple(shape))}

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        return {"values": q.codes}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        return QTensor(tensors["values"], None, shape)


@register("fp16")
class FP16Quantizer(CastQuantizer):
    dtype = torch.float16


@register("bf16")
class BF16Quantizer(CastQuantizer):
    dtype = torch.bfloat16


@register("fp32")
class FP32Quantizer(CastQuantizer):
    dtype = torch.float32
