"""The quantizer contract, and helpers shared by the built-in quantizers.

A quantizer is an `nn.Module` built from a validated options dataclass (its `Config`) and attached to
one weight (see `qtoolkit.layers`). It may own parameters (e.g. a learned scale). Every quantizer
provides:

    forward(w)          fake-quantized weight for training; differentiable (straight-through)
    quantize_input(x)   fake-quantized layer input (`self.act`, from the `activations` option)
    quantize(w)         -> QTensor: the integer (or low-precision float) codes, their scales, and the
                        `extras` the layer also stores (below)
    dequantize(q)       QTensor -> float weight; equals forward(w) bit for bit (outside training-only
                        terms such as Sherry's annealed residual)
    layout(shape)       the packed tensors a weight of that shape is stored as: {suffix: (dtype, shape)}
    pack(q)             QTensor -> {suffix: tensor}, exactly as `layout` says (checked on every pack)
    unpack(tensors, shape)  the inverse of pack, bit-exact
    nbytes(shape)       exact storage bytes = sum of the layout's tensor bytes (codes *and* scales)
    bits_per_weight(shape)  8 * nbytes / numel, as an exact Fraction

A subclass implements the codes-and-scales part: `forward`, `_quantize`, `dequantize`, `_layout`,
`_pack`, `_unpack`. Methods whose layer computes more than `x_hat @ W_hat^T` add:

    extras(w)           {name: float tensor} stored beside codes and scales, as the layer uses them
                        (differentiable in training): Tequila's dead-zone bias, a low-rank
                        correction's factors, a learned activation step. `extras_layout(shape)` gives
                        their storage dtypes and shapes (part of `layout`, so counted in `nbytes`).
    output_term(x, extras)  an additive term on the layer output (None by default); the training
                        layer and the deployed one both call it, with live and stored extras.
    load_extras(extras) put stored learned state back (the deployed layer's activation quantizer).
    stats(q)            method-specific statistics of stored codes for `qtool analyze`.

Training progress. A quantizer whose forward depends on how far training has got (Sherry's annealed
residual) sets `needs_progress = True`; the trainer then calls `set_progress(p)` before every step,
p = (step + 1) / total_steps in (0, 1] (so the last step sees p = 1). Without a progress (None: any
other training loop, evaluation) such terms are off.

`nbytes` is derived from `layout`, and `pack` is checked against `layout`, so the bytes the memory
model predicts (qtoolkit.pack.memory_plan) are the bytes a packed checkpoint holds.

State. Anything a quantizer learns or fits (a learned scale, scales fixed by calibration, a
permutation) is a parameter or buffer of the quantizer module, created in `init_from_weight` with
its final shape. It then lives in the model's state dict (`<layer>.quantizer.<name>`), so a training
checkpoint carries it, `qtoolkit.pack.model_from_checkpoint` restores it (the policy rebuilds the
quantizer, `init_from_weight` creates the tensors, `load_state_dict` fills them), and packing uses it
(`pack_model` quantizes with the layer's own quantizer).

Calibration (optional). A quantizer that needs data sets `calibration = True` and implements

    observe(x)          x: one calibration batch of the layer's input, (..., in_features), float32,
                        as the layer receives it (before `quantize_input`). Accumulate streaming
                        statistics (e.g. H += x^T x, a running absmax); never keep x itself.
    calibrate(weight)   fit state from the statistics and release them. May return a new latent
                        weight (same shape) that the driver copies into the layer in place, e.g.
                        GPTQ's rounded weight with its scales kept as buffers, so that re-quantizing
                        the returned weight with the fitted state reproduces the codes exactly and
                        quantization-aware training can continue from it. Return None otherwise.

`qtoolkit.calibration.calibrate_model` drives it: block by block, each block's layer inputs computed
through the already-quantized (and calibrated) blocks before it, as GPTQ does. Only linear layers are
observed; an embedding's quantizer that sets `calibration` gets `calibrate(weight)` without any
`observe` call. Quantizers without calibration are never called and need no data. A quantizer used
without calibration (QAT from scratch) must still work: its uncalibrated state is its default.

Weights are 2-D, (rows, cols) = (out_features, in_features) for linears and (vocab, d_model) for
embeddings. Scales are fp32 and grouped along a row: one per tensor, per row ("channel"), or per
`group_size` consecutive columns of a row ("group"; a short last group when cols % group_size != 0).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from fractions import Fraction
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit import schema
from qtoolkit.quantizers.activations import (  # noqa: F401  (re-exported: the runtime uses them)
    ActivationOptions,
    ActivationQuantizer,
    fake_quant_int8_per_token,
    int8_per_token_codes,
)


@dataclass(frozen=True)
class TensorLayout:
    """dtype and shape of one packed tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * self.dtype.itemsize

    def matches(self, t: Tensor) -> bool:
        return t.dtype == self.dtype and tuple(t.shape) == self.shape


@dataclass(frozen=True)
class QTensor:
    """A quantized 2-D weight: codes (int8, or fp16/bf16/fp32 for casts), fp32 scales, and the
    extra tensors the layer stores with them (in their storage dtypes; see `Quantizer.extras`)."""

    codes: Tensor
    scales: Tensor | None
    shape: tuple[int, ...]
    extras: dict[str, Tensor] = field(default_factory=dict)


class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantized value; backward passes the gradient to the input unchanged."""

    @staticmethod
    def forward(ctx, x: Tensor, x_quantized: Tensor) -> Tensor:
        return x_quantized

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


FP16_MIN, FP16_MAX = 2.0**-14, 65504.0  # the normal fp16 range stored scales are clamped to


def fp16_scales(s: Tensor) -> Tensor:
    """Positive scales as they are stored in fp16 (clamped to the normal range, rounded), in fp32."""
    return s.clamp(FP16_MIN, FP16_MAX).half().float()


def straight_through(x: Tensor, x_quantized: Tensor) -> Tensor:
    """Value of `x_quantized`, gradient of the identity w.r.t. `x` (the STE)."""
    return _StraightThrough.apply(x, x_quantized)


# ------------------------------------------------------------------------------ grouping


def num_groups(shape: tuple[int, ...], granularity: str, group_size: int) -> tuple[int, int]:
    """(rows of scales, scales per row) for a weight of `shape`."""
    rows, cols = shape
    if granularity == "tensor":
        return 1, 1
    if granularity == "channel":
        return rows, 1
    if granularity == "group":
        return rows, -(-cols // group_size)
    raise ValueError(f"unknown granularity {granularity!r}")


def grouped(w: Tensor, granularity: str, group_size: int) -> Tensor:
    """View `w` (rows, cols) as (scale_rows, scales_per_row, elems) with zero padding at the end of
    each row when groups do not divide the columns. One scale covers one `[i, j, :]` slice."""
    rows, cols = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, rows * cols)
    if granularity == "channel":
        return w.reshape(rows, 1, cols)
    n = -(-cols // group_size)
    pad = n * group_size - cols
    if pad:
        w = F.pad(w, (0, pad))
    return w.reshape(rows, n, group_size)


def ungrouped(g: Tensor, shape: tuple[int, ...]) -> Tensor:
    rows, cols = shape
    return g.reshape(rows, -1)[:, :cols]  # drops group padding; a no-op view otherwise


def group_counts(shape: tuple[int, ...], granularity: str, group_size: int, device=None) -> Tensor:
    """Number of real (unpadded) elements under each scale, shaped to broadcast over `grouped`."""
    rows, cols = shape
    if granularity != "group" or cols % group_size == 0:
        n = {"tensor": rows * cols, "channel": cols}.get(granularity, group_size)
        return torch.tensor(float(n), device=device)
    n = -(-cols // group_size)
    counts = torch.full((1, n, 1), float(group_size), device=device)
    counts[0, -1, 0] = cols - (n - 1) * group_size
    return counts


# ------------------------------------------------------------------------------ contract


class Quantizer(nn.Module):
    """Base class. Subclasses set `name` (via `register`) and `Config` (an options dataclass that
    inherits `ActivationOptions`)."""

    name: ClassVar[str] = ""
    Config: ClassVar[type]
    needs_progress: ClassVar[bool] = False  # forward depends on training progress (set_progress)
    linear_only: ClassVar[bool] = False  # its layer computation needs a linear (no embedding lookups)
    calibration: ClassVar[bool] = False  # True: observe()/calibrate() fit state from data (docstring above)

    def __init__(self, config: Any = None):
        super().__init__()
        self.config = config if config is not None else self.Config()
        self.act = ActivationQuantizer(self.config)
        self.progress: float | None = None

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, path: str = "") -> Quantizer:
        config = schema.from_dict(cls.Config, options or {}, what=f"{cls.name} quantizer options", path=path)
        return cls(config)

    def spec(self) -> dict[str, Any]:
        """Canonical, serializable description: {"name": ..., every option with its value}."""
        return {"name": self.name, **{f.name: getattr(self.config, f.name) for f in fields(self.config)}}

    def init_from_weight(self, weight: Tensor) -> None:
        """Create/initialise any learned or fitted state (parameters, buffers) from the weight it
        will quantize, with its final shapes, so a state dict can be loaded into it."""

    def observe(self, x: Tensor) -> None:
        """Accumulate statistics of one calibration batch of the layer input x (..., in_features)."""
        raise NotImplementedError(f"{self.name} sets calibration = True but does not implement observe()")

    def calibrate(self, weight: Tensor) -> Tensor | None:
        """Fit state from the observed statistics (then release them); optionally return a new latent
        weight of the same shape (None: the weight stays as it is)."""
        raise NotImplementedError(f"{self.name} sets calibration = True but does not implement calibrate()")

    def set_progress(self, progress: float) -> None:
        """Fraction of training done after the current step, in (0, 1] (see the module docstring)."""
        self.progress = progress

    # ---------------------------------------------------------------- the layer's computation

    def forward(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def quantize_input(self, x: Tensor) -> Tensor:
        return self.act(x)

    @property
    def has_output_term(self) -> bool:
        return False

    def extras(self, w: Tensor) -> dict[str, Tensor]:
        """Float tensors stored beside the codes that the layer's computation uses (fp32 values,
        exactly representable in their `extras_layout` dtype). Default: the learned activation state."""
        return dict(self.act.state_tensors())

    def extras_layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        return {k: TensorLayout(torch.float32, s) for k, s in self.act.state_shapes().items()}

    def output_term(self, x: Tensor, extras: dict[str, Tensor]) -> Tensor | None:
        """Added to the layer output y = x_hat @ W_hat^T (x is the unquantized input)."""
        return None

    def load_extras(self, extras: dict[str, Tensor]) -> None:
        """Restore learned state from stored extras (used when a deployed layer is built)."""
        self.act.load_state_tensors({k: v.float() for k, v in extras.items()})

    # ---------------------------------------------------------------- storage

    @torch.no_grad()
    def quantize(self, w: Tensor) -> QTensor:
        q = self._quantize(w)
        layout = self.extras_layout(tuple(w.shape))
        extras = {k: v.detach().to(layout[k].dtype).reshape(layout[k].shape).cpu().clone()
                  for k, v in self.extras(w).items()}
        return dataclasses.replace(q, extras=extras) if extras else q

    def _quantize(self, w: Tensor) -> QTensor:
        raise NotImplementedError

    def dequantize(self, q: QTensor) -> Tensor:
        raise NotImplementedError

    def layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        shape = tuple(shape)
        return {**self._layout(shape), **self.extras_layout(shape)}

    def _layout(self, shape: tuple[int, ...]) -> dict[str, TensorLayout]:
        raise NotImplementedError

    def _pack(self, q: QTensor) -> dict[str, Tensor]:
        raise NotImplementedError

    def _unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        raise NotImplementedError

    def pack(self, q: QTensor) -> dict[str, Tensor]:
        """Storage tensors of a quantized weight; exactly the dtypes and shapes of `layout`."""
        out = {k: v.contiguous() for k, v in {**self._pack(q), **q.extras}.items()}
        expected = self.layout(q.shape)
        if out.keys() != expected.keys() or not all(expected[k].matches(v) for k, v in out.items()):
            got = {k: (v.dtype, tuple(v.shape)) for k, v in out.items()}
            raise AssertionError(f"{self.name}.pack produced {got}, layout says {expected}")
        return out

    def unpack(self, tensors: dict[str, Tensor], shape: tuple[int, ...]) -> QTensor:
        """Inverse of `pack`. Raises ValueError when the tensors do not match the layout."""
        shape = tuple(shape)
        expected = self.layout(shape)
        if tensors.keys() != expected.keys():
            raise ValueError(f"expected tensors {sorted(expected)}, got {sorted(tensors)}")
        for k, t in tensors.items():
            if not expected[k].matches(t):
                raise ValueError(
                    f"{k}: expected {expected[k].dtype} {expected[k].shape}, got {t.dtype} {tuple(t.shape)}"
                )
        extra_keys = self.extras_layout(shape).keys()
        q = self._unpack({k: t for k, t in tensors.items() if k not in extra_keys}, shape)
        return dataclasses.replace(q, extras={k: tensors[k] for k in extra_keys}) if extra_keys else q

    def nbytes(self, shape: tuple[int, ...]) -> int:
        return sum(t.nbytes for t in self.layout(tuple(shape)).values())

    def bits_per_weight(self, shape: tuple[int, ...]) -> Fraction:
        numel = shape[0] * shape[1]
        return Fraction(8 * self.nbytes(shape), numel)

    def stats(self, q: QTensor) -> dict[str, Any]:
        """What is particular to this method in stored codes (reported by `qtool analyze`)."""
        if self.config.activations == "elastic" and "act_step" in q.extras:
            return {"act_step": float(q.extras["act_step"]), "act_offset": float(q.extras["act_offset"])}
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.spec().items() if k != "name")


class ScaledIntQuantizer(Quantizer):
    """Integer codes in [-qmax, qmax] times one fp32 scale per group (ternary, int8).

    Subclasses give `qmax` and `scales(w)` (one scale per group, shaped like `grouped(w)` with a
    last dim of 1); the config provides `granularity` and optionally `group_size`.
    Fake quantization, `quantize` and `dequantize` are then the same float operations, so
    `dequantize(quantize(w)) == forward(w)` bit for bit.
    """

    qmax: ClassVar[int]

    @property
    def group_size(self) -> int:
        return getattr(self.config, "group_size", 0)

    def scales(self, w: Tensor) -> Tensor:
        raise NotImplementedError

    def grouped_codes(self, w: Tensor, scale: Tensor) -> Tensor:
        """round(w / scale) clamped to [-qmax, qmax], grouped (as w's float dtype)."""
        return (grouped(w, self.config.granularity, self.group_size) / scale).round_().clamp_(-self.qmax, self.qmax)

    def forward(self, w: Tensor) -> Tensor:
        with torch.no_grad():
            scale = self.scales(w)
            w_hat = ungrouped(self.grouped_codes(w, scale).mul_(scale), tuple(w.shape))
        return straight_through(w, w_hat)

    @torch.no_grad()
    def _quantize(self, w: Tensor) -> QTensor:
        scale = self.scales(w)
        codes = ungrouped(self.grouped_codes(w, scale), tuple(w.shape))
        return QTensor(codes.to(torch.int8), scale.reshape(scale.shape[:2]).float(), tuple(w.shape))

    def dequantize(self, q: QTensor) -> Tensor:
        scale = q.scales.reshape(*q.scales.shape, 1)
        g = grouped(q.codes.to(q.scales.dtype), self.config.granularity, self.group_size)
        return ungrouped(g * scale, q.shape)
