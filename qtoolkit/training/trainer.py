"""Quantization-aware training from a recipe, and evaluation of checkpoints.

`train(recipe, out_dir)` builds the model, applies the recipe's policy, prepares data, and runs
AdamW with the recipe's schedule. It reports through a callback (`TrainEvent`s) and never prints;
`qtoolkit.report` renders the events as a progress bar and a summary.

Files in `out_dir`:
    ckpt.pt         the latest checkpoint (periodic, final, and on interruption); atomic writes
    metrics.jsonl   one JSON object per line: {"type": "train", step, loss, ce, lr, tokens_per_s,
                    grad_norm, elapsed} every `log_every` steps and {"type": "eval", step, val_loss,
                    val_ppl, train_ce, train_val_ratio} at every evaluation
    recipe.yaml     the resolved recipe of the run

Loss: cross-entropy with label smoothing (the training objective); every reported perplexity is
exp(plain cross-entropy). Batches are a pure function of (seed, step) and the checkpoint carries
optimizer and RNG state, so `resume=True` reaches bit-identical weights to an uninterrupted run.
A non-finite loss stops the run with `TrainingDiverged` before the bad update; the last
checkpoint on disk is the last good one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qtoolkit.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from qtoolkit.errors import CheckpointError, ConfigError, TrainingDiverged
from qtoolkit.pack import model_from_checkpoint
from qtoolkit.policy import Coverage, build_model
from qtoolkit.training.data import PreparedData, TokenStream, prepare_data, tokenizer_from_json
from qtoolkit.training.recipe import DataConfig, Recipe, TrainConfig, save_recipe


@dataclass
class TrainEvent:
    kind: str  # "data" | "start" | "step" | "eval" | "checkpoint" | "stop"
    step: int = 0
    data: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    out_dir: Path
    checkpoint: Path
    steps: int
    total_steps: int
    val_loss: float
    val_ppl: float
    train_ce: float
    tokens_per_s: float
    elapsed_s: float
    params: int
    coverage: Coverage
    interrupted: bool = False


Callback = Callable[[TrainEvent], None]


def _noop(event: TrainEvent) -> None:
    pass


# ------------------------------------------------------------------------------ pieces


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available on this machine")
    return device


def lr_and_wd(step: int, cfg: TrainConfig) -> tuple[float, float]:
    """Learning rate and weight decay for `step` (0-based).

    cosine:     linear warmup to `lr`, then cosine decay to `lr * min_lr_ratio` at `steps`.
    two_stage:  BitNet b1.58's schedule: the same curve, but from the midpoint on the learning rate
                is multiplied by `stage2_lr_scale` and weight decay is switched off.
    """
    total, warmup = cfg.steps, cfg.warmup_steps or 0
    if step < warmup:
        lr = cfg.lr * (step + 1) / warmup
    else:
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        floor = cfg.lr * cfg.min_lr_ratio
        lr = floor + 0.5 * (cfg.lr - floor) * (1 + math.cos(math.pi * progress))
    wd = cfg.weight_decay
    if cfg.schedule == "two_stage" and step >= total // 2:
        lr, wd = lr * cfg.stage2_lr_scale, 0.0
    return lr, wd


def loss_fn(logits: Tensor, targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(training loss with label smoothing, plain cross-entropy), both means over tokens."""
    logp = F.log_softmax(logits.float().flatten(0, -2), dim=-1)
    nll = -logp.gather(-1, targets.reshape(-1, 1)).squeeze(-1)
    ce = nll.mean()
    if label_smoothing == 0:
        return ce, ce
    smooth = -logp.mean(dim=-1)
    return (1 - label_smoothing) * ce + label_smoothing * smooth.mean(), ce


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices only; not on norms or quantizer scales."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and ".quantizer." not in f".{name}" else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "decays": True},
        {"params": no_decay, "weight_decay": 0.0, "decays": False},
    ]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on the CPU (where bf16 matmuls are slower, not faster)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, val: TokenStream, batch_size: int, seq_len: int, max_batches: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Mean plain cross-entropy over fixed validation windows, and its perplexity."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in val.eval_batches(batch_size, seq_len, max_batches):
            x, y = x.to(device), y.to(device)
            with autocast(device):
                logits = model(x)
            _, ce = loss_fn(logits, y, 0.0)
            total += ce.item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    loss = total / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


class _StopFlag:
    """Set by Ctrl-C (first press) or by the caller; the loop stops at the next step boundary."""

    def __init__(self, external: threading.Event | None):
        self.event = external or threading.Event()
        self._previous = None

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if self.event.is_set():  # second Ctrl-C: stop now
                    raise KeyboardInterrupt
                self.event.set()

            self._previous = signal.signal(signal.SIGINT, handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def is_set(self) -> bool:
        return self.event.is_set()


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop log lines from steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto_step:
                keep.append(line)
        except json.JSONDecodeError:
            continue  # a line cut by a crash
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


# ------------------------------------------------------------------------------ main loop


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = False,
    callback: Callback = _noop,
    stop: threading.Event | None = None,
) -> TrainResult:
    recipe = recipe.resolved()
    cfg = recipe.train
    out_dir = Path(out_dir)
    ckpt_path = out_dir / "ckpt.pt"
    metrics_path = out_dir / "metrics.jsonl"

    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"{ckpt_path}: nothing to resume (no checkpoint in {out_dir})")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["kind"] != "train":
            raise CheckpointError(f"{ckpt_path}: a {ckpt['kind']} checkpoint cannot be resumed")
        saved = ckpt["recipe"]
        for section in ("model", "policy"):
            if saved[section] != recipe.to_dict()[section]:
                raise CheckpointError(
                    f"{ckpt_path}: the checkpoint's {section} differs from this recipe's; resume with "
                    f"the recipe the run started with (saved in {out_dir / 'recipe.yaml'})"
                )
    elif ckpt_path.exists():
        raise CheckpointError(
            f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )

    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model_config = recipe.model_config()
    model, coverage = build_model(model_config, recipe.policy)
    model.to(device)

    def data_progress(stage: str, done: int, total: int | None) -> None:
        callback(TrainEvent("data", 0, {"stage": stage, "done": done, "total": total}))

    tokens_needed = cfg.steps * cfg.batch_size * cfg.seq_len
    tokenizer = tokenizer_from_json(ckpt["tokenizer"]) if ckpt else None
    data = prepare_data(recipe.data, model_config.vocab_size, tokens_needed, tokenizer, progress=data_progress)

    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps
    )
    step = 0
    last_eval: dict[str, float] = {}
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step = ckpt["step"]
        torch.set_rng_state(ckpt["rng"]["torch"])
        last_eval = dict(ckpt.get("metrics") or {})
        _rewrite_metrics(metrics_path, step)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out_dir / "recipe.yaml")

    def checkpoint() -> None:
        state = {
            "kind": "train",
            "model_config": model_config.to_dict(),
            "recipe": recipe.to_dict(),
            "policy": dict(recipe.policy),
            "coverage": coverage.to_dict(),
            "tokenizer": data.tokenizer.to_str(),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "rng": {"torch": torch.get_rng_state()},
            "data": data.info,
            "metrics": last_eval,
        }
        save_checkpoint(state, ckpt_path)
        callback(TrainEvent("checkpoint", step, {"path": str(ckpt_path)}))

    def run_eval() -> dict[str, float]:
        return evaluate(model, data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device)

    n_params = sum(p.numel() for p in model.parameters())
    callback(TrainEvent("start", step, {
        "total_steps": cfg.steps, "params": n_params, "coverage": coverage, "device": str(device),
        "data": data.description, "data_info": data.info, "recipe": recipe.name,
        "tokens_per_step": cfg.batch_size * cfg.seq_len, "resumed": ckpt is not None,
    }))

    t_start = time.perf_counter()
    window = {"loss": 0.0, "ce": 0.0, "n": 0, "t": t_start, "tokens": 0}
    recent_ce = float("nan")
    tok_per_s = live_rate = 0.0
    interrupted = False
    model.train()
    with _StopFlag(stop) as stop_flag, open(metrics_path, "a") as log:

        def log_line(record: dict[str, Any]) -> None:
            log.write(json.dumps(record) + "\n")
            log.flush()

        while step < cfg.steps:
            if stop_flag.is_set():
                interrupted = True
                break
            t_step = time.perf_counter()
            lr, wd = lr_and_wd(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd if group["decays"] else 0.0
            x, y = data.train.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
            x, y = x.to(device), y.to(device)
            with autocast(device):
                logits = model(x)
            loss, ce = loss_fn(logits, y, cfg.label_smoothing)
            if not torch.isfinite(loss):
                raise TrainingDiverged(
                    f"loss became {loss.item()} at step {step + 1}; stopped before applying the update. "
                    + (f"Last good checkpoint: {ckpt_path}." if ckpt_path.exists() else "No checkpoint was written yet.")
                    + " Try a lower train.lr or a stricter train.grad_clip."
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = (
                nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item() if cfg.grad_clip > 0 else float("nan")
            )
            optimizer.step()
            step += 1

            window["loss"] += loss.item()
            window["ce"] += ce.item()
            window["n"] += 1
            window["tokens"] += y.numel()
            now = time.perf_counter()
            if step % cfg.log_every == 0 or step == cfg.steps:
                tok_per_s = window["tokens"] / max(now - window["t"], 1e-9)
                recent_ce = window["ce"] / window["n"]
                log_line({"type": "train", "step": step, "loss": window["loss"] / window["n"], "ce": recent_ce,
                          "lr": lr, "tokens_per_s": tok_per_s, "grad_norm": grad_norm, "elapsed": now - t_start})
                window = {"loss": 0.0, "ce": 0.0, "n": 0, "t": now, "tokens": 0}
            rate = y.numel() / max(now - t_step, 1e-9)
            live_rate = rate if live_rate == 0 else 0.9 * live_rate + 0.1 * rate  # smoothed for display
            callback(TrainEvent("step", step, {"loss": loss.item(), "ce": ce.item(), "lr": lr,
                                               "tokens_per_s": live_rate, "total_steps": cfg.steps}))
            if step % cfg.eval_every == 0 or step == cfg.steps:
                last_eval = run_eval()
                train_ce = recent_ce if math.isfinite(recent_ce) else ce.item()
                record = {"type": "eval", "step": step, **last_eval, "train_ce": train_ce,
                          "train_val_ratio": train_ce / last_eval["val_loss"]}
                log_line(record)
                callback(TrainEvent("eval", step, record))
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                checkpoint()

    if interrupted:
        checkpoint()
        callback(TrainEvent("stop", step, {"path": str(ckpt_path)}))
    if not last_eval:
        last_eval = run_eval()
    elapsed = time.perf_counter() - t_start
    return TrainResult(
        out_dir=out_dir, checkpoint=ckpt_path, steps=step, total_steps=cfg.steps,
        val_loss=last_eval["val_loss"], val_ppl=last_eval["val_ppl"], train_ce=recent_ce,
        tokens_per_s=tok_per_s, elapsed_s=elapsed, params=n_params, coverage=coverage,
        interrupted=interrupted,
    )


# ------------------------------------------------------------------------------ evaluation


@dataclass
class EvalResult:
    checkpoint: str
    step: int
    val_loss: float
    val_ppl: float
    val_tokens: int
    data: str
    kind: str = "train"


def evaluate_checkpoint(
    path: str | Path,
    data_path: str | None = None,
    batches: int | None = None,
    device: str = "auto",
    progress: Callable[[str, int, int | None], None] | None = None,
) -> EvalResult:
    """Validation loss/perplexity of a training or packed checkpoint, on its own data config
    (or on `data_path`)."""
    ckpt = load_checkpoint(path)
    recipe = ckpt["recipe"]
    data_cfg = DataConfig(**recipe["data"])
    if data_path is not None:
        data_cfg = dataclasses.replace(data_cfg, path=str(data_path))
    dev = resolve_device(device)
    model, _ = model_from_checkpoint(ckpt)
    model.to(dev)
    tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    kwargs = {"progress": progress} if progress else {}
    data: PreparedData = prepare_data(data_cfg, model.config.vocab_size, tokenizer=tokenizer, need_train=False, **kwargs)
    train_cfg = recipe["train"]
    res = evaluate(model, data.val, train_cfg["batch_size"], train_cfg["seq_len"],
                   batches or train_cfg["eval_batches"], dev)
    step = ckpt.get("step", ckpt.get("source", {}).get("step")) or 0
    return EvalResult(str(ckpt["path"]), step, res["val_loss"], res["val_ppl"], int(res["val_tokens"]),
                      data.description, ckpt["kind"])


__all__ = [
    "EvalResult", "TrainEvent", "TrainResult", "autocast", "evaluate", "evaluate_checkpoint", "loss_fn", "lr_and_wd",
    "param_groups", "resolve_device", "train",
]
