"""Quantized drop-in replacements for nn.Linear and nn.Embedding.

Each keeps its latent float weight (the parameter the optimizer updates) and a `quantizer`
submodule; the forward pass uses the quantizer's fake-quantized weight (and input, for linears
whose spec quantizes activations). `from_float` reuses the original Parameter object, so weight
tying and optimizer references survive the swap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.quantizers import Quantizer


class QuantLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, quantizer: Quantizer, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, device="meta")
        self.quantizer = quantizer

    @classmethod
    def from_float(cls, linear: nn.Linear, quantizer: Quantizer) -> QuantLinear:
        q = cls(linear.in_features, linear.out_features, quantizer, bias=linear.bias is not None)
        q.weight = linear.weight
        q.bias = linear.bias
        quantizer.init_from_weight(linear.weight)
        return q

    def quantized_weight(self) -> Tensor:
        return self.quantizer(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantizer.quantize_input(x), self.quantized_weight(), self.bias)


class QuantEmbedding(nn.Embedding):
    """Looks rows up in the fake-quantized table (activation options do not apply to lookups)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quantizer: Quantizer):
        # a placeholder weight (from_float puts the real one in): `_weight` skips nn.Embedding's
        # normal_ initialisation, which on a meta tensor costs seconds (it imports torch._dynamo)
        super().__init__(num_embeddings, embedding_dim, _weight=torch.empty(num_embeddings, embedding_dim, device="meta"))
        self.quantizer = quantizer

    @classmethod
    def from_float(cls, embedding: nn.Embedding, quantizer: Quantizer) -> QuantEmbedding:
        q = cls(embedding.num_embeddings, embedding.embedding_dim, quantizer)
        q.weight = embedding.weight
        quantizer.init_from_weight(embedding.weight)
        return q

    def quantized_weight(self) -> Tensor:
        return self.quantizer(self.weight)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.quantized_weight())


class FrozenQuantLinear(nn.Module):
    """Deployed form of a QuantLinear: the weight *is* the dequantized stored codes (never
    re-quantized); only the input is quantized, exactly as in training."""

    def __init__(self, weight: Tensor, quantizer: Quantizer):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.quantizer = quantizer
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantizer.quantize_input(x), self.weight)


class FrozenQuantEmbedding(nn.Module):
    """Deployed form of a QuantEmbedding: a lookup in the dequantized stored table."""

    def __init__(self, weight: Tensor, quantizer: Quantizer):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.quantizer = quantizer
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight)


QUANT_MODULES = (QuantLinear, QuantEmbedding)
FROZEN_MODULES = (FrozenQuantLinear, FrozenQuantEmbedding)
