"""Static decode: a fixed-shape decode step, captured once as a CUDA graph and replayed per token.

Eager decoding on a GPU is bound by the host, not the device: a `ternarylm-132m` step is ~1,000
small kernels (12 blocks of norms, activation quantization, GEMMs, RoPE, attention), each launched
by Python, plus a host read of the logits to sample. Here a step is one `graph.replay()`:

    state on the device (allocated once per (batch, max_len, sampler)):
        token (B, 1) long     the last token; the step overwrites it with the next one
        pos (1,) long         its position; the step adds 1
        cache                 KVCache (B, max_len): k/v written at `pos` by index
        temperature () fp32, noise (B, V or top_k) fp32   sampling (noise drawn before each step)
    step = InferenceModel.static_step(token, pos, cache) -> logits (B, V)
           -> next token on the device (`pick_token`: argmax, or softmax / Exp(1) noise -> argmax)
           -> token <- next, pos <- pos + 1

No tensor shape depends on the position and nothing is read back inside the step, so the whole
step (sampling included) is captured once by `torch.cuda.CUDAGraph` (after warm-up steps on a side
stream, as PyTorch's CUDA-graph docs prescribe) and replayed per token. The host reads one
integer per generated token (the token id, needed to stream and to stop at end-of-text).

Sampling on the device uses the exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) i.i.d. picks
i with probability p_i (as Gumbel-max does), so a categorical draw is two elementwise ops and an
argmax. The noise is drawn by `exponential_` from a seeded generator on the device before each
replay (outside the graph, so any generator works). Greedy (temperature 0) is the argmax, the same
token as `sample_next`; sampled tokens are deterministic for a seed but differ from the CPU
sampler's for the same seed (a different random stream).

On the CPU the same step runs eagerly (there are no graphs), which is how it is tested.
`torch.compile` of the step is an option (`compile=True`): the compiled step is warmed up and then
captured by the same graph. Steps run under `torch.no_grad()`, not inference mode, because inductor
cannot trace in-place writes into views of inference tensors (the cache); state tensors are
therefore created outside inference mode. Compiled steps fuse and reorder float ops, so their logits
agree with the eager step to the runtime's tolerance, not bit for bit (measured on a tiny model: max
|diff| 0.0046 of max |logit| ~3.4). If compilation fails, the uncompiled step runs and
`compile_error` says why.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from qtoolkit.errors import ConfigError

WARMUP_STEPS = 3  # eager steps on a side stream before capture (cuBLAS handles, allocator, compile)
BUCKET = 128  # cache lengths are rounded up to a multiple of this, so prompts of similar length share a graph
MAX_DECODERS = 4  # captured decoders kept per model (each holds its KV cache and graph memory pool)


def pick_token(logits: Tensor, temperature: Tensor | None, top_k: int | None, noise: Tensor | None) -> Tensor:
    """Next token ids (B,) from logits (B, V), on the device, no host read: argmax when `noise` is
    None (greedy); else softmax(logits / temperature) restricted to the `top_k` largest (None: all)
    sampled by the exponential race with `noise` (B, top_k or V) ~ Exp(1)."""
    if noise is None:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        values, indices = logits.topk(top_k, dim=-1)
        choice = (torch.softmax(values, dim=-1) / noise).argmax(dim=-1, keepdim=True)
        return indices.gather(-1, choice).squeeze(-1)
    return (torch.softmax(logits, dim=-1) / noise).argmax(dim=-1)


def cache_length(model: Any, needed: int) -> int:
    """`needed` positions rounded up to a multiple of BUCKET, within the model's context."""
    return min(-(-needed // BUCKET) * BUCKET, model.config.max_seq_len)


class StaticDecoder:
    """A model's decode step for one (batch, max_len, sampler), with its device-side state; on CUDA
    (and `graphs`) captured once as a CUDA graph (module docstring).

        dec = StaticDecoder(model, batch=1, max_len=256, sample=False)
        first = dec.prefill(ids)          # (B, T) prompt -> first token ids (B,) on the device
        for _ in range(n): dec.step()     # next token in dec.token, position in dec.pos
    """

    def __init__(self, model: Any, batch: int, max_len: int, sample: bool = False, top_k: int | None = None,
                 graphs: bool = True, compile: bool = False):
        device = model.device
        vocab = model.config.vocab_size
        self.model = model
        self.batch, self.max_len = batch, max_len
        self.top_k = top_k if sample and top_k is not None and top_k < vocab else None
        with torch.inference_mode(False):  # state a compiled step may mutate: normal tensors
            self.cache = model.new_cache(batch, max_len)
            self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
            self.pos = torch.zeros(1, dtype=torch.long, device=device)
            self.temperature = torch.ones((), device=device) if sample else None
            self.noise = torch.ones(batch, self.top_k or vocab, device=device) if sample else None
        self.generator: torch.Generator | None = None
        self.logits: Tensor | None = None  # the last step's logits (B, V); a fixed address under a graph
        self.position = 0  # host copy of `pos` (positions are counted here, never read back)
        self._fn = torch.compile(model.static_step_fn) if compile else model.static_step_fn
        self.compiled = compile
        self.graph: Any = None
        self.graph_error = ""  # why capture failed (the step then runs eagerly)
        self.compile_error = ""  # why torch.compile failed (the step then runs uncompiled)
        capture = graphs and device.type == "cuda"
        if capture or compile:
            self._prepare(capture)

    def _step(self) -> None:
        with torch.inference_mode(False), torch.no_grad():  # not inference mode (module docstring)
            self._run_step()

    def _run_step(self) -> None:
        self.logits = self._fn(self.token, self.pos, self.cache)
        self.token.copy_(pick_token(self.logits, self.temperature, self.top_k, self.noise).view(-1, 1))
        self.pos.add_(1)

    def _prepare(self, capture: bool) -> None:
        """Warm up (compiling, if asked; on CUDA on a side stream, as PyTorch's CUDA-graph docs
        prescribe), capture one step as a CUDA graph, then reset the state the warm-up wrote."""
        cuda = self.token.device.type == "cuda"
        side = torch.cuda.Stream(self.token.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(self.token.device))
        with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
            try:
                self._warm_up()
            except Exception as e:  # noqa: BLE001 (a compiler failure of any kind: run the step uncompiled)
                if not self.compiled:
                    raise
                self.compile_error = _first_line(e)
                self._fn, self.compiled = self.model.static_step_fn, False
                self._warm_up()
        if cuda:
            torch.cuda.current_stream(self.token.device).wait_stream(side)
        if capture:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step()
                self.graph = graph
            except RuntimeError as e:  # an op that syncs or copies from the host: run eagerly instead
                self.graph, self.graph_error = None, _first_line(e)
        self.token.zero_()
        self.pos.zero_()
        self.cache.k.zero_()
        self.cache.v.zero_()

    def _warm_up(self) -> None:
        self.pos.zero_()
        for _ in range(WARMUP_STEPS):
            self._step()

    def set_sampling(self, temperature: float, generator: torch.Generator | None) -> None:
        if self.temperature is not None:
            self.temperature.fill_(temperature)
        self.generator = generator

    @torch.inference_mode()
    def prefill(self, ids: Tensor) -> Tensor:
        """Run the prompt ids (B, T) through the model's dynamic forward into this decoder's cache and
        pick the first new token on the device: (B,) long, also left in `token`."""
        B, T = ids.shape
        if B != self.batch or T >= self.max_len:
            raise ConfigError(f"prompt of shape {(B, T)} does not fit a decoder for batch {self.batch}, "
                             f"{self.max_len} positions")
        self.cache.length = 0
        logits = self.model(ids.to(self.token.device), self.cache, last_only=True)[:, -1]
        self._draw_noise()
        self.token.copy_(pick_token(logits, self.temperature, self.top_k, self.noise).view(-1, 1))
        self.pos.fill_(T)
        self.position = T
        return self.token.view(-1)

    def _draw_noise(self) -> None:
        if self.noise is not None:
            self.noise.exponential_(generator=self.generator)

    def step(self) -> Tensor:
        """One decode step from the current token at the current position: the next token ids (B,)
        on the device (a view of `token`)."""
        if self.position >= self.max_len:
            raise ConfigError(f"the decoder's cache holds {self.max_len} positions; all are used")
        self._draw_noise()
        if self.graph is not None:
            self.graph.replay()
        else:
            self._step()
        self.position += 1
        self.cache.length = self.position
        return self.token.view(-1)


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()] or [""]
    return f"{type(e).__name__}: {lines[0][:200]}"


def decoder_for(model: Any, batch: int, max_len: int, sample: bool, top_k: int | None) -> StaticDecoder:
    """The model's decoder for this shape and sampler, built (and captured) on first use; the model
    keeps the last MAX_DECODERS."""
    key = (batch, max_len, sample, top_k if sample else None, model.cuda_graphs, model.compile_step)
    dec = model._static.pop(key, None)
    if dec is None:
        dec = StaticDecoder(model, batch, max_len, sample, top_k, model.cuda_graphs, model.compile_step)
        while len(model._static) >= MAX_DECODERS:
            model._static.pop(next(iter(model._static)))
    model._static[key] = dec  # most recently used last
    return dec


def generate_static(model: Any, ids: list[int], max_new_tokens: int, temperature: float, top_k: int | None,
                    seed: int | None, eos_id: int | None, stats: Any) -> Iterator[int]:
    """`runtime.generate`'s loop over a StaticDecoder (arguments already checked there)."""
    import time

    sample = temperature > 0
    dec = decoder_for(model, 1, cache_length(model, len(ids) + max_new_tokens), sample, top_k)
    generator = None
    if sample and seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    dec.set_sampling(temperature, generator)
    t0 = time.perf_counter()
    token = int(dec.prefill(torch.tensor([ids]))[0])  # the one host read per token
    stats.prefill_s = time.perf_counter() - t0
    for i in range(max_new_tokens):
        stats.new_tokens += 1
        stats.token_ids.append(token)
        yield token
        if eos_id is not None and token == eos_id:
            stats.stopped_at_eos = True
            return
        if i + 1 < max_new_tokens:
            t = time.perf_counter()
            token = int(dec.step()[0])
            stats.decode_s += time.perf_counter() - t


__all__ = ["BUCKET", "StaticDecoder", "cache_length", "decoder_for", "generate_static", "pick_token"]
