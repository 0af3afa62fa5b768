"""INTn weights, 2..8 bits, per channel or per group, rounded to nearest (RTN) or by GPTQ.

Grid. b = `bits`, codes c are integers in [-2^(b-1), 2^(b-1) - 1] (all 2^b levels), one scale s and
one zero point z per scale group G (one output row, or `group_size` consecutive inputs of a row; the
last group of a row is short when cols % group_size != 0):

    symmetric (z = 0)      s_G = 2 max_{i in G} |W_i| / (2^b - 1)
    asymmetric             lo = min(min_G W, 0),  hi = max(max_G W, 0),  s_G = (hi - lo) / (2^b - 1),
                           z_G = round(-lo / s_G) - 2^(b-1)                   (an integer in the code range)
    codes                  c_i = clamp(round(W_i / s_G) + z_G, -2^(b-1), 2^(b-1) - 1)
    dequantized            What_i = (c_i - z_G) * s_G

(the grid of the GPTQ reference code: `symmetric` is its `sym`, the unsigned code is c + 2^(b-1)).
Scales are rounded to fp16 (default `scale_dtype`) or kept fp32 before the codes are taken, so the
stored scale is the one the codes were rounded with; fp16 scales are clamped to [2^-14, 65504].

backward: dL/dW = dL/dWhat (identity STE), as `int8`; quantization-aware training works as for it.

Rounding.
  rtn   round to nearest, scales from the weight itself in every forward (as int8/ternary).
  gptq  GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization for
        Generative Pre-trained Transformers", ICLR 2023, arXiv 2210.17323; the reference code
        IST-DASLab/gptq `gptq.py` was read, not copied). The layer's calibration inputs X give
        H = sum_t x_t x_t^T (`observe`); `calibrate` then quantizes the columns one at a time and
        spreads each column's rounding error over the columns not yet quantized:
            H += damp * mean(diag H) * I            (dead inputs, diag H = 0: H_jj = 1, W_:j = 0)
            U  = chol(H^-1)^T  (upper)              (the damped Cholesky inverse)
            for column j (in blocks of `group_size` or 128 columns, with lazy block updates):
                q_:j   = quantize(W_:j)
                e      = (W_:j - q_:j) / U_jj
                W_:k  -= e U_jk            for the columns k > j not yet quantized
        `act_order: true` takes the columns in order of decreasing diag H. Scales: per channel from
        the weight before GPTQ; per group from the updated weight when the group's first column is
        reached (as the reference), or, with `act_order`, from the weight before GPTQ ("static
        groups", so that stored groups stay consecutive columns). The scales and zero points become
        buffers of the quantizer (state dict: `<layer>.quantizer.scale`, `.zero`), and `calibrate`
        returns the dequantized GPTQ weight as the new latent weight: re-quantizing it with those
        buffers gives the same codes, so packing, evaluation and further QAT use the GPTQ result.
        Until calibrated the buffers hold the RTN scales of the initial weight (a usable default).

Storage (`layout`), for a weight (rows, cols) with n scale groups per row:
    "codes"   uint8 (ceil(rows * cols * b / 8),): the unsigned codes c + 2^(b-1), row-major, as one
              b-bit stream without padding (`bitpack.pack_uint`; the layout is drawn there)
    "scales"  fp16 or fp32 (rows, n)
    "zero"    int8 (rows, n), z (asymmetric only; an extra, `QTensor.extras["zero"]`)
So bits per weight = b + (16 or 32) / group + (8 / group if asymmetric), e.g. `int4` (b = 4,
group 128, asymmetric, fp16) = 4 + 16/128 + 8/128 = 4.1875, plus the padding of the last code byte.

Aliases (`ALIASES`): int2, int3, int4, int5, int6 = intn with that many bits, group 128, RTN; gptq2,
gptq3, gptq4, gptq6, gptq8 = the same with `rounding: gptq` (8 bits per group 128, unlike `int8`,
which is symmetric per channel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qtoolkit.quantizers import bitpack, register, register_alias
from qtoolkit.quantizers.activations import ActivationOptions
from qtoolkit.quantizers.base import (
    QTensor,
    Quantizer,
    TensorLayout,
    fp16_scales,
    grouped,
    num_groups,
    straight_through,
    ungrouped,
)

EPS = 1e-8


@dataclass(frozen=True)
class IntNConfig(ActivationOptions):
    bits: int = 4
    symmetric: bool = False
    granularity: Literal["channel", "group"] = "group"
    group_size: int = 128
    scale_dtype: Literal["fp16", "fp32"] = "fp16"
    rounding: Literal["rtn", "gptq"] = "rtn"
    act_order: bool = False
    damp: float = 0.01

    def check(self) -> list[tuple[str, str]]:
        errors = super().check()
        if not 2 <= self.bits <= 8:
            errors.append(("bits", f"must be in [2, 8], got {self.bits}"))
        if self.group_size < 1:
            errors.append(("group_size", f"must be >= 1, got {self.group_size}"))
        if not 0.0 <= self.damp <= 1.0:
            errors.append(("damp", f"must be in [0, 1] (a fraction of the mean Hessian diagonal), got {self.damp}"))
        if self.act_order and self.rounding != "gptq":
            errors.append(("act_order", "only applies to rounding: gptq"))
        return errors


def quant_params(g: Tensor, bits: int, symmetric: bool, scale_dtype: str) -> tuple[Tensor, Tensor]:
    """(s, z) of the groups g (..., elems) along the last dim, each (..., 1), fp32 (z integral)."""
    levels = 2**bits - 1
    g = g.float()
    if symmetric:
        s = 2 * g.abs().amax(dim=-1, keepdim=True) / levels
    else:
        lo = g.amin(dim=-1, keepdim=True).clamp_max(0)
        hi = g.amax(dim=-1, keepdim=True).clamp_min(0)
        s = (hi - lo) / levels
    s = fp16_scales(s) if scale_dtype == "fp16" else s.clamp_min(EPS)
    if symmetric:
        return s, torch.zeros_like(s)
    return s, (-lo / s).round().clamp(0, levels) - 2 ** (bits - 1)


def quantize_codes(w: Tensor, s: Tensor, z: Tensor, bits: int) -> Tensor:
    """c = clamp(round(w / s) + z, -2^(b-1), 2^(b-1) - 1), as float."""
    half = 2 ** (bits - 1)
    return (w / s).round_().add_(z).clamp_(-half, half - 1)


def gptq(weight: Tensor, h: Tensor, cfg: IntNConfig) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of `weight` (rows, cols) with H (cols, cols): (dequantized weight, s, z), s and z shaped
    (rows, n groups). The algorithm is in the module docstring."""
    w = weight.detach().to(torch.float64).clone()
    h = h.to(torch.float64).clone()
    rows, cols = w.shape
    gs = cfg.group_size if cfg.granularity == "group" else cols
    params = lambda block: quant_params(block, cfg.bits, cfg.symmetric, cfg.scale_dtype)  # noqa: E731
    s_all, z_all = (t.squeeze(-1) for t in params(grouped(w, cfg.granularity, gs)))  # from the weight before GPTQ
    s_all, z_all = s_all.to(torch.float64).clone(), z_all.to(torch.float64).clone()

    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if cfg.act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += cfg.damp * torch.diag(h).mean() * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    dynamic = cfg.granularity == "group" and not cfg.act_order  # group scales from the updated weight
    block = gs if cfg.granularity == "group" else 128  # block starts are group starts: exact group scales
    q = torch.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        if dynamic:
            s_g, z_g = params(w1)
            s_all[:, i1 // gs], z_all[:, i1 // gs] = s_g.squeeze(-1), z_g.squeeze(-1)
        for j in range(i2 - i1):
            col = int(perm[i1 + j])
            s, z = s_all[:, col // gs], z_all[:, col // gs]
            c = quantize_codes(w1[:, j].float(), s.float(), z.float(), cfg.bits).double()
            q[:, i1 + j] = (c - z) * s
            e = (w1[:, j] - q[:, i1 + j]) / u1[j, j]
            w1[:, j:] -= e.unsqueeze(1) * u1[j, j:].unsqueeze(0)
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return q, s_all.float(), z_all.float()


@register("intn")
class IntNQuantizer(Quantizer):
    Config = IntNConfig
    config: IntNConfig

    @property
    def qmax(self) -> int:
        return 2 ** (self.config.bits - 1)

    @property
    def calibration(self) -> bool:  # an instance property: only `rounding: gptq` needs data
        return self.config.rounding == "gptq"

    @property
    def group_size(self) -> int:
        return self.config.group_size if self.config.granularity == "group" else 0

    # ---------------------------------------------------------------- state and calibration

    def init_from_weight(self, weight: Tensor) -> None:
        if self.calibration:
            s, z = self._rtn_params(weight)
            self.register_buffer("scale", s.reshape(s.shape[:2]).clone())
            self.register_buffer("zero", z.reshape(z.shape[:2]).clone())
            self._h, self._n = None, 0

    def observe(self, x: Tensor) -> None:
        x = self.quantize_input(x.detach()).reshape(-1, x.shape[-1]).double()
        self._h = x.T @ x if getattr(self, "_h", None) is None else self._h + x.T @ x
        self._n = getattr(self, "_n", 0) + x.shape[0]

    def calibrate(self, weight: Tensor) -> Tensor | None:
        if getattr(self, "_h", None) is None:  # nothing observed (an embedding): keep RTN
            return None
        q, s, z = gptq(weight, self._h / max(self._n, 1), self.config)
        if not hasattr(self, "scale"):
            self.init_from_weight(weight)
        self.scale.copy_(s)
        self.zero.copy_(z)
        self._h, self._n = None, 0
        return q.to(weight.dtype)

    # ---------------------------------------------------------------- the grid

    def _rtn_params(self, w: Tensor) -> tuple[Tensor, Tensor]:
        g = grouped(w.detach(), self.config.granularity, self.group_size)
        return quant_params(g, self.config.bits, self.config.symmetric, self.config.scale_dtype)

    def _params(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """(s, z), each (rows, n, 1): the fitted buffers (gptq) or the RTN parameters of w."""
        if self.calibration and hasattr(self, "scale"):
            return self.scale.unsqueeze(-1), self.zero.unsqueeze(-1)
        return self._rtn_params(w)

    def _codes(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        s, z = self._params(w)
        g = grouped(w.detach().float(), self.config.granularity, self.group_size)
        return quantize_codes(g, s, z, self.config.bits), s, z

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            c, s, z = self._codes(w)
            w_hat = ungrouped((c - z) * s, tuple(w.shape)).to(w.dtype)
        return straight_through(w, w_hat)

    @torch.no_grad()
    def _quantize(self, w: Tensor) -> QTensor:
        c, s, _ = self._codes(w)
        return QTensor(ungrouped(c, tuple(w.shape)).to(torch.int8), s.reshape(s.shape[:2]).float(), tuple(w.shape))

    def dequantize(self, q: QTensor) -> Tensor:
        s = q.scales.reshape(*q.scales.shape, 1)
        z = q.extras["zero"].float().reshape(s.shape) if not self.config.symmetric else torch.zeros_like(s)
        g = grouped(q.codes.float(), self.config.granularity, self.group_size)
        return ungrouped((g - z) * s, q.shape)

    # ---------------------------------------------------------------- storage

    def extras(self, w: Tensor) -> dict[str, Tensor]:
        out = super().extras(w)
        if not self.config.symmetric:
            out["zero"] = self._params(w)[1].reshape(w.shape[0], -1)
        return out

    def extras_layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        out = super().extras_layout(shape)
        if not self.config.symmetric:
            out["zero"] = TensorLayout(torch.int8, num_groups(shape, self.config.granularity, self.group_size))
        return out

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        dtype = torch.float16 if self.config.scale_dtype == "fp16" else torch.float32
        return {"codes": TensorLayout(torch.uint8, (bitpack.uint_packed_len(shape[0] * shape[1], self.config.bits),)),
                "scales": TensorLayout(dtype, num_groups(shape, self.config.granularity, self.group_size))}

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        dtype = torch.float16 if self.config.scale_dtype == "fp16" else torch.float32
        return {"codes": bitpack.pack_uint(q.codes.to(torch.int16) + self.qmax, self.config.bits),
                "scales": q.scales.to(dtype)}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        codes = bitpack.unpack_uint(tensors["codes"], shape[0] * shape[1], self.config.bits) - self.qmax
        return QTensor(codes.to(torch.int8).reshape(shape), tensors["scales"].float(), shape)

    def stats(self, q: QTensor) -> dict[str, Any]:
        """Share of the 2^b levels in use and the codes' entropy (bits per weight an entropy coder
        could reach, beside the b stored)."""
        counts = torch.bincount((q.codes.reshape(-1).long() + self.qmax), minlength=2 * self.qmax).double()
        p = counts[counts > 0] / counts.sum()
        return {**super().stats(q), "levels_used": int((counts > 0).sum()), "levels": 2 * self.qmax,
                "entropy_bits": float(-(p * p.log2()).sum()),
                "clipped": float((counts[0] + counts[-1]) / counts.sum())}


for _b in (2, 3, 4, 5, 6):
    register_alias(f"int{_b}", {"name": "intn", "bits": _b, "group_size": 128})
for _b in (2, 3, 4, 6, 8):
    register_alias(f"gptq{_b}", {"name": "intn", "bits": _b, "group_size": 128, "rounding": "gptq"})

__all__ = ["IntNConfig", "IntNQuantizer", "gptq", "quant_params", "quantize_codes"]
