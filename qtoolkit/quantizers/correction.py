"""Low-rank gated correction: a small fp16 path beside any quantized linear (HGF).

Source: "Hybrid Gated Flow (HGF): Stabilizing 1.58-bit LLMs via Selective Low-Rank Correction"
(D. A. Trejo Pizzo, arXiv 2602.05269, 2026), read through its abstract and the summaries of its
method (no code is public): a ternary backbone plus a learnable low-rank FP16 correction path
controlled by a learned gate, one scalar per projection, which settles near g = 0.1; on TinyStories
it recovers ~55% of the ternary-vs-FP16 gap for ~12-15% memory beyond the ternary backbone.

It is one option of a layer's spec in a policy, on top of any quantizer:

    policy:
      _default: {name: ternary, correction: {rank: 16}}          # gate: scalar, gate_init: 0.1

forward, for a linear of weight W (out, in) with input x and the wrapped quantizer Q:
    y = Q-layer(x) + g * B (A x)                (Q-layer(x) = x_hat What^T (+ its own output term))
    A (rank, in), B (out, rank): learned, A ~ N(0, 1/in), B = 0 at the start (so y starts as the
    plain layer); g: learned, one scalar (`gate: scalar`, HGF) or one per output (`gate: channel`),
    initialised to `gate_init`. x is the layer's unquantized input (the path is fp16, not ternary).
    A, B and g are rounded to fp16 in the forward pass (straight-through), exactly as stored.

backward: ordinary autograd through the path (the fp16 rounding is straight-through):
    dL/dB = g * dL/dy (A x)^T,   dL/dA = B^T (g * dL/dy) x^T,   dL/dg = sum (dL/dy * B A x)
    (summed over outputs for a scalar gate), and dL/dx gains A^T B^T (g * dL/dy).
    The correction's parameters live in the quantizer (`...quantizer.lora_a`), so the trainer gives
    them no weight decay.

rank 0 or g = 0 gives exactly the plain layer (B A x is then 0, and y + 0 = y).

Storage (added to the wrapped quantizer's tensors, and so to `nbytes` and the memory model):
    "lora_a" fp16 (rank, in), "lora_b" fp16 (out, rank), "gate" fp16 (1,) or (out,)
    bytes = 2 * rank * (in + out) + 2 * (1 or out)
Inference cost: rank * (in + out) multiply-adds per token (vs in * out additions of the ternary
layer), one multiply per output by g, one add per output.

Embeddings cannot take a correction (a lookup has no input to multiply); the policy says so.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.quantizers.base import QTensor, Quantizer, TensorLayout, straight_through


@dataclass(frozen=True)
class CorrectionConfig:
    rank: int = 16
    gate: Literal["scalar", "channel"] = "scalar"
    gate_init: float = 0.1

    def check(self) -> list[tuple[str, str]]:
        errors = []
        if self.rank < 0:
            errors.append(("rank", f"must be >= 0, got {self.rank}"))
        if not math.isfinite(self.gate_init):
            errors.append(("gate_init", f"must be a finite number, got {self.gate_init}"))
        return errors


def _fp16(t: Tensor) -> Tensor:
    """Round to fp16 and back (straight-through): the values the stored fp16 tensor holds."""
    with torch.no_grad():
        r = t.to(torch.float16).to(t.dtype)
    return straight_through(t, r)


class Corrected(Quantizer):
    """`base` (any quantizer) plus the low-rank gated path; spec = base spec + {"correction": ...}."""

    linear_only = True

    def __init__(self, base: Quantizer, correction: CorrectionConfig):
        nn.Module.__init__(self)  # not Quantizer.__init__: the base owns config and activations
        self.base = base
        self.correction = correction
        self.name = base.name
        self.config = base.config

    @property
    def act(self):  # the base's activation quantizer
        return self.base.act

    def spec(self) -> dict[str, Any]:
        return {**self.base.spec(), "correction": asdict(self.correction)}

    def init_from_weight(self, weight: Tensor) -> None:
        self.base.init_from_weight(weight)
        out_f, in_f = weight.shape
        r, dev = self.correction.rank, weight.device
        self.lora_a = nn.Parameter(torch.randn(r, in_f, device=dev) / math.sqrt(in_f))
        self.lora_b = nn.Parameter(torch.zeros(out_f, r, device=dev))
        n_gates = 1 if self.correction.gate == "scalar" else out_f
        self.gate = nn.Parameter(torch.full((n_gates,), float(self.correction.gate_init), device=dev))

    def set_progress(self, progress: float) -> None:
        self.base.set_progress(progress)

    # ---------------------------------------------------------------- the layer's computation

    def forward(self, w: Tensor) -> Tensor:
        return self.base(w)

    def quantize_input(self, x: Tensor) -> Tensor:
        return self.base.quantize_input(x)

    @property
    def has_output_term(self) -> bool:
        return True

    def extras(self, w: Tensor) -> dict[str, Tensor]:
        return {**self.base.extras(w), "lora_a": _fp16(self.lora_a), "lora_b": _fp16(self.lora_b),
                "gate": _fp16(self.gate)}

    def extras_layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        out_f, in_f = shape
        r = self.correction.rank
        gates = (1,) if self.correction.gate == "scalar" else (out_f,)
        return {**self.base.extras_layout(shape), "lora_a": TensorLayout(torch.float16, (r, in_f)),
                "lora_b": TensorLayout(torch.float16, (out_f, r)), "gate": TensorLayout(torch.float16, gates)}

    def output_term(self, x: Tensor, extras: dict[str, Tensor]) -> Tensor:
        a, b, g = extras["lora_a"], extras["lora_b"], extras["gate"]
        term = F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype)) * g.to(x.dtype)
        if self.base.has_output_term:
            term = self.base.output_term(x, extras) + term
        return term

    def load_extras(self, extras: dict[str, Tensor]) -> None:
        self.base.load_extras({k: v for k, v in extras.items() if k not in ("lora_a", "lora_b", "gate")})

    # ---------------------------------------------------------------- storage: the base's codes

    def _quantize(self, w: Tensor) -> QTensor:
        return self.base._quantize(w)

    def dequantize(self, q: QTensor) -> Tensor:
        return self.base.dequantize(q)

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        return self.base._layout(shape)

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        return self.base._pack(q)

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        return self.base._unpack(tensors, shape)

    def correction_bytes(self, shape: tuple[int, ...]) -> int:
        return sum(t.nbytes for k, t in self.extras_layout(shape).items() if k in ("lora_a", "lora_b", "gate"))

    def stats(self, q: QTensor) -> dict[str, Any]:
        """The correction's rank, bytes, share of the layer's bytes and gate magnitude."""
        nbytes = self.correction_bytes(q.shape)
        return {
            **self.base.stats(q),
            "correction_rank": self.correction.rank,
            "correction_bytes": nbytes,
            "correction_share": nbytes / self.nbytes(q.shape),
            "gate_abs_mean": float(q.extras["gate"].double().abs().mean()),
        }

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in asdict(self.correction).items())
