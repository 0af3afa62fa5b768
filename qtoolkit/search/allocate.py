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
import inspect
import json
import math
import re
import time
import warnings
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
from qtoolkit.errors import ConfigError, QToolkitError, short_repr
from qtoolkit.model import DecoderLM, meta_model
from qtoolkit.outputs import check_outputs
from qtoolkit.pack import model_from_checkpoint
from qtoolkit.rundir import run_dir_lock
from qtoolkit.schema import check_int, check_number, check_seed
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
MAX_BUDGET = 10**15  # 1 PB: budgets beyond it are typos (and overflow the integer program)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


class SearchError(QToolkitError, RuntimeError):
    """A search that cannot run as asked (e.g. an impossible budget)."""


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


def parse_budget(text: str | int) -> int:
    """"400MB" (10^6), "1.5GB", "64MiB" (2^20), "512KiB", "123456" (bytes) -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if not 1 <= text <= MAX_BUDGET:
            raise ConfigError(f"budget {text} B must be in [1, {MAX_BUDGET}]")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in _UNITS and unit != "":
        raise ConfigError(f"budget {text!r}: expected a number with B, KB, MB, GB, KiB, MiB or GiB, e.g. 400MB")
    value = float(m.group(1)) * _UNITS.get(unit or "b", 1)
    if not value >= 1:
        raise ConfigError(f"budget {text!r} must be positive")
    if value > MAX_BUDGET:
        raise ConfigError(f"budget {short_repr(text)} is beyond any model (at most {MAX_BUDGET / 1e12:.0f} TB)")
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
    model = meta_model(model_config)
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
                 seed: int = 0, calib: list | None = None, sources: dict[str, Any] | None = None,
                 device: torch.device | str = "cpu"):
        self.model, self.space, self.val_batches = model, space, val_batches
        self.device = torch.device(device)
        self.train, self.finetune_steps, self.finetune_lr = train, finetune_steps, finetune_lr
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.calib, self.sources = calib, sources
        self.tokens = sum(y.numel() for _, y in val_batches)

    @property
    def finetune_seed(self) -> int:
        return self.seed + 1  # the finetuning batches differ from the calibration windows

    def _val_loss(self, model: nn.Module) -> float:
        from qtoolkit.training.trainer import evaluate_batches

        return evaluate_batches(model, self.val_batches, self.device)["val_loss"]

    def __call__(self, alloc: dict[str, str]) -> float:
        assignment = self.space.assignment(alloc)
        if not self.finetune_steps:
            with quantized(self.model, assignment, self.calib, self.sources):
                return self._val_loss(self.model)
        from qtoolkit.training.trainer import finetune

        model = copy.deepcopy(self.model)
        with quantized(model, assignment, self.calib, self.sources):
            finetune(model, self.train, self.finetune_steps, self.finetune_lr, self.batch_size, self.seq_len,
                     self.finetune_seed, self.device)
            return self._val_loss(model)


# ------------------------------------------------------------------------------ storage


HEARTBEAT_S = 10  # a RUNNING trial whose process stops beating for 3 intervals is failed and retried


def open_storage(url: str):
    """An Optuna storage: sqlite:///file.db, postgresql://..., mysql://..., or journal:/path/file.log.

    Database storages record a heartbeat for every running trial: a trial whose process died
    (kill -9, a lost machine) is marked failed after 3 missed beats and re-enqueued once
    (`RetryFailedTrialCallback`), by whichever process of the study next asks for a trial."""
    import optuna

    def fail(e: BaseException) -> SearchError:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        return SearchError(f"cannot open Optuna storage {short_repr(url, 120)}: {reason} (a damaged or foreign "
                           "file? pass another --storage or --out)")

    if url.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        path = Path(url[len("journal:"):])
        if path.is_dir():
            raise SearchError(f"--storage {url}: {path} is a directory; give a file")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as e:
            raise fail(e) from None
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    # Optuna >= 4.9 names the retry callback RetryHeartbeatStaleTrialCallback (the old name is deprecated)
    retry = getattr(optuna.storages, "RetryHeartbeatStaleTrialCallback", None) or optuna.storages.RetryFailedTrialCallback
    stale = ("heartbeat_stale_trial_callback" if "heartbeat_stale_trial_callback"
             in inspect.signature(optuna.storages.RDBStorage).parameters else "failed_trial_callback")
    try:
        with warnings.catch_warnings():  # heartbeats are marked experimental (since Optuna 2.9)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=3 * HEARTBEAT_S,
                                              **{stale: retry(max_retry=1)})
    except Exception as e:
        raise fail(e) from None


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
    study: Any = field(default=None, repr=False, compare=False)  # the optuna.Study (figures draw from it)
    pareto: bool = False

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
            "interrupted": self.interrupted, "applied": self.applied, "pareto": self.pareto,
        }

    def outputs(self) -> list[Path]:
        """The files this search writes (the study's SQLite file when the storage is the default)."""
        files = [self.out_dir / "search.json"] + ([self.out_dir / "policy.yaml"] if self.best else [])
        if self.storage.startswith("sqlite:///"):
            files.append(Path(self.storage[len("sqlite:///"):]))
        return files


def _trial_record(t) -> dict[str, Any]:
    values = t.values if t.values is not None else None
    return {
        "number": t.number, "state": t.state.name, "bytes": t.user_attrs.get("bytes"),
        "loss": t.user_attrs.get("loss"), "source": t.user_attrs.get("source", "sampler"),
        "values": values, "allocation": dict(t.params),
    }


# ------------------------------------------------------------------------------ main entry


def study_identity(ckpt_fp: str, space: SearchSpace, budget: int, pareto: bool, finetune_steps: int,
                   granularity: str, eval_batches: int, data_source: str, seed: int, calib_tokens: int,
                   probe_key: str) -> dict[str, Any]:
    """Everything that changes the objective or the search's answer. Trials of one study are only
    comparable if all of it is equal: the default study name is its hash, and a study records it
    and refuses to continue under different settings (`--study NAME` reused with other arguments)."""
    return {"ckpt": ckpt_fp, "formats": [f.spec for f in space.formats], "budget": budget, "pareto": pareto,
            "finetune_steps": finetune_steps, "units": granularity, "eval_batches": eval_batches,
            "data": data_source, "seed": seed, "calib_tokens": calib_tokens, "probe": probe_key}


def default_study_name(identity: dict[str, Any]) -> str:
    return "qtool-search-" + hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]


def _check_identity(study, identity: dict[str, Any], name: str, storage: str) -> None:
    saved = study.user_attrs.get("identity")
    if saved is None:
        if study.get_trials(deepcopy=False):
            raise SearchError(f"study {name!r} in {storage} was not made by this version of qtool search (no "
                              "recorded settings); use another --study or --out")
        study.set_user_attr("identity", identity)
        return
    saved = json.loads(json.dumps(saved))  # storage round trip: tuples become lists
    differ = [k for k in sorted(set(saved) | set(identity)) if saved.get(k) != json.loads(json.dumps(identity.get(k)))]
    if differ:
        shown = "; ".join(f"{k}: {short_repr(saved.get(k), 40)} then, {short_repr(identity.get(k), 40)} now"
                          for k in differ[:3])
        raise SearchError(f"study {name!r} in {storage} was run with other settings ({shown}); its losses are not "
                          "comparable with this search: use another --study or --out")


def _requeue_unfinished_seeds(study, heartbeat: bool) -> int:
    """Enqueue again every seed allocation (MILP and Fisher seeds) that no trial has finished: a
    seed interrupted by Ctrl-C (FAIL without an error), or RUNNING in a storage without heartbeats
    (whose process may have died; if it is alive the seed is evaluated twice, harmlessly). A seed
    that failed with an error (a non-finite loss) is not retried. Returns how many were enqueued."""
    import optuna

    TS = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    settled = {TS.COMPLETE, TS.PRUNED, TS.WAITING} | ({TS.RUNNING} if heartbeat else set())
    done = {json.dumps(t.params, sort_keys=True) for t in trials if t.state in settled}
    done |= {json.dumps(t.params, sort_keys=True) for t in trials if t.state == TS.FAIL and "error" in t.user_attrs}
    n = 0
    for t in trials:
        sig = json.dumps(t.params, sort_keys=True)
        if t.user_attrs.get("source", "sampler") != "sampler" and t.params and sig not in done:
            study.enqueue_trial(dict(t.params), user_attrs={**t.user_attrs, "retry_of": t.number})
            done.add(sig)
            n += 1
    return n


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
    device: str = "auto",
    apply: bool = False,
) -> SearchResult:
    """The search of the module docstring. With `apply`, the chosen allocation is then written as a
    quantized training checkpoint (`apply_allocation`), and with `finetune_steps` its finetuned
    version too. `device` (auto, cpu, cuda) runs the probe, the trials and their finetuning."""
    from qtoolkit.device import resolve_device

    t_start = time.perf_counter()
    budget = parse_budget(budget)
    check_int(trials, "trials", 1)
    if timeout is not None:
        check_number(timeout, "timeout", minimum=0)
    check_int(finetune_steps, "finetune_steps", 0)
    check_seed(seed)
    check_int(calib_tokens, "calib_tokens", 1)
    check_int(eval_batches, "eval_batches", 1)
    if not formats:
        raise ConfigError("formats: give at least one candidate format")
    deadline = None if timeout is None else t_start + timeout
    dev = resolve_device(device)
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
    check_outputs([("--out", out_dir / "search.json", None), ("--out", out_dir / "policy.yaml", None)],
                  [ckpt_path, data_path])
    if apply:
        check_apply_outputs(out_dir, finetune_steps)
    with run_dir_lock(out_dir, "qtool search"):
        return _search(ckpt_path, ckpt, cfg, space, budget, formats, out_dir, data_path, trials, deadline, storage,
                       study_name, granularity, finetune_steps, pareto, seed, calib_tokens, eval_batches, seeds_k,
                       progress, t_start, device, dev, apply)


def _search(ckpt_path, ckpt, cfg, space, budget, formats, out_dir, data_path, trials, deadline, storage,
            study_name, granularity, finetune_steps, pareto, seed, calib_tokens, eval_batches, seeds_k,
            progress, t_start, device, dev, apply) -> SearchResult:
    import optuna

    from qtoolkit.search.probes import checkpoint_fingerprint
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import checkpoint_data_config

    probe = run_probe(ckpt_path, formats, granularity, data_path, calib_tokens, seed,
                      timeout=None if deadline is None else max(1.0, deadline - time.perf_counter()),
                      progress=progress, device=device)
    sens = probe.sensitivity()

    model = float_model(ckpt).to(dev)
    recipe = ckpt.get("recipe") or {}
    train_cfg = recipe.get("train") or {}
    calibrated = [f.key for f in formats if quantizers.build(f.spec).calibration]  # per spec: intn calibrates with gptq only
    data = prepare_data(checkpoint_data_config(ckpt, data_path), cfg.vocab_size,
                        tokenizer=tokenizer_from_json(ckpt["tokenizer"]), need_train=finetune_steps > 0 or bool(calibrated),
                        progress=progress)
    bs, sl = int(train_cfg.get("batch_size") or 8), int(train_cfg.get("seq_len") or cfg.max_seq_len)
    data.val.require_window(sl)
    if data.train is not None:
        data.train.require_window(sl)
    val_batches = [(x.to(dev), y.to(dev)) for x, y in data.val.eval_batches(bs, sl, eval_batches)]
    # the calibration windows of `qtool quantize` (training.ptq.checkpoint_calibration), when a format needs data
    calib = checkpoint_calibration(ckpt, calib_tokens=calib_tokens, seed=seed, train=data.train)[0] if calibrated else None
    evaluate = Evaluator(model, space, val_batches, data.train, finetune_steps,
                         float(train_cfg.get("lr", 1e-3)) * float(train_cfg.get("min_lr_ratio", 0.1)), bs, sl, seed,
                         calib=calib, sources=source_quantizers(ckpt), device=dev)

    storage_url = storage or f"sqlite:///{(out_dir / 'search.db').resolve()}"
    identity = study_identity(checkpoint_fingerprint(ckpt["path"]), space, budget, pareto, finetune_steps,
                              granularity, eval_batches, str(data.info.get("source")), seed, calib_tokens, probe.key)
    name = study_name or default_study_name(identity)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # library code never prints; failures are in the records
    sampler = (optuna.samplers.NSGAIISampler(seed=seed) if pareto
               else optuna.samplers.TPESampler(seed=seed, multivariate=True, n_startup_trials=5))
    opened = open_storage(storage_url)
    heartbeat = isinstance(opened, optuna.storages.RDBStorage)
    try:
        study = optuna.create_study(
            storage=opened, study_name=name, sampler=sampler, load_if_exists=True,
            **({"directions": ["minimize", "minimize"]} if pareto else {"direction": "minimize"}),
        )
    except ValueError as e:  # e.g. an existing study with other directions
        raise SearchError(f"study {name!r} in {storage_url}: {str(e)[:200]}; use another --study or --out") from None
    _check_identity(study, identity, name, storage_url)

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
    if heartbeat:  # trials of processes that died are failed now (and re-enqueued by the storage's callback)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
    _requeue_unfinished_seeds(study, heartbeat)

    TS = optuna.trial.TrialState

    def n_complete() -> int:
        return sum(t.state == TS.COMPLETE for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,)))

    counts = {"rejected": 0, "done": n_complete()}
    max_rejections = 200 * trials

    def objective(trial):
        alloc = {u.name: trial.suggest_categorical(u.name, space.keys) for u in space.units}
        nbytes = space.bytes_of(alloc)
        trial.set_user_attr("bytes", nbytes)
        if nbytes > budget:  # rejected before any evaluation
            counts["rejected"] += 1
            raise optuna.TrialPruned(f"{nbytes} B over the budget")
        loss = evaluate(alloc)
        if not math.isfinite(loss):
            trial.set_user_attr("error", f"non-finite loss {loss}")
            return [nbytes, math.nan] if pareto else math.nan  # Optuna records the trial as failed
        trial.set_user_attr("loss", loss)
        return [nbytes, loss] if pareto else loss

    def seeds_waiting() -> bool:  # an exact seed (a retried one included) is never left unevaluated
        return any(t.user_attrs.get("source", "sampler") != "sampler"
                   for t in study.get_trials(deepcopy=False, states=(TS.WAITING,)))

    def after_trial(study, frozen) -> None:
        if frozen.state == TS.COMPLETE:
            counts["done"] = n_complete()
            progress("search trials", min(counts["done"], trials), trials)
        if (counts["done"] >= trials and not seeds_waiting()) or counts["rejected"] >= max_rejections:
            study.stop()

    interrupted = False
    progress("search trials", counts["done"], trials)
    remaining = None if deadline is None else deadline - time.perf_counter()
    if (counts["done"] < trials or seeds_waiting()) and (remaining is None or remaining > 0):
        try:
            # study.optimize, not ask/tell: it runs the heartbeat of each trial and fails stale ones
            study.optimize(objective, timeout=remaining, callbacks=[after_trial], gc_after_trial=False)
        except KeyboardInterrupt:  # Optuna has marked the running trial failed
            interrupted = True

    records = [_trial_record(t) for t in study.get_trials(deepcopy=False)]
    complete = [r for r in records if r["state"] == "COMPLETE" and r["bytes"] is not None and r["bytes"] <= budget]
    # a uniform allocation that fits and was measured is a candidate too: the answer is never worse
    uniform = [{"number": None, "state": "REFERENCE", "bytes": ref["bytes"], "loss": ref["loss"],
                "source": f"uniform {f}", "values": None, "allocation": space.uniform(f)}
               for f, ref in references.items() if f in space.keys and ref["bytes"] <= budget
               and ref["loss"] is not None and math.isfinite(ref["loss"])]
    candidates = complete + uniform
    best = min(candidates, key=lambda r: r["loss"]) if candidates else None
    front = []
    for r in sorted(candidates, key=lambda r: (r["bytes"], r["loss"])):
        if not front or r["loss"] < front[-1]["loss"]:
            front.append({"number": r["number"], "bytes": r["bytes"], "loss": r["loss"], "source": r["source"]})
    policy = space.policy(best["allocation"]) if best else {}
    result = SearchResult(
        out_dir=out_dir, budget=budget, min_bytes=space.min_bytes, max_bytes=space.max_bytes, space=space,
        probe=probe, study_name=name, storage=storage_url, trials=records, best=best, references=references,
        pareto_front=front, policy=policy, interrupted=interrupted, rejected=counts["rejected"],
        elapsed_s=time.perf_counter() - t_start, study=study, pareto=pareto,
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
    origin = (f"trial {best['number']}, {best['source']}" if best["number"] is not None
              else f"{best['source']}: no searched allocation that fits did better")
    header = (
        "# qtool search: mixed-precision policy\n"
        f"# budget {result.budget:,} B; this policy: {best['bytes']:,} B (qtool plan gives the same figure)\n"
        f"# validation loss {best['loss']:.4f} ({origin})\n"
        f"# use: qtool train --recipe ternary_all --set policy={result.out_dir / 'policy.yaml'}\n"
    )
    atomic_write_text(result.out_dir / "policy.yaml", header + yaml.safe_dump(result.policy, sort_keys=False))


__all__ = ["Evaluator", "SearchError", "SearchResult", "SearchSpace", "apply_allocation", "build_space",
           "milp_allocations", "open_storage", "parse_budget", "run_search"]
