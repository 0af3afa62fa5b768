"""Peak training memory of a recipe on a device, and the micro-batch that fits.

`estimate_training_memory(recipe, device, micro_batch_size)` adds up what one optimizer step holds
at its peak (the start of the last micro-batch's backward, with the earlier micro-batches'
gradients already accumulated):

    weights        latent parameters (fp32) and quantizer parameters, plus buffers (RoPE tables)
    gradients      one per trainable parameter (fp32); twice that under data parallelism (the
                   flat buffer of the all-reduce, training.distributed)
    optimizer      AdamW's exp_avg and exp_avg_sq: 2 x fp32 per trainable parameter, 2 x bf16 for the
                   block linears' weights with `train.optimizer_state: bf16` (training.optimizer)
    activations    what the forward of one micro-batch saves for the backward: per block, measured
                   (below); the residual stream into the head; fake-quantized weight copies
    logits         the loss's working set at the start of the backward: the log-softmax output,
                   its gradient (two buffers while the label-smoothing term is added) and the
                   logits' gradient, ~4 x N x V floats for N = micro_batch x seq_len tokens; with
                   `train.ce_chunk` C, 4 x C x V floats
    runtime        the process itself (CPU: its resident set when the estimate is made: the Python
                   interpreter, torch's libraries, the tokenizer; CUDA: 0, since the free memory
                   the estimate is compared with is already net of the CUDA context)

Activations are measured, not modelled: each distinct kind of block (blocks whose layers carry the
same quantizer specs) is built once on the device with random weights and run forward on 1 and 2
sequences of `min(seq_len, 256)` tokens under `torch.autograd.graph.saved_tensors_hooks`, which
see every tensor autograd keeps (deduplicated by storage; parameters excluded, they are counted as
weights). The difference of the two runs is the cost of a sequence, the rest is per step (the
fake-quantized weight copies a quantized layer saves); both scale to the micro-batch. So any
quantizer's own saved tensors (codes, scales, STE masks) are counted without a formula for each.
With `train.activation_checkpointing` a block keeps only its input, and the backward recomputes
one block at a time: L x (N x d) plus one block's activations.

`available_memory(device, memory_gib)`: `memory_gib` when set; on CUDA `torch.cuda.mem_get_info`'s
free bytes; on the CPU MemAvailable from /proc/meminfo (and the cgroup's memory.max when it is
lower), plus this process's own resident set, which the estimate counts as `runtime`.

`plan_training_memory(recipe, device)` compares the two and, when the recipe's micro-batch does not
fit, returns the largest divisor of `batch_size` that does (`fitted_micro_batch`, None when not even
one sequence fits). `qtool plan --train` renders it; `qtool train` runs it before reading any data
(`train.fit_memory`).

Accuracy: docs/training.md lists the estimate against the peak resident set of real runs. On the
CPU it runs low (real peaks up to 1.44x: the backward's transient buffers and the allocator's
fragmentation are not modelled), so plans leave a margin (`SAFETY`).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qtoolkit.config import ModelConfig
from qtoolkit.errors import ConfigError, InsufficientMemory
from qtoolkit.model import rope_tables
from qtoolkit.policy import build_model
from qtoolkit.procfs import MEMINFO, STATUS, proc_bytes
from qtoolkit.training.optimizer import STATE_DTYPES, optimizer_state_bytes
from qtoolkit.training.recipe import Recipe

GIB = 1024**3
PROBE_TOKENS = 256  # sequence length of the activation probe (activations scale linearly beyond it)
LOGIT_BUFFERS = 4  # log-softmax output, its gradient (x2 while the smoothing term is added), d(logits)
# A micro-batch "fits" when its estimate is at most this fraction of the available memory. On the CPU the
# peak resident set of real runs was up to 1.44x the estimate (small with both savers, ternarylm-132m
# 1.40x; docs/training.md):
# the saved tensors are all counted, the rest is the allocator's fragmentation and the backward's
# transient buffers, which the estimate does not model; the margin absorbs it.
SAFETY = {"cpu": 0.65, "cuda": 0.9}


def safety(device: torch.device | str) -> float:
    return SAFETY.get(torch.device(device).type, 0.65)


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of one training step (module docstring), by part."""

    device: str
    batch_size: int
    micro_batch_size: int
    seq_len: int
    ce_chunk: int
    activation_checkpointing: bool
    parts: dict[str, int]
    optimizer_state: str = "fp32"

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "total": self.total}


@dataclass
class TrainingMemoryPlan:
    """The recipe's estimate against the memory available, and the micro-batch that fits."""

    estimate: MemoryEstimate  # at the recipe's micro-batch
    available: int
    available_source: str
    fitted: MemoryEstimate | None = None  # at the largest micro-batch that fits (None: nothing fits)
    tried: list[int] = field(default_factory=list)
    profile: _Profile | None = field(default=None, repr=False)  # the measurements, to plan again cheaply

    @property
    def fits(self) -> bool:
        return self.estimate.total <= safety(self.estimate.device) * self.available

    @property
    def fitted_micro_batch(self) -> int | None:
        return self.fitted.micro_batch_size if self.fitted is not None else None

    def to_dict(self) -> dict[str, Any]:
        return {"estimate": self.estimate.to_dict(), "available": self.available,
                "available_source": self.available_source, "fits": self.fits, "safety": safety(self.estimate.device),
                "fitted_micro_batch": self.fitted_micro_batch,
                "fitted": self.fitted.to_dict() if self.fitted is not None else None}


# ------------------------------------------------------------------------------ available memory


def _rss() -> int:
    """This process's resident set (bytes), from /proc/self/status (0 where there is none)."""
    return proc_bytes(STATUS, "VmRSS") or 0


def _meminfo_available() -> int | None:
    return proc_bytes(MEMINFO, "MemAvailable")


def _cgroup_room() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it has a limit."""
    try:
        rel = Path("/proc/self/cgroup").read_text().strip().split("::")[-1]
        base = Path("/sys/fs/cgroup") / rel.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((base / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available_memory(device: torch.device | str, memory_gib: float | None = None) -> tuple[int, str]:
    """(bytes a training run on `device` may use, where that figure comes from) (module docstring)."""
    if memory_gib is not None:
        return int(memory_gib * GIB), "train.memory_gib"
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {device}"
    rooms = [(r, what) for r, what in ((_meminfo_available(), "MemAvailable"), (_cgroup_room(), "cgroup memory.max"))
             if r is not None]
    if not rooms:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical memory"
    room, what = min(rooms)
    return room + _rss(), f"{what} + this process"


# ------------------------------------------------------------------------------ the estimate


def _block_signature(block: nn.Module) -> tuple:
    return tuple((name, type(m).__name__, repr(getattr(m, "quantizer", None)))
                 for name, m in block.named_modules() if isinstance(m, (nn.Linear, nn.Embedding)))


def _saved_bytes(fn, exclude: set[int]) -> int:
    """Bytes of the distinct storages autograd saves while `fn()` runs, storages in `exclude` aside."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude:
            seen[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def _autocast(device: torch.device):  # trainer.autocast (not imported: the trainer imports this module)
    import contextlib

    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def _materialise(module: nn.Module, device: torch.device) -> nn.Module:
    """A copy of a meta-device module with random weights on `device` (values do not change sizes)."""
    m = copy.deepcopy(module).to_empty(device=device)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02).abs_().add_(1e-3)  # positive: learned scales stay valid
    return m


def _probe_block(block: nn.Module, cfg: ModelConfig, device: torch.device, seq_len: int) -> tuple[int, int]:
    """(bytes per step, bytes per sequence of seq_len tokens) that a block saves for the backward."""
    T = min(seq_len, PROBE_TOKENS)
    m = _materialise(block, device).train()
    cos, sin = (t[:T].to(device) for t in rope_tables(cfg.head_dim, T, cfg.rope_theta))
    exclude = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def run(batch: int) -> int:
        x = torch.randn(batch, T, cfg.d_model, device=device, requires_grad=True)
        with torch.enable_grad(), _autocast(device):
            return _saved_bytes(lambda: m(x, cos, sin), exclude)

    one, two = run(1), run(2)
    per_seq = max(two - one, 0)
    return max(one - per_seq, 0), per_seq * seq_len // T


def _probe_head(head: nn.Module, cfg: ModelConfig, device: torch.device) -> tuple[int, int]:
    """(bytes per step, bytes per token) the output layer saves (its input, a quantized weight copy)."""
    m = _materialise(head, device).train()
    exclude = {p.untyped_storage().data_ptr() for p in m.parameters()}

    def run(n: int) -> int:
        x = torch.randn(n, cfg.d_model, device=device, requires_grad=True)
        with torch.enable_grad(), _autocast(device):
            return _saved_bytes(lambda: m(x), exclude)

    one, two = run(64), run(128)
    per_token = max(two - one, 0) // 64
    return max(one - 64 * per_token, 0), per_token


@dataclass
class _Profile:
    """What the estimate needs from the model, measured once for every micro-batch size."""

    recipe: Recipe
    device: torch.device
    weights: int
    grads: int
    blocks: list[tuple[int, int]]  # per block: (bytes per step, bytes per sequence)
    head: tuple[int, int]  # (bytes per step, bytes per token)
    optimizer: dict[str, int]  # AdamW's moments, bytes, for each train.optimizer_state
    processes: int = 1  # data parallelism: the gradients' all-reduce takes one more flat copy of them

    @classmethod
    def measure(cls, recipe: Recipe, device: torch.device) -> _Profile:
        cfg, model_config = recipe.train, recipe.model_config()
        with torch.device("meta"):
            model, _ = build_model(model_config, recipe.policy)
        trainable = [p for p in model.parameters() if p.requires_grad]
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        weights += sum(b.numel() * b.element_size() for b in model.buffers())
        probes: dict[tuple, tuple[int, int]] = {}
        blocks = []
        for block in model.blocks:
            sig = _block_signature(block)
            if sig not in probes:
                probes[sig] = _probe_block(block, model_config, device, cfg.seq_len)
            blocks.append(probes[sig])
        head = _probe_head(model.lm_head, model_config, device)
        optimizer = {state: optimizer_state_bytes(model, state) for state in STATE_DTYPES}
        return cls(recipe, device, weights, sum(p.numel() * 4 for p in trainable), blocks, head, optimizer)

    def estimate(self, micro: int) -> MemoryEstimate:
        cfg, model_config = self.recipe.train, self.recipe.model_config()
        tokens = micro * cfg.seq_len
        act_bytes = 2 if self.device.type == "cuda" else 4  # bf16 autocast on CUDA
        stream = tokens * model_config.d_model * act_bytes  # the residual stream (one (N, d) tensor)
        if cfg.activation_checkpointing:
            blocks = model_config.n_layers * stream + max(a + b * micro for a, b in self.blocks)
        else:
            blocks = sum(a + b * micro for a, b in self.blocks)
        head_step, head_token = self.head
        activations = blocks + head_step + head_token * tokens + 2 * stream  # + the final norm's input, output
        rows = min(cfg.ce_chunk, tokens) if cfg.ce_chunk else tokens
        logit_bytes = 4 + (2 if self.device.type == "cuda" else 0)  # fp32 (CUDA: + bf16 logits before .float())
        grads = self.grads * (2 if self.processes > 1 else 1)
        parts = {"weights": self.weights, "gradients": grads, "optimizer": self.optimizer[cfg.optimizer_state],
                 "activations": activations, "logits": LOGIT_BUFFERS * rows * model_config.vocab_size * logit_bytes,
                 "runtime": _rss() if self.device.type == "cpu" else 0}
        return MemoryEstimate(str(self.device), cfg.batch_size, micro, cfg.seq_len, cfg.ce_chunk,
                              cfg.activation_checkpointing, parts, cfg.optimizer_state)


def estimate_training_memory(recipe: Recipe, device: torch.device | str = "cpu",
                             micro_batch_size: int | None = None) -> MemoryEstimate:
    """Estimated peak bytes of a training step of `recipe` on `device` (module docstring). The
    recipe is resolved (preset defaults) first; `micro_batch_size` overrides the recipe's."""
    recipe = recipe.resolved()
    cfg = recipe.train
    return _Profile.measure(recipe, torch.device(device)).estimate(micro_batch_size or cfg.micro_batch_size
                                                                   or cfg.batch_size)


def plan_training_memory(recipe: Recipe, device: torch.device | str = "cpu",
                         available: tuple[int, str] | None = None,
                         profile: _Profile | None = None, processes: int = 1) -> TrainingMemoryPlan:
    """The recipe's estimate against the memory available on `device` (`available_memory`, or the
    given (bytes, source)), and the largest micro-batch (a divisor of batch_size, at most the
    recipe's micro-batch) that fits. `profile`: an earlier plan's measurements of the same model
    (the process's resident set is read again); `processes`: data-parallel processes."""
    device = torch.device(device)
    recipe = recipe.resolved()
    cfg = recipe.train
    if cfg.micro_batch_size is not None and cfg.batch_size % cfg.micro_batch_size:
        raise ConfigError(f"train.micro_batch_size={cfg.micro_batch_size} does not divide train.batch_size="
                          f"{cfg.batch_size}: choose a divisor of the batch size")
    room, source = available or available_memory(device, cfg.memory_gib)
    if profile is None or profile.recipe.model_config() != recipe.model_config() or profile.device != device:
        profile = _Profile.measure(recipe, device)
    profile = dataclasses.replace(profile, recipe=recipe, processes=processes)
    estimate = profile.estimate(cfg.micro_batch_size or cfg.batch_size)
    plan = TrainingMemoryPlan(estimate, room, source, profile=profile)
    if plan.fits:
        plan.fitted = estimate
        return plan
    for micro in sorted((d for d in range(1, estimate.micro_batch_size) if cfg.batch_size % d == 0), reverse=True):
        candidate = profile.estimate(micro)
        plan.tried.append(micro)
        if candidate.total <= safety(device) * room:
            plan.fitted = candidate
            break
    return plan


def fit_recipe(recipe: Recipe, device: torch.device | str, earlier: TrainingMemoryPlan | None = None,
               processes: int = 1, processes_here: int = 1) -> tuple[Recipe, TrainingMemoryPlan]:
    """The recipe to train on `device` and its memory plan: with `train.fit_memory` (the default), a
    recipe whose micro-batch does not fit gets the largest one that does (`train.micro_batch_size`),
    and a recipe that fits at no micro-batch is refused with `InsufficientMemory` naming the options
    to change. Without it the recipe is returned as it is. `earlier`: a plan of the same recipe whose
    measurements are reused (the trainer plans before reading data, and again once the data and
    tokenizer are in memory). `processes` (data parallelism, `training.distributed`): each process
    runs batch_size / processes sequences per step, and the `processes_here` processes on this machine
    share its memory."""
    recipe = recipe.resolved()
    cfg = recipe.train
    share = dataclasses.replace(recipe, train=dataclasses.replace(cfg, batch_size=cfg.batch_size // processes))
    room, source = available_memory(device, cfg.memory_gib)
    if processes_here > 1:
        room, source = room // processes_here, f"{source}, shared by {processes_here} processes"
    plan = plan_training_memory(share, device, (room, source), earlier.profile if earlier is not None else None,
                                processes)
    if plan.fits or not cfg.fit_memory:
        return recipe, plan
    if plan.fitted is not None:
        train = dataclasses.replace(cfg, micro_batch_size=plan.fitted_micro_batch)
        return dataclasses.replace(recipe, train=train), plan
    one = plan.profile.estimate(1)
    parts = one.parts
    fixes = [fix for fix, off in (("train.ce_chunk=4096", not cfg.ce_chunk),
                                  ("train.activation_checkpointing=true", not cfg.activation_checkpointing),
                                  ("train.optimizer_state=bf16", cfg.optimizer_state == "fp32")) if off]
    fixes += ["a smaller train.seq_len or model",
              "train.memory_gib=N if more memory is free than detected (train.fit_memory=false skips this check)"]
    raise InsufficientMemory(
        f"training {recipe.name} on {recipe.preset} needs ~{one.total / GIB:.1f} GiB even at train.micro_batch_size=1 "
        f"(weights, gradients and optimizer {(parts['weights'] + parts['gradients'] + parts['optimizer']) / GIB:.1f}, "
        f"activations {parts['activations'] / GIB:.1f}, logits {parts['logits'] / GIB:.1f}, process "
        f"{parts['runtime'] / GIB:.1f} GiB), but {plan.estimate.device} has {plan.available / GIB:.1f} GiB "
        f"({plan.available_source}; {safety(device):.0%} of it is planned for); nothing was trained or written. Try "
        + ", ".join(fixes))


__all__ = ["fit_recipe", "MemoryEstimate", "TrainingMemoryPlan", "available_memory", "estimate_training_memory",
           "plan_training_memory"]
