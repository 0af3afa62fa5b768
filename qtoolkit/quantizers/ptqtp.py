"""PTQTP: two ternary "trit-planes" with their own scales, fitted post-training.

Source: "PTQTP: Post-Training Quantization to Trit-Planes for Large Language Models" (He Xiao et al.,
2025, arXiv 2509.16989). For a weight W split into scale groups G (one output row, or `group_size`
consecutive inputs of a row):

    What_i = a1_G * T1_i + a2_G * T2_i,        T1, T2 in {-1, 0, +1},  a1_G, a2_G > 0

fitted by the paper's progressive alternating approximation (closed-form ridge regression for the
scales, an exhaustive search over the trit pairs for the planes), group by group; the paper's
adaptive regularisation schedule is replaced here by a fixed small ridge term:
    1. progressive start: plane 1 is the absmean ternary of W (a1 = mean|W|, T1 = clamp(round(W / a1))),
       plane 2 the absmean ternary of the residual R = W - a1 T1.
    2. alternate until the stopping rule:
         scales given planes: per group, the 2x2 ridge least squares
             [T1.T1 + lam, T1.T2; T1.T2, T2.T2 + lam] [a1; a2] = [T1.W; T2.W],
             lam = 1e-6 (T1.T1 + T2.T2) / 2   (float64; keeps the system regular when T2 = +-T1)
         planes given scales: per weight, the pair (t1, t2) of the 9 in {-1, 0, 1}^2 that minimises
             (W_i - a1 t1 - a2 t2)^2 (exact: for each t1, t2 = clamp(round((W_i - a1 t1) / a2))).
       Each half step is an exact minimisation, so the error never grows (up to the ridge term).
       Stopping rule: stop when the squared error of the whole weight improves by less than `tol`
       (relative, default 1e-4) over one iteration, or after `max_iters` iterations (default 20).
    3. a negative scale flips its plane's sign; scales are rounded to their storage dtype
       (fp16 by default, clamped to [2^-14, 65504]) and the planes are refitted once to the
       rounded scales, so the stored codes are optimal for the stored scales.
The layer is multiplication-free like ternary: y = a1 (x . T1) + a2 (x . T2), two ternary dot
products per group.

backward: dL/dW = dL/dWhat (identity STE). The fit runs whenever the weight has changed (about
`max_iters` passes over it; it is reused while the weight tensor is unmodified, e.g. across
evaluation batches), so quantization-aware training works but every step refits: slower than
`ternary`; the method is meant for post-training use.

Codes. `QTensor.codes` holds both planes in one int8 per weight, c = 3 T1 + T2 in [-4, 4]
(T1 = round(c / 3), T2 = c - 3 T1); `QTensor.scales` is fp32 (rows, 2n): a1 of group j in column
2j, a2 in column 2j + 1.

Storage (`layout`), for a weight (rows, cols) with n groups per row:
    "plane1", "plane2"  uint8, T1 and T2 each packed flat like ternary codes (`packing`: `2bit`, 4
                        codes per byte, or `base3`, 5 per byte; layouts drawn in `bitpack.py`)
    "scales"            fp16 or fp32 (rows, 2n)
Default (base3, group 128, fp16): 2 * 1.6 + 2 * 16 / 128 = 3.45 bits per weight.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from qtoolkit.quantizers import bitpack, register
from qtoolkit.quantizers.activations import ActivationOptions
from qtoolkit.quantizers.base import (
    QTensor,
    Quantizer,
    TensorLayout,
    fp16_scales,
    group_counts,
    grouped,
    num_groups,
    straight_through,
    ungrouped,
)

EPS = 1e-8
RIDGE = 1e-6  # relative to the planes' mean squared norm


@dataclass(frozen=True)
class PTQTPConfig(ActivationOptions):
    granularity: Literal["channel", "group"] = "group"
    group_size: int = 128
    packing: Literal["2bit", "base3"] = "base3"
    scale_dtype: Literal["fp16", "fp32"] = "fp16"
    max_iters: int = 20
    tol: float = 1e-4

    def check(self) -> list[tuple[str, str]]:
        errors = super().check()
        if self.group_size < 1:
            errors.append(("group_size", f"must be >= 1, got {self.group_size}"))
        if self.max_iters < 0:
            errors.append(("max_iters", f"must be >= 0, got {self.max_iters}"))
        if not self.tol >= 0:
            errors.append(("tol", f"must be >= 0, got {self.tol}"))
        return errors


def _best_planes(g: Tensor, a1: Tensor, a2: Tensor) -> tuple[Tensor, Tensor]:
    """Per weight, the (t1, t2) in {-1, 0, 1}^2 minimising (g - a1 t1 - a2 t2)^2; ties keep the
    smaller |t1| (so padding zeros get t1 = t2 = 0)."""
    best_err = best_t1 = best_t2 = None
    for t1 in (0.0, 1.0, -1.0):
        r = g - a1 * t1
        t2 = (r / a2).round_().clamp_(-1, 1)
        err = (r - a2 * t2).square_()
        if best_err is None:
            best_err, best_t1, best_t2 = err, torch.zeros_like(g), t2
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_t1 = torch.where(better, torch.full_like(g, t1), best_t1)
            best_t2 = torch.where(better, t2, best_t2)
    return best_t1, best_t2


def _scales(g: Tensor, t1: Tensor, t2: Tensor) -> tuple[Tensor, Tensor]:
    """Ridge least squares (a1, a2) per group given the planes, each (..., 1). In float64 with a
    relative ridge: when the planes are (nearly) collinear (T2 = +-T1 on a group) the 2x2 system is
    singular, and in float32 its determinant cancels to 0."""
    g, t1, t2 = g.double(), t1.double(), t2.double()
    s11, s22 = (t1 * t1).sum(-1, keepdim=True), (t2 * t2).sum(-1, keepdim=True)
    s12 = (t1 * t2).sum(-1, keepdim=True)
    lam = RIDGE * (s11 + s22) / 2 + 1e-12
    s11, s22 = s11 + lam, s22 + lam
    b1, b2 = (t1 * g).sum(-1, keepdim=True), (t2 * g).sum(-1, keepdim=True)
    det = s11 * s22 - s12 * s12  # >= lam (s11 + s22) > 0 by Cauchy-Schwarz
    return ((s22 * b1 - s12 * b2) / det).float(), ((s11 * b2 - s12 * b1) / det).float()


def fit(g: Tensor, counts: Tensor | float, max_iters: int, tol: float, scale_dtype: str
        ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The progressive alternating fit of the module docstring on groups g (..., elems), fp32.
    Returns (t1, t2, a1, a2, iterations); scales (..., 1) rounded to `scale_dtype`."""
    g = g.float()
    a1 = (g.abs().sum(-1, keepdim=True) / counts).clamp_min(EPS)
    t1 = (g / a1).round().clamp(-1, 1)
    r = g - a1 * t1
    a2 = (r.abs().sum(-1, keepdim=True) / counts).clamp_min(EPS)
    t2 = (r / a2).round().clamp(-1, 1)
    prev = (g - a1 * t1 - a2 * t2).square().sum()
    it = 0
    while it < max_iters:
        it += 1
        a1, a2 = _scales(g, t1, t2)
        a1, t1 = _positive(a1, t1)
        a2, t2 = _positive(a2, t2)
        t1, t2 = _best_planes(g, a1, a2)
        err = (g - a1 * t1 - a2 * t2).square().sum()
        done = prev - err <= tol * prev
        prev = err
        if done:
            break
    if scale_dtype == "fp16":
        a1, a2 = fp16_scales(a1), fp16_scales(a2)
    else:
        a1, a2 = a1.clamp_min(EPS), a2.clamp_min(EPS)
    t1, t2 = _best_planes(g, a1, a2)
    return t1, t2, a1, a2, it


def _positive(a: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """A negative scale flips its plane; a zero one becomes EPS (its plane is then refitted)."""
    a = torch.where(torch.isfinite(a), a, EPS)
    sign = torch.where(a < 0, -1.0, 1.0)
    return (a * sign).clamp_min(EPS), t * sign


@register("ptqtp")
class PTQTPQuantizer(Quantizer):
    Config = PTQTPConfig
    config: PTQTPConfig
    qmax = 4  # c = 3 T1 + T2

    @property
    def group_size(self) -> int:
        return self.config.group_size if self.config.granularity == "group" else 0

    def _fit(self, w: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The fit of `w`, reused while `w` is the same tensor, unmodified: evaluating a model calls
        the forward once per batch on an unchanged weight, and the fit is ~20 passes over it. Any
        in-place update (an optimizer step, `copy_`) bumps the tensor's version and refits."""
        cache = getattr(self, "_cache", None)
        if cache is not None and cache[0]() is w and cache[1] == w._version:
            return cache[2]
        cfg = self.config
        g = grouped(w.detach().float(), cfg.granularity, self.group_size)
        counts = group_counts(tuple(w.shape), cfg.granularity, self.group_size, device=w.device)
        t1, t2, a1, a2, _ = fit(g, counts, cfg.max_iters, cfg.tol, cfg.scale_dtype)
        self._cache = (weakref.ref(w), w._version, (t1, t2, a1, a2))  # the same tensor object, same version
        return t1, t2, a1, a2

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            t1, t2, a1, a2 = self._fit(w)
            w_hat = ungrouped(t1 * a1 + t2 * a2, tuple(w.shape)).to(w.dtype)
        return straight_through(w, w_hat)

    @torch.no_grad()
    def _quantize(self, w: Tensor) -> QTensor:
        t1, t2, a1, a2 = self._fit(w)
        codes = ungrouped(3 * t1 + t2, tuple(w.shape)).to(torch.int8)
        scales = torch.cat([a1, a2], dim=-1).reshape(w.shape[0], -1)  # (rows, n, 2) -> (rows, 2n)
        return QTensor(codes, scales.float(), tuple(w.shape))

    @staticmethod
    def planes(codes: Tensor) -> tuple[Tensor, Tensor]:
        """(T1, T2) as int8 from the combined codes c = 3 T1 + T2."""
        c = codes.to(torch.int16)
        t1 = torch.div(c + 1, 3, rounding_mode="floor")  # c in {3t1-1, 3t1, 3t1+1}
        return t1.to(torch.int8), (c - 3 * t1).to(torch.int8)

    def dequantize(self, q: QTensor) -> Tensor:
        t1, t2 = self.planes(q.codes)
        s = q.scales.reshape(q.shape[0], -1, 2)
        a1, a2 = s[..., :1], s[..., 1:]
        g1 = grouped(t1.float(), self.config.granularity, self.group_size)
        g2 = grouped(t2.float(), self.config.granularity, self.group_size)
        return ungrouped(g1 * a1 + g2 * a2, q.shape)

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        n = bitpack.packed_len(shape[0] * shape[1], self.config.packing)
        rows, groups = num_groups(shape, self.config.granularity, self.group_size)
        dtype = torch.float16 if self.config.scale_dtype == "fp16" else torch.float32
        return {"plane1": TensorLayout(torch.uint8, (n,)), "plane2": TensorLayout(torch.uint8, (n,)),
                "scales": TensorLayout(dtype, (rows, 2 * groups))}

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        t1, t2 = self.planes(q.codes)
        dtype = torch.float16 if self.config.scale_dtype == "fp16" else torch.float32
        return {"plane1": bitpack.pack(t1, self.config.packing), "plane2": bitpack.pack(t2, self.config.packing),
                "scales": q.scales.to(dtype)}

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        n = shape[0] * shape[1]
        t1 = bitpack.unpack(tensors["plane1"], n, self.config.packing).to(torch.int8)
        t2 = bitpack.unpack(tensors["plane2"], n, self.config.packing).to(torch.int8)
        return QTensor((3 * t1 + t2).reshape(shape), tensors["scales"].float(), shape)

    def stats(self, q: QTensor) -> dict[str, Any]:
        """Zero fractions of each plane, the scale ratio a2 / a1 and the entropy of the 9 codes."""
        t1, t2 = self.planes(q.codes)
        s = q.scales.reshape(q.shape[0], -1, 2)
        counts = torch.bincount(q.codes.reshape(-1).long() + 4, minlength=9).double()
        p = counts[counts > 0] / counts.sum()
        return {**super().stats(q), "plane1_zeros": float((t1 == 0).float().mean()),
                "plane2_zeros": float((t2 == 0).float().mean()),
                "scale_ratio": float((s[..., 1] / s[..., 0]).mean()),
                "entropy_bits": float(-(p * p.log2()).sum())}


__all__ = ["PTQTPConfig", "PTQTPQuantizer", "fit"]
