"""Quantization of a layer's input (the `activations` option that every weight format takes).

Every quantizer config inherits `ActivationOptions` (`activations`, `elastic_bits`); the quantizer
builds one `ActivationQuantizer` from them (`quantizer.act`) and `quantize_input(x)` calls it. The
input is quantized along its last dimension (features), per token or per layer:

none      identity (weight-only quantization).

int8      BitNet b1.58's absmax per token (one scale per token t):
              s_t = 127 / max(max_j |x_tj|, 1e-5);   xhat_tj = clamp(round(x_tj s_t), -128, 127) / s_t
          backward: identity (STE).

int4      the same with 4-bit codes:  s_t = 7 / max(max_j |x_tj|, 1e-5);  clamp(round(x s_t), -8, 7) / s_t.

elastic   LSQ+ (Bhalgat et al., "LSQ+: Improving low-bit quantization through learnable offsets and
          better initialization", CVPR-W 2020), the learned activation quantizer that "Binary and
          Ternary Natural Language Generation" (Liu et al., ACL 2023; facebookresearch/
          Ternary_Binary_Transformer, quant/utils_quant.py `ElasticQuantBinarizer*`, read for this)
          uses for low-bit activations. One learned step s and one learned offset beta per layer,
          b = `elastic_bits` (2..8), Qn = -2^(b-1), Qp = 2^(b-1) - 1:
              v = (x - beta) / s;   xhat = clamp(round(v), Qn, Qp) * s + beta
          backward (g = 1 / sqrt(K * Qp), K = features per token, LSQ's gradient scale):
              dL/dx    = dL/dxhat * [Qn <= v <= Qp]
              dL/ds    = g * sum dL/dxhat * (round(v) - v   if Qn <= v <= Qp;   Qn if v < Qn;   Qp if v > Qp)
              dL/dbeta = g * sum dL/dxhat * [v < Qn or v > Qp]
          Initialised on the first training batch the layer sees (LSQ+'s statistics rule):
              s = max(|mu - 3 sigma|, |mu + 3 sigma|) / 2^(b-1),  beta = 0
          (until then s = 1, beta = 0). s and beta are stored with the packed weight (fp32 "act_step",
          "act_offset"), so a deployed layer quantizes its input exactly as in training. Unlike
          int8/int4 the codes need no per-token max: the deployed integer kernel would use fixed
          s and beta (beta * sum_j W_ij folds into a per-output constant).

Activation options do not apply to embedding lookups (an embedding has no input to quantize).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

ACTIVATIONS = ("none", "int8", "int4", "elastic")
_ABSMAX_QMAX = {"int8": 127, "int4": 7}


@dataclass(frozen=True)
class ActivationOptions:
    """The activation options shared by every quantizer config (a base class of each `Config`)."""

    activations: Literal["none", "int8", "int4", "elastic"] = "none"
    elastic_bits: int = 8  # bits of the `elastic` quantizer (2..8); ignored by the other options

    def check(self) -> list[tuple[str, str]]:
        if not 2 <= self.elastic_bits <= 8:
            return [("elastic_bits", f"must be in [2, 8], got {self.elastic_bits}")]
        if self.activations != "elastic" and self.elastic_bits != 8:
            return [("elastic_bits", f"only applies to activations: elastic (activations is {self.activations!r})")]
        return []


# ------------------------------------------------------------------------------ per token absmax


def absmax_per_token_codes(x: Tensor, qmax: int) -> tuple[Tensor, Tensor]:
    """Codes clamp(round(x * s), -qmax - 1, qmax) as x.dtype and s = qmax / max(max|x|, 1e-5), one
    per token (last dim)."""
    s = qmax / x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    return (x * s).round_().clamp_(-qmax - 1, qmax), s


def int8_per_token_codes(x: Tensor) -> tuple[Tensor, Tensor]:
    """BitNet's 8-bit absmax activation codes and scales (the integer kernels use these)."""
    return absmax_per_token_codes(x, 127)


class _PerTokenFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, qmax: int) -> Tensor:
        codes, s = absmax_per_token_codes(x, qmax)
        return codes.div_(s)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


def fake_quant_int8_per_token(x: Tensor) -> Tensor:
    return _PerTokenFakeQuant.apply(x, 127)


# ------------------------------------------------------------------------------ elastic (LSQ+)


class _ElasticFakeQuant(torch.autograd.Function):
    """LSQ+ forward/backward (formulas in the module docstring)."""

    @staticmethod
    def forward(ctx, x: Tensor, step: Tensor, offset: Tensor, qn: int, qp: int) -> Tensor:
        s = step.clamp_min(1e-8)
        v = (x - offset) / s
        q = v.round().clamp_(qn, qp)
        ctx.save_for_backward(v, q, step)
        ctx.qp = qp
        return q * s + offset

    @staticmethod
    def backward(ctx, grad: Tensor):
        v, q, step = ctx.saved_tensors
        qp = ctx.qp
        inside = (v >= -qp - 1) & (v <= qp)
        g = 1.0 / math.sqrt(v.shape[-1] * qp)
        grad_x = grad * inside
        ds = torch.where(inside, q - v, q)  # outside the range q is the clamp bound Qn or Qp
        grad_s = (grad * ds).sum().reshape(1) * g * (step > 1e-8)
        grad_b = (grad * ~inside).sum().reshape(1) * g
        return grad_x, grad_s, grad_b, None, None


class ActivationQuantizer(nn.Module):
    """The fake quantizer of a layer's input, built from `ActivationOptions`."""

    def __init__(self, options: ActivationOptions):
        super().__init__()
        self.mode = options.activations
        if self.mode == "elastic":
            bits = options.elastic_bits
            self.qn, self.qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
            self.step = nn.Parameter(torch.ones(1))
            self.offset = nn.Parameter(torch.zeros(1))
            self.register_buffer("initialized", torch.zeros(1, dtype=torch.bool))

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "none":
            return x
        if self.mode in _ABSMAX_QMAX:
            return _PerTokenFakeQuant.apply(x, _ABSMAX_QMAX[self.mode])
        if self.training and not bool(self.initialized):
            self._initialize(x)
        return _ElasticFakeQuant.apply(x, self.step, self.offset, self.qn, self.qp)

    @property
    def awaiting_init(self) -> bool:
        """True until an elastic quantizer has set its step from its first training input."""
        return self.mode == "elastic" and not bool(self.initialized)

    @torch.no_grad()
    def _initialize(self, x: Tensor) -> None:
        mu, sigma = x.float().mean(), x.float().std()
        self.step.fill_(max(float((mu - 3 * sigma).abs()), float((mu + 3 * sigma).abs()), 1e-5) / -self.qn)
        self.offset.zero_()
        self.initialized.fill_(True)

    # the learned state travels with the packed weight (see Quantizer.extras)
    def state_tensors(self) -> dict[str, Tensor]:
        if self.mode != "elastic":
            return {}
        return {"act_step": self.step, "act_offset": self.offset}

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"act_step": (1,), "act_offset": (1,)} if self.mode == "elastic" else {}

    @torch.no_grad()
    def load_state_tensors(self, tensors: dict[str, Tensor]) -> None:
        if self.mode == "elastic":
            self.step.copy_(tensors["act_step"].reshape(1))
            self.offset.copy_(tensors["act_offset"].reshape(1))
            self.initialized.fill_(True)

    def extra_repr(self) -> str:
        return self.mode if self.mode != "elastic" else f"elastic, codes [{self.qn}, {self.qp}]"
