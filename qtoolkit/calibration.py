"""Calibration: run data through a quantized model so that quantizers that need data fit their state.

The contract is in `qtoolkit.quantizers.base`: a quantizer with `calibration = True` gets
`observe(x)` for every calibration batch of its layer's input and then `calibrate(weight)`, which
fits its state and may return a new latent weight. `calibrate_model` is the driver:

    calibrate_model(model, batches, blocks=None, modules=None, progress=None) -> CalibrationReport

Order (sequential, as GPTQ and llm-compressor's sequential pipeline do). The model already carries
its policy (`apply_policy`), so layers that need no calibration quantize in their forward anyway.

1. The block list is found (`policy.find_blocks`: `blocks`, `model.layers`, `transformer.h`, ... or
   the `blocks` argument). Layers to calibrate outside it are split by a probe pass into those
   called before the first block (an input projection) and after it (the LM head).
2. Layers before the blocks are calibrated first, on full forward passes stopped at block 0.
3. The inputs of the first block with something to calibrate are captured once per batch (a
   forward pre-hook that stops the pass), then for each block b in turn: its target layers are
   calibrated on b's cached inputs, and b's outputs (through its now-quantized layers) become the
   inputs of b + 1. So block b sees what blocks 0..b-1 will really compute after quantization.
4. Layers after the blocks are calibrated on full forward passes.

Within a segment (a block, or the full model), layers are calibrated in *stages* in call order, a
stage being the consecutive layers that read the same input tensor (q/k/v; gate/up): a stage is
observed on a pass where every earlier stage is already calibrated ("true sequential" in GPTQ's
reference code). Layer inputs are streamed to `observe` through forward pre-hooks one batch at a
time; the only thing held across batches is one block's input per batch. A model without a block
list is calibrated the same way with the whole model as its one segment.

Batches are whatever the model's forward takes: a tensor (`model(x)`), a tuple (`model(*b)`) or a
dict (`model(**b)`); they are moved to the model's device. Nothing here is random: the same model
and batches give the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from qtoolkit.errors import ConfigError, QToolkitError
from qtoolkit.layers import QUANT_MODULES
from qtoolkit.policy import find_blocks

Progress = Callable[[str, int, int | None], None]


class CalibrationError(QToolkitError, RuntimeError):
    """A model or data that calibration cannot run on (the message says why)."""


def _noop(stage: str, done: int, total: int | None) -> None:
    pass


@dataclass
class CalibrationReport:
    layers: list[str] = field(default_factory=list)  # calibrated modules, in calibration order
    batches: int = 0
    segments: int = 0  # forward segments run: blocks, plus the parts before/after them
    mode: str = "none"  # "none" (nothing needed data) | "blocks" | "model" (no block list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"layers": list(self.layers), "batches": self.batches, "segments": self.segments,
                "mode": self.mode, "seconds": self.seconds}


def calibration_targets(model: nn.Module, modules: Iterable[str] | None = None) -> dict[str, nn.Module]:
    """{name: module} of the quantized layers whose quantizer needs calibration, one per quantizer
    (layers sharing a quantizer, as tied embeddings do, are calibrated through their linear),
    restricted to `modules` when given."""
    wanted = None if modules is None else set(modules)
    groups: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, m in model.named_modules():
        if isinstance(m, QUANT_MODULES) and m.quantizer.calibration and (wanted is None or name in wanted):
            groups.setdefault(id(m.quantizer), []).append((name, m))
    out = {}
    for members in groups.values():
        linears = [(n, m) for n, m in members if isinstance(m, nn.Linear)]
        name, m = (linears or members)[0]
        out[name] = m
    return out


def needs_calibration(model: nn.Module) -> bool:
    return bool(calibration_targets(model))


# ------------------------------------------------------------------------------ forward plumbing


class _Stop(Exception):
    """Raised by a hook to end a forward pass early (everything needed has been seen)."""


def _call(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _hidden(output: Any) -> Tensor:
    """A block's hidden-state output: the tensor itself, or the first item of a tuple (HF layers)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _with_hidden(args: tuple, kwargs: dict, h: Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    if "hidden_states" in kwargs:
        return args, {**kwargs, "hidden_states": h}
    raise CalibrationError("cannot find the hidden states among a block's inputs (neither its first "
                           "positional argument nor a `hidden_states` keyword)")


def _stop_at(module: nn.Module):
    def hook(mod, args, kwargs):
        raise _Stop

    return module.register_forward_pre_hook(hook, with_kwargs=True)


def _run_stopped(model: nn.Module, batch: Any) -> None:
    try:
        _call(model, batch)
    except _Stop:
        pass


def _capture_block_inputs(model: nn.Module, block: nn.Module, batches: list[Any]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of `block` for every batch, each pass stopped as the block is entered."""
    captured: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            n = len(captured)
            _run_stopped(model, b)
            if len(captured) == n:
                raise CalibrationError(f"the model's forward never calls its block {type(block).__name__}; "
                                       "pass the right block list (blocks=NAME)")
    finally:
        handle.remove()
    return captured


# ------------------------------------------------------------------------------ one segment


def _stages(layers: dict[str, nn.Module], run_one: Callable[[], None]) -> list[list[str]]:
    """Target layers grouped by call order into stages of consecutive layers that read the same
    input tensor, from one probe pass."""
    order: list[tuple[str, Tensor]] = []  # holding the inputs keeps their ids unique during the pass

    def make(name):
        def hook(mod, args):
            if all(n != name for n, _ in order):
                order.append((name, args[0]))
        return hook

    handles = [m.register_forward_pre_hook(make(n)) for n, m in layers.items()]
    try:
        run_one()
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in layers if all(n != o for o, _ in order)]
    if missing:
        raise CalibrationError(f"layer {missing[0]} is never called in the forward pass, so it cannot be "
                               "calibrated")
    stages: list[list[str]] = []
    for i, (name, x) in enumerate(order):
        if i and x is order[i - 1][1]:
            stages[-1].append(name)
        else:
            stages.append([name])
    return stages


def _observe(layers: dict[str, nn.Module], run: Callable[[], None]) -> None:
    def hook(mod, args):
        mod.quantizer.observe(args[0].detach().float())

    handles = [m.register_forward_pre_hook(hook) for m in layers.values()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()


def _fit(name: str, module: nn.Module) -> None:
    new = module.quantizer.calibrate(module.weight.detach())
    if new is None:
        return
    if tuple(new.shape) != tuple(module.weight.shape):
        raise ValueError(f"{module.quantizer.name}.calibrate returned a weight of shape {tuple(new.shape)} "
                         f"for {name}, whose weight is {tuple(module.weight.shape)}")
    module.weight.copy_(new.to(module.weight.dtype))  # in place: tied weights and references survive


def _calibrate_segment(layers: dict[str, nn.Module], items: list[Any], fn: Callable[[Any], Any],
                       report: CalibrationReport) -> None:
    """Calibrate `layers` on the passes `fn(item)` for every item, stage by stage."""
    if not layers:
        return
    for stage in _stages(layers, lambda: fn(items[0])):
        chosen = {n: layers[n] for n in stage}
        _observe(chosen, lambda: [fn(it) for it in items])
        for n, m in chosen.items():
            _fit(n, m)
        report.layers += stage


# ------------------------------------------------------------------------------ the driver


@torch.no_grad()
def calibrate_model(model: nn.Module, batches: Iterable[Any], blocks: str | None = None,
                    modules: Iterable[str] | None = None, progress: Progress = _noop) -> CalibrationReport:
    """Calibrate every quantizer of `model` that needs data (or those of `modules`), in place.

    `batches`: model inputs (module docstring). `blocks`: the name of the block list when
    `find_blocks` does not find it. Returns what was calibrated; a model whose quantizers need no
    data returns at once without running anything.
    """
    t0 = time.perf_counter()
    report = CalibrationReport()
    targets = calibration_targets(model, modules)
    if not targets:
        return report
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    items = [_to(b, device) for b in batches]
    if not items:
        raise ConfigError("calibration needs at least one batch of data")
    report.batches = len(items)
    was_training = model.training
    model.eval()
    try:
        embeddings = {n: m for n, m in targets.items() if not isinstance(m, nn.Linear)}
        for n, m in embeddings.items():  # nothing to observe: data-free fitting
            _fit(n, m)
            report.layers.append(n)
        linears = {n: m for n, m in targets.items() if n not in embeddings}
        found = find_blocks(model, blocks)
        if found is None:
            report.mode, report.segments = "model", 1
            progress("calibrating", 0, 1)
            _calibrate_segment(linears, items, lambda b: _call(model, b), report)
            progress("calibrating", 1, 1)
        else:
            report.mode = "blocks"
            _calibrate_blocks(model, found, linears, items, report, progress)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    return report


def _calibrate_blocks(model: nn.Module, found: tuple[str, nn.Module], linears: dict[str, nn.Module],
                      items: list[Any], report: CalibrationReport, progress: Progress) -> None:
    prefix, block_list = found
    per_block: dict[int, dict[str, nn.Module]] = {}
    outside: dict[str, nn.Module] = {}
    for name, m in linears.items():
        if name.startswith(prefix + "."):
            per_block.setdefault(int(name[len(prefix) + 1:].split(".")[0]), {})[name] = m
        else:
            outside[name] = m

    # which outside layers run before the first block: one pass, stopped at block 0
    before: set[str] = set()
    if outside:
        def seen(name):
            return lambda mod, args: before.add(name)

        handles = [m.register_forward_pre_hook(seen(n)) for n, m in outside.items()]
        handles.append(_stop_at(block_list[0]))
        try:
            _run_stopped(model, items[0])
        finally:
            for h in handles:
                h.remove()
    pre = {n: m for n, m in outside.items() if n in before}
    post = {n: m for n, m in outside.items() if n not in before}

    span = (min(per_block), max(per_block)) if per_block else None
    total = bool(pre) + (span[1] - span[0] + 1 if span else 0) + bool(post)
    done = 0
    progress("calibrating", done, total)
    if pre:
        stop = _stop_at(block_list[0])
        try:
            _calibrate_segment(pre, items, lambda b: _run_stopped(model, b), report)
        finally:
            stop.remove()
        done += 1
        progress("calibrating", done, total)
    if span:
        first, last = span
        inputs = _capture_block_inputs(model, block_list[first], items)
        for i in range(first, last + 1):
            block = block_list[i]
            _calibrate_segment(per_block.get(i, {}), inputs, lambda a, block=block: block(*a[0], **a[1]), report)
            if i < last:  # the next block's inputs, through this block as now quantized
                inputs = [_with_hidden(args, kwargs, _hidden(block(*args, **kwargs))) for args, kwargs in inputs]
            done += 1
            report.segments += 1
            progress("calibrating", done, total)
        del inputs
    if post:
        _calibrate_segment(post, items, lambda b: _call(model, b), report)
        done += 1
        progress("calibrating", done, total)
    report.segments += bool(pre) + bool(post)


__all__ = ["CalibrationError", "CalibrationReport", "calibrate_model", "calibration_targets", "needs_calibration"]
