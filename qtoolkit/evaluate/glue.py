"""Downstream transfer: finetune a checkpoint on GLUE tasks (MRPC, SST-2, CoLA) and score its dev split.

`run_glue(ckpt, GlueConfig(...), compare=None)` runs, for every task and seed:

    backbone (checkpoint, its policy or --policy; QAT)  +  fresh head (seeded)      classifier.py
    train split -> `a <eos> [b <eos>]` ids, truncated to max_len                      glue_data.py
    AdamW, `epochs` passes over the training split in length-bucketed random batches, warmup then
    cosine decay to 0; backbone at `lr`, head at `head_lr`; grad clip; bf16 autocast on CUDA
    dev split -> predictions -> the task's metrics (MRPC F1 + accuracy, SST-2 accuracy, CoLA MCC)

and returns per-seed metrics, their mean, sample standard deviation (n - 1), min and max, beside
the majority-class baseline (the training split's most frequent label predicted for every dev
example). With `compare`, the second checkpoint goes through the same protocol (same seeds, same
batches) and `GlueReport.differences()` sets the two side by side.

Seeds: seed `s` fixes the head's initialisation and the batch order; the backbone always starts
from the checkpoint. Subsampling (`max_train`) draws one subset with `seed` for every run, so the
seeds and both checkpoints see the same examples; by default only SST-2 is subsampled (20,000 of
its 67,349 training phrases, one epoch), which keeps `small` at about a minute per SST-2 run on 2 CPU
cores.

`freeze=True` is a linear probe: the backbone is not trained, so its pooled features are computed
once per split and only the head is trained on them, standardized (same schedule, at `head_lr`;
the standardization is folded into the head afterwards, so the classifier reads raw features).

The training pieces are the training stage's: `loss_fn`, `param_groups`, `lr_and_wd`, `autocast`,
`resolve_device` (qtoolkit.device). Metrics are in GLUE points (x100) in every output.
Library code: reports through `callback(GlueEvent)` and never prints.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from qtoolkit.checkpoint import load_checkpoint
from qtoolkit.device import resolve_device
from qtoolkit.errors import ConfigError, TrainingDiverged
from qtoolkit.evaluate.classifier import (
    POOLINGS,
    SequenceClassifier,
    load_backbone,
    save_classifier,
)
from qtoolkit.evaluate.glue_data import (
    EncodedSplit,
    GlueTask,
    encode_split,
    load_split,
    parse_tasks,
)
from qtoolkit.evaluate.metrics import score
from qtoolkit.training.data import eos_id, tokenizer_from_json
from qtoolkit.training.recipe import TrainConfig
from qtoolkit.training.trainer import autocast, loss_fn, lr_and_wd, param_groups

# The TernaryLM paper's dev-set figures (arXiv 2602.07374): a 132M ternary decoder pretrained on
# far more text than qtoolkit's CPU checkpoints see, and its BERT-Base reference. GLUE points.
PAPER = {
    "ternarylm-132m": {"mrpc": {"f1": 82.47}, "sst2": {"accuracy": 88.92}, "cola": {"mcc": 47.23}},
    "bert-base": {"mrpc": {"f1": 84.98}, "sst2": {"accuracy": 92.43}, "cola": {"mcc": 56.78}},
}


@dataclass
class GlueConfig:
    """The finetuning protocol (one for every checkpoint of a comparison)."""

    tasks: str = "all"  # mrpc | sst2 | cola | a comma list | all
    data_dir: str | None = None  # local GLUE TSVs; None = the Hub's nyu-mll/glue
    epochs: int | None = None  # None: the task's default (MRPC 2, SST-2 1, CoLA 3)
    lr: float = 3e-4  # backbone peak learning rate
    head_lr: float = 1e-3  # head peak learning rate
    batch_size: int = 32
    max_len: int = 128  # tokens per example (capped at the model's max_seq_len)
    max_train: int | None = None  # at most this many training examples (one seeded subset); None: the
    # task's default (SST-2 20,000 of 67,349; MRPC and CoLA all); 0: all of every task
    weight_decay: float = 0.01
    warmup: float = 0.06  # fraction of the steps
    grad_clip: float = 1.0
    pooling: str = "last"
    freeze: bool = False  # linear probe: train the head only
    policy: Any = None  # None: the checkpoint's own policy; else see classifier.resolve_policy
    seeds: int = 3
    seed: int = 0  # first seed; runs use seed, seed + 1, ...
    device: str = "auto"
    eval_batch_size: int = 128

    def __post_init__(self) -> None:
        errors = []
        for name in ("batch_size", "max_len", "seeds", "eval_batch_size"):
            if getattr(self, name) < 1:
                errors.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.epochs is not None and self.epochs < 1:
            errors.append(f"epochs must be >= 1, got {self.epochs}")
        if self.max_train is not None and self.max_train < 0:
            errors.append(f"max_train must be >= 0 (0 = all examples), got {self.max_train}")
        for name in ("lr", "head_lr"):
            if not getattr(self, name) > 0:
                errors.append(f"{name} must be > 0, got {getattr(self, name)}")
        if not 0 <= self.warmup < 1:
            errors.append(f"warmup must be a fraction in [0, 1), got {self.warmup}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            errors.append("weight_decay and grad_clip must be >= 0")
        if self.pooling not in POOLINGS:
            errors.append(f"pooling must be one of {', '.join(POOLINGS)}, got {self.pooling!r}")
        if errors:
            raise ConfigError("; ".join(errors))
        parse_tasks(self.tasks)  # unknown task names fail here, before any work

    def task_list(self) -> list[GlueTask]:
        return parse_tasks(self.tasks)

    def epochs_for(self, task: GlueTask) -> int:
        return self.epochs or task.default_epochs

    def max_train_for(self, task: GlueTask) -> int | None:
        """Training examples to use (None: all)."""
        if self.max_train is None:
            return task.default_max_train
        return self.max_train or None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["policy"] = self.policy if self.policy is None or isinstance(self.policy, dict) else str(self.policy)
        d["epochs_per_task"] = {t.name: self.epochs_for(t) for t in self.task_list()}
        d["max_train_per_task"] = {t.name: self.max_train_for(t) for t in self.task_list()}
        return d


@dataclass
class GlueEvent:
    kind: str  # "load" | "data" | "start" | "features" (linear probe) | "step" | "result"
    data: dict[str, Any] = field(default_factory=dict)


Callback = Callable[[GlueEvent], None]


def _noop(event: GlueEvent) -> None:
    pass


# ------------------------------------------------------------------------------ results


def summarize(values: list[float]) -> dict[str, float]:
    """mean, sample standard deviation (n - 1; 0 for one value), min, max."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


@dataclass
class SeedRun:
    seed: int
    metrics: dict[str, float]  # GLUE points
    train_loss: float  # mean over the last epoch
    steps: int
    elapsed_s: float


@dataclass
class TaskResult:
    task: str
    title: str
    metrics: list[str]  # the first is the headline metric
    data: dict[str, Any]  # source and per-split encoding statistics
    majority: dict[str, Any]  # {"label", "label_name", metric: points}
    epochs: int
    steps: int
    runs: list[SeedRun] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        return {m: summarize([r.metrics[m] for r in self.runs]) for m in self.metrics} if self.runs else {}

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "title": self.title, "metrics": self.metrics, "data": self.data,
                "majority": self.majority, "epochs": self.epochs, "steps": self.steps,
                "runs": [asdict(r) for r in self.runs], "summary": self.summary()}


@dataclass
class GlueResult:
    """One checkpoint through the protocol."""

    checkpoint: str
    kind: str  # "train" | "packed"
    step: int | None
    policy: dict[str, Any]
    policy_source: str  # "checkpoint" or the --policy value
    quantizers: dict[str, int]  # parameters per quantizer in the finetuned backbone
    device: str
    tasks: dict[str, TaskResult] = field(default_factory=dict)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "kind": self.kind, "step": self.step, "policy": self.policy,
                "policy_source": self.policy_source, "quantizers": self.quantizers, "device": self.device,
                "elapsed_s": self.elapsed_s, "tasks": {k: v.to_dict() for k, v in self.tasks.items()}}


def difference(a: TaskResult, b: TaskResult, metric: str) -> dict[str, Any]:
    """B - A on one metric, against the seed spread.

    `exceeds_spread`: the seed ranges do not overlap (every seed of one checkpoint scores above every
    seed of the other). For 3 + 3 seeds that happens by chance with probability 2/20 = 10% when the
    two are equally good (a permutation argument, no normality assumed). `welch_t` is the
    difference over sqrt(sA^2/nA + sB^2/nB), for readers who want a t statistic.
    """
    sa, sb = a.summary()[metric], b.summary()[metric]
    diff = sb["mean"] - sa["mean"]
    se = math.sqrt(sa["std"] ** 2 / sa["n"] + sb["std"] ** 2 / sb["n"])
    separated = sb["min"] > sa["max"] or sa["min"] > sb["max"]
    return {"a": sa["mean"], "b": sb["mean"], "diff": diff, "std_a": sa["std"], "std_b": sb["std"],
            "welch_t": diff / se if se > 0 else None, "exceeds_spread": separated}


@dataclass
class GlueReport:
    config: GlueConfig
    results: list[GlueResult]  # the checkpoint, then the --compare one

    def differences(self) -> dict[str, dict[str, Any]] | None:
        """{task: {metric: difference(A, B)}} (B - A), or None without a comparison."""
        if len(self.results) < 2:
            return None
        a, b = self.results[0].tasks, self.results[1].tasks
        return {t: {m: difference(a[t], b[t], m) for m in a[t].metrics} for t in a if t in b}

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "metrics_unit": "GLUE points (x100)",
                "results": [r.to_dict() for r in self.results], "differences": self.differences(),
                "paper": PAPER}


# ------------------------------------------------------------------------------ batches


def _pad(ids: list[list[int]], rows: list[int] | np.ndarray, pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) ids and (B,) lengths of the given rows."""
    seqs = [ids[i] for i in rows]
    lengths = torch.tensor([len(s) for s in seqs])
    x = torch.full((len(seqs), int(lengths.max())), pad_id, dtype=torch.long)
    for j, s in enumerate(seqs):
        x[j, : len(s)] = torch.tensor(s)
    return x, lengths


def epoch_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: int = 50) -> list[np.ndarray]:
    """Random batches of one epoch; a pure function of (seed, epoch). Examples of similar length
    share a batch (sorted within random chunks of `bucket` batches) to keep padding low; the
    order of batches is shuffled."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    lens = np.asarray(lengths)
    batches = []
    for start in range(0, len(order), batch_size * bucket):
        chunk = order[start : start + batch_size * bucket]
        chunk = chunk[np.argsort(lens[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _eval_batches(lengths: list[int], batch_size: int) -> Iterator[np.ndarray]:
    order = np.argsort(np.asarray(lengths), kind="stable")
    for i in range(0, len(order), batch_size):
        yield order[i : i + batch_size]


# ------------------------------------------------------------------------------ one run


def _schedule(total_steps: int, warmup: float) -> TrainConfig:
    """The training stage's cosine schedule as a multiplier (lr = 1), decaying to 0."""
    return TrainConfig(steps=total_steps, warmup_steps=int(warmup * total_steps), lr=1.0, min_lr_ratio=0.0)


def _optimizer(cfg: GlueConfig, modules: list[tuple[nn.Module, float]]) -> torch.optim.AdamW:
    """AdamW over (module, peak lr) pairs, with the training stage's weight-decay groups (matrices
    decay; norms and quantizer scales do not). Parameters that get no gradient (lm_head) never move."""
    groups = []
    for module, lr in modules:
        for g in param_groups(module, cfg.weight_decay):
            if g["params"]:
                groups.append({**g, "base_lr": lr, "lr": lr})
    return torch.optim.AdamW(groups, betas=(0.9, 0.999), eps=1e-8)


def _train_epoch(optimizer: torch.optim.Optimizer, cfg: GlueConfig, batches: list[np.ndarray],
                 step_fn: Callable[[np.ndarray], tuple[Tensor, Tensor]], total: int, step0: int,
                 callback: Callback, label: str) -> tuple[int, float]:
    """One epoch of optimizer steps; returns (steps done so far, mean loss of the epoch)."""
    schedule = _schedule(total, cfg.warmup)
    step, losses = step0, []
    for rows in batches:
        scale, _ = lr_and_wd(step, schedule)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * scale
        logits, y = step_fn(rows)
        loss, _ = loss_fn(logits, y, 0.0)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"{label}: loss became {loss.item()} at step {step + 1}; try a lower --lr")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
        optimizer.step()
        step += 1
        losses.append(loss.item())
        callback(GlueEvent("step", {"label": label, "step": step, "total": total, "loss": loss.item()}))
    return step, statistics.fmean(losses)


@torch.no_grad()
def _features(clf: SequenceClassifier, enc: EncodedSplit, cfg: GlueConfig, pad_id: int, device) -> Tensor:
    """Pooled (N, d) features of every example, in the split's order."""
    clf.eval()
    out = torch.empty(len(enc), clf.head.in_features)
    for rows in _eval_batches([len(x) for x in enc.ids], cfg.eval_batch_size):
        x, lengths = _pad(enc.ids, rows, pad_id)
        with autocast(device):
            out[torch.as_tensor(rows)] = clf.features(x.to(device), lengths.to(device)).float().cpu()
    return out


@torch.no_grad()
def predict(clf: SequenceClassifier, enc: EncodedSplit, pad_id: int, batch_size: int = 128,
            device: torch.device | str = "cpu") -> list[int]:
    """Predicted labels of every example of an encoded split, in its order."""
    device = torch.device(device)
    was_training = clf.training
    clf.eval()
    preds = torch.empty(len(enc), dtype=torch.long)
    try:
        for rows in _eval_batches([len(x) for x in enc.ids], batch_size):
            x, lengths = _pad(enc.ids, rows, pad_id)
            with autocast(device):
                logits = clf(x.to(device), lengths.to(device))
            preds[torch.as_tensor(rows)] = logits.argmax(-1).cpu()
    finally:
        clf.train(was_training)
    return preds.tolist()


def finetune(backbone: nn.Module, task: GlueTask, train: EncodedSplit, dev: EncodedSplit, cfg: GlueConfig,
             seed: int, pad_id: int, device: torch.device, callback: Callback = _noop, label: str = "",
             feature_cache: dict[str, Tensor] | None = None) -> tuple[SequenceClassifier, SeedRun]:
    """Finetune a copy of `backbone` with a fresh head on `train`; score on `dev`.

    With `cfg.freeze`, the pooled features of both splits are computed once and kept in
    `feature_cache` (pass the same dict to every seed of a task: the frozen backbone gives the same
    features each time)."""
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    clf = SequenceClassifier(copy.deepcopy(backbone), len(task.label_names), cfg.pooling).to(device)
    epochs = cfg.epochs_for(task)
    lengths = [len(x) for x in train.ids]
    per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = epochs * per_epoch
    labels = torch.tensor(train.labels)
    callback(GlueEvent("start", {"label": label, "task": task.name, "seed": seed, "total": total}))

    cache = feature_cache if feature_cache is not None else {}
    if cfg.freeze:
        clf.backbone.requires_grad_(False)
        for name, split in (("train", train), ("dev", dev)):
            if name not in cache:
                callback(GlueEvent("features", {"label": label, "task": task.name, "split": name, "examples": len(split)}))
                cache[name] = _features(clf, split, cfg, pad_id, device)
        # standardized features: the raw ones sit far from 0 with small spreads (e.g. means of +-3,
        # deviations of 0.2-0.6 for `small`), which SGD on a linear head fits poorly in a few epochs
        mu, sd = cache["train"].mean(0), cache["train"].std(0).clamp_min(1e-6)
        feats = ((cache["train"] - mu) / sd).to(device)
        optimizer = _optimizer(cfg, [(clf.head, cfg.head_lr)])

        def step_fn(rows):
            idx = torch.as_tensor(rows, device=feats.device)
            return clf.head(feats[idx]), labels[idx.cpu()].to(device)
    else:
        optimizer = _optimizer(cfg, [(clf.backbone, cfg.lr), (clf.head, cfg.head_lr)])

        def step_fn(rows):
            x, lens = _pad(train.ids, rows, pad_id)
            with autocast(device):
                logits = clf(x.to(device), lens.to(device))
            return logits.float(), labels[torch.as_tensor(rows)].to(device)

    clf.train()
    step, loss = 0, float("nan")
    for epoch in range(epochs):
        batches = epoch_batches(lengths, cfg.batch_size, seed, epoch)
        step, loss = _train_epoch(optimizer, cfg, batches, step_fn, total, step, callback, label)
    if cfg.freeze:
        with torch.no_grad():  # fold the standardization into the head: it reads raw features again
            clf.head.weight.div_(sd.to(device))
            clf.head.bias.sub_(clf.head.weight @ mu.to(device))
            preds = clf.head(cache["dev"].to(device)).argmax(-1).cpu().tolist()
    else:
        preds = predict(clf, dev, pad_id, cfg.eval_batch_size, device)
    metrics = {m: 100 * v for m, v in score(task.metrics, dev.labels, preds).items()}
    run = SeedRun(seed, metrics, loss, step, time.perf_counter() - t0)
    callback(GlueEvent("result", {"label": label, "task": task.name, "seed": seed, "metrics": metrics,
                                  "elapsed_s": run.elapsed_s, "train_loss": loss}))
    return clf, run


def majority_baseline(task: GlueTask, train: EncodedSplit, dev: EncodedSplit) -> dict[str, Any]:
    """The training split's most frequent label, predicted for every dev example."""
    counts = np.bincount(train.labels, minlength=len(task.label_names))
    label = int(counts.argmax())
    metrics = score(task.metrics, dev.labels, [label] * len(dev))
    return {"label": label, "label_name": task.label_names[label], **{m: 100 * v for m, v in metrics.items()}}


# ------------------------------------------------------------------------------ protocol


def _subsample(enc: EncodedSplit, n: int | None, seed: int) -> EncodedSplit:
    if n is None or n >= len(enc):
        return enc
    rows = np.sort(np.random.default_rng([seed, 7919]).choice(len(enc), n, replace=False))
    truncated = enc.truncated  # counted over the whole split; reported as such
    return EncodedSplit([enc.ids[i] for i in rows], [enc.labels[i] for i in rows], enc.max_len, truncated)


def _run_one(path: str | Path, cfg: GlueConfig, data: dict[str, tuple], callback: Callback, label: str,
             save_dir: Path | None, save_prefix: str) -> GlueResult:
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    ckpt = load_checkpoint(path)
    backbone, coverage, policy = load_backbone(ckpt, cfg.policy, cfg.freeze)
    tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    pad_id = eos_id(tokenizer)  # any id would do: never read (causal attention, real-position pooling)
    max_len = min(cfg.max_len, backbone.config.max_seq_len)
    if coverage is not None:
        quantizers = coverage.params_by_quantizer()
    else:  # a frozen packed backbone: its stored layers
        quantizers = {}
        for layer in ckpt["layers"]:
            if layer["kind"] != "param" and not layer.get("tied_to"):
                name = layer["spec"]["name"]
                quantizers[name] = quantizers.get(name, 0) + layer["params"]
    result = GlueResult(str(ckpt["path"]), ckpt["kind"], ckpt.get("step", (ckpt.get("source") or {}).get("step")),
                        policy, "checkpoint" if cfg.policy is None else str(cfg.policy), quantizers, str(device))
    callback(GlueEvent("load", {"label": label, "checkpoint": result.checkpoint, "kind": result.kind,
                                "policy_source": result.policy_source, "coverage": coverage,
                                "device": str(device), "max_len": max_len, "freeze": cfg.freeze}))
    for task in cfg.task_list():
        train_split, dev_split = data[task.name]
        train = encode_split(train_split, tokenizer, max_len)
        dev = encode_split(dev_split, tokenizer, max_len)
        used = _subsample(train, cfg.max_train_for(task), cfg.seed)
        info = {"source": {"train": train_split.source, "validation": dev_split.source},
                "train": {**train.stats(), "used": len(used)}, "validation": dev.stats()}
        callback(GlueEvent("data", {"label": label, "task": task.name, **info}))
        epochs = cfg.epochs_for(task)
        res = TaskResult(task.name, task.title, list(task.metrics), info, majority_baseline(task, used, dev),
                         epochs, epochs * math.ceil(len(used) / cfg.batch_size))
        cache: dict[str, Tensor] = {}  # linear probe: the frozen features, shared by the seeds
        for seed in range(cfg.seed, cfg.seed + cfg.seeds):
            clf, run = finetune(backbone, task, used, dev, cfg, seed, pad_id, device, callback, label, cache)
            res.runs.append(run)
            if save_dir is not None:
                save_classifier(clf, ckpt, coverage, policy, save_dir / f"{save_prefix}{task.name}-seed{seed}.pt",
                                {"task": task.name, "labels": list(task.label_names), "seed": seed,
                                 "max_len": max_len, "metrics": run.metrics})
            del clf
        result.tasks[task.name] = res
    result.elapsed_s = time.perf_counter() - t0
    return result


def load_task_data(cfg: GlueConfig) -> dict[str, tuple]:
    """{task: (train GlueSplit, validation GlueSplit)} for the configured tasks (read once)."""
    return {t.name: (load_split(t, "train", cfg.data_dir), load_split(t, "validation", cfg.data_dir))
            for t in cfg.task_list()}


def run_glue(ckpt: str | Path, config: GlueConfig | None = None, compare: str | Path | None = None,
             save_dir: str | Path | None = None, callback: Callback = _noop) -> GlueReport:
    """The protocol on `ckpt` (and on `compare` when given): see the module docstring.

    `save_dir`: write every finetuned classifier there as a training checkpoint
    (`<task>-seed<S>.pt`, `compare-<task>-seed<S>.pt`; see classifier.save_classifier).
    """
    cfg = config or GlueConfig()
    save = Path(save_dir) if save_dir is not None else None
    if save is not None:
        planned = [save / f"{prefix}{t.name}-seed{s}.pt" for prefix in ("", "compare-")[: 2 if compare else 1]
                   for t in cfg.task_list() for s in range(cfg.seed, cfg.seed + cfg.seeds)]
        existing = [str(p) for p in planned if p.exists()]
        if existing:
            raise ConfigError(f"{save} already holds {', '.join(existing[:3])}{' ...' if len(existing) > 3 else ''}; "
                              "choose another output folder")
    data = load_task_data(cfg)
    results = [_run_one(ckpt, cfg, data, callback, "A" if compare else "", save, "")]
    if compare is not None:
        results.append(_run_one(compare, cfg, data, callback, "B", save, "compare-"))
    return GlueReport(cfg, results)


__all__ = ["PAPER", "GlueConfig", "GlueEvent", "GlueReport", "GlueResult", "SeedRun", "TaskResult", "difference",
           "epoch_batches", "finetune", "load_task_data", "majority_baseline", "predict", "run_glue", "summarize"]
