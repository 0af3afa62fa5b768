"""Sensitivity and sparsity probes (`qtool probe`, and the first step of `qtool search`).

Units. The probe (and the search) assign one format per *unit*: a single quantizable module
(`--units layer`: `blocks.3.attn.q_proj`, `embed`, `lm_head`) or a group (`--units group`: a
block's attention `blocks.3.attn` = q,k,v,o; its MLP `blocks.3.mlp` = gate,up,down; `embed`;
`lm_head`). Tied embeddings make `embed` and `lm_head` one unit.

Measured sensitivity. The base model is the checkpoint's latent weights in fp32, every unit
unquantized. For every unit u and candidate format f, the unit alone is fake-quantized to f
(weights and, where the spec says so, activations) and

    S(u, f) = L(u -> f) - L(base)         L = mean plain cross-entropy on the calibration batches

The calibration batches are a fixed, seeded set of training windows. Every S(u, f) uses the same
batches, so the comparisons are paired and their ranking is stable at small calibration sizes
(docs/search.md reports the rank stability). Inputs to every block are computed once with the
base model and cached, so probing a unit in block b reruns only blocks b..L-1 and the head.

Cheap estimate (one backward pass per calibration batch). With the empirical Fisher diagonal
F = mean over batches of g^2 (g = dL/dW of the base model),

    S~(u, f) = 1/2 * sum_i F_i * (Q_f(W)_i - W_i)^2

the second-order term of a Taylor expansion around a trained model (whose first-order term
vanishes in expectation). It ignores activation quantization. The probe reports how well it ranks
the (unit, format) pairs against the measured S: Spearman's rho, overall and per format.

Sparsity probe: per linear, the ternary zero fraction, near-threshold fraction and alpha of its
latent weights under the default ternary quantizer, computed by `qtoolkit.evaluate.analyze`.

Results are cached as JSON under `$QTOOLKIT_CACHE/probes/`, keyed by the checkpoint (path, size,
modification time), the calibration data and settings, the formats and the unit granularity. A
re-run loads them; a run stopped by `timeout` keeps what it measured and continues next time.
Non-finite losses raise `ProbeError` naming the unit and format.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit import quantizers
from qtoolkit.checkpoint import atomic_write_text, load_checkpoint
from qtoolkit.errors import CheckpointError, ConfigError, QToolkitError, short_repr
from qtoolkit.evaluate.analyze import code_stats, latent_stats
from qtoolkit.model import DecoderLM, layer_position
from qtoolkit.policy import apply_policy, set_by_name
from qtoolkit.training.data import CALIBRATION_STEP, calibration_batches  # noqa: F401 (re-exported)

Progress = Callable[[str, int, int | None], None]


class ProbeError(QToolkitError, RuntimeError):
    """A probe measurement that cannot be used (e.g. a non-finite loss)."""


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


# ------------------------------------------------------------------------------ formats and units


@dataclass(frozen=True)
class Format:
    key: str  # short, stable label: "ternary", "int8", "ternary(packing=base3)"
    spec: dict[str, Any]  # canonical spec


def format_key(spec: dict[str, Any]) -> str:
    """"ternary", "ternary(packing=base3)"; an alias's spec is keyed by the alias ("int4", "gptq3")."""
    alias = quantizers.alias_of(spec)
    if alias is not None:
        return alias
    defaults = quantizers.canonical(spec["name"])
    opts = ",".join(f"{k}={v}" for k, v in spec.items() if k != "name" and defaults.get(k) != v)
    return f"{spec['name']}({opts})" if opts else spec["name"]


def parse_formats(value: str | list[Any]) -> list[Format]:
    """"ternary,int8,fp16", or a YAML list of specs: "[{name: ternary, packing: base3}, int8]"."""
    from qtoolkit.yamlsafe import parse_yaml

    if isinstance(value, str):
        items = parse_yaml(value, "--formats") if value.strip().startswith("[") else [v.strip() for v in value.split(",") if v.strip()]
    else:
        items = list(value)
    if not isinstance(items, list):
        raise ConfigError(f"--formats takes ternary,int8,fp16 or a YAML list of specs, got {short_repr(value)}")
    if not items:
        raise ConfigError("--formats needs at least one quantizer")
    formats, seen = [], set()
    for item in items:
        spec = quantizers.canonical(item)
        key = format_key(spec)
        if key in seen:
            raise ConfigError(f"--formats lists {key} twice")
        seen.add(key)
        formats.append(Format(key, spec))
    return formats


@dataclass(frozen=True)
class Unit:
    name: str
    modules: tuple[str, ...]  # module names that take the unit's format
    shapes: tuple[tuple[int, int], ...]  # one per *stored* weight (a tied pair stores one)
    block: int | None  # the first block the unit touches (None: embed or lm_head)

    def nbytes(self, fmt: Format) -> int:
        q = quantizers.build(fmt.spec)
        return sum(q.nbytes(shape) for shape in self.shapes)


def search_units(model: nn.Module, granularity: str = "layer") -> list[Unit]:
    if granularity not in ("layer", "group"):
        raise ConfigError(f"units must be 'layer' or 'group', got {granularity!r}")
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]
    tied = getattr(model, "embed", None) is not None and model.embed.weight is model.lm_head.weight
    groups: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, module in targets:
        block, kind = layer_position(name)
        if tied and name in ("embed", "lm_head"):
            key = "embed"
        elif granularity == "group" and block is not None:
            key = f"blocks.{block}.{'attn' if kind in ('q', 'k', 'v', 'o') else 'mlp'}"
        else:
            key = name
        groups.setdefault(key, []).append((name, module))
    units = []
    for key, members in groups.items():
        seen, shapes = set(), []
        for _, m in members:
            if id(m.weight) not in seen:
                seen.add(id(m.weight))
                shapes.append(tuple(m.weight.shape))
        units.append(Unit(key, tuple(n for n, _ in members), tuple(shapes), layer_position(members[0][0])[0]))
    return units


# ------------------------------------------------------------------------------ models


def float_model(ckpt: dict[str, Any]) -> DecoderLM:
    """The checkpoint's latent weights in a plain fp32 DecoderLM (quantizer state dropped)."""
    from qtoolkit.training.ptq import latent_model

    if ckpt["kind"] != "train":
        raise CheckpointError(f"{ckpt['path']}: probes and search need latent weights: pass a training "
                              "checkpoint, not a packed one")
    return latent_model(ckpt)


@contextlib.contextmanager
def quantized(model: nn.Module, assignment: dict[str, dict[str, Any]], calib: list[Any] | None = None,
              sources: dict[str, Any] | None = None) -> Iterator[nn.Module]:
    """Temporarily fake-quantize the named modules ({module: spec}); originals are restored.

    As `qtool quantize` does it: layers whose spec is unchanged from `sources`
    (`training.ptq.source_quantizers`) take that state, and quantizers that need data are calibrated
    on `calib` (model inputs). Weights a calibration changes are restored on exit."""
    from qtoolkit.calibration import calibrate_model, calibration_targets
    from qtoolkit.training.ptq import adopt_state

    originals = {name: model.get_submodule(name) for name in assignment}
    saved: list[tuple[Tensor, Tensor]] = []
    try:
        if assignment:
            apply_policy(model, assignment)
            adopted = adopt_state(model, sources) if sources else []
            targets = [n for n in calibration_targets(model) if n not in adopted]
            if targets:
                if calib is None:
                    raise ConfigError(f"{', '.join(targets)}: these formats calibrate on data, and no "
                                      "calibration batches were given")
                saved = [(w, w.detach().clone()) for w in {id(m.weight): m.weight for m in
                                                           (model.get_submodule(n) for n in targets)}.values()]
                calibrate_model(model, calib, modules=targets)
        yield model
    finally:
        with torch.no_grad():
            for w, value in saved:
                w.copy_(value)
        for name, module in originals.items():
            set_by_name(model, name, module)


def _ce(logits: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")


class CachedForward:
    """Calibration losses of a model whose inputs to each block are cached from the base model."""

    def __init__(self, model: DecoderLM, batches: list[tuple[Tensor, Tensor]]):
        self.model, self.batches = model, batches
        self.tokens = sum(y.numel() for _, y in batches)
        self.hidden: list[list[Tensor]] = []  # per batch: inputs to blocks 0..L-1 and the final hidden
        with torch.no_grad():
            for x, _ in batches:
                h = model.embed(x)
                hs = [h]
                cos, sin = self._rope(x.shape[1])
                for block in model.blocks:
                    h = block(h, cos, sin)
                    hs.append(h)
                self.hidden.append(hs)

    def _rope(self, T: int) -> tuple[Tensor, Tensor]:
        return self.model.rope_cos[:T], self.model.rope_sin[:T]

    @torch.no_grad()
    def loss(self, start: int | None) -> float:
        """Mean CE, recomputing from block `start` (None: from the embedding; n_layers: the head)."""
        total = 0.0
        for (x, y), hs in zip(self.batches, self.hidden, strict=True):
            cos, sin = self._rope(x.shape[1])
            if start is None:
                h, first = self.model.embed(x), 0
            else:
                h, first = hs[start], start
            for block in self.model.blocks[first:]:
                h = block(h, cos, sin)
            total += _ce(self.model.lm_head(self.model.norm(h)), y).item()
        return total / self.tokens


def _start_block(unit: Unit, n_layers: int) -> int | None:
    if unit.name == "embed" or "embed" in unit.modules:
        return None
    if unit.block is not None:
        return unit.block
    return n_layers  # lm_head only


# ------------------------------------------------------------------------------ results


@dataclass
class ProbeResult:
    key: str
    checkpoint: str
    granularity: str
    units: list[dict[str, Any]]  # {"name", "modules", "block", "bytes": {fmt: bytes}}
    formats: list[dict[str, Any]]  # {"key", "spec"}
    calibration: dict[str, Any]
    base_loss: float | None = None
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # unit -> fmt -> S
    cheap: dict[str, dict[str, float]] = field(default_factory=dict)
    sparsity: dict[str, dict[str, Any]] = field(default_factory=dict)  # module -> stats
    spearman: dict[str, float | None] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    complete: bool = False
    cached: bool = False
    cache_path: str = ""  # the JSON file under $QTOOLKIT_CACHE/probes that holds these results

    def missing(self) -> list[tuple[str, str]]:
        return [(u["name"], f["key"]) for u in self.units for f in self.formats
                if f["key"] not in self.measured.get(u["name"], {})]

    def sensitivity(self) -> dict[str, dict[str, float]]:
        """Measured S where available; the cheap estimate, rescaled to the measured values it
        overlaps (least squares through the origin), where a timeout left gaps."""
        pairs = [(self.cheap[u][f], s) for u, fs in self.measured.items() for f, s in fs.items()
                 if u in self.cheap and f in self.cheap[u]]
        denom = sum(c * c for c, _ in pairs)
        scale = sum(c * s for c, s in pairs) / denom if denom > 0 else 1.0
        out = {}
        for u in self.units:
            name = u["name"]
            out[name] = {f["key"]: self.measured.get(name, {}).get(f["key"], scale * self.cheap.get(name, {}).get(f["key"], 0.0))
                         for f in self.formats}
        return out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cached")
        d.pop("cache_path")
        return d


def _spearman(measured: dict[str, dict[str, float]], cheap: dict[str, dict[str, float]],
              formats: list[str]) -> dict[str, float | None]:
    from scipy.stats import spearmanr

    def rho(pairs: list[tuple[float, float]]) -> float | None:
        if len(pairs) < 3:
            return None
        a, b = zip(*pairs, strict=True)
        if len(set(a)) < 2 or len(set(b)) < 2:
            return None
        return float(spearmanr(a, b).statistic)

    out = {"all": rho([(measured[u][f], cheap[u][f]) for u in measured for f in measured[u] if f in cheap.get(u, {})])}
    for f in formats:
        out[f] = rho([(measured[u][f], cheap[u][f]) for u in measured if f in measured[u] and f in cheap.get(u, {})])
    return out


def checkpoint_fingerprint(path: str | Path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return f"{p}:{st.st_size}:{st.st_mtime_ns}"


def _cache_path(key: str) -> Path:
    from qtoolkit.training.data import cache_dir

    return cache_dir() / "probes" / f"{key}.json"


def _load_cached(key: str) -> dict[str, Any] | None:
    path = _cache_path(key)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (ValueError, OSError):  # undecodable or unreadable: a damaged cache entry is recomputed
        return None
    return data if isinstance(data, dict) else None


# ------------------------------------------------------------------------------ the probes


def sparsity_probe(model: nn.Module, band: float = 0.05) -> dict[str, dict[str, Any]]:
    """Per linear: what the default ternary quantizer would make of its latent weights."""
    spec = quantizers.canonical("ternary")
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            q = quantizers.build(spec)
            w = module.weight.detach().float()
            qt = q.quantize(w)
            stats = {**code_stats(qt, spec), **latent_stats(w, qt, q, band)}
            out[name] = {k: stats[k] for k in ("zeros", "plus", "minus", "near_threshold", "alpha", "entropy_bits")}
    return out


def fisher_sensitivity(model: DecoderLM, units: list[Unit], formats: list[Format],
                       batches: list[tuple[Tensor, Tensor]]) -> dict[str, dict[str, float]]:
    """The one-backward-pass estimate 1/2 sum F (Q(W) - W)^2 (module docstring)."""
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}
    fisher = {n: torch.zeros_like(w) for n, w in weights.items()}
    model.zero_grad(set_to_none=True)
    with torch.enable_grad():
        for x, y in batches:
            loss = _ce(model(x), y) / y.numel()  # this batch's mean CE
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (n, _), g in zip(weights.items(), grads, strict=True):
                if g is not None:
                    fisher[n] += g.pow(2) / len(batches)
    out: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for unit in units:
            out[unit.name] = {}
            for fmt in formats:
                total, seen = 0.0, set()
                for name in unit.modules:
                    w = weights[name]
                    if id(w) in seen:
                        continue
                    seen.add(id(w))
                    q = quantizers.build(fmt.spec)
                    q.init_from_weight(w)
                    dw = q(w.detach()) - w.detach()
                    total += 0.5 * float((fisher[name] * dw.pow(2)).sum())
                out[unit.name][fmt.key] = total
    return out


def run_probe(
    ckpt_path: str | Path,
    formats: list[Format],
    granularity: str = "layer",
    data_path: str | None = None,
    calib_tokens: int = 4096,
    seed: int = 0,
    timeout: float | None = None,
    progress: Progress = _noop,
    use_cache: bool = True,
    device: str = "auto",
) -> ProbeResult:
    """Sparsity probe, cheap estimate and measured sensitivities (module docstring), cached.
    `device` (auto, cpu, cuda) runs the forward passes; the cache does not depend on it."""
    from qtoolkit.device import resolve_device
    from qtoolkit.schema import check_int, check_number, check_seed
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import checkpoint_data_config

    check_int(calib_tokens, "calib_tokens", 1)
    check_seed(seed)
    if timeout is not None:
        check_number(timeout, "timeout", minimum=0)
    if not formats:
        raise ConfigError("formats: give at least one candidate format")
    dev = resolve_device(device)
    ckpt = load_checkpoint(ckpt_path)
    model = float_model(ckpt).to(dev)
    cfg = model.config
    recipe = ckpt.get("recipe") or {}
    seq_len = int((recipe.get("train") or {}).get("seq_len") or cfg.max_seq_len)
    data = prepare_data(checkpoint_data_config(ckpt, data_path), cfg.vocab_size,
                        tokenizer=tokenizer_from_json(ckpt["tokenizer"]), progress=progress)
    data.train.require_window(seq_len)
    batches = [(x.to(dev), y.to(dev)) for x, y in calibration_batches(data.train, calib_tokens, seq_len, seed)]
    units = search_units(model, granularity)

    calibration = {"tokens": sum(y.numel() for _, y in batches), "seq_len": seq_len, "seed": seed,
                   "batches": len(batches), "data": data.info.get("source")}
    key_src = json.dumps({"ckpt": checkpoint_fingerprint(ckpt["path"]), "calibration": calibration,
                          "formats": [f.spec for f in formats], "granularity": granularity}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    result = ProbeResult(
        key=key, checkpoint=str(ckpt["path"]), granularity=granularity,
        units=[{"name": u.name, "modules": list(u.modules), "block": u.block,
                "bytes": {f.key: u.nbytes(f) for f in formats}} for u in units],
        formats=[{"key": f.key, "spec": f.spec} for f in formats], calibration=calibration,
        cache_path=str(_cache_path(key)),
    )
    cached = _load_cached(key) if use_cache else None
    if cached is not None:
        for k in ("base_loss", "measured", "cheap", "sparsity", "spearman", "seconds", "complete"):
            setattr(result, k, cached.get(k, getattr(result, k)))
        if result.complete:
            result.cached = True
            return result

    def save() -> None:
        result.spearman = _spearman(result.measured, result.cheap, [f.key for f in formats])
        atomic_write_text(_cache_path(key), json.dumps(result.to_dict()))

    start = time.perf_counter()
    deadline = None if timeout is None else start + timeout
    if not result.sparsity:
        progress("sparsity probe", 0, 1)
        t = time.perf_counter()
        result.sparsity = sparsity_probe(model)
        result.seconds["sparsity"] = time.perf_counter() - t
        progress("sparsity probe", 1, 1)
    if not result.cheap:
        progress("fisher estimate", 0, 1)
        t = time.perf_counter()
        result.cheap = fisher_sensitivity(model, units, formats, batches)
        result.seconds["fisher"] = time.perf_counter() - t
        progress("fisher estimate", 1, 1)
        _check_finite(result.cheap, "cheap estimate")
        save()

    todo = [(u, f) for u in units for f in formats if f.key not in result.measured.get(u.name, {})]
    total = len(units) * len(formats)
    t = time.perf_counter()
    forward = CachedForward(model, batches)
    if result.base_loss is None:
        result.base_loss = forward.loss(None)
        if not math.isfinite(result.base_loss):
            raise ProbeError(f"{ckpt['path']}: the unquantized model's calibration loss is {result.base_loss}")
    done = total - len(todo)
    progress("sensitivity probe", done, total)
    last_save = time.perf_counter()
    for unit, fmt in todo:
        if deadline is not None and time.perf_counter() > deadline:
            break
        with quantized(model, {name: fmt.spec for name in unit.modules}, calib=[x for x, _ in batches]):
            loss = forward.loss(_start_block(unit, cfg.n_layers))
        if not math.isfinite(loss):
            save()
            raise ProbeError(f"quantizing {unit.name} to {fmt.key} gives a non-finite loss ({loss}); "
                             "this format cannot be used for this unit")
        result.measured.setdefault(unit.name, {})[fmt.key] = loss - result.base_loss
        done += 1
        progress("sensitivity probe", done, total)
        if time.perf_counter() - last_save > 10:
            save()
            last_save = time.perf_counter()
    result.seconds["measured"] = result.seconds.get("measured", 0.0) + time.perf_counter() - t
    result.complete = not result.missing()
    save()
    return result


def _check_finite(table: dict[str, dict[str, float]], what: str) -> None:
    for unit, fs in table.items():
        for fmt, v in fs.items():
            if not math.isfinite(v):
                raise ProbeError(f"{what}: non-finite value for {unit} -> {fmt} ({v})")


__all__ = ["Format", "ProbeError", "ProbeResult", "Unit", "calibration_batches", "fisher_sensitivity",
           "float_model", "format_key", "parse_formats", "quantized", "run_probe", "search_units",
           "sparsity_probe"]
