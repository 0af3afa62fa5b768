"""Data parallelism for `train`: one process per device, started by torchrun.

    torchrun --nproc-per-node N -m qtoolkit.cli train --recipe ternary_all ...

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address in each process's
environment; `World.from_env()` reads them and `process_group` joins the group (gloo on the CPU,
NCCL on CUDA, where rank r uses cuda:LOCAL_RANK). Without torchrun the world is one process and
nothing here runs.

The global batch is the recipe's `batch_size`: every rank computes the same batch of step s (a pure
function of (seed, s)) and takes rows [r * B / W, (r + 1) * B / W), so the ranks' shares are
disjoint, deterministic, and together exactly the batch a 1-process run sees. Each rank accumulates
the gradient of the mean loss over its share (micro-batches as usual) through PyTorch's
DistributedDataParallel around `training.step.LossModule`, the module whose forward is the whole
step's forward (model, chunked or plain loss), so DDP sees every parameter the loss uses. DDP
averages the gradients in buckets while the backward still runs (overlapping communication with
compute), and only in the last micro-batch's backward (`no_sync` for the others):

    grad = (1 / W) sum_r grad(mean loss over share r) = grad(mean loss over the batch)

so every rank applies the same update to the same weights, and a W-process run matches a
1-process run to float rounding (tests/test_distributed.py, with and without micro-batches, the
chunked loss, activation checkpointing and torch.compile). Every parameter must receive a gradient
(DDP runs without `find_unused_parameters`); every shipped recipe's forward uses all of them.
`all_reduce_mean` then averages the loss figures and the stop flag in one small collective.

Rank 0 alone holds the run directory's lock and writes (checkpoints, metrics.jsonl, recipe.yaml) and
reports progress; the others compute. A checkpoint holds no world size: the weights and optimizer
state are the same on every rank and batches depend only on (seed, step), so a run resumes under
any number of processes.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @classmethod
    def from_env(cls) -> World:
        """The world torchrun describes in the environment (one process without it)."""
        env = os.environ
        size = int(env.get("WORLD_SIZE", "1"))
        return cls(int(env.get("RANK", "0")), size, int(env.get("LOCAL_RANK", "0")),
                   int(env.get("LOCAL_WORLD_SIZE", str(size))))

    def share(self, batch: Tensor) -> Tensor:
        """This rank's rows of a global batch (module docstring)."""
        n = batch.shape[0] // self.size
        return batch[self.rank * n:(self.rank + 1) * n]


def is_main_process() -> bool:
    """False in the processes of a torchrun launch other than rank 0 (they do not print or write)."""
    return World.from_env().main


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for the block (gloo on the CPU, NCCL on CUDA); nothing for one process."""
    import torch.distributed as dist

    created = False
    if world.distributed and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL's collectives run on the current device
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        created = True
    try:
        yield
    finally:
        if created:
            dist.destroy_process_group()


def all_reduce_mean(grads: list[Tensor], extra: Tensor, world: World) -> Tensor:
    """Average `grads` (in place) and `extra` (returned) over the ranks, in one collective."""
    if not world.distributed:
        return extra
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1) for g in grads] + [extra.reshape(-1).to(grads[0].dtype if grads else extra.dtype)])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()
    return flat[offset:].to(extra.dtype)


def broadcast_object(value, world: World):
    """Rank 0's `value` on every rank."""
    if not world.distributed:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()


__all__ = ["World", "all_reduce_mean", "barrier", "broadcast_object", "is_main_process", "process_group"]
