"""How much of a loss difference is noise: the statistics behind the search's "better" and "tied".

A trial's loss is the mean of B per-batch losses l_1..l_B (fixed validation batches, the same for
every trial). Two standard errors come from them:

    SE(trial) = sd(l_b) / sqrt(B)                     the loss as an estimate of the expected loss
    SE(A - B) = sd(l_b(A) - l_b(B)) / sqrt(B)         a difference on the same (paired) batches

The paired one is usually much smaller (both allocations see the same hard and easy batches), so
it is the honest test of a difference; the search is stricter still: a difference counts as a win
only when it exceeds both the chosen trial's SE and twice the paired SE (about 95% two-sided).
Anything less is reported as a statistical tie. With one batch there is no estimate (None) and
every difference is reported as untested.

The probe uses the paired SE the same way: S(u, f) is a paired difference against the base model
on the calibration batches, and an |S| below twice its SE is at the noise floor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

Z = 2.0  # "significant": beyond Z paired standard errors


def standard_error(values: Sequence[float]) -> float | None:
    """sd / sqrt(n) of the values (sample sd, n - 1); None for fewer than 2 values."""
    n = len(values)
    if n < 2:
        return None
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def paired_standard_error(a: Sequence[float], b: Sequence[float]) -> float | None:
    """The standard error of mean(a) - mean(b) for values measured on the same batches."""
    if len(a) != len(b):
        return None
    return standard_error([x - y for x, y in zip(a, b, strict=True)])


def compare(chosen: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """Is `chosen` (a trial: loss, batch_losses, se) really better than `other`? Returns the
    difference other - chosen (positive: chosen is better), its paired SE, the threshold a win has to
    exceed and the verdict: "better", "worse", "tied" or "untested" (no per-batch losses)."""
    diff = other["loss"] - chosen["loss"]
    se_pair = paired_standard_error(chosen.get("batch_losses") or [], other.get("batch_losses") or [])
    se_trial = chosen.get("se")
    if se_pair is None or se_trial is None:
        return {"diff": diff, "se_paired": se_pair, "threshold": None, "verdict": "untested"}
    threshold = max(se_trial, Z * se_pair)
    verdict = "tied" if abs(diff) <= threshold else ("better" if diff > 0 else "worse")
    return {"diff": diff, "se_paired": se_pair, "threshold": threshold, "verdict": verdict}


__all__ = ["Z", "compare", "paired_standard_error", "standard_error"]
