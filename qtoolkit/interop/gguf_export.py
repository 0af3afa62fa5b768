"""Export a qtoolkit checkpoint to a GGUF file of llama.cpp's `llama` architecture.

    export_gguf(ckpt, out, type="tq2_0")  -> GGUFExportResult (per-tensor types, fallbacks, bytes)

The file is written with the `gguf` package (llama.cpp's own reader/writer) and holds:

    general.architecture = llama, general.name, general.file_type, general.quantization_version
    llama.{context_length, embedding_length, block_count, feed_forward_length, attention.head_count,
           attention.head_count_kv, attention.layer_norm_rms_epsilon, rope.freq_base,
           rope.dimension_count, vocab_size}
    the tokenizer (`gguf_vocab`)
    tensors   token_embd, blk.{i}.{attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate,
              ffn_up, ffn_down}, output_norm, output (absent when the head is tied to the embedding),
              each of the type `gguf_types` picks for its stored format

RoPE: llama.cpp's `llama` architecture rotates adjacent pairs (x[2i], x[2i+1]) of a head, qtoolkit
(like transformers) the pairs (x[i], x[i + hd/2]). The rows of attn_q and attn_k are therefore
permuted within each head, row i of a head going to 2i and row i + hd/2 to 2i + 1 (the permutation
llama.cpp's convert_hf_to_gguf applies to Llama checkpoints; attn_k by k/v head). Permuting output
rows permutes q and k alike, so q.k is unchanged; the codes and per-row scales move with their rows.

Not exported (ConversionError): `subln` models (the llama architecture has no sub-norms) and
tokenizers other than byte-level BPE.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from qtoolkit.checkpoint import atomic_path, load_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError, ConversionError
from qtoolkit.interop.gguf_types import TARGETS, GGUFTensor, convert
from qtoolkit.interop.gguf_vocab import add_vocab, gguf_vocab
from qtoolkit.pack import memory_plan, packed_form, unpack_layer

Progress = Callable[[str, int, "int | None"], None]
_BLOCK_NAMES = {"attn_norm": "attn_norm", "attn.q_proj": "attn_q", "attn.k_proj": "attn_k", "attn.v_proj": "attn_v",
                "attn.o_proj": "attn_output", "mlp_norm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
                "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
_FILE_TYPES = {"tq2_0": "MOSTLY_TQ2_0", "tq1_0": "MOSTLY_TQ1_0", "q8_0": "MOSTLY_Q8_0", "f16": "MOSTLY_F16"}


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


def gguf_name(name: str) -> str:
    """GGUF tensor name of a qtoolkit entry ("blocks.3.attn.q_proj" -> "blk.3.attn_q.weight")."""
    top = {"embed": "token_embd", "norm.weight": "output_norm", "lm_head": "output"}
    if name in top:
        return f"{top[name]}.weight"
    parts = name.split(".")
    if parts[0] == "blocks":
        rest = ".".join(parts[2:]).removesuffix(".weight")
        if rest in _BLOCK_NAMES:
            return f"blk.{parts[1]}.{_BLOCK_NAMES[rest]}.weight"
    raise ConversionError(f"{name}: no tensor of llama.cpp's llama architecture holds it")


def rope_permutation(n_heads: int, head_dim: int) -> np.ndarray:
    """Row order of attn_q/attn_k in GGUF: new row (h, 2i + j) is old row (h, i + j * hd/2)."""
    half = head_dim // 2
    return np.arange(n_heads * head_dim).reshape(n_heads, 2, half).swapaxes(1, 2).reshape(-1)


@dataclass
class GGUFExportResult:
    path: Path
    target: str
    tensors: list[GGUFTensor]
    file_bytes: int
    packed_bytes: dict[str, int]  # the qtoolkit packed checkpoint's tensor bytes, by ternary packing
    notes: list[str] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def fallbacks(self) -> list[GGUFTensor]:
        return [t for t in self.tensors if t.fallback]

    def types(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for t in self.tensors:
            out[t.ggml_type] = out.get(t.ggml_type, 0) + 1
        return out

    def to_dict(self) -> dict[str, Any]:
        errs = [t.scale_rel_err for t in self.tensors if t.scale_rel_err is not None]
        return {"path": str(self.path), "format": "gguf", "type": self.target, "file_bytes": self.file_bytes,
                "tensor_bytes": self.tensor_bytes, "packed_bytes": self.packed_bytes, "types": self.types(),
                "max_scale_rel_err": max(errs, default=None),
                "fallbacks": [{"name": t.name, "type": t.ggml_type, "why": t.fallback} for t in self.fallbacks],
                "tensors": [t.to_dict() for t in self.tensors], "notes": self.notes}


def _check(cfg: ModelConfig, target: str) -> None:
    if target not in TARGETS:
        raise ConfigError(f"--type must be one of {', '.join(TARGETS)}, got {target!r}")
    if cfg.subln:
        raise ConversionError("subln: llama.cpp's llama architecture has no sub-norms (RMSNorm before o_proj and "
                              "down_proj), so a subln model cannot be exported to GGUF")


def _tensors(ckpt: dict[str, Any], cfg: ModelConfig, target: str, progress: Progress) -> list[GGUFTensor]:
    layers = [layer for layer in ckpt["layers"] if not layer.get("tied_to")]
    out = []
    for i, layer in enumerate(layers):
        progress("converting tensors", i, len(layers))
        entry, q = unpack_layer(ckpt, layer)
        kind = entry.name.split(".")[-1]
        if kind in ("q_proj", "k_proj"):
            heads = cfg.n_heads if kind == "q_proj" else cfg.n_kv_heads
            order = rope_permutation(heads, cfg.head_dim)
            scales = q.scales if q.scales is None or q.scales.shape[0] == 1 else q.scales[order]
            q = type(q)(q.codes[order], scales, q.shape)
        out.append(convert(entry, q, target, gguf_name(entry.name)))
    progress("converting tensors", len(layers), len(layers))
    return out


def export_gguf(ckpt_path: str | Path, out: str | Path, target: str = "tq2_0", name: str | None = None,
                progress: Progress = _noop) -> GGUFExportResult:
    """Write CKPT (training or packed) as a llama-architecture GGUF file (see the module docstring)."""
    try:
        import gguf
    except ImportError:
        raise ConversionError("export --format gguf needs the gguf package: pip install 'qtoolkit[gguf]'") from None
    target = target.lower()
    ckpt = packed_form(load_checkpoint(ckpt_path))
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    _check(cfg, target)
    vocab = gguf_vocab(ckpt["tokenizer"], cfg.vocab_size)
    tensors = _tensors(ckpt, cfg, target, progress)
    out = Path(out)
    progress("writing gguf", 0, 1)
    with atomic_path(out) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name or Path(ckpt["path"]).parent.name)
        w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[target]])
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(cfg.vocab_size)
        w.add_context_length(cfg.max_seq_len)
        w.add_embedding_length(cfg.d_model)
        w.add_block_count(cfg.n_layers)
        w.add_feed_forward_length(cfg.d_ff)
        w.add_head_count(cfg.n_heads)
        w.add_head_count_kv(cfg.n_kv_heads)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_rope_dimension_count(cfg.head_dim)
        add_vocab(w, vocab)
        for t in tensors:
            raw = gguf.GGMLQuantizationType[t.ggml_type] if t.ggml_type not in ("F32", "F16") else None
            w.add_tensor(t.gguf_name, t.data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    progress("writing gguf", 1, 1)
    packed = {p: memory_plan(cfg, ckpt["policy"], p).total_bytes for p in ("2bit", "base3")}
    notes = []
    if vocab.padded:
        notes.append(f"{vocab.padded} unused token ids padded up to vocab_size={cfg.vocab_size}")
    if cfg.tie_embeddings:
        notes.append("tied head: no output.weight; llama.cpp uses token_embd for the head")
    return GGUFExportResult(out, target, tensors, os.path.getsize(out), packed, notes)


__all__ = ["GGUFExportResult", "export_gguf", "gguf_name", "rope_permutation"]
