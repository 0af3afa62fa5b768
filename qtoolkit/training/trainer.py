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

Starting point: a fresh model, or with `init=CKPT` the weights of a training checkpoint (fp32 or
quantized) under the recipe's policy, quantized exactly as `qtool quantize` would (`training.ptq`),
with a fresh optimizer and this recipe's schedule; the init checkpoint's tokenizer is used.
`train.quant_warmup_steps = K` ramps quantization in: every quantized layer uses
W + lambda (Q(W) - W) (and likewise its input), lambda = step / K until it reaches 1 (`layers.py`).
Quantizers that declare `needs_progress` (Sherry's annealed residual) get `set_progress((step + 1) /
steps)` before every step, so their schedules follow the run (and a resumed run) exactly.

Loss: cross-entropy with label smoothing (the training objective, `training.loss`); every reported
perplexity is exp(plain cross-entropy).

Memory: before reading data `training.memory.fit_recipe` estimates the step's peak memory and, when
it does not fit, picks the largest micro-batch that does (or refuses with `InsufficientMemory`); a
step runs `batch_size / micro_batch_size` micro-batches whose scaled gradients add up to the whole
batch's. `train.ce_chunk` and `train.activation_checkpointing` trade compute for memory.
The step itself (forward and loss, under `torch.compile` with `train.compile`, accumulation, the
all-reduce, clipping, the update) is `training.step.TrainStep`.
Under torchrun each process trains on its share of every batch (`training.distributed`). Batches are a pure function of (seed, step) and the checkpoint carries
optimizer and RNG state, so `resume=True` reaches bit-identical weights to an uninterrupted run.
Nothing lost (docs/reliability.md):
  * the run holds `out_dir`'s lock (`qtoolkit.rundir`) from start to end: a second run into the
    same directory fails at once; temporary files a crashed run left are removed;
  * a non-finite loss or gradient norm never reaches the weights (`training.step`'s on-device guard
    skips the update) and stops the run with `TrainingDiverged` naming that step (on CUDA at the next
    log, evaluation or checkpoint step, where the trainer reads anything from the GPU), and a
    checkpoint is written only if no step was bad, every weight and optimizer value is finite and
    the evaluation at that step is finite: the checkpoint on disk is always the last good one;
  * SIGTERM (schedulers, `docker stop`) saves a checkpoint and stops, like Ctrl-C;
  * `--resume` continues only with the run's own recipe (`qtoolkit.training.resume` lists what
    may change), and only on the same data;
  * the data is checked before the first step (each split must hold at least one window);
  * a new run in a directory whose earlier run crashed before its first checkpoint moves the stale
    metrics.jsonl aside instead of appending to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
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
from torch import Tensor, nn

from qtoolkit import schema
from qtoolkit.checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from qtoolkit.device import resolve_device
from qtoolkit.errors import CheckpointError, ConfigError, DataError, TrainingDiverged, short_repr
from qtoolkit.layers import set_quant_mix
from qtoolkit.pack import model_from_checkpoint
from qtoolkit.policy import Coverage, build_model
from qtoolkit.quantizers import Quantizer
from qtoolkit.rundir import run_dir_lock
from qtoolkit.schema import check_int
from qtoolkit.training.data import (
    PreparedData,
    Progress,
    TokenStream,
    prepare_data,
    prepare_eval_data,
    tokenizer_from_json,
)
from qtoolkit.training.distributed import World, barrier, broadcast_object, process_group
from qtoolkit.training.loss import chunked_loss, loss_fn
from qtoolkit.training.memory import fit_recipe
from qtoolkit.training.optimizer import build_adamw
from qtoolkit.training.recipe import Recipe, TrainConfig, checkpoint_data_config, save_recipe
from qtoolkit.training.resume import resume_recipe
from qtoolkit.training.step import (
    TrainStep,
    autocast,
    compile_enabled,
    fused_adamw_kwargs,
    use_fused,
)
from qtoolkit.training.throughput import flops_per_token, mfu, peak_flops


@dataclass
class TrainEvent:
    kind: str  # "memory" | "data" | "start" | "step" | "eval" | "checkpoint" | "stop" | "notice" ({"message"})
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

    def outputs(self) -> list[Path]:
        """Every file the run writes (module docstring)."""
        return [self.checkpoint, self.out_dir / "metrics.jsonl", self.out_dir / "recipe.yaml"]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "coverage"}
        return {**d, "out_dir": str(self.out_dir), "checkpoint": str(self.checkpoint),
                "params_by_quantizer": self.coverage.params_by_quantizer(), "coverage": self.coverage.to_dict(),
                "outputs": [str(p) for p in self.outputs()]}


Callback = Callable[[TrainEvent], None]


def _noop(event: TrainEvent) -> None:
    pass


# ------------------------------------------------------------------------------ pieces


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


def progress_quantizers(model: nn.Module) -> list[Quantizer]:
    """The quantizers whose forward depends on training progress (`Quantizer.needs_progress`)."""
    return [m for m in model.modules() if isinstance(m, Quantizer) and m.needs_progress]


def evaluate(model: nn.Module, val: TokenStream, batch_size: int, seq_len: int, max_batches: int | None,
             device: torch.device | str = "cpu", progress: Progress | None = None,
             micro_batch_size: int | None = None, ce_chunk: int = 0) -> dict[str, float]:
    """Mean plain cross-entropy over fixed validation windows, and its perplexity. `max_batches=None`
    scores the whole stream (`TokenStream.eval_batches`); `progress("evaluating", done, total)` is
    called after every batch. `micro_batch_size`: run each batch that many sequences at a time (the
    same windows and the same mean; the logits of one micro-batch in memory, as in training);
    `ce_chunk`: the loss `ce_chunk` tokens at a time (`training.loss.chunked_loss`)."""
    n_batches, _ = val.eval_windows(batch_size, seq_len, max_batches)
    return evaluate_batches(model, val.eval_batches(batch_size, seq_len, max_batches), device, progress, n_batches,
                            micro_batch_size, ce_chunk)


@torch.no_grad()
def evaluate_batches(model: nn.Module, batches, device: torch.device | str = "cpu",
                     progress: Progress | None = None, total: int | None = None,
                     micro_batch_size: int | None = None, ce_chunk: int = 0) -> dict[str, float]:
    """Mean plain cross-entropy (and perplexity) over (x, y) batches: the one loss that `qtool eval`,
    training evaluations and the search's trials all report."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_loss, count = torch.zeros((), dtype=torch.float64, device=device), 0  # summed on the device: no read per batch
    try:
        for i, (xb, yb) in enumerate(batches):
            for x, y in zip(xb.split(micro_batch_size or len(xb)), yb.split(micro_batch_size or len(yb)), strict=True):
                x, y = x.to(device), y.to(device)
                if ce_chunk:
                    with autocast(device):
                        _, ce = chunked_loss(model.hidden_states(x), model.lm_head, y, 0.0, ce_chunk)
                else:
                    with autocast(device):
                        logits = model(x)
                    _, ce = loss_fn(logits, y, 0.0)
                    del logits
                total_loss += ce.double() * y.numel()
                count += y.numel()
            if progress is not None:
                progress("evaluating", i + 1, total)
    finally:
        model.train(was_training)
    loss = total_loss.item() / count
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


def finetune(model: nn.Module, train: TokenStream, steps: int, lr: float, batch_size: int, seq_len: int,
             seed: int, device: torch.device | str = "cpu") -> list[float]:
    """A short QAT run in place: AdamW at a constant `lr` without weight decay, plain cross-entropy,
    gradient norm clipped at 1, batches `train.batch(step, ..., seed)`. The search scores a trial
    with it (`--finetune-steps`) and `search --apply` writes its result, so both see the same model.
    Returns the loss of every step."""
    device = torch.device(device)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        x, y = train.batch(step, batch_size, seq_len, seed)
        x, y = x.to(device), y.to(device)
        with torch.enable_grad(), autocast(device):
            loss, _ = loss_fn(model(x), y, 0.0)
        if not torch.isfinite(loss):
            raise TrainingDiverged(f"finetuning: loss became {loss.item()} at step {step + 1}; try a lower learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


class _StopFlag:
    """Set by Ctrl-C or SIGTERM (first one) or by the caller; the loop stops at the next step
    boundary and saves. A second signal stops at once (the last checkpoint stays intact)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, external: threading.Event | None):
        self.event = external or threading.Event()
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                if self.event.is_set():  # second signal: stop now
                    raise KeyboardInterrupt
                self.event.set()

            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def is_set(self) -> bool:
        return self.event.is_set()


def _rewrite_metrics(path: Path, upto_step: int) -> None:
    """On resume, drop log lines from steps after the checkpoint (they will be redone)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            if json.loads(line).get("step", 0) <= upto_step:
                keep.append(line)
        except (json.JSONDecodeError, AttributeError):
            continue  # a line cut by a crash
    atomic_write_text(path, "".join(f"{line}\n" for line in keep))


# ------------------------------------------------------------------------------ main loop


def _set_aside(path: Path) -> Path | None:
    """Rename `path` to a free `<stem>.stale-N<suffix>` beside it (nothing is deleted)."""
    if not path.exists():
        return None
    n = 1
    while (target := path.with_name(f"{path.stem}.stale-{n}{path.suffix}")).exists():
        n += 1
    path.rename(target)
    return target


def _all_finite(tensors) -> bool:
    """One fused check (a single host sync) that every floating-point tensor is finite."""
    flags = [torch.isfinite(t).all() for t in tensors if t.is_floating_point() and t.numel()]
    return bool(torch.stack(flags).all()) if flags else True


def _host_reads_every_step(device: torch.device) -> bool:
    """Read the step's figures (and the guard) every step: on the CPU a read waits for nothing."""
    return device.type != "cuda"


def _optimizer_tensors(optimizer: torch.optim.Optimizer):
    for state in optimizer.state.values():
        for v in state.values():
            if isinstance(v, Tensor):
                yield v


def _load_resume_state(ckpt: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Weights, optimizer state and RNG of a checkpoint, each checked against this run's model (the
    loader checked the weights; the optimizer state must match them tensor for tensor)."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"]["torch"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{ckpt['path']}: damaged resume state ({reason})") from None
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, v in optimizer.state.get(p, {}).items():
                if isinstance(v, Tensor) and v.dim() and v.shape != p.shape:
                    raise CheckpointError(f"{ckpt['path']}: damaged resume state (optimizer {name} of shape "
                                          f"{list(v.shape)} for a weight of {list(p.shape)})")
    if not _all_finite(_optimizer_tensors(optimizer)):
        raise CheckpointError(f"{ckpt['path']}: the optimizer state holds NaN or inf; it cannot be resumed")


def train(
    recipe: Recipe,
    out_dir: str | Path,
    resume: bool = False,
    callback: Callback = _noop,
    stop: threading.Event | None = None,
    init: str | Path | None = None,
    init_calib_tokens: int | None = None,
) -> TrainResult:
    """Train `recipe` into `out_dir` (module docstring), holding the directory's lock throughout.
    `init`: start from this checkpoint's weights (ignored when `resume` continues an existing run);
    `init_calib_tokens`: calibration tokens for quantizers that need data (default
    `training.ptq.DEFAULT_CALIB_TOKENS`)."""
    out_dir = Path(out_dir)
    world = World.from_env()  # several processes under torchrun (training.distributed); rank 0 writes
    if not world.main:
        return _train(recipe, out_dir, resume, _noop, stop, init, init_calib_tokens, world)
    with run_dir_lock(out_dir, f"qtool train, recipe {recipe.name}"):
        return _train(recipe, out_dir, resume, callback, stop, init, init_calib_tokens, world)


def _train(recipe: Recipe, out_dir: Path, resume: bool, callback: Callback, stop: threading.Event | None,
           init: str | Path | None, init_calib_tokens: int | None, world: World) -> TrainResult:
    device = resolve_device(recipe.train.device, "train.device")
    if world.distributed and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
    with process_group(world, device):
        return _train_in_group(recipe, out_dir, resume, callback, stop, init, init_calib_tokens, world, device)


def _train_in_group(recipe: Recipe, out_dir: Path, resume: bool, callback: Callback, stop: threading.Event | None,
                    init: str | Path | None, init_calib_tokens: int | None, world: World,
                    device: torch.device) -> TrainResult:
    ckpt_path = out_dir / "ckpt.pt"
    metrics_path = out_dir / "metrics.jsonl"

    ckpt = None
    if resume:
        if not ckpt_path.is_file():
            raise CheckpointError(f"{ckpt_path}: nothing to resume (no checkpoint in {out_dir})")
        ckpt = load_checkpoint(ckpt_path)
        if ckpt["kind"] != "train":
            raise CheckpointError(f"{ckpt_path}: a {ckpt['kind']} checkpoint cannot be resumed")
        if not all(k in ckpt for k in ("optimizer", "step", "rng")):
            raise CheckpointError(f"{ckpt_path}: holds no optimizer state (written by `qtool quantize`?); it can be "
                                  "evaluated or packed, not resumed: start training from it with --init instead")
        recipe = resume_recipe(recipe, ckpt.get("recipe"), ckpt["step"], str(ckpt_path))
    elif ckpt_path.exists():
        raise CheckpointError(
            f"{out_dir} already holds a checkpoint; pass --resume to continue it or choose another --out"
        )
    else:
        recipe = recipe.resolved()
    cfg = recipe.train
    if cfg.quant_warmup_steps > cfg.steps:
        raise ConfigError(f"train.quant_warmup_steps={cfg.quant_warmup_steps} exceeds train.steps={cfg.steps}: "
                          "the model would never be trained fully quantized")
    if cfg.batch_size % world.size:
        raise ConfigError(f"train.batch_size={cfg.batch_size} is not divisible by the {world.size} processes: each "
                          "takes an equal share of the batch")
    local_batch = cfg.batch_size // world.size
    if cfg.micro_batch_size is not None and local_batch % cfg.micro_batch_size:
        per = f" / {world.size} processes = {local_batch}" if world.distributed else ""
        raise ConfigError(f"train.micro_batch_size={cfg.micro_batch_size} does not divide train.batch_size="
                          f"{cfg.batch_size}{per}: choose a divisor of the batch size")

    # The peak memory of a step and the micro-batch that fits, or a refusal: before any data is read,
    # and again once the data and tokenizer are in memory (below). Rank 0 decides for every process.
    asked_micro = cfg.micro_batch_size
    memory = None
    if world.main:
        recipe, memory = fit_recipe(recipe, device, None, world.size, world.local_size)
    recipe = broadcast_object(recipe, world)
    cfg = recipe.train
    torch.manual_seed(cfg.seed)
    model_config = recipe.model_config()
    init_ckpt = _load_init(init, model_config) if init is not None and ckpt is None else None

    def data_progress(stage: str, done: int, total: int | None) -> None:
        callback(TrainEvent("data", 0, {"stage": stage, "done": done, "total": total}))

    tokens_needed = cfg.steps * cfg.batch_size * cfg.seq_len
    tokenizer_src = ckpt or init_ckpt
    tokenizer = tokenizer_from_json(tokenizer_src["tokenizer"]) if tokenizer_src else None
    if not world.main:  # rank 0 prepares the data (tokenizer, token cache) first; the others read its cache
        barrier(world)
    data = prepare_data(recipe.data, model_config.vocab_size, tokens_needed, tokenizer, progress=data_progress)
    if world.main:
        barrier(world)
    try:  # before any work, not at the first evaluation
        data.train.require_window(cfg.seq_len)
        data.val.require_window(cfg.seq_len)
    except DataError as e:
        raise DataError(f"{'--data ' + recipe.data.path if recipe.data.path else recipe.data.dataset}: {e}") from None
    saved_source = (ckpt.get("data") or {}).get("source") if ckpt else None
    if saved_source is not None and saved_source != data.info.get("source"):
        raise CheckpointError(
            f"{ckpt_path}: the run trained on other data ({short_repr(saved_source, 60)}) than "
            f"{recipe.data.path or recipe.data.dataset} ({short_repr(data.info.get('source'), 60)}); resume on the "
            "run's own data"
        )
    if world.main:  # from the micro-batch asked for, so that the plan states what that one needs
        asked = dataclasses.replace(recipe, train=dataclasses.replace(cfg, micro_batch_size=asked_micro))
        recipe, memory = fit_recipe(asked, device, memory, world.size, world.local_size)
        callback(TrainEvent("memory", 0, {**memory.to_dict(), "micro_batch_size": recipe.train.micro_batch_size,
                                          "changed": recipe.train.micro_batch_size != asked_micro,
                                          "fit_memory": cfg.fit_memory, "processes": world.size}))
    recipe = broadcast_object(recipe, world)
    cfg = recipe.train
    init_record = None
    if init_ckpt is not None:
        model, coverage, init_record = _init_model(init_ckpt, recipe, model_config, data, init_calib_tokens,
                                                   device, data_progress)
    else:
        model, coverage = build_model(model_config, recipe.policy)
    model.to(device)
    scheduled = progress_quantizers(model)

    # fused AdamW (one kernel, and the found_inf skip of training.step's guard) for fp32 moments;
    # LowPrecisionAdamW (bf16 moments) takes no found_inf: the guard then reads the flag every step
    fused = fused_adamw_kwargs(device) if cfg.optimizer_state == "fp32" else {}
    optimizer = build_adamw(param_groups(model, cfg.weight_decay), model, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                            eps=cfg.adam_eps, optimizer_state=cfg.optimizer_state, seed=cfg.seed, **fused)
    step = 0
    last_eval: dict[str, float] = {}
    if ckpt is not None:
        _load_resume_state(ckpt, model, optimizer)
        use_fused(optimizer, bool(fused))
        step = ckpt["step"]
        last_eval = dict(ckpt.get("metrics") or {})
        if world.main:
            _rewrite_metrics(metrics_path, step)
    stale = None
    if world.main:
        stale = None if ckpt is not None else _set_aside(metrics_path)  # a run that crashed before its first checkpoint
        save_recipe(recipe, out_dir / "recipe.yaml")
    last_good = {"step": step if ckpt is not None else None}

    def diverged(what: str) -> TrainingDiverged:
        saved = (f"Last good checkpoint: {ckpt_path} (step {last_good['step']})." if last_good["step"] is not None
                 else "No checkpoint was written.")
        return TrainingDiverged(f"{what}; nothing was saved from it. {saved} "
                                "Try a lower train.lr or a stricter train.grad_clip.")

    def checkpoint() -> None:
        check_guard()  # a step the guard skipped must not be saved as trained
        if not _all_finite(itertools.chain(model.state_dict().values(), _optimizer_tensors(optimizer))):
            raise diverged(f"the weights or optimizer state became non-finite by step {step}")
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
        init_info = init_record or (ckpt or {}).get("init")
        if init_info:
            state["init"] = init_info
        if world.main:  # the state is the same on every rank
            save_checkpoint(state, ckpt_path)
        last_good["step"] = step
        callback(TrainEvent("checkpoint", step, {"path": str(ckpt_path)}))

    def quant_mix(at_step: int) -> None:  # the quantization warmup's lambda before step `at_step` (0-based)
        if cfg.quant_warmup_steps:
            set_quant_mix(model, min(1.0, at_step / cfg.quant_warmup_steps))

    def run_eval() -> dict[str, float]:
        quant_mix(step)  # the model as the next step would use it (lambda = 1 once the warmup is over)
        return evaluate(model, data.val, cfg.batch_size, cfg.seq_len, cfg.eval_batches, device,
                        micro_batch_size=cfg.micro_batch_size, ce_chunk=cfg.ce_chunk)

    n_params = sum(p.numel() for p in model.parameters())
    per_token = flops_per_token(model, cfg.seq_len)
    peak, device_name = peak_flops(device)
    callback(TrainEvent("start", step, {
        "total_steps": cfg.steps, "params": n_params, "coverage": coverage, "device": str(device),
        "data": data.description, "data_info": data.info, "recipe": recipe.name,
        "tokens_per_step": cfg.batch_size * cfg.seq_len, "resumed": ckpt is not None, "init": init_record,
        "stale_metrics": str(stale) if stale else None, "processes": world.size,
        "compile": compile_enabled(cfg.compile, device), "gpu": device_name if device.type == "cuda" else None,
        "peak_flops": peak, "flops_per_token": per_token,
    }))

    t_start = time.perf_counter()
    # Figures stay on the device between host reads (training.step): every step on the CPU, where a
    # read costs nothing; on CUDA only where the loop logs, evaluates or saves anyway.
    window = {"sums": torch.zeros(2, dtype=torch.float64, device=device), "n": 0, "t": t_start, "tokens": 0}
    recent_ce = float("nan")
    loss_v = ce_v = grad_norm = float("nan")
    tok_per_s = live_rate = 0.0
    rate_mark = {"t": t_start, "tokens": 0}
    total_tokens = 0
    interrupted = False
    awaiting_init = any(getattr(m, "awaiting_init", False) for m in model.modules())
    read_every_step = _host_reads_every_step(device)
    stop_requests = torch.zeros((), device=device)  # under torchrun: the all-reduced stop flags, sticky

    def notice(message: str) -> None:
        callback(TrainEvent("notice", step, {"message": message}))

    train_step = TrainStep(model, optimizer, cfg, device, world, cfg.micro_batch_size or local_batch,
                           compile=compile_enabled(cfg.compile, device), notice=notice)

    def check_guard() -> None:
        """Stop, naming the first step whose loss or gradient norm was not finite (none reached the weights)."""
        bad = train_step.guard.first_bad()
        if bad is not None:
            at, bad_loss, bad_norm = bad
            what = f"loss {bad_loss}" if not math.isfinite(bad_loss) else f"gradient norm {bad_norm}"
            raise diverged(f"{what} at step {at}: stopped before applying the update")

    model.activation_checkpointing = cfg.activation_checkpointing
    model.train()
    stop_all = False  # under torchrun: a stop any rank saw, agreed on in the step's all-reduce
    with _StopFlag(stop) as stop_flag, (open(metrics_path, "a") if world.main else contextlib.nullcontext()) as log:

        def log_line(record: dict[str, Any]) -> None:
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()

        while step < cfg.steps:
            if stop_all or (not world.distributed and stop_flag.is_set()):
                interrupted = True
                break
            lr, wd = lr_and_wd(step, cfg)
            quant_mix(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
                group["weight_decay"] = wd if group["decays"] else 0.0
            for q in scheduled:  # e.g. Sherry's annealed residual: p = 1 on the last step
                q.set_progress((step + 1) / cfg.steps)
            x, y = data.train.batch(step, cfg.batch_size, cfg.seq_len, cfg.seed)
            if awaiting_init:  # elastic activations set their step from their first input: let that be the
                # whole global batch, as in a one-process whole-batch run, not a micro-batch or one rank's rows
                with torch.no_grad(), autocast(device):
                    model.hidden_states(x.to(device))
                awaiting_init = False
            x, y = world.share(x), world.share(y)  # this process's rows of the global batch (all of it alone)
            stats = train_step(x, y, step + 1, stop=stop_flag.is_set())
            step += 1
            if stats.stop_any is not None:
                stop_requests = torch.maximum(stop_requests, stats.stop_any)
            window["sums"] += torch.stack([stats.loss, stats.ce])
            window["n"] += 1
            window["tokens"] += y.numel() * world.size
            total_tokens += y.numel() * world.size
            log_due = step % cfg.log_every == 0 or step == cfg.steps
            eval_due = step % cfg.eval_every == 0 or step == cfg.steps
            ckpt_due = step % cfg.ckpt_every == 0 or step == cfg.steps
            if read_every_step or log_due or eval_due or ckpt_due:
                # a host read: the guard first (raises at the first bad step), then this step's figures
                check_guard()
                loss_v, ce_v, grad_norm = torch.stack([stats.loss, stats.ce, stats.grad_norm]).tolist()
                stop_all = bool(stop_requests > 0) if world.distributed else False
                now = time.perf_counter()
                rate = (total_tokens - rate_mark["tokens"]) / max(now - rate_mark["t"], 1e-9)
                live_rate = rate if live_rate == 0 else 0.9 * live_rate + 0.1 * rate  # smoothed for display
                rate_mark = {"t": now, "tokens": total_tokens}
            if log_due:
                tok_per_s = window["tokens"] / max(now - window["t"], 1e-9)
                loss_sum, ce_sum = window["sums"].tolist()
                recent_ce = ce_sum / window["n"]
                log_line({"type": "train", "step": step, "loss": loss_sum / window["n"], "ce": recent_ce,
                          "lr": lr, "tokens_per_s": tok_per_s, "mfu": mfu(tok_per_s, per_token, peak),
                          "grad_norm": grad_norm, "elapsed": now - t_start})
                window = {"sums": torch.zeros(2, dtype=torch.float64, device=device), "n": 0, "t": now, "tokens": 0}
            callback(TrainEvent("step", step, {"loss": loss_v, "ce": ce_v, "lr": lr, "tokens_per_s": live_rate,
                                               "mfu": mfu(live_rate, per_token, peak), "total_steps": cfg.steps}))
            if eval_due:
                last_eval = run_eval()
                if not math.isfinite(last_eval["val_loss"]):
                    raise diverged(f"validation loss {last_eval['val_loss']} at step {step}")
                train_ce = recent_ce if math.isfinite(recent_ce) else ce_v
                record = {"type": "eval", "step": step, **last_eval, "train_ce": train_ce,
                          "train_val_ratio": train_ce / last_eval["val_loss"]}
                log_line(record)
                callback(TrainEvent("eval", step, record))
            if ckpt_due:
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


def _load_init(init: str | Path, model_config) -> dict[str, Any]:
    """The --init checkpoint, checked to fit the recipe's model before any data is prepared."""
    from qtoolkit.training.ptq import check_fits, load_source

    src = load_source(init, what="--init")
    check_fits(src, model_config, what="--init")
    return src


def _init_model(src: dict[str, Any], recipe: Recipe, model_config, data: PreparedData, calib_tokens: int | None,
                device: torch.device, progress) -> tuple[nn.Module, Coverage, dict[str, Any]]:
    """The --init checkpoint's weights under the recipe's policy (training.ptq.quantize_source),
    calibrated on this run's training data when a quantizer needs it."""
    from qtoolkit.training.data import calibration_batches
    from qtoolkit.training.ptq import DEFAULT_CALIB_TOKENS, quantize_source

    tokens = calib_tokens or DEFAULT_CALIB_TOKENS
    cfg = recipe.train

    def calib() -> list[Tensor]:
        return [x for x, _ in calibration_batches(data.train, tokens, cfg.seq_len, cfg.seed)]

    q = quantize_source(src, recipe.policy, calib, calib_tokens=tokens, seed=cfg.seed, device=device,
                        model_config=model_config, progress=progress)
    record = {"checkpoint": str(src["path"]), "step": src.get("step"), "metrics": src.get("metrics", {}),
              "adopted": q.adopted, "calibration": q.calibration.to_dict()}
    return q.model, q.coverage, record


# ------------------------------------------------------------------------------ evaluation


def _checkpoint_train_config(ckpt: dict[str, Any]) -> TrainConfig:
    """The (resolved) train section of a checkpoint's recipe, validated."""
    recipe = ckpt.get("recipe") or {}
    raw = recipe.get("train") if isinstance(recipe, dict) else None
    cfg = schema.from_dict(TrainConfig, raw if isinstance(raw, dict) else {}, what=f"{ckpt['path']}: recipe.train")
    if cfg.batch_size is None or cfg.seq_len is None:
        raise CheckpointError(f"{ckpt['path']}: its recipe has no train.batch_size / train.seq_len to evaluate with")
    return cfg


@dataclass
class EvalResult:
    checkpoint: str
    step: int
    val_loss: float
    val_ppl: float
    val_tokens: int  # tokens scored (every target position counts once)
    data: str
    kind: str = "train"
    whole: bool = False  # True: every token of the named data was scored

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def evaluate_checkpoint(
    path: str | Path,
    data_path: str | None = None,
    eval_batches: int | None = None,
    device: str = "auto",
    progress: Progress | None = None,
    *,
    batches: int | None = None,  # the old name of `eval_batches`, kept for one release
) -> EvalResult:
    """Validation loss/perplexity of a training or packed checkpoint.

    Without `data_path`: the checkpoint's own validation split, `eval_batches` batches of it (default:
    the recipe's `train.eval_batches`, so the figure matches the one training reported). With
    `data_path` (a file or directory the user names for evaluation): that text itself, all of it
    (`training.data.prepare_eval_data`), or its first `eval_batches` batches."""
    eval_batches = eval_batches if eval_batches is not None else batches
    if eval_batches is not None:
        check_int(eval_batches, "--eval-batches", 1)
    dev = resolve_device(device)
    ckpt = load_checkpoint(path)
    train_cfg = _checkpoint_train_config(ckpt)
    model, _ = model_from_checkpoint(ckpt)
    model.to(dev)
    tokenizer = tokenizer_from_json(ckpt["tokenizer"])
    kwargs = {"progress": progress} if progress else {}
    if data_path is not None:
        data: PreparedData = prepare_eval_data(data_path, tokenizer, **kwargs)
        max_batches = eval_batches
    else:
        data = prepare_data(checkpoint_data_config(ckpt, None), model.config.vocab_size, tokenizer=tokenizer,
                            need_train=False, **kwargs)
        data.val.require_window(train_cfg.seq_len)
        max_batches = eval_batches or train_cfg.eval_batches
    res = evaluate(model, data.val, train_cfg.batch_size, train_cfg.seq_len, max_batches, dev, progress)
    step = ckpt.get("step", ckpt.get("source", {}).get("step")) or 0
    return EvalResult(str(ckpt["path"]), step, res["val_loss"], res["val_ppl"], int(res["val_tokens"]),
                      data.description, ckpt["kind"], whole=max_batches is None)


__all__ = [
    "EvalResult", "TrainEvent", "TrainResult", "autocast", "evaluate", "evaluate_batches", "evaluate_checkpoint",
    "finetune", "loss_fn", "lr_and_wd", "param_groups", "train",
]
