"""Packed checkpoints and the one memory model that predicts their bytes.

A model is stored as a list of *entries*, in module order:

    a quantizable module (Linear / Embedding)   its quantizer's packed tensors; an unquantized one is
                                                stored by the `fp32` quantizer (so it counts 4 B/weight)
    every other parameter (RMSNorm weights,     fp32 values
      Linear biases)
    a tied lm_head                              no tensors (it is the embedding's entry)

Any `nn.Module` packs this way, not only the decoder: `save_packed(model, path)` writes a module
quantized with `apply_policy` / `qtoolkit.quantize`, `load_packed(path, model)` rebuilds it into a
float instance of the same architecture (on the `meta` device or not), and `memory_plan(model)`
counts a live module. Quantizer state (learned or calibrated scales) is used when packing: codes
come from each layer's own quantizer.

`model_entries` builds that list from a model and a policy's coverage; `memory_plan` runs it on the
`meta` device (no memory, no time, any size) and sums each entry's quantizer `layout`;
`pack_model` runs the same entries over real weights and calls each quantizer's `pack`, which is
checked against the same `layout`. The predicted bytes therefore equal the bytes of the tensors
written, exactly; the file adds only the safetensors header (JSON metadata, reported separately).

File format (safetensors, loads without executing code):

    tensors     "<entry>.<suffix>" for every packed tensor, e.g.
                "blocks.0.attn.q_proj.codes"   uint8  (ceil(n/4),)   2-bit codes (bitpack.py)
                "blocks.0.attn.q_proj.scales"  fp32   (1, 1)         ternary alpha
                "lm_head.codes" int8 (V, d), "lm_head.scales" fp32 (V, 1), "norm.weight.values" fp32 (d,)
    metadata    format="qtoolkit", kind="packed", version="1", tokenizer=<tokenizer JSON>,
                meta=<JSON: model_config, policy, recipe, source, total_bytes, layers=[{name, kind,
                shape, spec, rule, tied_to, bytes, tensors: {suffix: key}}]>

Loading (`model_from_checkpoint`) rebuilds the decoder with `FrozenQuantLinear`/`FrozenQuantEmbedding`
modules whose weights are the dequantized stored codes; they quantize activations exactly as in
training and add the quantizer's output term from the stored extras (Tequila's bias, a correction). Dequantized weights are bit-identical to the fake-quantized training weights (the codes
and scales are the same and `dequantize` repeats the same float operations), so the packed model's
logits equal the training model's exactly on the same device: tolerance 0, tested.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit import quantizers
from qtoolkit.checkpoint import load_checkpoint, write_packed
from qtoolkit.config import ModelConfig
from qtoolkit.errors import CheckpointError, OutputError
from qtoolkit.layers import FROZEN_MODULES, QUANT_MODULES, FrozenQuantEmbedding, FrozenQuantLinear
from qtoolkit.model import DecoderLM, meta_model
from qtoolkit.outputs import check_outputs
from qtoolkit.policy import Coverage, Policy, build_model, live_coverage, set_by_name
from qtoolkit.quantizers.base import TensorLayout

FP32_SPEC = {"name": "fp32"}
PACKINGS = ("2bit", "base3")


@dataclass
class Entry:
    """One stored weight and how it is stored."""

    name: str  # module name ("blocks.0.attn.q_proj") or parameter name ("norm.weight")
    kind: str  # "linear" | "embedding" | "param"
    shape: tuple[int, ...]
    spec: dict[str, Any]  # canonical quantizer spec; fp32 for anything unquantized
    rule: str | None = None  # the policy rule that assigned it (None: not assigned, stored fp32)
    tied_to: str | None = None  # shares the weight of another entry: stores nothing itself
    _quantizer: quantizers.Quantizer | None = field(default=None, repr=False, compare=False)

    @property
    def quantizer(self) -> quantizers.Quantizer:
        if self._quantizer is None:
            self._quantizer = quantizers.build(self.spec)
        return self._quantizer

    @property
    def params(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def layout(self) -> dict[str, TensorLayout]:
        if self.tied_to is not None:
            return {}
        shape = self.shape if len(self.shape) == 2 else (1, self.params)  # 1-D params as one row
        return self.quantizer.layout(shape)

    @functools.cached_property
    def nbytes(self) -> int:  # an Entry is not changed after it is made (plans sum this often)
        return sum(t.nbytes for t in self.layout().values())

    @property
    def bits_per_weight(self) -> Fraction:
        return Fraction(8 * self.nbytes, self.params)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "spec": self.spec,
                "rule": self.rule, "tied_to": self.tied_to, "params": self.params, "bytes": self.nbytes,
                "bits_per_weight": float(self.bits_per_weight)}


def _with_packing(spec: dict[str, Any], packing: str | None) -> dict[str, Any]:
    if packing is None or spec["name"] != "ternary":
        return spec
    return {**spec, "packing": packing}


def model_entries(model: nn.Module, coverage: Coverage, packing: str | None = None) -> list[Entry]:
    """The stored entries of `model` under `coverage` (optionally forcing a ternary packing)."""
    if packing is not None and packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")
    entries: list[Entry] = []
    owners: dict[int, str] = {}  # id(weight) -> entry name that stores it
    covered: set[str] = set()
    built: dict[str, quantizers.Quantizer] = {}  # one (stateless) quantizer per spec: layouts, packing

    def entry(name, kind, shape, spec, rule=None, tied_to=None) -> Entry:
        spec = quantizers.canonical(spec)
        key = repr(sorted(spec.items()))
        if key not in built:
            built[key] = quantizers.build(spec)
        return Entry(name, kind, shape, spec, rule, tied_to, _quantizer=built[key])

    for a in coverage.layers:
        module = model.get_submodule(a.name)
        # the weight and its quantizer's parameters are the entry; a bias is a parameter of its own
        covered.update(f"{a.name}.{n}" for n, _ in module.named_parameters(recurse=True) if n != "bias")
        spec = _with_packing(a.spec, packing) if a.spec is not None else FP32_SPEC
        tied_to = owners.get(id(module.weight))
        owners.setdefault(id(module.weight), a.name)
        entries.append(entry(a.name, a.module_type, a.shape, spec, a.rule, tied_to))
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in covered:
            entries.append(entry(name, "param", tuple(p.shape), FP32_SPEC))
    return entries


@dataclass
class MemoryPlan:
    model_config: ModelConfig | None  # None for a module that is not a DecoderLM
    entries: list[Entry]
    warnings: list[tuple[str, str]] = field(default_factory=list)  # policy rules that assign nothing

    @property
    def total_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def params(self) -> int:
        return sum(e.params for e in self.entries if e.tied_to is None)

    @property
    def fp32_bytes(self) -> int:
        return 4 * self.params

    @property
    def compression(self) -> float:
        return self.fp32_bytes / self.total_bytes

    @property
    def correction_bytes(self) -> int:
        """Bytes of the low-rank corrections (part of their layers' bytes, counted in `total_bytes`)."""
        return sum(e.quantizer.correction_bytes(e.shape) for e in self.entries
                   if e.tied_to is None and isinstance(e.quantizer, quantizers.Corrected))

    def bytes_by_quantizer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in self.entries:
            if e.tied_to is None:
                out[e.spec["name"]] = out.get(e.spec["name"], 0) + e.nbytes
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_config": self.model_config.to_dict() if self.model_config is not None else None,
            "total_bytes": self.total_bytes,
            "params": self.params,
            "fp32_bytes": self.fp32_bytes,
            "compression_vs_fp32": self.compression,
            "bytes_by_quantizer": self.bytes_by_quantizer(),
            "correction_bytes": self.correction_bytes,
            "entries": [e.to_dict() for e in self.entries],
            "warnings": [list(w) for w in self.warnings],
        }


def memory_plan(model: ModelConfig | nn.Module, policy: Policy | dict[str, Any] | str | Path | None = None,
                packing: str | None = None, blocks: str | None = None) -> MemoryPlan:
    """Exact stored bytes, per entry, of a model under a policy.

    `model` is a ModelConfig (the decoder is built on the `meta` device: no weights, any size) or a
    live nn.Module. For a module, `policy=None` counts it as it is (the quantizers it carries);
    a policy counts it as if that policy were applied (`blocks` as in `apply_policy`)."""
    if isinstance(model, nn.Module):
        coverage = live_coverage(model) if policy is None else Policy.load(policy).resolve(model, blocks)
        return MemoryPlan(_config_of(model), model_entries(model, coverage, packing), coverage.warnings)
    if policy is None:
        raise TypeError("memory_plan(model_config, policy): a model config needs a policy")
    decoder = meta_model(model)
    coverage = Policy.load(policy).resolve(decoder, blocks)
    return MemoryPlan(model, model_entries(decoder, coverage, packing), coverage.warnings)


def _config_of(model: nn.Module) -> ModelConfig | None:
    cfg = getattr(model, "config", None)
    return cfg if isinstance(cfg, ModelConfig) else None


# ------------------------------------------------------------------------------ packing


def _weight(model: nn.Module, entry: Entry) -> Tensor:
    if entry.kind == "param":
        return model.get_parameter(entry.name).detach().reshape(1, -1)
    return model.get_submodule(entry.name).weight.detach()


def _model_quantizer(model: nn.Module, entry: Entry) -> quantizers.Quantizer:
    """The quantizer that computes the entry's codes: the module's own one when it has one
    (learned scales live there). It may differ from `entry.quantizer` only in storage options
    (a `packing` override), which is why packing goes through `entry.quantizer`."""
    if entry.kind != "param":
        module = model.get_submodule(entry.name)
        if isinstance(module, QUANT_MODULES):
            return module.quantizer
    return entry.quantizer


@torch.no_grad()
def pack_model(model: nn.Module, coverage: Coverage | None = None, packing: str | None = None
               ) -> tuple[dict[str, Tensor], list[Entry]]:
    """Packed tensors {"<entry>.<suffix>": tensor} of a (fake-quantized) model, and its entries.
    `coverage` defaults to what the model carries (`policy.live_coverage`)."""
    if any(isinstance(m, FROZEN_MODULES) for m in model.modules()):
        raise CheckpointError("this model holds deployed (frozen) layers, i.e. it was loaded from a packed "
                              "checkpoint: it is already packed")
    entries = model_entries(model, coverage if coverage is not None else live_coverage(model), packing)
    tensors: dict[str, Tensor] = {}
    for e in entries:
        if e.tied_to is not None:
            continue
        codes = _model_quantizer(model, e).quantize(_weight(model, e).float().cpu())
        packed = e.quantizer.pack(codes)
        tensors.update({f"{e.name}.{suffix}": t for suffix, t in packed.items()})
    return tensors, entries


@dataclass
class PackResult:
    path: Path
    predicted_bytes: int  # memory_plan's figure
    tensor_bytes: int  # sum of the bytes of the tensors written
    file_bytes: int  # size on disk
    fp32_bytes: int
    plan: MemoryPlan

    @property
    def overhead_bytes(self) -> int:
        return self.file_bytes - self.tensor_bytes

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "predicted_bytes": self.predicted_bytes, "tensor_bytes": self.tensor_bytes,
                "file_bytes": self.file_bytes, "overhead_bytes": self.overhead_bytes, "fp32_bytes": self.fp32_bytes,
                "plan": self.plan.to_dict()}


def save_packed(model: nn.Module, path: str | Path, coverage: Coverage | None = None, packing: str | None = None,
                *, tokenizer: str = "", meta: dict[str, Any] | None = None) -> PackResult:
    """Write the packed (deployment) form of any quantized module: a safetensors file whose tensors
    are exactly the bytes `memory_plan(model)` predicts. `coverage` defaults to what the model
    carries; `meta` adds to (or overrides) the header metadata. Atomic."""
    coverage = coverage if coverage is not None else live_coverage(model)
    tensors, entries = pack_model(model, coverage, packing)
    plan = MemoryPlan(_config_of(model), entries)
    header = {
        "model_config": plan.model_config.to_dict() if plan.model_config is not None else None,
        "policy": {a.name: _with_packing(a.spec, packing) for a in coverage.layers if a.spec is not None},
        "total_bytes": plan.total_bytes,
        "layers": [{**e.to_dict(), "tensors": {s: f"{e.name}.{s}" for s in e.layout()}} for e in entries],
        **(meta or {}),
    }
    path = write_packed(tensors, header, tokenizer, path)
    tensor_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return PackResult(path, plan.total_bytes, tensor_bytes, os.path.getsize(path), plan.fp32_bytes, plan)


def pack_checkpoint(ckpt_path: str | Path, out: str | Path, packing: str | None = None,
                    overwrite: bool = False) -> PackResult:
    """Write the packed (deployment) form of a training checkpoint. An existing file at `out` is
    refused unless `overwrite` (a packed file packed from an earlier state of a run is not lost)."""
    check_outputs([("output", out, "packed")], [ckpt_path])
    if Path(out).exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it or -o another path "
                          "(nothing was written)")
    ckpt = load_checkpoint(ckpt_path)
    if ckpt["kind"] != "train":
        raise CheckpointError(f"{ckpt['path']}: already a packed checkpoint")
    model_config = ModelConfig.from_dict(ckpt["model_config"])
    model, coverage = model_from_checkpoint(ckpt)
    plan = memory_plan(model_config, ckpt["policy"], packing)  # predicted on `meta`, independently of the weights
    policy = {k: _with_packing(quantizers.canonical(v), packing) for k, v in ckpt["policy"].items()}
    meta = {
        "policy": policy,
        "recipe": ckpt.get("recipe", {}),
        "source": {"checkpoint": str(ckpt["path"]), "step": ckpt.get("step"), "metrics": ckpt.get("metrics", {})},
    }
    result = save_packed(model, out, coverage, packing, tokenizer=ckpt["tokenizer"], meta=meta)
    result.predicted_bytes, result.plan = plan.total_bytes, plan
    return result


# ------------------------------------------------------------------------------ loading


def unpack_layer(ckpt: dict[str, Any], layer: dict[str, Any], consume: bool = False
                 ) -> tuple[Entry, quantizers.QTensor]:
    """(entry, QTensor) of one layer record of a packed checkpoint; `consume` pops its tensors
    from `ckpt["tensors"]` so they can be freed as soon as the caller is done with them."""
    entry = Entry(layer["name"], layer["kind"], tuple(layer["shape"]), layer["spec"], layer.get("rule"),
                  layer.get("tied_to"))
    shape = entry.shape if len(entry.shape) == 2 else (1, entry.params)
    tensors = ckpt["tensors"]
    try:
        parts = {s: (tensors.pop(k) if consume else tensors[k]) for s, k in layer["tensors"].items()}
        return entry, entry.quantizer.unpack(parts, shape)
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{ckpt['path']}: layer {entry.name}: damaged packed data ({e})") from None


def packed_form(ckpt: dict[str, Any]) -> dict[str, Any]:
    """A loaded checkpoint of either kind in its packed form, in memory: a packed one as it is, a
    training one packed as `qtool pack` would write it (default packings; nothing is written)."""
    if ckpt["kind"] == "packed":
        return ckpt
    model, coverage = model_from_checkpoint(ckpt)
    tensors, entries = pack_model(model, coverage)
    layers = [{**e.to_dict(), "tensors": {s: f"{e.name}.{s}" for s in e.layout()}} for e in entries]
    return {"kind": "packed", "model_config": ckpt["model_config"], "policy": ckpt["policy"], "layers": layers,
            "tensors": tensors, "tokenizer": ckpt["tokenizer"], "path": ckpt["path"],
            "recipe": ckpt.get("recipe", {}), "source": {"checkpoint": str(ckpt["path"]), "step": ckpt.get("step")}}


def unpack_layers(ckpt: dict[str, Any]) -> dict[str, tuple[Entry, quantizers.QTensor]]:
    """{entry name: (entry, QTensor)} of a packed checkpoint; tied entries are left out."""
    return {layer["name"]: unpack_layer(ckpt, layer) for layer in ckpt["layers"] if not layer.get("tied_to")}


def load_packed(source: str | Path | dict[str, Any], model: nn.Module) -> nn.Module:
    """Load a packed file into `model`, a float instance of the architecture it was saved from (its
    weights may live on the `meta` device: they are replaced). Quantized layers become
    `FrozenQuantLinear`/`FrozenQuantEmbedding` holding the dequantized stored codes; every other
    stored parameter is set by name. Returns `model` (changed in place)."""
    ckpt = source if isinstance(source, dict) else load_checkpoint(source)
    if ckpt["kind"] != "packed":
        raise CheckpointError(f"{ckpt['path']}: a training checkpoint, not a packed one (load it with "
                              "qtoolkit.pack.model_from_checkpoint)")
    _check_fits(ckpt, model)
    for name, (entry, q) in unpack_layers(ckpt).items():
        weight = entry.quantizer.dequantize(q).to(torch.float32)
        if entry.kind == "param":
            set_by_name(model, name, nn.Parameter(weight.reshape(entry.shape), requires_grad=False))
        elif entry.spec["name"] == "fp32" and entry.rule is None:  # never quantized: a plain float module
            module = model.get_submodule(name)
            module.weight = nn.Parameter(weight, requires_grad=False)
        else:
            cls = FrozenQuantEmbedding if entry.kind == "embedding" else FrozenQuantLinear
            set_by_name(model, name, cls(weight, entry.quantizer, q.extras))
    for layer in ckpt["layers"]:
        if layer.get("tied_to"):
            set_by_name(model, layer["name"], _tied(model.get_submodule(layer["tied_to"]), layer["kind"]))
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"{ckpt['path']}: holds no weights for {left[0]} of this model "
                              f"({len(left)} parameters missing); it was saved from another architecture")
    return model


def _check_fits(ckpt: dict[str, Any], model: nn.Module) -> None:
    """Every stored entry exists in `model` with the same shape (else one error naming the first)."""
    for layer in ckpt["layers"]:
        name, shape = layer["name"], tuple(layer["shape"])
        try:
            have = (model.get_parameter(name) if layer["kind"] == "param" else model.get_submodule(name).weight).shape
        except AttributeError:
            raise CheckpointError(f"{ckpt['path']}: stores {name}, which this model does not have; "
                                  "it was saved from another architecture") from None
        if tuple(have) != shape:
            raise CheckpointError(f"{ckpt['path']}: {name} is {shape} in the file but {tuple(have)} in this model")


def model_from_packed(ckpt: dict[str, Any]) -> DecoderLM:
    """An inference DecoderLM from a packed checkpoint (dequantized weights, frozen quantizers)."""
    if ckpt.get("model_config") is None:
        raise CheckpointError(f"{ckpt['path']}: a packed module that is not a qtoolkit DecoderLM; build the "
                              "model and load it with qtoolkit.pack.load_packed(path, model)")
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    with torch.device("meta"):
        model = DecoderLM(cfg)
    load_packed(ckpt, model)
    model.rope_cos, model.rope_sin = (t.to("cpu") for t in _rope(cfg))
    model.eval()
    return model


def _rope(cfg: ModelConfig) -> tuple[Tensor, Tensor]:
    from qtoolkit.model import rope_tables

    return rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)


def _tied(source: nn.Module, kind: str) -> nn.Module:
    """The other half of a tied embedding/head pair, sharing the source's weight (and quantizer)."""
    if isinstance(source, (FrozenQuantLinear, FrozenQuantEmbedding)):
        cls = FrozenQuantLinear if kind == "linear" else FrozenQuantEmbedding
        return cls(source.weight, source.quantizer, source.extras)
    rows, cols = source.weight.shape
    module = nn.Linear(cols, rows, bias=False, device="meta") if kind == "linear" else nn.Embedding(rows, cols, device="meta")
    module.weight = source.weight
    return module


def model_from_checkpoint(ckpt: dict[str, Any]) -> tuple[DecoderLM, Coverage | None]:
    """The model of a loaded checkpoint of either kind: (model, coverage).

    Training checkpoints give the fake-quantized training model (with its coverage); packed ones
    the inference model (coverage None).
    """
    if ckpt["kind"] == "packed":
        return model_from_packed(ckpt), None
    model, coverage = build_model(ModelConfig.from_dict(ckpt["model_config"]), ckpt["policy"])
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:  # quantizer state of the wrong shape (verify bounds it, not its exact shape)
        reason = (str(e).strip().splitlines() or ["state dict mismatch"])[-1].strip()[:200]
        raise CheckpointError(f"{ckpt['path']}: weights do not fit the model ({reason})") from None
    return model, coverage


__all__ = ["Entry", "MemoryPlan", "PackResult", "load_packed", "memory_plan", "model_entries", "model_from_checkpoint",
           "model_from_packed", "pack_checkpoint", "pack_model", "packed_form", "save_packed", "unpack_layer",
           "unpack_layers"]
