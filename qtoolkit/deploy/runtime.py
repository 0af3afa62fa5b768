"""Inference runtime: a packed checkpoint as a fast decoder with a KV cache, and text generation.

    load_inference_model(path)  -> InferenceModel (packed or training checkpoint; CPU or CUDA)
    model(idx, cache)           prefill (T tokens) or decode (T = 1) against a preallocated KV cache
    generate(model, ids, ...)   yields token ids as they are sampled (greedy, temperature, top-k, seed)
    generate_text(model, text)  the same as decoded text pieces, for streaming

The model is the DecoderLM's computation (RMSNorm, RoPE, causal attention, SwiGLU; `qtoolkit.model`)
with every linear replaced by an op that computes from the stored format:

    ternary (tensor/channel alpha, int8 activations)  TernaryLinear: weights packed 2 bits/weight in
        the kernel layout (`qtoolkit.deploy.kernels`); per-token int8 activation codes; integer dots; one
        multiply by gamma_i / s_t per output. Identical integers to the training forward's
        x_hat @ W_hat^T = (q / s) @ (gamma W~)^T.
    int8, weight-only (the default; embed/lm_head)   Int8Linear: int8 codes, fp32 row scales, float
        activations (the layer never quantized its input in training, so neither does the runtime).
    int8 with `activations: int8` (W8A8)             Int8Linear: per-token codes, exact int32 product.
    fp16 / bf16 / fp32                               nn.Linear on the dequantized fp32 weight.
    ternary with `activations: none`                Int8Linear (weight-only) on the codes.
    sherry / tequila with tensor or channel scales   as ternary: their codes are ternary too.
    group scales, binary, intn (int2..int6, GPTQ),   ReferenceLinear: the fake-quant formula on the
    ptqtp, int4 or elastic activations               dequantized weight (not accelerated).
    a method's output term (Tequila's dead-zone      WithOutputTerm around the layer's op: op(x) +
    bias, a low-rank correction)                     quantizer.output_term(x, stored extras).

On a GPU (`weights="auto"` there = bf16) every layer is instead one `DenseLinear`: its weight
dequantized once at load to bf16/fp16/fp32 (integer codes kept as exact 16-bit integers with fp32
scales), one GEMM per call; `weights="packed"` keeps the 2-bit form and unpacks per call. Decode steps
of `generate` on CUDA run `InferenceModel.static_step` (fixed shapes, position on the device) captured
once as a CUDA graph (`qtoolkit.deploy.static_decode`).

When the C++ extension is loaded, attention (RoPE, cache write, softmax), SwiGLU and RMSNorm run as
single calls into it (`use_fused_ops`), ~10 calls per block; otherwise they are the training model's
PyTorch ops. For all-ternary models (packed ternary block linears, int8 embed/head) a batch-1 decode
step is one call into the extension's `Decoder`, bit-identical to the op-by-op path (`use_decoder`;
its scheduling is described in csrc/ternary_kernels.cpp and docs/inference.md).

Layers of a block that read the same input with the same format are fused into one op:
q/k/v -> `qkv` (one activation quantization, one kernel call) and gate/up -> `gate_up`. The same
fusion is applied to the float baselines (`InferenceModel.float_baseline`), so benchmarks compare
weights and kernels, not graph shapes.

KV cache layout (preallocated for prompt + new tokens, so decoding never reallocates):

    k, v: (n_layers, B, n_kv_heads, max_len, head_dim) fp32;  positions [0, length) are filled
    (n_kv_heads = n_heads without grouped-query attention; with it the cache is n_heads / n_kv_heads
    times smaller, and query head h reads k/v head h // (n_heads / n_kv_heads))

Outputs match the fake-quantized model: identical integer accumulations in every ternary layer;
float rounding (the training GEMM's summation order against one exact integer sum) moves a few
activation codes across rounding boundaries, so logits agree to the activation-quantization noise
level (stated tolerance and measurements in docs/inference.md); greedy generations are identical
on the test prompts (tests/test_runtime.py).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.config import ModelConfig
from qtoolkit.deploy import kernels
from qtoolkit.deploy.kernels import Backend, Progress
from qtoolkit.deploy.static_decode import generate_static
from qtoolkit.errors import CheckpointError, ConfigError
from qtoolkit.model import apply_rope, repeat_kv, rope_tables
from qtoolkit.quantizers.base import int8_per_token_codes
from qtoolkit.schema import check_seed

EOS = "<|endoftext|>"
TERNARY_CODES = ("ternary", "sherry", "tequila")  # int8 codes in {-1, 0, 1} times row/tensor scales

# ------------------------------------------------------------------------------ layer ops


class TernaryLinear(nn.Module):
    """Ternary weights x int8 activation codes. Holds (by backend):

        native kernels   packed (N, Kp/4) uint8, 2 bits/weight (kernel layout), gamma (N,)
        reference        codes (N, K) int8 (unpacked once, for torch._int_mm), gamma (N,)
        cuda             packed as above, dequantized per call (gamma * W~) for a float matmul
    """

    def __init__(self, codes: Tensor, gamma: Tensor, backend: Backend, device: torch.device | str = "cpu"):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.backend = backend
        self.mode = "kernel" if backend.native else ("int" if backend.name == "reference" else "dequant")
        self.register_buffer("gamma", gamma.float().reshape(-1).contiguous().to(device))
        if self.mode == "int":
            self.register_buffer("codes", codes.to(torch.int8).contiguous().to(device))
        else:
            self.register_buffer("packed", kernels.pack_ternary(codes.to(torch.int8)).to(device))
        self._isa = backend.isa
        self._fn = kernels.ext().ternary_linear if self.mode == "kernel" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "kernel":
            return self._fn(x, self.packed, self.gamma, self._isa)
        if self.mode == "int":
            return kernels.ternary_linear_reference(x, self.codes, self.gamma)
        # dequantize-then-matmul (any device): the training forward's formula
        w = kernels.unpack_ternary(self.packed, self.in_features).to(x.dtype) * self.gamma[:, None]
        codes, s = int8_per_token_codes(x)
        return F.linear(codes / s, w)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {self.mode}"


class Int8Linear(nn.Module):
    """INT8 codes (N, K) with fp32 row scales. Weight-only (float activations) unless `act_int8`."""

    def __init__(self, codes: Tensor, scale: Tensor, act_int8: bool, backend: Backend,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.out_features, self.in_features = codes.shape
        self.act_int8 = act_int8
        self.backend = backend
        self.mode = "kernel" if backend.native else ("int" if backend.name == "reference" else "dequant")
        self.register_buffer("codes", codes.to(torch.int8).contiguous().to(device))
        self.register_buffer("scale", scale.float().reshape(-1).contiguous().to(device))
        self._isa = backend.isa
        self._fn = kernels.ext().int8_linear if self.mode == "kernel" else None

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dequant":
            w = self.codes.to(x.dtype) * self.scale[:, None]
            if self.act_int8:
                codes, s = int8_per_token_codes(x)
                x = codes / s
            return F.linear(x, w)
        if self.act_int8:  # W8A8: exact int32 products of the codes, then both scales
            codes, s = int8_per_token_codes(x)
            return kernels.int_matmul(codes.to(torch.int8), self.codes).float() * (self.scale / s)
        if self.mode == "kernel":
            return self._fn(x, self.codes, self.scale, self._isa)
        return F.linear(x, self.codes.to(x.dtype)) * self.scale

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {'w8a8' if self.act_int8 else 'w8'}, {self.mode}"


WEIGHT_LAYOUTS = ("auto", "packed", "bf16", "fp16", "fp32")
DENSE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dense_mm(x: Tensor, w: Tensor) -> Tensor:
    """x (M, K) fp32 @ w.T for a dense weight w (N, K) of any float dtype -> (M, N) fp32.

    16-bit weights: x is rounded to w's dtype and the products are summed in fp32 with an fp32
    result (CUDA: cuBLAS through `torch.mm(..., out_dtype=float32)`; the CPU, which lacks that op,
    widens both operands, giving the same products and fp32 sums). Integer codes (|c| <= 128) and
    ternary/int8 weights are exact in bf16 and fp16, so for them the result is the exact integer
    dot product while partial sums stay below 2^24."""
    if w.dtype == torch.float32:
        return F.linear(x, w)
    if x.is_cuda:
        return torch.mm(x.to(w.dtype), w.t(), out_dtype=torch.float32)
    return F.linear(x.to(w.dtype).float(), w.float())


class DenseLinear(nn.Module):
    """A layer dequantized ONCE at load into a dense bf16 / fp16 / fp32 weight (the GPU layout):

        integer codes (ternary, int8; `scale` (N,) fp32):  weight = the codes themselves, exact in
            16 bits; with `act_codes` (int8 activations) y = dense_mm(q, W~) * (scale_i / s_t) from the
            training quantizer's per-token codes q and scales s: the same integers and float epilogue
            as the reference path (`ternary_linear_reference`), hence bit-identical ternary outputs;
            weight-only, y = dense_mm(x, codes) * scale (x rounded to the weight's dtype).
        float weights (fp16/bf16/fp32 specs; `scale` None): weight = the float weight in the layout's
            dtype, y = dense_mm(quantize_input(x), W) (the quantizer's input rule for the formats that
            have one: group scales, intn, binary, int4 / elastic inputs).

    Holds 2 bytes per weight in bf16/fp16 (4 in fp32) against 1/4 byte for the packed ternary form:
    the price of a single GEMM per layer, without a per-call unpack."""

    def __init__(self, weight: Tensor, scale: Tensor | None, act_codes: bool, quantizer: nn.Module | None,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.act_codes = act_codes
        self.quantizer = quantizer
        self.register_buffer("weight", weight.to(dtype).contiguous().to(device))
        self.register_buffer("scale", None if scale is None else scale.float().reshape(-1).contiguous().to(device))

    def forward(self, x: Tensor) -> Tensor:
        if self.act_codes:
            q, s = int8_per_token_codes(x)
            return dense_mm(q, self.weight) * (self.scale / s)
        if self.quantizer is not None:
            x = self.quantizer.quantize_input(x)
        y = dense_mm(x, self.weight)
        return y if self.scale is None else y * self.scale

    def extra_repr(self) -> str:
        kind = "codes, int8 inputs" if self.act_codes else ("codes" if self.scale is not None else "float")
        return f"{self.in_features} -> {self.out_features}, {self.weight.dtype} ({kind})"


class ReferenceLinear(nn.Module):
    """The fake-quantized layer as trained: quantize the input as the spec says, dequantized weight."""

    def __init__(self, weight: Tensor, quantizer: nn.Module):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())
        self.quantizer = quantizer
        self.out_features, self.in_features = weight.shape

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantizer.quantize_input(x), self.weight)


class WithOutputTerm(nn.Module):
    """A layer op plus its quantizer's additive output term, read from the stored extras (the
    training layer's formula, `Quantizer.output_term`)."""

    def __init__(self, op: nn.Module, quantizer: nn.Module, extras: dict[str, Tensor],
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.op = op
        self.quantizer = quantizer
        self._names = sorted(extras)
        for k in self._names:
            self.register_buffer(f"extra_{k}", extras[k].float().contiguous().to(device))
        self.out_features, self.in_features = op.out_features, op.in_features

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x) + self.quantizer.output_term(x, {k: getattr(self, f"extra_{k}") for k in self._names})


class Int8Embedding(nn.Module):
    """Lookup of int8 (or ternary) code rows, dequantized on the fly: codes[idx] * scale[idx]."""

    def __init__(self, codes: Tensor, scale: Tensor, device: torch.device | str = "cpu"):
        super().__init__()
        self.register_buffer("codes", codes.to(torch.int8).contiguous().to(device))
        self.register_buffer("scale", scale.float().reshape(-1, 1).contiguous().to(device))

    def forward(self, idx: Tensor) -> Tensor:
        return self.codes[idx].float() * self.scale[idx]


class FloatEmbedding(nn.Module):
    def __init__(self, weight: Tensor):
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())

    def forward(self, idx: Tensor) -> Tensor:
        return F.embedding(idx, self.weight)


# ------------------------------------------------------------------------------ the model


class KVCache:
    """Keys and values of the positions seen so far (layout in the module docstring)."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device: torch.device | str = "cpu"):
        if max_len > cfg.max_seq_len:
            raise ConfigError(f"{max_len} positions exceed the model's max_seq_len={cfg.max_seq_len}")
        shape = (cfg.n_layers, batch, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device)
        self.v = torch.zeros(shape, device=device)
        self.max_len = max_len
        self.length = 0

    @property
    def nbytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()


class RuntimeBlock(nn.Module):
    """One decoder block over fused ops: qkv (or q, k, v), o, gate_up (or gate, up), down."""

    def __init__(self, cfg: ModelConfig, ops: dict[str, nn.Module], norms: dict[str, Tensor]):
        super().__init__()
        self.d, self.f, self.nh, self.hd, self.eps = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.head_dim, cfg.norm_eps
        self.nkv, self.kvd = cfg.n_kv_heads, cfg.kv_dim
        for name, op in ops.items():
            self.add_module(name, op)
        self.fused_qkv = "qkv" in ops
        self.fused_gate_up = "gate_up" in ops
        for name, w in norms.items():
            self.register_buffer(name, w.float().contiguous())
        self.subln = "attn_sub_norm" in norms
        self.fused_ops = False  # C++ attention / SwiGLU ops (set by InferenceModel.use_fused_ops)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], layer: int, cache: KVCache | None, pos: int) -> Tensor:
        if self.fused_ops and cache is not None:
            return self._fused_forward(x, rope, layer, cache, pos)
        return self._forward(x, lambda h, B, T: self._attention(h, B, T, rope, layer, cache, pos))

    def static_forward(self, x: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor,
                       mask: Tensor) -> Tensor:
        """One token per row, fixed shapes (`InferenceModel.static_step`): x (B, 1, C); cos/sin (1, hd/2)
        the RoPE rows at `pos`; k_cache/v_cache (B, nkv, max_len, hd) this layer's cache; pos (1,) long
        on the device; mask (1, 1, 1, max_len) bool, keys 0 .. pos."""
        return self._forward(x, lambda h, B, T: self._static_attention(h, B, cos, sin, k_cache, v_cache, pos, mask))

    def _forward(self, x: Tensor, attention) -> Tensor:
        """The PyTorch block around `attention(h (B*T, C), B, T) -> (B*T, C)`."""
        B, T, C = x.shape
        h = F.rms_norm(x, (C,), self.attn_norm, self.eps).view(B * T, C)
        y = attention(h, B, T)
        if self.subln:
            y = F.rms_norm(y, (C,), self.attn_sub_norm, self.eps)
        x = x + self.o(y).view(B, T, C)
        h = F.rms_norm(x, (C,), self.mlp_norm, self.eps).view(B * T, C)
        if self.fused_gate_up:
            g, u = self.gate_up(h).split(self.f, dim=1)
        else:
            g, u = self.gate(h), self.up(h)
        m = F.silu(g).mul_(u)
        if self.subln:
            m = F.rms_norm(m, (self.f,), self.mlp_sub_norm, self.eps)
        return x + self.down(m).view(B, T, C)

    def _fused_forward(self, x: Tensor, rope: tuple[Tensor, Tensor], layer: int, cache: KVCache, pos: int) -> Tensor:
        """The same block as ~8 calls into the C++ extension (plus the linear ops); x is updated in place."""
        e, eps = self._ext, self.eps
        B, T, C = x.shape
        x2 = x.view(B * T, C)
        h = e.rms_norm(x2, self.attn_norm, eps)
        # RoPE on q and k, k/v into the cache, attention over positions 0 .. pos + t
        y = e.attention_step(self.qkv(h), cache.k[layer], cache.v[layer], rope[0], rope[1], pos, self.nh)
        if self.subln:
            y = e.rms_norm(y, self.attn_sub_norm, eps)
        h = e.add_rms_norm(x2, self.o(y), self.mlp_norm, eps)  # x += o(y); h = norm(x)
        m = e.silu_mul(self.gate_up(h))
        if self.subln:
            m = e.rms_norm(m, self.mlp_sub_norm, eps)
        x2.add_(self.down(m))
        return x

    def _attention(self, h: Tensor, B: int, T: int, rope: tuple[Tensor, Tensor], layer: int, cache: KVCache | None,
                   pos: int) -> Tensor:
        """The PyTorch path: the training model's attention, reading and extending the cache."""
        C = self.d
        q, k, v = self._qkv(h, B, T)
        cos, sin = rope[0][pos:pos + T], rope[1][pos:pos + T]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            ck, cv = cache.k[layer], cache.v[layer]
            ck[:, :, pos:pos + T] = k
            cv[:, :, pos:pos + T] = v
            k, v = ck[:, :, :pos + T], cv[:, :, :pos + T]
        k, v = repeat_kv(k, self.nh), repeat_kv(v, self.nh)
        if T == 1:
            y = F.scaled_dot_product_attention(q, k, v)
        elif pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # a chunk after cached positions: query i sees keys 0 .. pos + i
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=h.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(B * T, C)

    def _qkv(self, h: Tensor, B: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
        """(B*T, C) -> q (B, nh, T, hd); k, v (B, nkv, T, hd)."""
        C = self.d
        if self.fused_qkv:
            q, k, v = self.qkv(h).split((C, self.kvd, self.kvd), dim=1)
        else:
            q, k, v = self.q(h), self.k(h), self.v(h)
        q = q.reshape(B, T, self.nh, self.hd).transpose(1, 2)
        k = k.reshape(B, T, self.nkv, self.hd).transpose(1, 2)
        v = v.reshape(B, T, self.nkv, self.hd).transpose(1, 2)
        return q, k, v

    def _static_attention(self, h: Tensor, B: int, cos: Tensor, sin: Tensor, ck: Tensor, cv: Tensor, pos: Tensor,
                          mask: Tensor) -> Tensor:
        """`_attention` for one token at a device-side position: k/v written at `pos` by index, the
        query attends over the whole cache with keys after `pos` masked out (no slice by a host int)."""
        q, k, v = self._qkv(h, B, 1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        ck.index_copy_(2, pos, k)
        cv.index_copy_(2, pos, v)
        k, v = repeat_kv(ck, self.nh), repeat_kv(cv, self.nh)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return y.transpose(1, 2).reshape(B, self.d)


class InferenceModel(nn.Module):
    """embed -> blocks -> norm -> head, with a KV cache (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, embed: nn.Module, blocks: list[RuntimeBlock], norm: Tensor,
                 head: nn.Module, backend: Backend, device: torch.device | str = "cpu"):
        super().__init__()
        self.config = cfg
        self.embed = embed
        self.blocks = nn.ModuleList(blocks)
        self.register_buffer("norm", norm.float().contiguous())
        self.head = head
        self.backend = backend
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos.to(device))
        self.register_buffer("rope_sin", sin.to(device))
        self.tokenizer: Any = None
        self._ext = None  # the C++ extension while its fused ops are on (use_fused_ops)
        self._decoder = None  # its Decoder: batch-1 decode steps in one call each
        # native: the CPU kernels' 2-bit blocks; int8: codes unpacked once (reference path); packed:
        # 2-bit, unpacked per call; bf16/fp16/fp32: dense (set by from_packed); baselines: their name
        self.weight_layout = "native" if backend.native else {"reference": "int8", "dequant": "packed"}.get(
            backend.name, backend.name)
        # decode steps of `generate` as fixed-shape steps (CUDA graphs on a GPU): `use_static_decode`
        self.static_decode = torch.device(device).type == "cuda"
        self.cuda_graphs = True
        self.compile_step = False
        self._static: dict[tuple, Any] = {}  # (batch, max_len, sampler) -> StaticDecoder
        self.eval()

    @property
    def device(self) -> torch.device:
        return self.rope_cos.device

    def use_fused_ops(self, enabled: bool) -> InferenceModel:
        """Run attention (RoPE, cache write, softmax) and SwiGLU through the C++ extension's fused ops
        (blocks whose q/k/v and gate/up are fused); otherwise the PyTorch ops of the training model."""
        ext = kernels.ext() if enabled else None
        for block in self.blocks:
            block.fused_ops = enabled and block.fused_qkv and block.fused_gate_up
            block._ext = ext
        self._ext = ext if enabled and all(b.fused_ops for b in self.blocks) else None
        self._decoder = self._build_decoder() if self._ext is not None else None
        return self

    def use_decoder(self, enabled: bool) -> InferenceModel:
        """Run batch-1 decode steps through the C++ `Decoder` (the default where it applies) or op by op
        (same logits, bit for bit; for comparisons). Returns the model; `has_decoder` says which runs."""
        self._decoder = self._build_decoder() if enabled and self._ext is not None else None
        return self

    @property
    def has_decoder(self) -> bool:
        return self._decoder is not None

    def _build_decoder(self):
        """The C++ `Decoder` (one call per batch-1 decode step, bit-identical to the op-by-op fused
        path) when every block linear is a packed ternary kernel op and embed/head are int8 weight-only
        on the CPU; else None (the op-by-op path runs). It holds the model's weight tensors, not copies:
        after replacing a weight tensor (not its values), call `use_decoder(True)` again."""
        def ternary(op) -> bool:
            return isinstance(op, TernaryLinear) and op.mode == "kernel"

        ok = (self.device.type == "cpu" and self.backend.native and isinstance(self.embed, Int8Embedding)
              and isinstance(self.head, Int8Linear) and self.head.mode == "kernel" and not self.head.act_int8
              and all(ternary(b.qkv) and ternary(b.o) and ternary(b.gate_up) and ternary(b.down) for b in self.blocks))
        if not ok:
            return None
        layers = []
        for b in self.blocks:
            layer = [b.qkv.packed, b.qkv.gamma, b.o.packed, b.o.gamma, b.gate_up.packed, b.gate_up.gamma,
                     b.down.packed, b.down.gamma, b.attn_norm, b.mlp_norm]
            if b.subln:
                layer += [b.attn_sub_norm, b.mlp_sub_norm]
            layers.append(layer)
        cfg = self.config
        return self._ext.Decoder(layers, self.embed.codes, self.embed.scale.reshape(-1), self.norm, self.head.codes,
                                 self.head.scale, self.rope_cos, self.rope_sin, cfg.n_heads, cfg.n_kv_heads,
                                 cfg.norm_eps, self.backend.isa)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        return KVCache(self.config, batch, max_len or self.config.max_seq_len, self.device)

    def use_static_decode(self, enabled: bool = True, cuda_graphs: bool = True, compile: bool = False) -> InferenceModel:
        """How `generate` runs decode steps: with `enabled` (the default on CUDA) each step is
        `static_step` driven by a `StaticDecoder` (sampling on the device, one host read per token),
        captured once per (batch, max_len, sampler) as a CUDA graph and replayed (`cuda_graphs`, CUDA
        only; the CPU runs the same step eagerly), optionally through `torch.compile` first
        (`compile`). Disabled: the dynamic step (`forward` with T = 1), as on the CPU. Decoders
        already captured are kept (keyed by these settings too); `release_static_decoders` frees them."""
        self.static_decode, self.cuda_graphs, self.compile_step = enabled, cuda_graphs, compile
        return self

    def release_static_decoders(self) -> None:
        """Drop the captured decoders (their KV caches and CUDA-graph memory)."""
        self._static.clear()

    @torch.inference_mode()
    def static_step(self, token: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
        """One decode step of fixed shapes: token (B, 1) long and pos (1,) long, both on the device ->
        logits (B, V) fp32. Writes k/v at `pos` in every layer and attends to keys 0 .. pos through a
        mask over the whole cache; RoPE rows are gathered by index. Nothing reads a value back to the
        host and no Python branch depends on data, so the step can be captured in a CUDA graph.
        `cache.length` is left alone: the caller owns the position (`qtoolkit.deploy.static_decode`).
        Computes what `forward(token, cache)` computes at length `pos` with the PyTorch block ops
        (not the C++ fused ops), up to the float summation order of masked attention."""
        return self.static_step_fn(token, pos, cache)

    def static_step_fn(self, token: Tensor, pos: Tensor, cache: KVCache) -> Tensor:
        """`static_step` without its inference-mode wrapper: what `torch.compile` traces (inductor
        cannot mutate views of the cache under inference mode); call it under `torch.no_grad()`."""
        cfg = self.config
        cos, sin = self.rope_cos.index_select(0, pos), self.rope_sin.index_select(0, pos)  # (1, hd/2)
        keys = torch.arange(cache.max_len, device=pos.device)
        mask = (keys <= pos).view(1, 1, 1, -1)
        x = self.embed(token)
        for i, block in enumerate(self.blocks):
            x = block.static_forward(x, cos, sin, cache.k[i], cache.v[i], pos, mask)
        x = F.rms_norm(x, (cfg.d_model,), self.norm, cfg.norm_eps)
        return self.head(x.reshape(-1, cfg.d_model))

    @torch.inference_mode()
    def forward(self, idx: Tensor, cache: KVCache | None = None, last_only: bool = False) -> Tensor:
        """idx (B, T) -> logits (B, T, V) (or (B, 1, V) with `last_only`), appending to `cache`."""
        B, T = idx.shape
        pos = cache.length if cache is not None else 0
        limit = cache.max_len if cache is not None else self.config.max_seq_len
        if pos + T > limit:
            raise ConfigError(f"{pos + T} positions exceed the {'cache' if cache else 'model'} length {limit}")
        if self._decoder is not None and cache is not None and B == 1 and T == 1 and cache.k.device.type == "cpu":
            logits = self._decoder.step(idx, cache.k, cache.v, pos)  # the whole step in C++
            cache.length = pos + 1
            return logits
        rope = (self.rope_cos, self.rope_sin)
        x = self.embed(idx)
        for i, block in enumerate(self.blocks):
            x = block(x, rope, i, cache, pos)
        if cache is not None:
            cache.length = pos + T
        if last_only:
            x = x[:, -1:]
        C = self.config.d_model
        if self._ext is not None:  # the C++ RMSNorm, as in the blocks (and the Decoder)
            x = self._ext.rms_norm(x.contiguous(), self.norm, self.config.norm_eps)
        else:
            x = F.rms_norm(x, (C,), self.norm, self.config.norm_eps)
        return self.head(x.reshape(-1, C)).view(B, x.shape[1], -1)

    def weight_summary(self) -> dict[str, Any]:
        """Where the weights live and how: {"device", "layout", "bytes", "bytes_by_dtype"} (the bytes
        `weight_bytes` counts; on a GPU, what the device holds for weights, KV cache excluded)."""
        by_dtype: dict[str, int] = {}
        for t in self._weight_tensors():
            key = str(t.dtype).removeprefix("torch.")
            by_dtype[key] = by_dtype.get(key, 0) + t.numel() * t.element_size()
        return {"device": str(self.device), "layout": self.weight_layout, "bytes": self.weight_bytes(),
                "bytes_by_dtype": dict(sorted(by_dtype.items()))}

    def _weight_tensors(self) -> list[Tensor]:
        seen: set[int] = set()
        out = []
        for name, t in list(self.named_buffers()) + list(self.named_parameters()):
            if name.startswith("rope_") or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            out.append(t)
        return out

    def weight_bytes(self) -> int:
        """Bytes of every weight tensor the model holds (tied weights once; RoPE tables excluded)."""
        total = sum(t.numel() * t.element_size() for t in self._weight_tensors())
        for m in self.modules():  # torch.ao dynamic-quantized linears keep packed weights off the buffer list
            packed = getattr(m, "_packed_params", None)
            if packed is not None and hasattr(packed, "_weight_bias"):
                w, _ = packed._weight_bias()
                total += w.numel() * w.element_size() + _qscale_bytes(w)
        return total

    # -------------------------------------------------------------------------- builders

    @classmethod
    def from_packed(cls, ckpt: dict[str, Any], kernels_: str | None = None, device: str | torch.device = "cpu",
                    _consume: bool = False, progress: Progress | None = None, weights: str = "auto") -> InferenceModel:
        """Build from a loaded packed checkpoint (`load_checkpoint`).

        `kernels_` picks the CPU path (`qtoolkit.deploy.kernels.select_backend`: auto, reference, avx2,
        avx512-vnni) or "dequant" (= `weights="packed"`); `progress` hears of a first-use build of the
        C++ kernels (`kernels.load_extension`). `weights` picks the layout of the quantized weights:
            auto     the CPU kernels' layout on the CPU, bf16 on CUDA
            packed   2-bit ternary (and int8 codes) kept as stored, dequantized on every call (the
                     memory-saving layout: a quarter byte per ternary weight)
            bf16 | fp16 | fp32   every layer dequantized once at load into one dense weight
                     (`DenseLinear`; 2 bytes per weight in bf16/fp16), one GEMM per layer
        The dense and packed layouts run on any device (on the CPU they are slow: for tests and checks)."""
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ConfigError(f"unsupported device {device}; use cpu or cuda")
        if weights not in WEIGHT_LAYOUTS:
            raise ConfigError(f"weights must be one of {', '.join(WEIGHT_LAYOUTS)}, got {weights!r}")
        if kernels_ not in (None, "dequant") and weights != "auto":
            raise ConfigError(f"kernels={kernels_} picks a CPU kernel path; it cannot be combined with "
                              f"weights={weights} (leave one of them unset)")
        if kernels_ == "dequant" and weights not in ("auto", "packed"):
            raise ConfigError(f"kernels=dequant is the packed layout; it cannot be combined with weights={weights}")
        if weights == "auto" and device.type == "cuda" and kernels_ != "dequant":
            weights = "bf16"
        if kernels_ == "dequant" or weights == "packed":
            backend = Backend("dequant", "packed weights, dequantized on every call (requested)")
        elif weights in DENSE_DTYPES:
            where = "CUDA default" if device.type == "cuda" else "requested"
            backend = Backend("dense", f"weights dequantized once at load to {weights} ({where}; one GEMM per layer)")
        else:
            backend = kernels.select_backend(kernels_, progress)
        model = _Builder(ckpt, backend, device, _consume, dense=DENSE_DTYPES.get(weights)).build(cls)
        if weights in DENSE_DTYPES:
            model.weight_layout = weights
        return model.use_fused_ops(backend.native)

    @classmethod
    def float_baseline(cls, ckpt: dict[str, Any], dynamic_int8: bool = False, kernels_: str | None = None,
                       _consume: bool = False) -> InferenceModel:
        """The same architecture as a plain PyTorch float32 model (nn.Linear over the dequantized
        packed weights, fused like the packed model), or with `dynamic_int8` PyTorch's dynamic INT8
        (`torch.ao.quantization.quantize_dynamic` on every nn.Linear; embeddings stay fp32).
        Built block by block, so no more than one block's float weights exist beside the result.
        The attention / SwiGLU ops are the packed model's (fused C++ ops when `kernels_` selects a
        native path), so a comparison measures the linear layers."""
        fused = kernels.select_backend(kernels_).native
        if not dynamic_int8:
            backend = Backend("fp32", "plain PyTorch float32 (nn.Linear)")
            return _Builder(ckpt, backend, torch.device("cpu"), _consume, as_float=True).build(cls).use_fused_ops(fused)
        import warnings

        from torch.ao.quantization import quantize_dynamic

        def quantize(module: nn.Module) -> None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quantize_dynamic(module, {nn.Linear}, dtype=torch.qint8, inplace=True)

        backend = Backend("int8-dynamic", "PyTorch dynamic INT8 (quantize_dynamic on nn.Linear; "
                          f"engine {torch.backends.quantized.engine})")
        model = _Builder(ckpt, backend, torch.device("cpu"), _consume, as_float=True, block_hook=quantize).build(cls)
        quantize(model)  # the head
        return model.use_fused_ops(fused)


def _qscale_bytes(w: Tensor) -> int:
    if w.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
        return w.q_per_channel_scales().numel() * 8 + w.q_per_channel_zero_points().numel() * 8
    return 16


def _float_linear(weight: Tensor) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=False, device="meta")
    lin.weight = nn.Parameter(weight.detach().float().contiguous(), requires_grad=False)
    return lin


# ------------------------------------------------------------------------------ loading


@dataclass
class _Layer:
    """One linear's stored weights in a form that can be fused (rows concatenated) and built."""

    kind: str  # "ternary" | "int8" | "float" | "reference"
    act_int8: bool = False
    codes: Tensor | None = None  # int8 (N, K)
    scale: Tensor | None = None  # fp32 (N,)
    weight: Tensor | None = None  # fp32 (N, K), float and reference kinds
    quantizer: Any = None
    term: tuple[Any, dict[str, Tensor]] | None = None  # (quantizer, stored extras) of an output term

    def fusable_with(self, other: _Layer) -> bool:
        return (self.kind == other.kind and self.kind != "reference" and self.act_int8 == other.act_int8
                and self.term is None and other.term is None)


def _fuse(layers: list[_Layer]) -> _Layer | None:
    if not all(layers[0].fusable_with(x) for x in layers[1:]):
        return None
    first = layers[0]
    if first.kind == "float":
        return _Layer("float", weight=torch.cat([x.weight for x in layers]))
    return _Layer(first.kind, first.act_int8, torch.cat([x.codes for x in layers]), torch.cat([x.scale for x in layers]))


class _Builder:
    def __init__(self, ckpt: dict[str, Any], backend: Backend, device: torch.device, consume: bool,
                 as_float: bool = False, block_hook=None, dense: torch.dtype | None = None):
        if ckpt.get("kind") != "packed":
            raise CheckpointError(f"{ckpt.get('path')}: expected a packed checkpoint")
        self.ckpt, self.backend, self.device, self.consume = ckpt, backend, device, consume
        self.dense = dense  # the dtype of DenseLinear weights, or None for the per-format ops
        self.as_float, self.block_hook = as_float, block_hook
        self.cfg = ModelConfig.from_dict(ckpt["model_config"])
        self.by_name = {layer["name"]: layer for layer in ckpt["layers"]}

    def _qtensor(self, name: str):
        from qtoolkit.pack import unpack_layer

        return unpack_layer(self.ckpt, self.by_name[name], consume=self.consume)

    def _source(self, name: str) -> str:
        return self.by_name[name].get("tied_to") or name

    def param(self, name: str) -> Tensor:
        entry, q = self._qtensor(name)
        return entry.quantizer.dequantize(q).to(torch.float32).reshape(entry.shape).to(self.device)

    def layer(self, name: str) -> _Layer:
        entry, q = self._qtensor(self._source(name))
        quantizer = entry.quantizer.to(self.device)
        if q.extras:
            quantizer.load_extras(q.extras)  # learned activation state
        term = (quantizer, q.extras) if quantizer.has_output_term else None
        layer = self._base_layer(entry.spec, q, quantizer)
        layer.term = term
        return layer

    def _base_layer(self, spec: dict[str, Any], q, quantizer) -> _Layer:
        rows, act = q.shape[0], spec.get("activations", "none")
        if self.as_float:
            return _Layer("float", weight=quantizer.dequantize(q).to(torch.float32))
        ternary_codes = spec["name"] in TERNARY_CODES
        if ((ternary_codes or spec["name"] == "int8") and spec.get("granularity") in ("tensor", "channel")
                and act in ("int8", "none")):
            scale = q.scales.reshape(-1).float().expand(rows).contiguous()
            if ternary_codes and act == "int8":
                return _Layer("ternary", True, q.codes, scale)
            return _Layer("int8", act == "int8", q.codes, scale)  # ternary codes without activation quantization too
        weight = quantizer.dequantize(q).to(torch.float32)
        if spec["name"] in ("fp32", "fp16", "bf16") and act == "none":
            return _Layer("float", weight=weight)
        return _Layer("reference", weight=weight, quantizer=quantizer)

    def op(self, layer: _Layer) -> nn.Module:
        if self.dense is not None:
            op = self._dense_op(layer)
        elif layer.kind == "ternary":
            op = TernaryLinear(layer.codes, layer.scale, self.backend, self.device)
        elif layer.kind == "int8":
            op = Int8Linear(layer.codes, layer.scale, layer.act_int8, self.backend, self.device)
        elif layer.kind == "float":
            op = _float_linear(layer.weight.to(self.device))
        else:
            op = ReferenceLinear(layer.weight.to(self.device), layer.quantizer)
        if layer.term is not None:
            op = WithOutputTerm(op, *layer.term, device=self.device)
        return op

    def _dense_op(self, layer: _Layer) -> nn.Module:
        if layer.kind in ("ternary", "int8"):  # integer codes (exact in 16 bits) and row scales
            return DenseLinear(layer.codes, layer.scale, layer.act_int8, None, self.dense, self.device)
        quantizer = layer.quantizer if layer.kind == "reference" else None
        return DenseLinear(layer.weight, None, False, quantizer, self.dense, self.device)

    def ops(self, prefix: str, names: tuple[str, ...], fused: str) -> dict[str, nn.Module]:
        layers = [self.layer(f"{prefix}.{n}_proj") for n in names]
        f = _fuse(layers)
        if f is not None:
            return {fused: self.op(f)}
        return {n: self.op(x) for n, x in zip(names, layers, strict=True)}

    def build(self, cls):
        cfg = self.cfg
        blocks = []
        for i in range(cfg.n_layers):
            p = f"blocks.{i}"
            ops = {**self.ops(f"{p}.attn", ("q", "k", "v"), "qkv"), "o": self.op(self.layer(f"{p}.attn.o_proj"))}
            ops.update(self.ops(f"{p}.mlp", ("gate", "up"), "gate_up"))
            ops["down"] = self.op(self.layer(f"{p}.mlp.down_proj"))
            norms = {"attn_norm": self.param(f"{p}.attn_norm.weight"), "mlp_norm": self.param(f"{p}.mlp_norm.weight")}
            if cfg.subln:
                norms.update(attn_sub_norm=self.param(f"{p}.attn.sub_norm.weight"),
                             mlp_sub_norm=self.param(f"{p}.mlp.sub_norm.weight"))
            blocks.append(RuntimeBlock(cfg, ops, norms))
            if self.block_hook is not None:
                self.block_hook(blocks[-1])
        embed_layer = self.layer("embed")
        if embed_layer.kind in ("ternary", "int8") and embed_layer.scale is not None:
            embed = Int8Embedding(embed_layer.codes, embed_layer.scale, self.device)
        else:
            embed = FloatEmbedding(embed_layer.weight.to(self.device))
        # a tied head reads the embedding's codes (same storage) under the embedding's spec
        tied = bool(self.by_name["lm_head"].get("tied_to"))
        head = self.op(embed_layer if tied else self.layer("lm_head"))
        norm = self.param("norm.weight")
        return cls(cfg, embed, blocks, norm, head, self.backend, self.device)


def load_tokenizer_json(text: str | None):
    """The checkpoint's tokenizer, or None when it has none (e.g. test checkpoints)."""
    if not text:
        return None
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_str(text)
    except Exception:
        return None


def load_inference_model(path: str | Path, kernels: str | None = None, device: str = "auto",
                         progress: Progress | None = None, weights: str = "auto") -> InferenceModel:
    """A packed checkpoint (or a training one, packed in memory) as an InferenceModel with its tokenizer.

    `kernels`: auto | reference | avx2 | avx512-vnni (default: $QTOOLKIT_KERNELS or auto);
    `device`: auto | cpu | cuda (`qtoolkit.device`); `progress`: hears of a first-use kernel build;
    `weights`: auto | packed | bf16 | fp16 | fp32, the weight layout (`InferenceModel.from_packed`;
    auto = bf16 on CUDA, the CPU kernels' layout on the CPU)."""
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.device import resolve_device
    from qtoolkit.pack import packed_form

    device = resolve_device(device)
    ckpt = packed_form(load_checkpoint(path))
    model = InferenceModel.from_packed(ckpt, kernels, device, _consume=True, progress=progress, weights=weights)
    model.tokenizer = load_tokenizer_json(ckpt.get("tokenizer"))
    model.source = str(ckpt["path"])
    return model


# ------------------------------------------------------------------------------ generation


@dataclass
class GenerationStats:
    """Filled in while `generate` runs."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0  # time for the forward passes after the first sampled token
    stopped_at_eos: bool = False
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else math.nan

    @property
    def decode_tok_s(self) -> float:
        steps = self.new_tokens - 1  # the first new token comes from the prefill's logits
        return steps / self.decode_s if steps > 0 and self.decode_s else math.nan

    def to_dict(self) -> dict[str, Any]:
        nan_none = lambda x: None if math.isnan(x) else x  # noqa: E731 (JSON has no NaN)
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "stopped_at_eos": self.stopped_at_eos, "token_ids": list(self.token_ids),
                "prefill_tok_s": nan_none(self.prefill_tok_s), "decode_tok_s": nan_none(self.decode_tok_s)}


def sample_next(logits: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> int:
    """One token id from logits (V,): argmax when temperature == 0, else softmax(logits / T)
    restricted to the top-k logits, drawn with `generator` (deterministic for a fixed seed)."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    logits = logits.float() / temperature
    if top_k is not None and 0 < top_k < logits.numel():
        values, indices = torch.topk(logits, top_k)
        probs = torch.softmax(values, dim=-1)
        return int(indices[torch.multinomial(probs.cpu(), 1, generator=generator)])
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None) -> None:
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not temperature >= 0 or math.isinf(temperature):
        raise ConfigError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be >= 1, got {top_k}")


def generate(model: InferenceModel, prompt_ids: Iterable[int], max_new_tokens: int = 64, temperature: float = 0.0,
             top_k: int | None = None, seed: int | None = 0, eos_id: int | None = None,
             stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled token ids, one at a time, stopping after `eos_id`.

    Prefill runs the prompt through the model once (filling a KV cache sized for prompt + new
    tokens); each further token is one decode step. A fixed `seed` makes sampling deterministic.
    Arguments are checked here, before the first token is asked for."""
    _check_sampling(max_new_tokens, temperature, top_k)
    if seed is not None:
        check_seed(seed)
    ids = list(prompt_ids)
    if not ids:
        raise ConfigError("the prompt is empty")
    if len(ids) + max_new_tokens > model.config.max_seq_len:
        raise ConfigError(f"prompt ({len(ids)} tokens) + max_new_tokens ({max_new_tokens}) exceed the model's "
                          f"context of {model.config.max_seq_len} tokens")
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(ids)
    return _generate(model, ids, max_new_tokens, temperature, top_k, seed, eos_id, stats)


def _generate(model: InferenceModel, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
              seed: int | None, eos_id: int | None, stats: GenerationStats) -> Iterator[int]:
    if model.static_decode:  # CUDA: fixed-shape steps replayed from a CUDA graph, sampling on the device
        return generate_static(model, ids, max_new_tokens, temperature, top_k, seed, eos_id, stats)
    return _generate_dynamic(model, ids, max_new_tokens, temperature, top_k, seed, eos_id, stats)


def _generate_dynamic(model: InferenceModel, ids: list[int], max_new_tokens: int, temperature: float,
                      top_k: int | None, seed: int | None, eos_id: int | None,
                      stats: GenerationStats) -> Iterator[int]:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    device = model.device
    cache = model.new_cache(1, len(ids) + max_new_tokens)
    t0 = time.perf_counter()
    logits = model(torch.tensor([ids], device=device), cache, last_only=True)[0, -1]
    stats.prefill_s = time.perf_counter() - t0
    step = torch.empty(1, 1, dtype=torch.long, device=device)
    for i in range(max_new_tokens):
        token = sample_next(logits, temperature, top_k, generator)
        stats.new_tokens += 1
        stats.token_ids.append(token)
        yield token
        if eos_id is not None and token == eos_id:
            stats.stopped_at_eos = True
            return
        if i + 1 < max_new_tokens:
            t = time.perf_counter()
            step.fill_(token)
            logits = model(step, cache)[0, -1]
            stats.decode_s += time.perf_counter() - t


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt, after the end-of-text token that separates training stories (so the
    prompt starts a document, as stories do in training)."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    eos = tokenizer.token_to_id(EOS)
    return ([eos] if eos is not None else []) + ids


def decode_stream(tokenizer, token_ids: Iterable[int]) -> Iterator[str]:
    """Text pieces as tokens arrive; a piece is held back while it ends inside a UTF-8 character."""
    ids: list[int] = []
    emitted = 0
    for token in token_ids:
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            continue
        if len(text) > emitted:
            yield text[emitted:]
            emitted = len(text)
    text = tokenizer.decode(ids, skip_special_tokens=False)
    if len(text) > emitted:
        yield text[emitted:]


def generate_text(model: InferenceModel, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  top_k: int | None = None, seed: int | None = 0, stop_at_eos: bool = True,
                  stats: GenerationStats | None = None) -> Iterator[str]:
    """`generate` from a text prompt with the checkpoint's tokenizer; yields decoded text pieces."""
    tok = model.tokenizer
    if tok is None:
        raise CheckpointError("this checkpoint carries no usable tokenizer; generate from token ids instead")
    eos = tok.token_to_id(EOS) if stop_at_eos else None
    ids = generate(model, encode_prompt(tok, prompt), max_new_tokens, temperature, top_k, seed, eos, stats)
    return decode_stream(tok, (t for t in ids if t != eos))


__all__ = ["DenseLinear", "GenerationStats", "InferenceModel", "Int8Embedding", "Int8Linear", "KVCache", "ReferenceLinear",
           "TernaryLinear", "WithOutputTerm", "decode_stream", "encode_prompt", "generate", "generate_text", "load_inference_model",
           "sample_next"]
