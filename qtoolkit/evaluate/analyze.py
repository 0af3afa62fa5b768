"""Layer-wise quantization analysis of a checkpoint (`qtool analyze`).

For every quantizable layer (linears, embedding) the report gives its storage (quantizer, spec,
bits per weight including scales, bytes — from the same memory model as `qtool plan`) and what
the stored codes look like:

    zeros, plus, minus   fractions of codes equal to 0, +1, -1 (ternary; `zeros` also for int8)
    alpha                the scale(s): value, or mean/min/max over rows or groups
    entropy_bits         Shannon entropy of the code distribution, in bits per weight: the lower
                         bound an entropy coder could reach, beside the 2.0 / 1.6 code bits stored
    near_threshold       fraction of latent weights within `band` of a rounding threshold,
                         | |W / alpha| - 0.5 | < band (default 0.05): the "dead-zone trapping"
                         weights that a tiny update would flip between 0 and +-1 (Tequila)
    sqnr_db              10 log10(|W|^2 / |W - Q(W)|^2) of the layer's weights (None when exact)
    method               what is particular to the layer's method (`Quantizer.stats`), e.g.
                         sherry: zero_fraction, groups_with_one_zero (1.0: one zero in every 4),
                                 zero_position (share of groups with the zero at position 0..3)
                         tequila: dead_zone (share of codes at 0), bias_abs_mean, bias_abs_max
                         a correction: correction_rank, correction_bytes, correction_share (of
                                 the layer's bytes), gate_abs_mean
                         elastic activations: act_step, act_offset

Ternary-like formats (ternary, sherry, tequila) all report zeros/plus/minus/entropy; binary reports
plus/minus; ptqtp reports zeros/plus/minus over the trits of both planes and the entropy of the nine
(T1, T2) pairs; intn the entropy of its 2^b codes. Every format reports `sqnr_db`.

`near_threshold` and `sqnr_db` need the latent float weights, so they are None for packed
checkpoints; everything else agrees exactly between a packed checkpoint and the training
checkpoint it came from (the codes and scales are the same).

Aggregates: per block and per module kind (zero fractions are parameter-weighted, i.e. the share of
zero codes among all ternary weights of the group), the paper's middle-vs-boundary comparison
(middle blocks default to the paper's L5-L9 of 12, scaled to the model's depth), and model totals
against fp32, with the method statistics per quantizer (parameter-weighted means) and the
low-rank corrections' bytes and share of the model's bytes.

`analyze_checkpoint(path, as_policy=...)` analyses a float (or any training) checkpoint "as if"
quantized under another policy, e.g. `{"_default": "ternary"}`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit import quantizers
from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError
from qtoolkit.layers import QUANT_MODULES
from qtoolkit.model import layer_position
from qtoolkit.pack import Entry, memory_plan, model_from_checkpoint, unpack_layers
from qtoolkit.policy import Policy
from qtoolkit.quantizers.base import QTensor, grouped, ungrouped
from qtoolkit.quantizers.ptqtp import PTQTPQuantizer

SCHEMA_VERSION = 3  # 2: qtoolkit_version and recipe; 3: layers[].method, totals.methods / correction_bytes / correction_share
TERNARY_LIKE = ("ternary", "sherry", "tequila")  # int8 codes in {-1, 0, +1}
CODE_BITS = {"sherry": 1.25, "binary": 1.0, "int8": 8.0}  # code bits per weight (ternary: by packing)
DEFAULT_BAND = 0.05


@dataclass
class LayerStats:
    name: str
    block: int | None
    kind: str  # q k v o gate up down | embed | lm_head
    quantizer: str
    spec: dict[str, Any]
    rule: str | None
    shape: list[int]
    params: int
    bits_per_weight: float  # stored, scales included
    bytes: int
    code_bits: float | None = None  # code bits per weight without scales (2.0 / 1.6 / 8)
    zeros: float | None = None
    plus: float | None = None
    minus: float | None = None
    alpha: dict[str, float] | None = None  # {"mean", "min", "max", "count"}
    entropy_bits: float | None = None
    near_threshold: float | None = None
    sqnr_db: float | None = None
    method: dict[str, Any] | None = None  # Quantizer.stats (module docstring)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Analysis:
    checkpoint: str
    kind: str  # "train" | "packed"
    step: int | None
    as_policy: dict[str, Any] | None
    model_config: dict[str, Any]
    band: float
    layers: list[LayerStats]
    blocks: list[dict[str, Any]] = field(default_factory=list)
    kinds: dict[str, dict[str, Any]] = field(default_factory=dict)
    middle_vs_boundary: dict[str, Any] | None = None
    totals: dict[str, Any] = field(default_factory=dict)
    recipe: str | None = None  # the name of the recipe the checkpoint was trained with

    def to_dict(self) -> dict[str, Any]:
        from qtoolkit import __version__

        return {
            "schema_version": SCHEMA_VERSION,
            "qtoolkit_version": __version__,
            "checkpoint": self.checkpoint,
            "recipe": self.recipe,
            "kind": self.kind,
            "step": self.step,
            "as_policy": self.as_policy,
            "model_config": self.model_config,
            "band": self.band,
            "layers": [x.to_dict() for x in self.layers],
            "blocks": self.blocks,
            "kinds": self.kinds,
            "middle_vs_boundary": self.middle_vs_boundary,
            "totals": self.totals,
        }

    def layer(self, name: str) -> LayerStats:
        return next(x for x in self.layers if x.name == name)


# ------------------------------------------------------------------------------ per layer


def entropy_bits(counts: Tensor) -> float:
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return float(-(p * p.log2()).sum())


def code_stats(q: QTensor, spec: dict[str, Any]) -> dict[str, Any]:
    """Statistics of stored codes and scales (needs no latent weights)."""
    out: dict[str, Any] = {}
    name = spec["name"]
    if name in TERNARY_LIKE or name in ("int8", "binary"):
        codes = q.codes.reshape(-1).to(torch.int16)
        lo = -128 if name == "int8" else -1
        counts = torch.bincount((codes - lo).to(torch.int64), minlength=1 - 2 * lo)
        n = codes.numel()
        out["zeros"] = float(counts[-lo]) / n
        out["entropy_bits"] = entropy_bits(counts)
        if name != "int8":
            out["minus"], out["plus"] = float(counts[0]) / n, float(counts[2]) / n
        out["code_bits"] = CODE_BITS.get(name) or 8 / (5 if spec.get("packing") == "base3" else 4)
    elif name == "ptqtp":  # two ternary planes: trit fractions over both, entropy of the 9 (T1, T2) pairs
        t1, t2 = PTQTPQuantizer.planes(q.codes)
        trits = torch.cat([t1.reshape(-1), t2.reshape(-1)]).to(torch.int64) + 1
        counts = torch.bincount(trits, minlength=3)
        n = trits.numel()
        out["zeros"], out["minus"], out["plus"] = (float(counts[i]) / n for i in (1, 0, 2))
        out["entropy_bits"] = entropy_bits(torch.bincount(q.codes.reshape(-1).to(torch.int64) + 4, minlength=9))
        out["code_bits"] = 2 * 8 / (5 if spec.get("packing") == "base3" else 4)
    elif name == "intn":
        half = 2 ** (spec["bits"] - 1)
        out["entropy_bits"] = entropy_bits(torch.bincount(q.codes.reshape(-1).to(torch.int64) + half, minlength=2 * half))
        out["code_bits"] = float(spec["bits"])
    if "code_bits" in out:
        s = q.scales.double()
        out["alpha"] = {"mean": float(s.mean()), "min": float(s.min()), "max": float(s.max()), "count": s.numel()}
    return out


def latent_stats(w: Tensor, q: QTensor, quantizer: quantizers.Quantizer, band: float) -> dict[str, Any]:
    """Statistics that need the latent weight `w`."""
    w = w.detach().double()
    err = (w - quantizer.dequantize(q).double()).pow(2).sum()
    out: dict[str, Any] = {"sqnr_db": None if err == 0 else float(10 * torch.log10(w.pow(2).sum() / err))}
    if quantizer.name in ("ternary", "tequila"):  # round-to-nearest thresholds at |W / alpha| = 1/2
        cfg = quantizer.config
        v = ungrouped(grouped(w, cfg.granularity, cfg.group_size) / q.scales.double().unsqueeze(-1), q.shape)
        out["near_threshold"] = float(((v.abs() - 0.5).abs() < band).double().mean())
    return out


def _layer(entry: Entry, q: QTensor, quantizer: quantizers.Quantizer, latent: Tensor | None,
           band: float) -> LayerStats:
    block, kind = layer_position(entry.name)
    stats = LayerStats(
        name=entry.name, block=block, kind=kind, quantizer=entry.spec["name"], spec=entry.spec, rule=entry.rule,
        shape=list(entry.shape), params=entry.params, bits_per_weight=float(entry.bits_per_weight),
        bytes=entry.nbytes, **code_stats(q, entry.spec), method=quantizer.stats(q) or None,
    )
    if latent is not None:
        for k, v in latent_stats(latent, q, quantizer, band).items():
            setattr(stats, k, v)
    return stats


# ------------------------------------------------------------------------------ aggregates


def middle_blocks(n_layers: int, middle: tuple[int, int] | None = None) -> list[int]:
    """The paper's middle blocks (L5-L9 of 12, i.e. [4, 9)) scaled to `n_layers`, or `middle`."""
    lo, hi = middle if middle is not None else (round(n_layers * 4 / 12), round(n_layers * 9 / 12))
    if not 0 <= lo < hi <= n_layers:
        raise ConfigError(f"middle blocks [{lo}, {hi}) do not fit a model with {n_layers} blocks")
    return list(range(lo, hi))


def _weighted(layers: list[LayerStats], attr: str) -> float | None:
    pts = [(getattr(x, attr), x.params) for x in layers if getattr(x, attr) is not None]
    if not pts:
        return None
    return sum(v * n for v, n in pts) / sum(n for _, n in pts)


def _group(layers: list[LayerStats]) -> dict[str, Any]:
    ternary = [x for x in layers if x.quantizer in TERNARY_LIKE]
    alphas = [x.alpha["mean"] for x in ternary if x.alpha]
    return {
        "layers": len(layers),
        "params": sum(x.params for x in layers),
        "bytes": sum(x.bytes for x in layers),
        "bits_per_weight": 8 * sum(x.bytes for x in layers) / max(1, sum(x.params for x in layers)),
        "quantizers": sorted({x.quantizer for x in layers}),
        "ternary_layers": len(ternary),
        "zeros": _weighted(ternary, "zeros"),
        "entropy_bits": _weighted(ternary, "entropy_bits"),
        "near_threshold": _weighted(ternary, "near_threshold"),
        "alpha_mean": sum(alphas) / len(alphas) if alphas else None,
        "sqnr_db": _weighted([x for x in layers if x.sqnr_db is not None and math.isfinite(x.sqnr_db)], "sqnr_db"),
    }


def aggregate(analysis: Analysis, n_layers: int, middle: tuple[int, int] | None = None) -> None:
    layers = analysis.layers
    analysis.blocks = [
        {"block": b, **_group([x for x in layers if x.block == b])} for b in range(n_layers)
    ]
    order = ["embed", "q", "k", "v", "o", "gate", "up", "down", "lm_head"]
    kinds = sorted({x.kind for x in layers}, key=lambda k: order.index(k) if k in order else len(order))
    analysis.kinds = {k: _group([x for x in layers if x.kind == k]) for k in kinds}
    mids = middle_blocks(n_layers, middle)
    bounds = [b for b in range(n_layers) if b not in mids]
    mid_layers = [x for x in layers if x.block in mids and x.quantizer in TERNARY_LIKE]
    bound_layers = [x for x in layers if x.block in bounds and x.quantizer in TERNARY_LIKE]
    if mid_layers and bound_layers:
        m, b = _weighted(mid_layers, "zeros"), _weighted(bound_layers, "zeros")
        analysis.middle_vs_boundary = {
            "middle_blocks": mids, "boundary_blocks": bounds,
            "middle_zeros": m, "boundary_zeros": b, "difference": m - b,
        }


# ------------------------------------------------------------------------------ entry point


def _policy_from(as_policy: Any) -> dict[str, Any]:
    """A quantizer spec ("ternary", {"name": ...}) means {_default: spec}; else a policy/path."""
    if isinstance(as_policy, (str, dict)):
        try:
            quantizers.build(as_policy)
            return {"_default": as_policy}
        except Exception:  # not a spec: a policy mapping or a policy file
            pass
    return Policy.load(as_policy).to_dict()


@torch.no_grad()
def analyze_checkpoint(
    path: str | Path,
    as_policy: Any = None,
    band: float = DEFAULT_BAND,
    middle: tuple[int, int] | None = None,
) -> Analysis:
    """Per-layer and aggregate quantization statistics of a training or packed checkpoint."""
    if not 0 < band < 0.5:
        raise ConfigError(f"band must be in (0, 0.5), got {band}")
    ckpt = load_checkpoint(path)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    policy = ckpt["policy"]
    if as_policy is not None:
        if ckpt["kind"] == "packed":
            raise ConfigError(f"{ckpt['path']}: --as needs latent float weights; a packed checkpoint has none")
        policy = _policy_from(as_policy)

    plan = memory_plan(cfg, policy)
    entries = {e.name: e for e in plan.entries if e.kind != "param"}
    layers: list[LayerStats] = []
    if ckpt["kind"] == "packed":
        for name, (entry, q) in unpack_layers(ckpt).items():
            if entry.kind != "param":
                layers.append(_layer(entries[name], q, entries[name].quantizer, None, band))
    else:
        model, _ = model_from_checkpoint(ckpt)
        for name, entry in entries.items():
            if entry.tied_to is not None:
                continue
            module = model.get_submodule(name)
            quantizer = _quantizer_for(module, entry)
            w = module.weight.detach().float()
            layers.append(_layer(entry, quantizer.quantize(w), quantizer, w, band))

    step = ckpt.get("step", ckpt.get("source", {}).get("step"))
    analysis = Analysis(
        checkpoint=str(ckpt["path"]), kind=ckpt["kind"], step=step,
        as_policy=policy if as_policy is not None else None, model_config=cfg.to_dict(), band=band, layers=layers,
        recipe=(ckpt.get("recipe") or {}).get("name"),
    )
    aggregate(analysis, cfg.n_layers, middle)
    analysis.totals = {
        "params": plan.params, "bytes": plan.total_bytes, "fp32_bytes": plan.fp32_bytes,
        "compression_vs_fp32": plan.compression, "bytes_by_quantizer": plan.bytes_by_quantizer(),
        "zeros": _weighted([x for x in layers if x.quantizer in TERNARY_LIKE], "zeros"),
        **method_totals(layers, plan.total_bytes),
    }
    return analysis


def method_totals(layers: list[LayerStats], total_bytes: int) -> dict[str, Any]:
    """Per quantizer, the parameter-weighted mean of each method statistic (elementwise for lists;
    bytes summed); and the corrections' bytes and their share of the model's bytes."""
    methods: dict[str, dict[str, Any]] = {}
    for name in sorted({x.quantizer for x in layers if x.method}):
        group = [x for x in layers if x.quantizer == name and x.method]
        weight = sum(x.params for x in group)
        agg: dict[str, Any] = {"layers": len(group)}
        for key in group[0].method:
            values = [(x.method.get(key), x.params) for x in group if x.method.get(key) is not None]
            if key.endswith("_bytes"):
                agg[key] = sum(v for v, _ in values)
            elif values and isinstance(values[0][0], list):
                agg[key] = [sum(v[i] * n for v, n in values) / weight for i in range(len(values[0][0]))]
            elif values and isinstance(values[0][0], (int, float)):
                agg[key] = sum(v * n for v, n in values) / sum(n for _, n in values)
        methods[name] = agg
    correction = sum(x.method.get("correction_bytes", 0) for x in layers if x.method)
    return {"methods": methods, "correction_bytes": correction, "correction_share": correction / total_bytes}


def _quantizer_for(module: nn.Module, entry: Entry) -> quantizers.Quantizer:
    """The module's own quantizer when the analysed spec is the trained one (learned scales live
    there); otherwise a fresh quantizer of the entry's spec initialised from the weight."""
    if isinstance(module, QUANT_MODULES) and module.quantizer.spec() == entry.spec:
        return module.quantizer
    q = quantizers.build(entry.spec)
    q.init_from_weight(module.weight.detach().float())
    return q


__all__ = ["SCHEMA_VERSION", "TERNARY_LIKE", "Analysis", "LayerStats", "analyze_checkpoint", "code_stats",
           "entropy_bits", "latent_stats", "method_totals", "middle_blocks"]
