"""The training loss, plain and chunked.

Loss = (1 - ls) * CE + ls * (mean over the vocabulary of -log p), per token, averaged over tokens
(label smoothing `ls`); the plain cross-entropy CE is returned beside it for perplexities.

`loss_fn(logits, targets, ls)` takes the logits (B, T, V). At the 132M shape with batch 32 x 512 and
a 30,522-token vocabulary they hold 16,384 x 30,522 values: 2.0 GB in fp32, and the log-softmax,
its gradient and the logits' gradient are as large again, so the loss alone needs ~8 GB.

`chunked_loss(hidden, head, targets, ls, chunk)` takes the final hidden states (B, T, d) and the
output layer instead, and never builds the (B*T, V) logits: it runs the head and the loss on `chunk`
rows at a time, each chunk under activation checkpointing (`torch.utils.checkpoint`), so only one
chunk's logits, log-probabilities and gradients exist at any moment:

    for rows r of hidden.flatten(0, 1) in chunks:     # (chunk, d)
        logits_r = x_r @ W^T                           # (chunk, V), freed after the forward
        sums += (nll_r.sum(), smooth_r.sum())          # recomputed chunk by chunk in the backward

Cost: the head's matmul runs once more (in the backward recompute): + 2 N d V FLOPs over the
6 N d V the head costs with its backward, while the memory of the loss drops from ~4 N V to
~4 chunk V floats. The values equal the plain loss's up to the order of summation (tests:
tests/test_loss.py). A quantized head (`QuantLinear`) quantizes its weight once and its input once,
over all rows (an activation quantizer with per-tensor statistics sees the same tensor as in the
plain path); only the matmul is chunked.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def loss_fn(logits: Tensor, targets: Tensor, label_smoothing: float) -> tuple[Tensor, Tensor]:
    """(training loss with label smoothing, plain cross-entropy), both means over tokens."""
    logp = F.log_softmax(logits.float().flatten(0, -2), dim=-1)
    nll = -logp.gather(-1, targets.reshape(-1, 1)).squeeze(-1)
    ce = nll.mean()
    if label_smoothing == 0:
        return ce, ce
    smooth = -logp.mean(dim=-1)
    return (1 - label_smoothing) * ce + label_smoothing * smooth.mean(), ce


def _chunk_sums(x: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                term: Callable[[], Tensor | None] | None = None) -> Tensor:
    """[sum of -log p(target), sum of mean_v -log p(v)] over the rows of x (chunk, d)."""
    logits = F.linear(x, weight, bias)
    extra = term() if term is not None else None
    if extra is not None:  # a quantizer's additive output term (Tequila's dead-zone bias, a low-rank path)
        logits = logits + extra
    logp = F.log_softmax(logits.float(), dim=-1)  # (chunk, V)
    nll = -logp.gather(-1, targets.reshape(-1, 1)).sum()
    smooth = -logp.mean(dim=-1).sum()
    return torch.stack([nll, smooth])


def head_operands(head: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
    """(input, weight, bias) with which `head(x)` computes `F.linear(input, weight, bias)` (plus the
    quantizer's output term, `QuantLinear.output_term`)."""
    operands = getattr(head, "linear_operands", None)
    if operands is not None:  # QuantLinear: the quantized (or warmup-blended) operands
        return operands(x)
    if not isinstance(head, nn.Linear):
        raise TypeError(f"chunked cross-entropy needs a linear output layer, got {type(head).__name__}")
    return x, head.weight, head.bias


def chunked_loss(hidden: Tensor, head: nn.Module, targets: Tensor, label_smoothing: float,
                 chunk: int) -> tuple[Tensor, Tensor]:
    """`loss_fn(head(hidden), targets, label_smoothing)` computed `chunk` rows at a time without the
    full logits (module docstring). hidden (..., d), targets (...)."""
    raw = hidden.flatten(0, -2)
    x, weight, bias = head_operands(head, raw)
    quantizer = getattr(head, "quantizer", None)
    # the output term is row-wise: computed per chunk from the raw rows, with the extras computed once
    extras = quantizer.extras(head.weight) if quantizer is not None and quantizer.has_output_term else None
    t = targets.reshape(-1)
    n = t.numel()
    sums = x.new_zeros(2, dtype=torch.float32)
    for start in range(0, n, chunk):
        rows = slice(start, start + chunk)
        term = functools.partial(head.output_term, raw[rows], extras) if extras is not None else None
        sums = sums + checkpoint(_chunk_sums, x[rows], weight, bias, t[rows], term, use_reentrant=False)
    ce, smooth = sums[0] / n, sums[1] / n
    if label_smoothing == 0:
        return ce, ce
    return (1 - label_smoothing) * ce + label_smoothing * smooth, ce


__all__ = ["chunked_loss", "head_operands", "loss_fn"]
