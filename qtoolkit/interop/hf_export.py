"""Export a qtoolkit checkpoint as a transformers-loadable directory that runs the quantized model.

    export_hf(ckpt, out)  -> HFExportResult (per-layer: how it was exported)

The directory (`from_pretrained(out)` loads it; transformers and accelerate must be installed):

    config.json              LlamaForCausalLM (model_type llama), or BitNetForCausalLM (model_type bitnet,
                             hidden_act silu) for `subln` models: BitNet's attn_sub_norm / ffn_sub_norm
                             are qtoolkit's sub-norms before o_proj / down_proj. dtype float32.
                             quantization_config = {quant_method: bitnet, linear_class: autobitlinear,
                             quantization_mode: offline, modules_to_not_convert: [...]}
    model.safetensors        the weights under transformers' names (`hf_names`)
    tokenizer.json, tokenizer_config.json, generation_config.json
    README.md                model card: the policy, what was exported how, the tolerance

transformers' `bitnet` method (integrations/bitnet.py, AutoBitLinear offline) computes
    y = F.linear(ActQuant(x), W~) * weight_scale,   ActQuant: s = 127 / max(max|x|, 1e-5) per token,
                                                    round, clamp to [-128, 127], divide by s,
which is qtoolkit's ternary forward (absmean alpha per tensor, int8 per-token activations) with
weight_scale = alpha, up to float rounding (alpha multiplies after the matmul instead of before).
So a ternary layer with a per-tensor scale and int8 activations is exported as
    <module>.weight         uint8 (ceil(rows / 4), cols), transformers' 2-bit row-block layout:
                            byte [r, k] holds digits u = c + 1 of rows r, r + R, r + 2R, r + 3R
                            (R = rows / 4) at bits 0-1, 2-3, 4-5, 6-7
    <module>.weight_scale   float32 (1,) = alpha
Every other linear (channel or group scales, int8, ternary without activation quantization, float
formats, rows not a multiple of 4, a tied head) is exported as its dequantized float32 weight and
listed in `modules_to_not_convert`, so transformers runs it as a plain nn.Linear: exact for weight-only
formats (int8 weight-only, ternary with `activations: none`, fp16/bf16/fp32), but a layer that
quantized its input in qtoolkit (W8A8 int8, channel/group ternary) no longer does there; the result
says so per layer. The embedding and the norms are float32.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, ConversionError
from qtoolkit.interop import hf_names
from qtoolkit.pack import Entry, memory_plan, packed_form, unpack_layer
from qtoolkit.quantizers import QTensor

Progress = Callable[[str, int, "int | None"], None]
VALUES_PER_ITEM = 4  # ternary digits per byte in transformers' bitnet layout
EOS = "<|endoftext|>"


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


@dataclass
class ExportedLayer:
    name: str  # qtoolkit name
    hf_name: str
    spec: dict[str, Any]
    how: str  # "bitnet" | "float"
    exact: bool  # transformers computes what qtoolkit computes (up to float rounding)
    reason: str = ""  # why not bitnet

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "hf_name": self.hf_name, "spec": self.spec, "how": self.how,
                "exact": self.exact, "reason": self.reason}


@dataclass
class HFExportResult:
    path: Path
    architecture: str
    layers: list[ExportedLayer]
    file_bytes: int  # bytes of every file in the directory
    weights_bytes: int  # model.safetensors
    packed_bytes: int  # the qtoolkit packed checkpoint's tensor bytes (2-bit ternary)
    notes: list[str] = field(default_factory=list)

    @property
    def not_converted(self) -> list[str]:
        return [layer.hf_name for layer in self.layers if layer.how == "float"]

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "format": "hf", "architecture": self.architecture,
                "file_bytes": self.file_bytes, "weights_bytes": self.weights_bytes, "packed_bytes": self.packed_bytes,
                "bitnet_layers": sum(layer.how == "bitnet" for layer in self.layers),
                "modules_to_not_convert": self.not_converted, "layers": [x.to_dict() for x in self.layers],
                "notes": self.notes}


def pack_rows(codes: Tensor) -> Tensor:
    """transformers' bitnet packing of ternary codes (rows, cols), rows % 4 == 0: row i*R + r (R = rows / 4)
    goes to byte row r, bits 2i..2i+1, as the digit c + 1."""
    rows, cols = codes.shape
    u = (codes.to(torch.int16) + 1).to(torch.uint8).view(VALUES_PER_ITEM, rows // VALUES_PER_ITEM, cols)
    out = torch.zeros(rows // VALUES_PER_ITEM, cols, dtype=torch.uint8)
    for i in range(VALUES_PER_ITEM):
        out |= u[i] << (2 * i)
    return out


def unpack_rows(packed: Tensor) -> Tensor:
    """Inverse of `pack_rows`: int8 codes (4 * packed rows, cols)."""
    parts = [((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(VALUES_PER_ITEM)]
    return torch.cat(parts, dim=0)


def bitnet_reason(entry: Entry, q: QTensor, tied: bool) -> str:
    """Why transformers' AutoBitLinear cannot hold this layer ("" when it can)."""
    spec = entry.spec
    if entry.kind != "linear":
        return "not a linear"
    if tied:
        return "tied to the embedding"
    if spec["name"] != "ternary":
        return f"{spec['name']} (bitnet holds ternary layers)"
    if spec.get("granularity") != "tensor":
        return f"{spec['granularity']} scales (bitnet has one scale per tensor)"
    if spec.get("activations") != "int8":
        return "no activation quantization (bitnet always quantizes activations)"
    if q.shape[0] % VALUES_PER_ITEM:
        return f"{q.shape[0]} rows are not a multiple of 4 (bitnet's packing)"
    return ""


def _quantizes_input(spec: dict[str, Any]) -> bool:
    return spec.get("activations") == "int8"


def _hf_config(cfg: ModelConfig, modules_to_not_convert: list[str], eos: int | None, bitnet: bool):
    try:
        import transformers
    except ImportError:
        raise ConversionError("export --format hf needs transformers >= 5: pip install 'qtoolkit[hf]'") from None
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu",
        bos_token_id=eos, eos_token_id=eos, pad_token_id=None, attention_bias=False,
    )
    config_cls = transformers.BitNetConfig if cfg.subln else transformers.LlamaConfig
    config = config_cls(**common, rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta})
    config.architectures = ["BitNetForCausalLM" if cfg.subln else "LlamaForCausalLM"]
    if bitnet:  # a model without ternary layers is a plain float model: no quantization_config
        config.quantization_config = {"quant_method": "bitnet", "linear_class": "autobitlinear",
                                      "quantization_mode": "offline", "modules_to_not_convert": modules_to_not_convert,
                                      "use_rms_norm": False}
    config.dtype = torch.float32
    return config


def _model_card(cfg: ModelConfig, ckpt: dict[str, Any], layers: list[ExportedLayer], arch: str) -> str:
    bitnet = [x for x in layers if x.how == "bitnet"]
    floats = [x for x in layers if x.how == "float"]
    inexact = [x for x in floats if not x.exact]
    lines = [
        "---", "library_name: transformers", "tags: [qtoolkit, ternary, bitnet]", "---", "",
        f"# {Path(ckpt['path']).parent.name} (exported by qtoolkit)", "",
        f"A {arch} with {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads "
        f"({cfg.n_kv_heads} k/v heads), d_ff {cfg.d_ff}, vocabulary {cfg.vocab_size}, context {cfg.max_seq_len}.", "",
        "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(PATH)   # needs accelerate for the bitnet layers",
        "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```", "",
        "## Quantization policy (qtoolkit)", "", "```yaml", *(f"{k}: {json.dumps(v)}" for k, v in ckpt["policy"].items()),
        "```", "",
        "## How each layer was exported", "",
        f"* {len(bitnet)} ternary layers with one scale per tensor and int8 activations: transformers' `bitnet` "
        "quantization (AutoBitLinear, offline), 2-bit packed codes and `weight_scale` = alpha. "
        "transformers computes `F.linear(ActQuant(x), W~) * alpha`, qtoolkit's forward.",
        f"* {len(floats)} linear layers as dequantized float32 weights (`modules_to_not_convert`).",
        "* the embedding and the RMSNorm weights as float32.", "",
    ]
    if inexact:
        lines += ["Layers that quantized their input in qtoolkit but run unquantized activations here "
                  "(their outputs differ from qtoolkit's by the activation-quantization noise):", ""]
        lines += [f"* `{x.hf_name}` ({x.reason})" for x in inexact] + [""]
    if floats:
        lines += ["| layer | qtoolkit format | why not bitnet |", "|---|---|---|"]
        lines += [f"| {x.hf_name} | {x.spec['name']} | {x.reason} |" for x in floats] + [""]
    lines += ["Logits match qtoolkit's packed model up to float32 rounding when every layer is exact "
              "(tests/interop/test_hf_export.py states the tolerance)."]
    return "\n".join(lines) + "\n"


def _tokenizer_files(tokenizer_json: str, cfg: ModelConfig) -> dict[str, str]:
    try:
        tok = json.loads(tokenizer_json)
    except (json.JSONDecodeError, TypeError):
        raise ConversionError("the checkpoint's tokenizer is not tokenizer JSON") from None
    if not tok.get("model"):
        raise ConversionError("the checkpoint carries no tokenizer; transformers' directory needs one")
    has_eos = any(t.get("content") == EOS for t in tok.get("added_tokens", []))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.max_seq_len,
              "clean_up_tokenization_spaces": False}
    if has_eos:
        config.update(bos_token=EOS, eos_token=EOS)
    return {"tokenizer.json": tokenizer_json, "tokenizer_config.json": json.dumps(config, indent=2)}


def export_hf(ckpt_path: str | Path, out: str | Path, progress: Progress = _noop) -> HFExportResult:
    """Write CKPT (training or packed) as a transformers directory (see the module docstring).
    Refuses an OUT that exists and is not empty."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} already exists and is not an empty directory; choose another --out")
    ckpt = packed_form(load_checkpoint(ckpt_path))
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    tokenizer_files = _tokenizer_files(ckpt["tokenizer"], cfg)
    eos = json.loads(ckpt["tokenizer"]).get("model", {}).get("vocab", {}).get(EOS)
    tensors: dict[str, Tensor] = {}
    layers: list[ExportedLayer] = []
    records = [r for r in ckpt["layers"] if not r.get("tied_to")]
    for i, record in enumerate(records):
        progress("converting tensors", i, len(records))
        entry, q = unpack_layer(ckpt, record)
        hf = hf_names.to_hf(entry.name)
        if entry.kind == "param":
            tensors[hf] = entry.quantizer.dequantize(q).float().reshape(entry.shape).contiguous()
            continue
        tied = cfg.tie_embeddings and entry.name == "embed"
        reason = bitnet_reason(entry, q, tied)
        if entry.kind == "linear" and not reason:
            tensors[f"{hf}.weight"] = pack_rows(q.codes)
            tensors[f"{hf}.weight_scale"] = q.scales.reshape(1).float().clone()
            layers.append(ExportedLayer(entry.name, hf, entry.spec, "bitnet", True))
            continue
        tensors[f"{hf}.weight"] = entry.quantizer.dequantize(q).float().contiguous()
        if entry.kind == "linear":
            layers.append(ExportedLayer(entry.name, hf, entry.spec, "float", not _quantizes_input(entry.spec), reason))
    if cfg.tie_embeddings:  # the head is the embedding; transformers ties it from the config
        spec = next(r["spec"] for r in ckpt["layers"] if r["name"] == "embed")
        layers.append(ExportedLayer("lm_head", "lm_head", spec, "float", not _quantizes_input(spec), "tied to the embedding"))
    progress("converting tensors", len(records), len(records))

    not_converted = [x.hf_name for x in layers if x.how == "float"]
    config = _hf_config(cfg, not_converted, eos, any(x.how == "bitnet" for x in layers))
    arch = config.architectures[0]
    progress("writing files", 0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        config.save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        for name, text in tokenizer_files.items():
            (tmp / name).write_text(text)
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": eos, "eos_token_id": eos, "do_sample": False}, indent=2))
        (tmp / "README.md").write_text(_model_card(cfg, ckpt, layers, arch))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    progress("writing files", 1, 1)
    files = sum(p.stat().st_size for p in out.iterdir())
    notes = [f"{x.hf_name}: {x.spec['name']} quantized its input in qtoolkit; transformers runs it on float "
             "activations" for x in layers if not x.exact]
    return HFExportResult(out, arch, layers, files, (out / "model.safetensors").stat().st_size,
                          memory_plan(cfg, ckpt["policy"], "2bit").total_bytes, notes)


__all__ = ["ExportedLayer", "HFExportResult", "bitnet_reason", "export_hf", "pack_rows", "unpack_rows"]
