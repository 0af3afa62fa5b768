"""What `--resume` may change, and what it must not.

A resumed run promises the weights an uninterrupted run would have reached (bit-identical), which
only holds if everything that shapes the weights is the run's own. `resume_recipe` takes the
recipe a user passes with `--resume` and the recipe stored in the checkpoint and returns the recipe
the run continues with:

1. Fields the new recipe leaves unset (a preset default: `train.steps`, `warmup_steps`,
   `batch_size`, ...) take the checkpoint's values, so `qtool train ... --resume` without the
   original `--max-steps` continues to the original horizon.
2. Every remaining difference is listed, and allowed only if it is in `ALLOWED`:

       train.steps        more steps (or fewer, but never fewer than the checkpoint's step): the
                          cosine horizon moves, so the remaining learning rates follow the new total
       train.eval_every, train.eval_batches, train.ckpt_every, train.log_every
                          when and how much to evaluate, save and log: the weights do not change
       train.device       where the run continues (another machine; numerics may differ by device)
       train.compile      eager or compiled: the same computation (numerics may differ by rounding)
       train.micro_batch_size, train.ce_chunk, train.activation_checkpointing, train.fit_memory,
       train.memory_gib   how the same batch is computed to fit in memory: the gradient is the
                          same sum, up to float rounding (bit-exact only with the same settings)
       train.optimizer_state
                          fp32 <-> bf16 moments of the block linears: the checkpoint's moments are
                          converted when loaded (bf16 -> fp32 exactly; fp32 -> bf16 rounded once), and
                          the run continues with the new precision (training.optimizer)
       name, description  labels
       data.path          only when the data behind it is the same (content fingerprint, checked
                          by the trainer once the data is read): the data moved, it did not change

   Anything else (seed, lr, schedule, batch size, data, model, policy, ...) changes what the
   weights become, and is refused with a message that names each difference.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from qtoolkit.errors import CheckpointError, short_repr
from qtoolkit.training.recipe import Recipe

ALLOWED = frozenset({"train.steps", "train.eval_every", "train.eval_batches", "train.ckpt_every",
                     "train.log_every", "train.device", "name", "description", "data.path",
                     "train.micro_batch_size", "train.ce_chunk", "train.activation_checkpointing",
                     "train.fit_memory", "train.memory_gib", "train.optimizer_state", "train.compile"})
_MISSING = object()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != "policy":  # policy keys are module names: compared whole
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def differences(saved: dict[str, Any], new: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, saved value, new value) for every dotted key whose values differ. Keys the saved recipe
    does not have (written by an older qtoolkit) are not compared."""
    a, b = _flatten(saved), _flatten(new)
    return [(k, a[k], b.get(k, _MISSING)) for k in a if a[k] != b.get(k, _MISSING)]


def resume_recipe(recipe: Recipe, saved: dict[str, Any], ckpt_step: int, ckpt_path: str) -> Recipe:
    """The (resolved) recipe a resumed run continues with, or CheckpointError naming what differs."""
    if not isinstance(saved, dict) or not isinstance(saved.get("train"), dict):
        raise CheckpointError(f"{ckpt_path}: the checkpoint holds no recipe to compare with; cannot resume")
    train = recipe.train
    unset = {f.name: saved["train"][f.name] for f in dataclasses.fields(train)
             if getattr(train, f.name) is None and f.name in saved["train"]}
    effective = dataclasses.replace(recipe, train=dataclasses.replace(train, **unset)).resolved()
    diffs = differences(saved, effective.to_dict())
    refused = [d for d in diffs if d[0] not in ALLOWED]
    if refused:
        listed = "; ".join(f"{k}: {short_repr(a, 40)} in the checkpoint, {short_repr(b, 40)} now"
                           for k, a, b in refused[:4])
        more = f" (and {len(refused) - 4} more)" if len(refused) > 4 else ""
        raise CheckpointError(
            f"{ckpt_path}: cannot resume with a different recipe: {listed}{more}. Resume with the run's own "
            "recipe (its recipe.yaml); only steps, evaluation/checkpoint/log cadence, device, name and the "
            "data's location may change"
        )
    if effective.train.steps < ckpt_step:
        raise CheckpointError(f"{ckpt_path}: the checkpoint is at step {ckpt_step}; train.steps "
                              f"({effective.train.steps}) cannot be smaller")
    return effective


__all__ = ["ALLOWED", "differences", "resume_recipe"]
