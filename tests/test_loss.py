"""The memory savers give the loss and gradients of the plain path: the chunked cross-entropy
(training/loss.py) and per-block activation checkpointing (DecoderLM.hidden_states)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from qtoolkit.config import ModelConfig
from qtoolkit.layers import set_quant_mix
from qtoolkit.policy import build_model
from qtoolkit.training.loss import chunked_loss, loss_fn

TERNARY_HEAD = {"_default": "ternary", "embed": "int8", "lm_head": "ternary"}


def _grads(params):
    return [p.grad.clone() for p in params]


@pytest.mark.parametrize("ls", [0.0, 0.1])
@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_loss_equals_the_plain_one_values_and_gradients(ls, chunk):
    torch.manual_seed(0)
    head = nn.Linear(16, 50, bias=True)
    h = torch.randn(3, 21, 16, requires_grad=True)
    t = torch.randint(0, 50, (3, 21))

    loss, ce = loss_fn(head(h), t, ls)
    loss.backward()
    plain = [h.grad.clone(), *_grads(head.parameters())]
    h.grad = None
    head.zero_grad()

    loss_c, ce_c = chunked_loss(h, head, t, ls, chunk)
    loss_c.backward()
    chunked = [h.grad.clone(), *_grads(head.parameters())]
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-6)
    assert ce_c.item() == pytest.approx(ce.item(), rel=1e-6)
    for a, b in zip(plain, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


HEADS = {
    "ternary": TERNARY_HEAD,
    "tequila": {**TERNARY_HEAD, "lm_head": {"name": "tequila", "lam": 1.0e-3}},  # dead-zone bias output term
    "hgf": {**TERNARY_HEAD, "lm_head": {"name": "ternary", "correction": {"rank": 3, "gate_init": 0.5}}},  # low-rank output term
}


@pytest.mark.parametrize("head", sorted(HEADS))
@pytest.mark.parametrize("mix", [1.0, 0.5])
def test_chunked_loss_with_a_quantized_head(mix, head):
    """A quantized head (ternary weight, int8 per-token input, inside a warmup blend; with an output
    term) through the whole tiny model: same loss and same gradient on every parameter."""
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig.from_name("tiny"), HEADS[head])
    set_quant_mix(model, mix)
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    loss, ce = loss_fn(model(x), y, 0.1)
    loss.backward()
    plain = _grads(model.parameters())
    model.zero_grad()
    loss_c, ce_c = chunked_loss(model.hidden_states(x), model.lm_head, y, 0.1, 10)
    loss_c.backward()
    assert loss_c.item() == pytest.approx(loss.item(), rel=1e-6) and ce_c.item() == pytest.approx(ce.item(), rel=1e-6)
    for (name, p), g in zip(model.named_parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6, msg=name)


class _LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an operator returns (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.largest = max(self.largest, o.numel())
        return out


def test_chunked_loss_never_builds_the_full_logits():
    torch.manual_seed(0)
    head = nn.Linear(8, 300, bias=False)  # the weight (300 x 8) is smaller than one chunk of logits
    n, chunk = 4 * 50, 16
    h = torch.randn(4, 50, 8, requires_grad=True)
    t = torch.randint(0, 300, (4, 50))
    with _LargestTensor() as plain:
        loss_fn(head(h), t, 0.1)[0].backward()
    with _LargestTensor() as chunked:
        chunked_loss(h, head, t, 0.1, chunk)[0].backward()
    assert plain.largest == n * 300
    assert chunked.largest == chunk * 300


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model, _ = build_model(ModelConfig.from_name("tiny"), {"_default": "ternary", "embed": "int8", "lm_head": "int8",
                                                          "blocks.0.attn.q_proj": {"name": "ternary", "alpha": "learned"}})
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    results = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        loss, _ = loss_fn(model(x), y, 0.1)
        loss.backward()
        results.append((loss.detach(), _grads(model.parameters())))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1)
    for (name, _), a, b in zip(model.named_parameters(), g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-7, msg=name)


def test_activation_checkpointing_keeps_only_block_inputs():
    """Saved for the backward: with recomputation, far fewer bytes (the blocks' inputs, not their
    activations); in eval or under no_grad nothing changes."""
    model, _ = build_model(ModelConfig.from_name("tiny"), {"_default": "fp32"})
    x = torch.randint(0, 512, (4, 64))

    def saved_bytes() -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.hidden_states(x)
        return total

    model.train()
    model.activation_checkpointing = False
    full = saved_bytes()
    model.activation_checkpointing = True
    recomputed = saved_bytes()
    assert recomputed < full / 3, (recomputed, full)


def test_evaluation_with_micro_batches_and_chunks_scores_the_same():
    from qtoolkit.training.trainer import evaluate_batches

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig.from_name("tiny"), TERNARY_HEAD)
    batches = [(torch.randint(0, 512, (4, 32)), torch.randint(0, 512, (4, 32))) for _ in range(3)]
    plain = evaluate_batches(model, batches)
    saved = evaluate_batches(model, batches, micro_batch_size=2, ce_chunk=24)
    assert saved["val_tokens"] == plain["val_tokens"] == 3 * 4 * 32
    assert saved["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-6)
