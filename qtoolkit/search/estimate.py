"""What a probe and a search will cost, from a quick measurement on this machine.

Before the sensitivity probe starts, one calibration batch is pushed through the embedding, every
block and the head, each timed (after one untimed warm-up pass), and every candidate format is
applied once to one unit and removed again (timed: the module swap and any calibration). With

    t_block, t_head     seconds per calibration batch for one block, for the final norm and head
    t_q(f)              seconds to apply format f to a unit, per weight element

the measurement of S(u, f) costs about  t_q(f) * |u| + B * ((L - start(u)) * t_block + t_head)
(B calibration batches; a unit in block b reruns blocks b..L-1; the embedding all of them), the
one-pass Fisher estimate about 3 full passes (forward and backward), and one search trial about
one full pass over its validation tokens plus applying every unit's format and the sampler's and
storage's bookkeeping (`TRIAL_OVERHEAD_S`). The estimate counts
the probe's pairs as measured except for formats predicted to sit at the noise floor (their
largest one-pass estimate below `FLOOR_RATIO` of the most sensitive format's), which the probe
stops measuring after a few units (`probes.FLOOR_RUN`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

FLOOR_RATIO = 1e-2
# a trial's bookkeeping besides its evaluation: the sampler's proposal (TPE, multivariate) and the
# storage round trips; about 0.3-1 s per trial on this workplace's 2-core machine (SQLite), which
# dominates on toy models and vanishes on real ones
TRIAL_OVERHEAD_S = 0.5


@dataclass
class Timing:
    """Seconds per calibration batch (`block`: the mean over blocks) and per weight element (`quantize`)."""
    embed: float
    block: float
    head: float
    n_layers: int
    quantize: dict[str, float] = field(default_factory=dict)
    tokens_per_batch: int = 0

    @property
    def full(self) -> float:
        return self.embed + self.n_layers * self.block + self.head

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Timing:
        return cls(d["embed_s"], d["block_s"], d["head_s"], d["n_layers"], dict(d["quantize_s_per_weight"]),
                   d["tokens_per_batch"])

    def pair(self, start: int | None, numel: int, fmt: str, n_batches: int) -> float:
        """Seconds to measure one (unit, format) with the block-input cache."""
        blocks = self.n_layers if start is None else self.n_layers - start
        fwd = (self.embed if start is None else 0.0) + blocks * self.block + self.head
        return self.quantize.get(fmt, 0.0) * numel + n_batches * fwd

    def to_dict(self) -> dict[str, Any]:
        return {"embed_s": self.embed, "block_s": self.block, "head_s": self.head, "n_layers": self.n_layers,
                "quantize_s_per_weight": self.quantize, "tokens_per_batch": self.tokens_per_batch}


@torch.no_grad()
def quick_timing(model, batch: tuple[Tensor, Tensor], units, formats, calib=None, sources=None) -> Timing:
    """Time one batch through the embedding, each block and the head (after a warm-up pass), and
    applying each format once to the largest unit of the first block (the swap and calibration)."""
    from qtoolkit.search.probes import quantized

    x, _ = batch
    cos, sin = model.rope_cos[: x.shape[1]], model.rope_sin[: x.shape[1]]

    def passes() -> tuple[float, float, float]:
        t0 = time.perf_counter()
        h = model.embed(x)
        t1 = time.perf_counter()
        for block in model.blocks:
            h = block(h, cos, sin)
        t2 = time.perf_counter()
        model.lm_head(model.norm(h)).float().logsumexp(-1)
        t3 = time.perf_counter()
        return t1 - t0, t2 - t1, t3 - t2

    passes()  # warm-up: first-call allocations and kernel selection
    embed, blocks, head = passes()
    n_layers = len(model.blocks)
    timing = Timing(embed, blocks / max(1, n_layers), head, n_layers, tokens_per_batch=int(x.numel()))
    blockwise = [u for u in units if u.block is not None] or list(units)
    unit = max(blockwise, key=_numel)
    for fmt in formats:
        t = time.perf_counter()
        with quantized(model, {name: fmt.spec for name in unit.modules}, calib=calib, sources=sources):
            pass
        timing.quantize[fmt.key] = (time.perf_counter() - t) / max(1, _numel(unit))
    return timing


def _numel(unit) -> int:
    return sum(a * b for a, b in unit.shapes)


def floor_formats(cheap: dict[str, dict[str, float]], formats: list[str]) -> list[str]:
    """Formats predicted to sit at the noise floor: their largest one-pass estimate is below
    FLOOR_RATIO of the largest estimate of any format."""
    top = {f: max((abs(fs.get(f, 0.0)) for fs in cheap.values()), default=0.0) for f in formats}
    most = max(top.values(), default=0.0)
    return [f for f in formats if most > 0 and top[f] < FLOOR_RATIO * most]


def probe_estimate(timing: Timing, pairs: list[tuple[Any, str]], n_batches: int, start_of, floor: list[str],
                   floor_run: int, fisher_done: bool) -> dict[str, float]:
    """Seconds for the Fisher estimate (unless done) and the measured pairs, formats in `floor`
    counted for `floor_run` pairs only."""
    measured, seen = 0.0, dict.fromkeys(floor, 0)
    for unit, fmt in pairs:
        if fmt in seen:
            if seen[fmt] >= floor_run:
                continue
            seen[fmt] += 1
        measured += timing.pair(start_of(unit), _numel(unit), fmt, n_batches)
    fisher = 0.0 if fisher_done else 3.0 * n_batches * timing.full
    return {"fisher": fisher, "measured": measured, "total": fisher + measured}


def trial_seconds(timing: Timing, units, formats, val_tokens: int, finetune_steps: int = 0,
                  finetune_tokens: int = 0) -> float:
    """Seconds for one search trial: apply every unit's format (the mean over formats), one full pass
    over the validation tokens, and `finetune_steps` forward+backward passes."""
    per_token = timing.full / max(1, timing.tokens_per_batch)
    q = sum(timing.quantize.values()) / max(1, len(timing.quantize))
    apply = q * sum(_numel(u) for u in units)
    return TRIAL_OVERHEAD_S + apply + per_token * val_tokens + 3.0 * per_token * finetune_tokens * finetune_steps


__all__ = ["FLOOR_RATIO", "TRIAL_OVERHEAD_S", "Timing", "floor_formats", "probe_estimate", "quick_timing", "trial_seconds"]
