"""One optimizer step of training: the loss's compute, optionally under `torch.compile`, and an
update that a non-finite loss or gradient never reaches, without reading anything back to the host.

    step = TrainStep(model, optimizer, cfg, device, world, micro, compile=True, notice=print_fn)
    stats = step(x, y, index)          # zero_grad, forward+backward per micro-batch, all-reduce,
                                       # clip, guard, optimizer.step(); stats hold device tensors
    bad = step.guard.first_bad()       # a host read: None, or (step, loss, grad norm) of the first
                                       # non-finite step

The compute. `LossModule` is the training step's forward as one module: (x, y) -> (loss, ce) under
bf16 autocast on CUDA, through the chunked loss when `train.ce_chunk` is set (`training.loss`).
With `train.compile` it runs as `torch.compile(LossModule)` (inductor; `QTOOLKIT_COMPILE_BACKEND`
picks another backend, e.g. `aot_eager`, which traces the same graphs without generating code). Every
shipped recipe's forward compiles into one graph (no graph breaks, `torch._dynamo.explain` on
`tiny`); the quantization warmup's lambda and Sherry's progress are Python floats on the modules,
which Dynamo specializes on once and then treats as dynamic, so a run recompiles a few times
in all, not once per step. Compilation happens lazily at the first call; when it fails there (no C++
compiler, an unsupported op, a Dynamo error) or at a later recompile, the step's gradients are
cleared, the step is redone in eager mode, `notice(message)` is called once and the run goes on
eagerly: a compile failure never stops training.

The guard. A non-finite loss or global gradient norm must not reach the weights (docs/reliability.md).
Reading the loss on the host every step would block the CPU until the GPU catches up, so the check
stays on the device: a sticky flag (0-dim float, 1 once any step was bad) is handed to the optimizer
as `found_inf`, the argument through which `GradScaler` skips steps. Fused AdamW (`fused=True`,
CUDA and CPU) then leaves the weights, the moments and the step count untouched on every step from
the first bad one on. The flag, the first bad step and its loss and gradient norm live on the
device until the trainer reads them (`first_bad()`), which it does where it reads anything anyway
(log, evaluation and checkpoint steps; every step on the CPU, where a read costs nothing), and
raises there, naming the first bad step: the weights are those after the step before it, and no
checkpoint was written after it. An optimizer that does not take `found_inf` (not fused) gets the
old behaviour: one host read per step, before `optimizer.step()`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qtoolkit.training.distributed import World, all_reduce_mean
from qtoolkit.training.loss import chunked_loss, loss_fn
from qtoolkit.training.recipe import TrainConfig

COMPILE_BACKEND_ENV = "QTOOLKIT_COMPILE_BACKEND"


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision on the CPU (where bf16 matmuls are slower, not faster)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_enabled(setting: bool | str, device: torch.device) -> bool:
    """`train.compile`: true, false, or auto (on for CUDA, off for the CPU, where the compile time of
    a run's first step is rarely won back)."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)


def compile_backend() -> str:
    return os.environ.get(COMPILE_BACKEND_ENV, "").strip() or "inductor"


def fused_adamw_kwargs(device: torch.device) -> dict[str, bool]:
    """{"fused": True} where PyTorch has a fused AdamW kernel for `device` (CUDA; the CPU since 2.4):
    one kernel for every parameter, and the `found_inf` skip the guard relies on."""
    try:
        torch.optim.AdamW([nn.Parameter(torch.zeros(1, device=device))], fused=True)
    except (RuntimeError, ValueError, TypeError):
        return {}
    return {"fused": True}


def use_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Set the implementation flag on every group: `load_state_dict` copies the saved groups' flags,
    and a checkpoint written by a non-fused run must not turn the fused kernel (and the guard) off."""
    for group in optimizer.param_groups:
        if "fused" in group:
            group["fused"] = fused
            if fused:
                group["foreach"] = None


class LossModule(nn.Module):
    """(x, y) -> (training loss, plain cross-entropy) of `model`: the step's whole forward, the unit
    that `torch.compile` (and DDP) wrap."""

    def __init__(self, model: nn.Module, label_smoothing: float, ce_chunk: int, device: torch.device):
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing
        self.ce_chunk = ce_chunk
        self.device = device

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        with autocast(self.device):
            if self.ce_chunk:  # the loss without the full logits (training.loss)
                return chunked_loss(self.model.hidden_states(x), self.model.lm_head, y, self.label_smoothing,
                                    self.ce_chunk)
            logits = self.model(x)
        return loss_fn(logits, y, self.label_smoothing)


class NonFiniteGuard:
    """The sticky on-device non-finite flag (module docstring)."""

    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device):
        self.optimizer = optimizer
        # fused AdamW (and any optimizer GradScaler can drive) skips its update where found_inf is 1
        self.deferred = bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
            g.get("fused") for g in optimizer.param_groups)
        self.flag = torch.zeros((), device=device)  # 1.0 from the first bad step on
        self.first = torch.full((3,), float("nan"), device=device)  # (step, loss, grad norm) of the first bad one
        if self.deferred:
            optimizer.found_inf = self.flag

    def update(self, step: int, loss: Tensor, grad_norm: Tensor) -> None:
        """Record step `step` (1-based) as bad if its loss or gradient norm is not finite."""
        values = torch.stack([loss.detach().float(), grad_norm.detach().float()])
        bad = (~torch.isfinite(values).all()).float()
        new = bad * (1 - self.flag)  # bad, and the first bad step
        record = torch.cat([torch.full((1,), float(step), device=values.device), values])
        self.first.copy_(torch.where(new.bool(), record, self.first))
        self.flag.copy_(torch.maximum(self.flag, bad))  # in place: the optimizer holds this tensor

    def first_bad(self) -> tuple[int, float, float] | None:
        """(step, loss, grad norm) of the first non-finite step, or None (a host read)."""
        step, loss, grad_norm = self.first.tolist()
        return None if step != step else (int(step), loss, grad_norm)  # nan: none yet


@dataclass
class StepStats:
    loss: Tensor  # the batch's training loss (0-dim, on the device)
    ce: Tensor  # its plain cross-entropy
    grad_norm: Tensor  # the global gradient norm before clipping
    stop_any: Tensor | None = None  # under torchrun: > 0 when any process asked to stop


class TrainStep:
    """A training step over `micro`-sequence micro-batches (module docstring). `notice(message)` is
    called once if compilation fails and the step falls back to eager mode."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig, device: torch.device,
                 world: World | None = None, micro: int | None = None, compile: bool = False,
                 notice: Callable[[str], None] | None = None):
        self.model, self.optimizer, self.cfg, self.device = model, optimizer, cfg, device
        self.world = world or World()
        self.micro = micro
        self.notice = notice or (lambda message: None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_module = LossModule(model, cfg.label_smoothing, cfg.ce_chunk, device)
        self.ddp = None
        if self.world.distributed:  # DDP around the whole forward, chunked loss included (training.distributed)
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.loss_module, device_ids=[device.index] if device.type == "cuda"
                                               else None, broadcast_buffers=False)
        self.eager: nn.Module = self.ddp or self.loss_module
        self.compute: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] = self.eager
        self.compiled = False
        self.compile_error: str | None = None
        if compile:
            try:
                self.compute = torch.compile(self.eager, backend=compile_backend())
                self.compiled = True
            except Exception as e:  # noqa: BLE001 - any failure to set up compilation means eager
                self._fall_back(e)
        self.guard = NonFiniteGuard(optimizer, device)

    def _fall_back(self, error: BaseException) -> None:
        reason = " ".join(str(error).split())[:200] or "no message"
        self.compile_error = f"{type(error).__name__}: {reason}"
        self.compute, self.compiled = self.eager, False
        self.notice(f"train.compile: torch.compile failed ({self.compile_error}); training continues in eager "
                    "mode (set train.compile=false to skip the attempt)")

    def _accumulate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Backward of the batch's mean loss, `micro` sequences at a time; returns (loss, ce) of the
        whole batch. Every micro-batch holds micro * seq_len tokens, so the batch mean is the mean of
        the micro-batch means: each backward is scaled by micro / batch_size and the gradients add up
        to the whole batch's (up to float rounding; one micro-batch is the unscaled loss itself)."""
        micro = self.micro or x.shape[0]
        if micro == x.shape[0]:
            loss, ce = self.compute(x, y)
            loss.backward()
            return loss.detach(), ce.detach()
        weight = micro / x.shape[0]
        total = torch.zeros(2, device=self.device)
        pieces = list(zip(x.split(micro), y.split(micro), strict=True))
        for i, (xm, ym) in enumerate(pieces):
            # under DDP the gradients are averaged over the processes in the last micro-batch's backward only
            quiet = self.ddp.no_sync() if self.ddp is not None and i < len(pieces) - 1 else contextlib.nullcontext()
            with quiet:
                loss, ce = self.compute(xm, ym)
                (loss * weight).backward()
            total += torch.stack([loss.detach(), ce.detach()]).float() * weight
        return total[0], total[1]

    def gradients(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Fresh gradients of the batch (x, y) (already on the device); (loss, ce) of it."""
        self.optimizer.zero_grad(set_to_none=True)
        if not self.compiled:
            return self._accumulate(x, y)
        try:
            return self._accumulate(x, y)
        except Exception as e:  # noqa: BLE001 - a compile failure; an eager error re-raises below
            self._fall_back(e)
            self.optimizer.zero_grad(set_to_none=True)
            return self._accumulate(x, y)

    def __call__(self, x: Tensor, y: Tensor, step: int, stop: bool = False) -> StepStats:
        """Step `step` (1-based) on the batch (x, y): gradients, the all-reduce under torchrun (with
        this process's stop request), clipping, the guard, and the update unless the guard forbids it."""
        if self.device.type == "cuda":  # from pinned memory the copy does not wait for the GPU's queue
            x, y = x.pin_memory(), y.pin_memory()
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        loss, ce = self.gradients(x, y)
        stop_any = None
        if self.world.distributed:  # DDP averaged the gradients; the losses and the stop flag here
            flag = torch.full((), float(stop), device=self.device)  # a fill, not a blocking copy
            loss, ce, stop_any = all_reduce_mean([], torch.stack([loss.float(), ce.float(), flag]), self.world)
        # The global gradient norm, clipped to grad_clip when set (no host sync: the clip factor is
        # a device tensor). A non-finite norm means the update would write NaN/inf into the weights.
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.params, max_norm)
        self.guard.update(step, loss, grad_norm)
        if self.guard.deferred or self.guard.first_bad() is None:  # a host read only without found_inf
            self.optimizer.step()
        return StepStats(loss.detach().float(), ce.detach().float(), grad_norm.detach().float(), stop_any)


__all__ = ["COMPILE_BACKEND_ENV", "LossModule", "NonFiniteGuard", "StepStats", "TrainStep", "autocast",
           "compile_backend", "compile_enabled", "fused_adamw_kwargs", "use_fused"]
