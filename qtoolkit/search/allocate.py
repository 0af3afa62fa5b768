"""Mixed-precision allocation under a memory budget (`qtool search`).

Given a training checkpoint, candidate formats and a budget in bytes, find one format per unit
(see `qtoolkit.search.probes`: layers or groups) so that the packed model fits the budget and loses as
little validation loss as possible.

1. Costs. For every unit and format the exact packed bytes (codes and scales), from the quantizers'
   layouts, plus the fixed bytes of everything that is not searched (norm weights): the same
   memory model as `qtool plan`, so `bytes(allocation) == memory_plan(policy).total_bytes`.
   A budget below the smallest reachable size fails at once and names that size.
2. Probe (cached): measured sensitivities S(u, f) and the one-pass Fisher estimate.
3. Exact seed: the integer program
        minimize   sum_u sum_f S(u, f) x_uf
        subject to sum_f x_uf = 1 for every unit u,   sum_uf bytes(u, f) x_uf <= budget - fixed,
                   x binary
   solved with scipy's `milp` (HiGHS). Its k best solutions (no-good cuts), and the solutions for
   the Fisher estimate, are enqueued as the first Optuna trials.
4. Refinement with the true objective: each Optuna trial picks a format per unit; an allocation
   over budget is rejected (pruned) before any evaluation; otherwise the checkpoint's weights are
   fake-quantized with it (optionally QAT-finetuned for `finetune_steps`) and the objective is the
   mean validation cross-entropy on fixed batches. TPE (single objective) or NSGA-II (`pareto`:
   bytes and loss, over budgets from the smallest reachable size up to the budget), seeded.
5. The study lives in Optuna storage (SQLite in the output directory by default): running the same
   command again continues it, Ctrl-C keeps every finished trial, and several processes can work on
   one study through the same storage (docs/search.md).

Outputs: `policy.yaml` (consumable by `qtool quantize --policy`, `qtool train --set policy=...`),
`search.json` (every trial), and a `SearchResult` that `qtoolkit.report` renders. With `apply`:
`quantized/ckpt.pt`, the chosen allocation written by `qtool quantize`'s code, and with
`finetune_steps` also `finetuned/ckpt.pt`; `qtool eval` of either reports the trial's loss on the
search's batches and `qtool pack` writes the bytes the search charged.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qtoolkit import quantizers
from qtoolkit.checkpoint import atomic_write_text, load_checkpoint
from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError, QToolkitError
from qtoolkit.model import DecoderLM
from qtoolkit.pack import model_from_checkpoint
from qtoolkit.search.probes import (
    Format,
    ProbeResult,
    Unit,
    float_model,
    quantized,
    run_probe,
    search_units,
)
from qtoolkit.training.ptq import (
    checkpoint_calibration,
    finetune_checkpoint,
    quantize_checkpoint,
    source_quantizers,
)

Progress = Callable[[str, int, int | None], None]
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class SearchError(QToolkitError, RuntimeError):
    """A search that cannot run as asked (e.g. an impossible budget)."""


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


def parse_budget(text: str | int) -> int:
    """"400MB" (10^6), "1.5GB", "64MiB" (2^20), "512KiB", "123456" (bytes) -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS and unit != "":
        raise ConfigError(f"budget {text!r}: expected a number with B, KB, MB, GB, KiB, MiB or GiB, e.g. 400MB")
    value = float(m.group(1)) * _UNITS.get(unit or "b", 1)
    if value < 1:
        raise ConfigError(f"budget {text!r} must be positive")
    return int(value)


# ------------------------------------------------------------------------------ the space


@dataclass
class SearchSpace:
    model_config: ModelConfig
    units: list[Unit]
    formats: list[Format]
    cost: dict[str, dict[str, int]]  # unit -> format key -> bytes
    fixed_bytes: int  # everything not searched: norm weights

    @property
    def keys(self) -> list[str]:
        return [f.key for f in self.formats]

    def bytes_of(self, alloc: dict[str, str]) -> int:
        return self.fixed_bytes + sum(self.cost[u.name][alloc[u.name]] for u in self.units)

    @property
    def min_bytes(self) -> int:
        return self.fixed_bytes + sum(min(c.values()) for c in self.cost.values())

    @property
    def max_bytes(self) -> int:
        return self.fixed_bytes + sum(max(c.values()) for c in self.cost.values())

    def uniform(self, key: str) -> dict[str, str]:
        return {u.name: key for u in self.units}

    def spec(self, key: str) -> dict[str, Any]:
        return next(f.spec for f in self.formats if f.key == key)

    def assignment(self, alloc: dict[str, str]) -> dict[str, dict[str, Any]]:
        """{module: spec} for every searched module."""
        return {m: self.spec(alloc[u.name]) for u in self.units for m in u.modules}

    def policy(self, alloc: dict[str, str]) -> dict[str, Any]:
        """A compact policy: the most common format of the linears as `_default`, exact names for
        the rest (the embedding always named). Specs are written as short names where they are
        a quantizer's defaults."""
        assignment = self.assignment(alloc)
        linears = [m for m in assignment if m != "embed"]
        counts = Counter(json.dumps(assignment[m], sort_keys=True) for m in linears)
        default = json.loads(counts.most_common(1)[0][0]) if counts else None
        policy: dict[str, Any] = {}
        if default is not None:
            policy["_default"] = _short(default)
        for m, spec in assignment.items():
            if m == "embed" or spec != default:
                policy[m] = _short(spec)
        return policy


def _short(spec: dict[str, Any]) -> str | dict[str, Any]:
    from qtoolkit import quantizers

    return spec["name"] if quantizers.canonical(spec["name"]) == spec else spec


def build_space(model_config: ModelConfig, formats: list[Format], granularity: str = "layer") -> SearchSpace:
    with torch.device("meta"):
        model = DecoderLM(model_config)
    units = search_units(model, granularity)
    searched = {m for u in units for m in u.modules}
    # the fixed part: every parameter outside the searched modules, stored as fp32 (the memory model's rule)
    fixed = 0
    for name, p in model.named_parameters(remove_duplicate=True):
        owner = name.rsplit(".", 1)[0]
        if owner not in searched:
            fixed += 4 * p.numel()
    cost = {u.name: {f.key: u.nbytes(f) for f in formats} for u in units}
    return SearchSpace(model_config, units, formats, cost, fixed)


# ------------------------------------------------------------------------------ exact seed


def milp_allocations(space: SearchSpace, sens: dict[str, dict[str, float]], budget: int, k: int = 1
                     ) -> list[dict[str, str]]:
    """Up to `k` best allocations of the integer program (module docstring), best first."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    U, Fk = space.units, space.keys
    n = len(U) * len(Fk)
    idx = {(u.name, f): i * len(Fk) + j for i, u in enumerate(U) for j, f in enumerate(Fk)}
    c = np.array([sens[u.name][f] for u in U for f in Fk], dtype=np.float64)
    cost = np.array([space.cost[u.name][f] for u in U for f in Fk], dtype=np.float64)
    one_each = np.zeros((len(U), n))
    for i, u in enumerate(U):
        for f in Fk:
            one_each[i, idx[(u.name, f)]] = 1
    rows, lo, hi = [one_each, cost[None, :]], [np.ones(len(U)), [-np.inf]], [np.ones(len(U)), [budget - space.fixed_bytes]]
    found: list[dict[str, str]] = []
    for _ in range(k):
        cons = LinearConstraint(np.vstack(rows), np.concatenate(lo), np.concatenate(hi))
        res = milp(c, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1))
        if res.status != 0 or res.x is None:
            break
        x = np.round(res.x).astype(int)
        alloc = {u.name: next(f for f in Fk if x[idx[(u.name, f)]]) for u in U}
        found.append(alloc)
        cut = np.zeros((1, n))  # no-good cut: exclude exactly this allocation next time
        for u in U:
            cut[0, idx[(u.name, alloc[u.name])]] = 1
        rows.append(cut)
        lo.append([-np.inf])
        hi.append([len(U) - 1])
    return found


# ------------------------------------------------------------------------------ the objective


class Evaluator:
    """Validation loss of the checkpoint's weights under an allocation (optionally QAT-finetuned).

    The trial model is made as `qtool quantize` makes it (same source state, same calibration
    windows `calib`), the finetuning is `training.trainer.finetune`, and the loss is
    `training.trainer.evaluate_batches`: so `search --apply` writes exactly the model a trial scored."""

    def __init__(self, model: DecoderLM, space: SearchSpace, val_batches: list, train=None,
                 finetune_steps: int = 0, finetune_lr: float = 1e-4, batch_size: int = 8, seq_len: int = 256,
                 seed: int = 0, calib: list | None = None, sources: dict[str, Any] | None = None):
        self.model, self.space, self.val_batches = model, space, val_batches
        self.train, self.finetune_steps, self.finetune_lr = train, finetune_steps, finetune_lr
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.calib, self.sources = calib, sources
        self.tokens = sum(y.numel() for _, y in val_batches)

    @property
    def finetune_seed(self) -> int:
        return self.seed + 1  # the finetuning batches differ from the calibration windows

    def _val_loss(self, model: nn.Module) -> float:
        from qtoolkit.training.trainer import evaluate_batches

        return evaluate_batches(model, self.val_batches)["val_loss"]

    def __call__(self, alloc: dict[str, str]) -> float:
        assignment = self.space.assignment(alloc)
        if not self.finetune_steps:
            with quantized(self.model, assignment, self.calib, self.sources):
                return self._val_loss(self.model)
        from qtoolkit.training.trainer import finetune

        model = copy.deepcopy(self.model)
        with quantized(model, assignment, self.calib, self.sources):
            finetune(model, self.train, self.finetune_steps, self.finetune_lr, self.batch_size, self.seq_len,
                     self.finetune_seed)
            return self._val_loss(model)


# ------------------------------------------------------------------------------ storage


def open_storage(url: str):
    """An Optuna storage: sqlite:///file.db, postgresql://..., mysql://..., or journal:/path/file.log."""
    import optuna

    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:"):]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    try:
        return optuna.storages.RDBStorage(url)
    except Exception as e:
        raise SearchError(f"cannot open Optuna storage {url!r}: {e}") from None


# ------------------------------------------------------------------------------ results


@dataclass
class SearchResult:
    out_dir: Path
    budget: int
    min_bytes: int
    max_bytes: int
    space: SearchSpace
    probe: ProbeResult
    study_name: str
    storage: str
    trials: list[dict[str, Any]]
    best: dict[str, Any] | None
    references: dict[str, dict[str, Any]]
    pareto_front: list[dict[str, Any]] = field(default_factory=list)
    policy: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False
    rejected: int = 0
    elapsed_s: float = 0.0
    applied: dict[str, Any] = field(default_factory=dict)  # --apply: {"quantized"/"finetuned": {path, bytes, loss}}

    def to_dict(self) -> dict[str, Any]:
        return {
            "budget": self.budget, "min_reachable_bytes": self.min_bytes, "max_bytes": self.max_bytes,
            "formats": [{"key": f.key, "spec": f.spec} for f in self.space.formats],
            "units": [{"name": u.name, "modules": list(u.modules), "bytes": self.space.cost[u.name]}
                      for u in self.space.units],
            "fixed_bytes": self.space.fixed_bytes,
            "study": self.study_name, "storage": self.storage,
            "probe": {"key": self.probe.key, "base_loss": self.probe.base_loss, "spearman": self.probe.spearman,
                      "seconds": self.probe.seconds, "complete": self.probe.complete,
                      "calibration": self.probe.calibration},
            "references": self.references, "best": self.best, "policy": self.policy,
            "pareto_front": self.pareto_front, "trials": self.trials, "rejected_over_budget": self.rejected,
            "interrupted": self.interrupted, "applied": self.applied,
        }


def _trial_record(t) -> dict[str, Any]:
    values = t.values if t.values is not None else None
    return {
        "number": t.number, "state": t.state.name, "bytes": t.user_attrs.get("bytes"),
        "loss": t.user_attrs.get("loss"), "source": t.user_attrs.get("source", "sampler"),
        "values": values, "allocation": dict(t.params),
    }


# ------------------------------------------------------------------------------ main entry


def default_study_name(ckpt_fp: str, space: SearchSpace, budget: int, pareto: bool, finetune_steps: int,
                       granularity: str) -> str:
    key = json.dumps({"ckpt": ckpt_fp, "formats": space.keys, "budget": budget, "pareto": pareto,
                      "finetune": finetune_steps, "units": granularity}, sort_keys=True)
    return "qtool-search-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def run_search(
    ckpt_path: str | Path,
    budget: str | int,
    formats: list[Format],
    out_dir: str | Path,
    data_path: str | None = None,
    trials: int = 30,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str | None = None,
    granularity: str = "layer",
    finetune_steps: int = 0,
    pareto: bool = False,
    seed: int = 0,
    calib_tokens: int = 4096,
    eval_batches: int = 8,
    seeds_k: int = 3,
    progress: Progress = _noop,
    apply: bool = False,
) -> SearchResult:
    """The search of the module docstring. With `apply`, the chosen allocation is then written as a
    quantized training checkpoint (`apply_allocation`), and with `finetune_steps` its finetuned
    version too."""
    import dataclasses

    import optuna

    from qtoolkit.search.probes import checkpoint_fingerprint
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import DataConfig

    t_start = time.perf_counter()
    deadline = None if timeout is None else t_start + timeout
    budget = parse_budget(budget)
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    ckpt = load_checkpoint(ckpt_path)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    space = build_space(cfg, formats, granularity)
    if budget < space.min_bytes:
        raise SearchError(
            f"budget {budget:,} B is below the smallest reachable size {space.min_bytes:,} B "
            f"({space.min_bytes / 1e6:.3f} MB: every unit at its smallest format among {', '.join(space.keys)}, "
            f"norms in fp32)"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if apply:
        check_apply_outputs(out_dir, finetune_steps)

    probe = run_probe(ckpt_path, formats, granularity, data_path, calib_tokens, seed,
                      timeout=None if deadline is None else max(1.0, deadline - time.perf_counter()),
                      progress=progress)
    sens = probe.sensitivity()

    model = float_model(ckpt)
    recipe = ckpt.get("recipe") or {}
    train_cfg = recipe.get("train", {})
    data_cfg = DataConfig(**recipe.get("data", {}))
    if data_path is not None:
        data_cfg = dataclasses.replace(data_cfg, path=str(data_path))
    calibrated = [f.key for f in formats if quantizers.get(f.spec["name"]).calibration]
    data = prepare_data(data_cfg, cfg.vocab_size, tokenizer=tokenizer_from_json(ckpt["tokenizer"]),
                        need_train=finetune_steps > 0 or bool(calibrated), progress=progress)
    bs, sl = int(train_cfg.get("batch_size") or 8), int(train_cfg.get("seq_len") or cfg.max_seq_len)
    val_batches = list(data.val.eval_batches(bs, sl, eval_batches))
    # the calibration windows of `qtool quantize` (training.ptq.checkpoint_calibration), when a format needs data
    calib = checkpoint_calibration(ckpt, calib_tokens=calib_tokens, seed=seed, train=data.train)[0] if calibrated else None
    evaluate = Evaluator(model, space, val_batches, data.train, finetune_steps,
                         float(train_cfg.get("lr", 1e-3)) * float(train_cfg.get("min_lr_ratio", 0.1)), bs, sl, seed,
                         calib=calib, sources=source_quantizers(ckpt))

    storage_url = storage or f"sqlite:///{(out_dir / 'search.db').resolve()}"
    name = study_name or default_study_name(checkpoint_fingerprint(ckpt["path"]), space, budget, pareto,
                                            finetune_steps, granularity)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = (optuna.samplers.NSGAIISampler(seed=seed) if pareto
               else optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5))
    study = optuna.create_study(
        storage=open_storage(storage_url), study_name=name, sampler=sampler, load_if_exists=True,
        **({"directions": ["minimize", "minimize"]} if pareto else {"direction": "minimize"}),
    )

    # references: every uniform allocation (computed once, kept with the study)
    references = dict(study.user_attrs.get("references", {}))
    for f in space.keys:
        if f not in references:
            alloc = space.uniform(f)
            references[f] = {"bytes": space.bytes_of(alloc), "loss": evaluate(alloc)}
            study.set_user_attr("references", references)

    # exact seeds (first run of the study only; marked after enqueueing, so a crash loses none)
    if not study.user_attrs.get("seeded"):
        seeds: list[tuple[str, dict[str, str]]] = []
        budgets = np.linspace(space.min_bytes, budget, max(2, seeds_k + 1))[1:] if pareto else [budget]
        for b in budgets:
            for i, alloc in enumerate(milp_allocations(space, sens, int(b), k=1 if pareto else seeds_k)):
                seeds.append((f"milp#{i + 1}" + (f"@{int(b)}" if pareto else ""), alloc))
        if not pareto:
            cheap = {u: dict(v) for u, v in probe.cheap.items()}
            seeds += [("milp-fisher", a) for a in milp_allocations(space, cheap, budget, k=1)]
        seen = set()
        for source, alloc in seeds:
            sig = json.dumps(alloc, sort_keys=True)
            if sig not in seen:
                seen.add(sig)
                study.enqueue_trial(alloc, user_attrs={"source": source})
        study.set_user_attr("seeded", True)

    def n_complete() -> int:
        return sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False))

    rejected, interrupted = 0, False
    done = n_complete()
    progress("search trials", done, trials)
    max_rejections = 200 * trials
    try:
        while done < trials and rejected < max_rejections:
            if deadline is not None and time.perf_counter() > deadline:
                break
            trial = study.ask()
            alloc = {u.name: trial.suggest_categorical(u.name, space.keys) for u in space.units}
            nbytes = space.bytes_of(alloc)
            trial.set_user_attr("bytes", nbytes)
            if nbytes > budget:  # rejected before any evaluation
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                rejected += 1
                continue
            try:
                loss = evaluate(alloc)
            except KeyboardInterrupt:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                raise
            if not math.isfinite(loss):
                trial.set_user_attr("error", f"non-finite loss {loss}")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
                continue
            trial.set_user_attr("loss", loss)
            study.tell(trial, [nbytes, loss] if pareto else loss)
            done = n_complete()
            progress("search trials", min(done, trials), trials)
    except KeyboardInterrupt:
        interrupted = True

    records = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    complete = [r for r in records if r["state"] == "COMPLETE" and r["bytes"] is not None and r["bytes"] <= budget]
    best = min(complete, key=lambda r: r["loss"]) if complete else None
    front = []
    if complete:
        for r in sorted(complete, key=lambda r: (r["bytes"], r["loss"])):
            if not front or r["loss"] < front[-1]["loss"]:
                front.append({"number": r["number"], "bytes": r["bytes"], "loss": r["loss"]})
    policy = space.policy(best["allocation"]) if best else {}
    result = SearchResult(
        out_dir=out_dir, budget=budget, min_bytes=space.min_bytes, max_bytes=space.max_bytes, space=space,
        probe=probe, study_name=name, storage=storage_url, trials=records, best=best, references=references,
        pareto_front=front, policy=policy, interrupted=interrupted, rejected=rejected,
        elapsed_s=time.perf_counter() - t_start,
    )
    write_outputs(result)
    if apply:
        result.applied = apply_allocation(result, ckpt_path, evaluate, data_path, calib_tokens, seed, progress)
        write_outputs(result)
    return result


# ------------------------------------------------------------------------------ --apply


def applied_paths(out_dir: Path) -> dict[str, Path]:
    return {"quantized": out_dir / "quantized" / "ckpt.pt", "finetuned": out_dir / "finetuned" / "ckpt.pt"}


def check_apply_outputs(out_dir: Path, finetune_steps: int) -> None:
    """Before any work: the checkpoints `--apply` writes must not exist yet (nothing is overwritten)."""
    paths = applied_paths(out_dir)
    for kind in ("quantized", "finetuned") if finetune_steps else ("quantized",):
        if paths[kind].exists():
            raise SearchError(f"{paths[kind]} already exists (an earlier --apply); move it away or pass another "
                              "--out, since --apply never overwrites a checkpoint")


def apply_allocation(result: SearchResult, ckpt_path: str | Path, evaluate: Evaluator, data_path: str | None,
                     calib_tokens: int, seed: int, progress: Progress = _noop) -> dict[str, Any]:
    """Write the chosen allocation as a quantized training checkpoint through `qtool quantize`'s code
    (`training.ptq.quantize_checkpoint`, the same calibration windows as the trials), and with
    `finetune_steps` its finetuned version (`training.ptq.finetune_checkpoint`, the trials' finetuning).
    Each checkpoint's `qtool eval` loss on the search's batches equals the trial's loss, and
    `qtool pack` writes exactly the bytes the search charged."""
    if not result.best:
        raise SearchError("--apply: no allocation within the budget was found, so there is nothing to write")
    best = result.best
    record = {"search": {"out": str(result.out_dir), "study": result.study_name, "trial": best["number"],
                        "loss": best["loss"], "bytes": best["bytes"], "budget": result.budget,
                        "finetune_steps": evaluate.finetune_steps}}
    paths = applied_paths(result.out_dir)
    progress("applying the allocation", 0, None)
    q = quantize_checkpoint(ckpt_path, result.policy, paths["quantized"], data=data_path, calib_tokens=calib_tokens,
                            seed=seed, progress=progress, record=record)
    applied: dict[str, Any] = {"quantized": {"path": str(q.path), "bytes": q.total_bytes,
                                             "loss": None if evaluate.finetune_steps else best["loss"]}}
    if evaluate.finetune_steps:
        f = finetune_checkpoint(q.path, paths["finetuned"], evaluate.finetune_steps, lr=evaluate.finetune_lr,
                                data=data_path, seed=evaluate.finetune_seed, batch_size=evaluate.batch_size,
                                seq_len=evaluate.seq_len, progress=progress)
        applied["quantized"]["loss"] = evaluate._val_loss(model_from_checkpoint(load_checkpoint(q.path))[0])
        applied["finetuned"] = {"path": str(f), "bytes": q.total_bytes, "loss": best["loss"]}
    progress("applying the allocation", 1, 1)
    return applied


def write_outputs(result: SearchResult) -> None:
    import yaml

    atomic_write_text(result.out_dir / "search.json", json.dumps(result.to_dict(), indent=2))
    if not result.best:
        return
    best = result.best
    header = (
        "# qtool search: mixed-precision policy\n"
        f"# budget {result.budget:,} B; this policy: {best['bytes']:,} B (qtool plan gives the same figure)\n"
        f"# validation loss {best['loss']:.4f} (trial {best['number']}, {best['source']})\n"
        f"# use: qtool train --recipe ternary_all --set policy={result.out_dir / 'policy.yaml'}\n"
    )
    atomic_write_text(result.out_dir / "policy.yaml", header + yaml.safe_dump(result.policy, sort_keys=False))


__all__ = ["Evaluator", "SearchError", "SearchResult", "SearchSpace", "apply_allocation", "build_space",
           "milp_allocations", "open_storage", "parse_budget", "run_search"]
