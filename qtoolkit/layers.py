"""Quantized drop-in replacements for nn.Linear and nn.Embedding.

Each keeps its latent float weight (the parameter the optimizer updates) and a `quantizer`
submodule; the forward pass uses the quantizer's fake-quantized weight (and input, for linears
whose spec quantizes activations). `from_float` reuses the original Parameter object, so weight
tying and optimizer references survive the swap.

A linear computes  y = x_hat @ W_hat^T (+ bias) (+ quantizer.output_term(x, extras))  where the
output term is a method's additive path (Tequila's dead-zone bias, a low-rank correction). In
training the extras come live from the latent weight; in the deployed (frozen) layer they are the
stored ones, so both compute the same numbers.

Quantization warmup. `quant_mix` (lambda, default 1) blends the float and the quantized operands:

    W_used = W + lambda * (Q(W) - W)        x_used = x + lambda * (Q_in(x) - x)

so lambda = 0 is the float layer (the output term is scaled by lambda too) and lambda = 1 the quantized one, exactly (the gradient reaching W
is (1 - lambda) + lambda * dQ/dW, i.e. 1 under the identity STE). `set_quant_mix(model, lambda)`
sets it on every quantized layer; the trainer ramps it over `train.quant_warmup_steps` (the
"warmup quantization" of Hugging Face's BitNet fine-tuning, docs/training.md). It is not state: a
loaded model always runs at lambda = 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.quantizers import Quantizer


def _mix(x: Tensor, x_quantized: Tensor, lam: float) -> Tensor:
    return x_quantized if lam >= 1.0 else torch.lerp(x, x_quantized, lam)  # x + lam * (xq - x)


class QuantLinear(nn.Linear):
    rule: str | None = None  # the policy rule that quantized it (reporting only)
    quant_mix: float = 1.0

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
        return _mix(self.weight, self.quantizer(self.weight), self.quant_mix)

    def linear_operands(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """(input, weight, bias) of the `F.linear` this layer computes for x (the chunked loss of
        `training.loss` multiplies them chunk by chunk)."""
        return _mix(x, self.quantizer.quantize_input(x), self.quant_mix), self.quantized_weight(), self.bias

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(*self.linear_operands(x))
        term = self.output_term(x)
        return y if term is None else y + term

    def output_term(self, x: Tensor, extras: dict[str, Tensor] | None = None) -> Tensor | None:
        """The quantizer's additive output term for x (None when it has none), scaled by the warmup
        blend; `extras` as `quantizer.extras(weight)` (computed here when not given)."""
        q = self.quantizer
        if not q.has_output_term:
            return None
        term = q.output_term(x, q.extras(self.weight) if extras is None else extras)
        return term if self.quant_mix == 1 else self.quant_mix * term


class QuantEmbedding(nn.Embedding):
    """Looks rows up in the fake-quantized table (activation options do not apply to lookups)."""

    rule: str | None = None
    quant_mix: float = 1.0

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
        return _mix(self.weight, self.quantizer(self.weight), self.quant_mix)

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.quantized_weight())


class FrozenQuantLinear(nn.Module):
    """Deployed form of a QuantLinear: the weight *is* the dequantized stored codes (never
    re-quantized); only the input is quantized, exactly as in training. `extras` are the stored
    extra tensors (QTensor.extras): learned activation state is loaded into the quantizer, and the
    output term reads them as fp32. A bias, when the layer has one, is a plain fp32 parameter."""

    def __init__(self, weight: Tensor, quantizer: Quantizer, extras: dict[str, Tensor] | None = None,
                 bias: Tensor | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.quantizer = quantizer
        self.out_features, self.in_features = weight.shape
        self._extra_names = sorted(extras or {})
        for k in self._extra_names:  # buffers, so they follow .to(device)
            self.register_buffer(f"extra_{k}", extras[k].float())
        if extras:
            quantizer.load_extras(self.extras)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.register_parameter("bias", bias)

    @property
    def extras(self) -> dict[str, Tensor]:
        return {k: getattr(self, f"extra_{k}") for k in self._extra_names}

    def forward(self, x: Tensor) -> Tensor:
        q = self.quantizer
        y = F.linear(q.quantize_input(x), self.weight, self.bias)
        if q.has_output_term:
            y = y + q.output_term(x, self.extras)
        return y


class FrozenQuantEmbedding(nn.Module):
    """Deployed form of a QuantEmbedding: a lookup in the dequantized stored table. `extras` are
    kept only so that a tied linear head built from it stores the same ones."""

    def __init__(self, weight: Tensor, quantizer: Quantizer, extras: dict[str, Tensor] | None = None):
        super().__init__()
        self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
        self.quantizer = quantizer
        self.num_embeddings, self.embedding_dim = weight.shape
        self.extras = dict(extras or {})

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight)


QUANT_MODULES = (QuantLinear, QuantEmbedding)
FROZEN_MODULES = (FrozenQuantLinear, FrozenQuantEmbedding)


def set_quant_mix(model: nn.Module, lam: float) -> None:
    """Set the warmup blend lambda in [0, 1] on every quantized layer of `model` (module docstring)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"quant_mix must be in [0, 1], got {lam}")
    for m in model.modules():
        if isinstance(m, QUANT_MODULES):
            m.quant_mix = float(lam)
