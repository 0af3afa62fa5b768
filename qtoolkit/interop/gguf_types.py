"""Which GGML tensor type each stored qtoolkit format becomes in a GGUF file, and its blocks.

GGML stores a weight (rows, cols) row by row, each row cut into blocks along the input dimension
(`cols`); every block carries its own fp16 scale d. The types used here (ggml-common.h):

    TQ2_0   256 weights, 66 bytes (2.0625 bits/weight): 64 bytes of 2-bit digits u = c + 1, then d.
            Weight e = 128a + 32s + j of the block sits in byte 32a + j, bits 2s..2s+1.
    TQ1_0   256 weights, 54 bytes (1.6875 bits/weight): 48 bytes of 5 base-3 digits and 4 bytes of
            4 digits (scaled by 256/243 so a digit is read with a multiply-shift), then d.
    Q8_0    32 weights, 34 bytes (8.5 bits/weight): d, then 32 int8 codes.
    F16 / BF16 / F32    plain values (norm weights are always F32).

How each qtoolkit format is written, by the `--type` asked for (tq2_0 is the default):

    ternary, tensor/channel scale          tq2_0, tq1_0: TQ2_0 / TQ1_0; codes exact, d = fp16(alpha) in
    (also group scales whose group_size        every block of the row (blocks whose codes are all 0 get
    is a multiple of the block)                d = 0, which is the same weights). The blocks come from
                                               gguf.quants (llama.cpp's reference packer), fed the
                                               dequantized row alpha * c: its block absmax is alpha, so it
                                               reproduces c exactly; checked on every tensor.
                                           q8_0: Q8_0 with the codes and d = fp16(alpha) (exact codes).
                                           f16:  F16 of alpha * c (= fp16(alpha) * c).
    int8, channel/tensor scale             tq2_0, tq1_0, q8_0: Q8_0 with the int8 codes unchanged and
                                               d = fp16(row scale) in each of the row's blocks (not the
                                               block absmax / 127 that llama.cpp's own quantizer picks:
                                               that would re-round the codes).
                                           f16: F16 of scale * code (one fp16 rounding per weight).
    fp16, bf16                             F16, BF16 (exact)
    fp32 (and never-quantized layers)      F32; F16 with --type f16; Q8_0 by llama.cpp's own rule
                                               (re-quantized) with --type q8_0
    1-D parameters (RMSNorm weights)       F32

Fallbacks (listed in the export result): a ternary layer whose cols are not a multiple of 256 (or
whose group scales do not line up with 256-blocks) is written as Q8_0 (codes still exact) when the
asked type is TQ2_0/TQ1_0; a layer whose cols are not a multiple of 32 (or whose scales do not line up
with 32-blocks) is written F16 (dequantized). The only change to a quantized layer's weights is then
the fp16 rounding of its scale: |fp16(alpha) - alpha| / alpha <= 2^-11 (~4.9e-4) for a normal fp16
alpha, reported per layer (`scale_rel_err`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qtoolkit.pack import Entry
from qtoolkit.quantizers import QTensor

TARGETS = ("tq2_0", "tq1_0", "q8_0", "f16")
BLOCK = {"TQ2_0": 256, "TQ1_0": 256, "Q8_0": 32}


@dataclass
class GGUFTensor:
    """One tensor as it is written: `data` and `ggml_type` go to GGUFWriter.add_tensor."""

    name: str  # qtoolkit entry name
    gguf_name: str
    ggml_type: str  # "TQ2_0", "TQ1_0", "Q8_0", "F16", "BF16", "F32"
    data: np.ndarray  # uint8 blocks (quantized types) or the values
    shape: tuple[int, ...]  # the weight's shape (rows, cols), or (n,) for 1-D parameters
    source: str  # the qtoolkit format, e.g. "ternary/tensor"
    how: str  # e.g. "codes exact, d = fp16(alpha)"
    fallback: str | None = None  # why the asked type could not hold it
    scale_rel_err: float | None = None  # max |fp16(s) - s| / s over its scales

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def to_dict(self) -> dict:
        return {"name": self.name, "gguf_name": self.gguf_name, "type": self.ggml_type, "shape": list(self.shape),
                "bytes": self.nbytes, "source": self.source, "how": self.how, "fallback": self.fallback,
                "scale_rel_err": self.scale_rel_err}


def block_scales(entry: Entry, q: QTensor, block: int) -> np.ndarray | None:
    """(rows, cols / block) fp32 scales, one per block, when every block lies under one scale; else None."""
    spec, (rows, cols) = entry.spec, q.shape
    if cols % block:
        return None
    s = q.scales.float().numpy()
    g = spec.get("granularity")
    if g == "tensor":
        return np.full((rows, cols // block), s.reshape(-1)[0], dtype=np.float32)
    if g == "channel":
        return np.repeat(s.reshape(rows, 1), cols // block, axis=1)
    if g == "group" and spec["group_size"] % block == 0:
        return np.repeat(s.reshape(rows, -1), spec["group_size"] // block, axis=1)[:, : cols // block]
    return None


def fp16_rel_err(scales: np.ndarray) -> float:
    s = scales.astype(np.float32)
    nz = s != 0
    if not nz.any():
        return 0.0
    return float((np.abs(s.astype(np.float16).astype(np.float32) - s)[nz] / np.abs(s[nz])).max())


def q8_0_blocks(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Q8_0 rows from int8 codes (rows, cols) and per-block scales (rows, cols / 32): each block is
    d = fp16(scale) (2 bytes) then its 32 codes, unchanged."""
    rows, cols = codes.shape
    d = scales.astype(np.float16).reshape(rows, cols // 32, 1).view(np.uint8)  # (rows, nb, 2)
    qs = codes.astype(np.int8).reshape(rows, cols // 32, 32).view(np.uint8)
    return np.concatenate([d, qs], axis=2).reshape(rows, -1)


def _ternary_blocks(codes: np.ndarray, scales: np.ndarray, ggml_type: str) -> np.ndarray:
    """TQ2_0 / TQ1_0 rows by gguf.quants from the dequantized weight (block absmax = alpha), checked
    to hold exactly the codes with d = fp16(alpha)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[ggml_type]
    rows, cols = codes.shape
    w = codes.astype(np.float32) * np.repeat(scales, 256, axis=1)
    blocks = gguf.quants.quantize(w, qtype)
    expected = codes.astype(np.float32) * np.repeat(scales.astype(np.float16).astype(np.float32), 256, axis=1)
    if not np.array_equal(gguf.quants.dequantize(blocks, qtype).reshape(rows, cols), expected):
        raise AssertionError(f"gguf.quants {ggml_type} did not reproduce the ternary codes")
    return blocks


def _float(entry: Entry, w: np.ndarray, ggml_type: str) -> np.ndarray:
    import gguf

    if ggml_type == "F32":
        return w.astype(np.float32)
    if ggml_type == "F16":
        return w.astype(np.float16)
    return gguf.quants.quantize(w.astype(np.float32), gguf.GGMLQuantizationType[ggml_type])


def _dequantized(entry: Entry, q: QTensor) -> np.ndarray:
    return entry.quantizer.dequantize(q).float().numpy()


def convert(entry: Entry, q: QTensor, target: str, gguf_name: str) -> GGUFTensor:
    """The GGUF tensor of one stored entry (rows already in GGUF order), for the asked `target`."""
    spec, shape = entry.spec, tuple(entry.shape)
    name, granular = spec["name"], spec.get("granularity")
    source = f"{name}/{granular}" if granular else name

    def tensor(ggml_type: str, data: np.ndarray, how: str, **kw) -> GGUFTensor:
        return GGUFTensor(entry.name, gguf_name, ggml_type, data, shape, source, how, **kw)

    if entry.kind == "param":  # RMSNorm weights
        return tensor("F32", _dequantized(entry, q).reshape(shape).astype(np.float32), "fp32 values")
    if name in ("ternary", "int8") and granular in ("tensor", "channel", "group"):
        return _scaled_int(entry, q, target, tensor)
    if name == "fp16":
        return tensor("F16", q.codes.numpy().astype(np.float16), "fp16 values")
    if name == "bf16":
        return tensor("BF16", _float(entry, _dequantized(entry, q), "BF16"), "bf16 values")
    if name == "fp32":
        w = _dequantized(entry, q)
        if target == "f16":
            return tensor("F16", w.astype(np.float16), "rounded to fp16")
        if target == "q8_0" and shape[1] % 32 == 0:
            return tensor("Q8_0", _float(entry, w, "Q8_0"), "quantized by llama.cpp's Q8_0 rule")
        return tensor("F32", w.astype(np.float32), "fp32 values")
    # a format GGUF has no type for: its dequantized weight
    return tensor("F16", _dequantized(entry, q).astype(np.float16), "dequantized to fp16",
                  fallback=f"GGUF has no type for {source}")


def _scaled_int(entry: Entry, q: QTensor, target: str, tensor) -> GGUFTensor:
    """Ternary and int8 codes with their scales (the table in the module docstring)."""
    name, cols = entry.spec["name"], q.shape[1]
    codes = q.codes.numpy()
    if target == "f16":
        err = fp16_rel_err(q.scales.numpy()) if name == "ternary" else None
        return tensor("F16", _dequantized(entry, q).astype(np.float16), "dequantized to fp16", scale_rel_err=err)
    fallback = None
    if name == "ternary" and target in ("tq2_0", "tq1_0"):
        wanted = target.upper()
        s = block_scales(entry, q, 256)
        if s is not None:
            return tensor(wanted, _ternary_blocks(codes, s, wanted), "codes exact, d = fp16(alpha)",
                          scale_rel_err=fp16_rel_err(s))
        fallback = f"{cols} columns are not 256-blocks under one scale each"
    s = block_scales(entry, q, 32)
    if s is not None:
        what = "alpha" if name == "ternary" else "row scale"
        return tensor("Q8_0", q8_0_blocks(codes, s), f"codes exact, d = fp16({what})", fallback=fallback,
                      scale_rel_err=fp16_rel_err(s))
    why = f"{cols} columns are not 32-blocks under one scale each"
    return tensor("F16", _dequantized(entry, q).astype(np.float16), "dequantized to fp16",
                  fallback=f"{fallback}; {why}" if fallback else why)


__all__ = ["BLOCK", "GGUFTensor", "TARGETS", "block_scales", "convert", "fp16_rel_err", "q8_0_blocks"]
