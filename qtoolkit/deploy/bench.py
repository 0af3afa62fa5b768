"""`qtool bench`: speed and memory of the packed runtime beside PyTorch FP32 and dynamic-INT8 models.

Every variant runs the same architecture through the same KV-cache decoding loop
(`qtoolkit.deploy.runtime.InferenceModel`, q/k/v and gate/up fused in all of them), so the comparison is
about weights and kernels:

    packed         the packed checkpoint: 2-bit ternary blocks x int8 activations, INT8 head
                   (kernel path as `qtoolkit.deploy.kernels.select_backend` picks it)
    fp32           nn.Linear on the dequantized packed weights, float32 (MKL)
    int8-dynamic   the fp32 model through torch.ao.quantization.quantize_dynamic (FBGEMM / oneDNN
                   int8 linears with per-call activation quantization; embedding stays fp32)

Each variant is measured in its own child process (`python -m qtoolkit.deploy.bench SPEC.json`), so peak
resident memory (VmHWM of that process: libraries + weights + KV cache + activations) is its
own. The child times, after one warm-up round, `repeats` rounds of

    prefill   one forward over `prompt_len` random token ids (seed 0) into an empty KV cache,
              logits at the last position only                              -> prompt_len / seconds
    decode    `new_tokens` single-token steps with greedy argmax             -> new_tokens / seconds

and reports the median round with the min and max beside it: on a shared machine rounds can differ
by 10x, so a large spread (`SPREAD_WARN`) is flagged rather than hidden. Rounds are timed with
`torch.utils.benchmark`'s clock (which synchronizes an accelerator before reading the time) and
summarized as its `Measurement` (median, interquartile range). A prompt and decode length that do
not fit the model's context are scaled down to fit it, and the report says so (`notes`).
Ratios are packed / baseline (speed: higher is better; bytes and memory: lower is better).

Before the first child starts, the parent loads the C++ kernels once (`kernels.select_backend`), so
a first-use build happens once, is announced through `progress`, and is not timed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from qtoolkit.errors import ConfigError
from qtoolkit.procfs import STATUS, proc_bytes

VARIANTS = ("packed", "fp32", "int8-dynamic")
BASELINES = ("fp32", "int8-dynamic")
SPREAD_WARN = 1.25  # max / min round time above which the report warns that the timings are noisy
Progress = Callable[[str, int, int | None], None]  # (stage, done, total)


def _measurement(times: list[float], what: str):
    from torch.utils.benchmark import Measurement
    from torch.utils.benchmark.utils.common import TaskSpec

    return Measurement(number_per_run=1, raw_times=list(times), task_spec=TaskSpec(stmt=what, setup=""))


@dataclass
class VariantResult:
    variant: str
    backend: str
    backend_reason: str
    threads: int
    prompt_len: int
    new_tokens: int
    prefill_s: list[float]  # one per measured round
    decode_s: list[float]
    weight_bytes: int  # bytes of the weight tensors the model holds
    kv_cache_bytes: int
    peak_rss_bytes: int  # peak resident memory of the child process (VmHWM)
    torch_rss_bytes: int  # resident memory right after `import torch` (the libraries' share)
    loaded_rss_bytes: int  # resident memory once the model is built and the checkpoint dropped
    load_s: float

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_len / _measurement(self.prefill_s, "prefill").median

    @property
    def decode_tok_s(self) -> float:
        return self.new_tokens / _measurement(self.decode_s, "decode").median

    @property
    def prefill_tok_s_range(self) -> tuple[float, float]:
        """(slowest, fastest) round in tokens/s."""
        return self.prompt_len / max(self.prefill_s), self.prompt_len / min(self.prefill_s)

    @property
    def decode_tok_s_range(self) -> tuple[float, float]:
        return self.new_tokens / max(self.decode_s), self.new_tokens / min(self.decode_s)

    @property
    def decode_ms_per_token(self) -> float:
        return 1e3 / self.decode_tok_s

    def spread(self) -> float:
        """The larger of max/min round time over prefill and decode (1.0 = identical rounds)."""
        return max(max(t) / min(t) for t in (self.prefill_s, self.decode_s))

    def to_dict(self) -> dict[str, Any]:
        decode = _measurement(self.decode_s, "decode")
        return {**asdict(self), "prefill_tok_s": self.prefill_tok_s, "decode_tok_s": self.decode_tok_s,
                "prefill_tok_s_range": list(self.prefill_tok_s_range),
                "decode_tok_s_range": list(self.decode_tok_s_range), "decode_ms_per_token": self.decode_ms_per_token,
                "decode_iqr_over_median": decode.iqr / decode.median, "spread": self.spread()}


@dataclass
class BenchReport:
    checkpoint: str
    model: dict[str, Any]  # preset-like summary: layers, d_model, vocab, params
    results: list[VariantResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # adjustments made to the request (context clamping)

    def warnings(self) -> list[str]:
        """One line per variant whose rounds differ by more than SPREAD_WARN (a busy machine)."""
        out = []
        for r in self.results:
            if r.spread() > SPREAD_WARN:
                lo, hi = r.decode_tok_s_range
                out.append(f"{r.variant}: rounds differ by {r.spread():.1f}x (decode {lo:,.0f}-{hi:,.0f} tokens/s); "
                           "the machine is busy or throttling: compare medians with care, or rerun with more --repeats")
        return out

    def get(self, variant: str) -> VariantResult | None:
        return next((r for r in self.results if r.variant == variant), None)

    def ratios(self) -> dict[str, dict[str, float]]:
        """packed / baseline for each baseline: decode and prefill speed-ups, weight and memory ratios."""
        p = self.get("packed")
        out: dict[str, dict[str, float]] = {}
        for r in self.results:
            if r.variant == "packed" or p is None:
                continue
            out[r.variant] = {
                "decode_speedup": p.decode_tok_s / r.decode_tok_s,
                "prefill_speedup": p.prefill_tok_s / r.prefill_tok_s,
                "weight_bytes_ratio": p.weight_bytes / r.weight_bytes,
                "peak_rss_ratio": p.peak_rss_bytes / r.peak_rss_bytes,
                "peak_rss_above_torch_ratio": (p.peak_rss_bytes - p.torch_rss_bytes)
                / max(1, r.peak_rss_bytes - r.torch_rss_bytes),
            }
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"checkpoint": self.checkpoint, "model": self.model, "notes": self.notes,
                "warnings": self.warnings(), "results": [r.to_dict() for r in self.results], "ratios": self.ratios()}


def parse_baselines(text: str | None) -> list[str]:
    if text is None or text.strip() == "":
        return []
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in names if x not in BASELINES]
    if bad:
        raise ConfigError(f"unknown baseline(s) {', '.join(bad)}; available: {', '.join(BASELINES)}")
    return list(dict.fromkeys(names))


def fit_context(prompt_len: int, new_tokens: int, context: int) -> tuple[int, int]:
    """(prompt_len, new_tokens) scaled down in proportion to fit `context` tokens (each >= 1)."""
    if prompt_len + new_tokens <= context:
        return prompt_len, new_tokens
    if context < 2:
        raise ConfigError(f"a model with a context of {context} token(s) cannot be benchmarked")
    p = min(context - 1, max(1, round(context * prompt_len / (prompt_len + new_tokens))))
    return p, context - p


def run_bench(ckpt: str | Path, baselines: list[str] | tuple[str, ...] = BASELINES, threads: int | None = None,
              prompt_len: int = 128, new_tokens: int = 64, repeats: int = 3, kernels: str | None = None,
              progress: Progress | None = None) -> BenchReport:
    """Measure the packed model and each baseline, each in its own process (see the module docstring).
    `progress(stage, done, total)` hears of a kernel build and of each variant being measured."""
    import torch

    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.config import ModelConfig
    from qtoolkit.deploy.kernels import select_backend
    from qtoolkit.schema import check_int

    for name in baselines:
        if name not in BASELINES:
            raise ConfigError(f"unknown baseline {name!r}; available: {', '.join(BASELINES)}")
    for name, value in (("prompt_len", prompt_len), ("new_tokens", new_tokens), ("repeats", repeats)):
        check_int(value, name, 1)
    threads = torch.get_num_threads() if threads is None else check_int(threads, "threads", 1, 4096)
    # verified here, once (CRC/digest, config against tensors): a bad file fails with a clear error,
    # not in a child process
    cfg = ModelConfig.from_dict(load_checkpoint(ckpt)["model_config"])
    report = BenchReport(str(ckpt), {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "vocab_size": cfg.vocab_size,
                                     "params": cfg.num_params(), "max_seq_len": cfg.max_seq_len})
    fitted = fit_context(prompt_len, new_tokens, cfg.max_seq_len)
    if fitted != (prompt_len, new_tokens):
        report.notes.append(f"prompt {prompt_len} + {new_tokens} new tokens exceed the model's context of "
                            f"{cfg.max_seq_len}; measured {fitted[0]} + {fitted[1]} instead")
        prompt_len, new_tokens = fitted
    select_backend(kernels, progress)  # build (once, announced) or load the kernels before any timing
    variants = ("packed", *baselines)
    for i, variant in enumerate(variants):
        if progress is not None:
            progress(f"measuring {variant}", i, len(variants))
        spec = {"ckpt": str(ckpt), "variant": variant, "threads": threads, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "kernels": kernels}
        report.results.append(VariantResult(**_run_child(spec, threads)))
    if progress is not None:
        progress("measuring", len(variants), len(variants))
    return report


def _run_child(spec: dict[str, Any], threads: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="qtool-bench-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps({**spec, "out": str(out_path)}))
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        proc = subprocess.run([sys.executable, "-m", "qtoolkit.deploy.bench", str(spec_path)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not out_path.is_file():
            tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
            raise RuntimeError(f"benchmark of {spec['variant']} failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out_path.read_text())


# ------------------------------------------------------------------------------ the child


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Load one variant, time prefill and decode, and return the figures (runs in the child)."""
    import time
    import warnings

    import torch

    # torch.utils.benchmark's clock: synchronizes an accelerator before reading the time
    from torch.utils.benchmark.utils.timer import timer as clock

    torch_rss = peak_rss_bytes()
    torch.set_num_threads(spec["threads"])
    warnings.filterwarnings("ignore")
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.deploy.runtime import InferenceModel
    from qtoolkit.pack import packed_form

    t0 = time.perf_counter()
    ckpt = packed_form(load_checkpoint(spec["ckpt"]))
    variant = spec["variant"]
    if variant == "packed":
        model = InferenceModel.from_packed(ckpt, spec.get("kernels"), _consume=True)
    else:
        model = InferenceModel.float_baseline(ckpt, dynamic_int8=variant == "int8-dynamic", kernels_=spec.get("kernels"),
                                              _consume=True)
    del ckpt
    load_s = time.perf_counter() - t0
    loaded_rss = rss_bytes()

    P, N = spec["prompt_len"], spec["new_tokens"]
    prompt = torch.randint(0, model.config.vocab_size, (1, P), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(1, P + N)
    prefill_s, decode_s = [], []
    for round_ in range(spec["repeats"] + 1):  # round 0 warms up
        cache.length = 0
        t = clock()
        logits = model(prompt, cache, last_only=True)
        t_prefill = clock() - t
        token = torch.argmax(logits[0, -1]).view(1, 1)
        t = clock()
        for _ in range(N):
            logits = model(token, cache)
            token = torch.argmax(logits[0, -1]).view(1, 1)
        t_decode = clock() - t
        if round_ > 0:
            prefill_s.append(t_prefill)
            decode_s.append(t_decode)
    return {"variant": variant, "backend": model.backend.name, "backend_reason": model.backend.reason,
            "threads": torch.get_num_threads(), "prompt_len": P, "new_tokens": N, "prefill_s": prefill_s,
            "decode_s": decode_s, "weight_bytes": model.weight_bytes(), "kv_cache_bytes": cache.nbytes,
            "peak_rss_bytes": peak_rss_bytes(), "torch_rss_bytes": torch_rss, "loaded_rss_bytes": loaded_rss,
            "load_s": load_s}


def _op_group(name: str) -> str:
    if name.startswith("qtoolkit::ternary"):
        return "ternary linears (C++ kernel)"
    if name.startswith("qtoolkit::int8"):
        return "int8 linears / LM head (C++ kernel)"
    if "attention_step" in name or "scaled_dot_product" in name or "flash_attention" in name:
        return "attention over the KV cache (RoPE, cache write, softmax)"
    if "rms_norm" in name or "silu" in name:
        return "RMSNorm, SwiGLU"
    if name.startswith("aten::linear") or name.startswith("aten::mm") or name.startswith("aten::addmm") \
            or name.startswith("quantized::"):
        return "PyTorch linears"
    return "other tensor ops (embedding, residual adds, views, allocations)"


def profile_decode(ckpt: str | Path, threads: int | None = None, prompt_len: int = 128, steps: int = 32,
                   kernels: str | None = None, top: int = 15) -> dict[str, Any]:
    """Where a decode step of the packed model spends its time, per token: torch.profiler self CPU
    time per op and per group, beside the unprofiled wall time (their difference is Python and
    dispatch overhead outside any op)."""
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    from qtoolkit.deploy.runtime import load_inference_model

    if threads:
        torch.set_num_threads(threads)
    model = load_inference_model(ckpt, kernels=kernels)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))

    def run() -> float:
        cache = model.new_cache(1, prompt_len + steps)
        token = model(prompt, cache, last_only=True)[0, -1].argmax().view(1, 1)
        t = time.perf_counter()
        for _ in range(steps):
            token = model(token, cache)[0, -1].argmax().view(1, 1)
        return time.perf_counter() - t

    run()
    wall = min(run() for _ in range(3)) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    ops = []
    for e in prof.key_averages():
        if e.key.startswith("aten::argmax") or e.self_cpu_time_total <= 0:
            continue
        ops.append({"op": e.key, "self_ms_per_token": e.self_cpu_time_total / 1e3 / steps,
                    "calls_per_token": e.count / steps})
    ops = [o for o in ops if o["calls_per_token"] >= 0.5]  # decode ops (the prefill ran once)
    groups: dict[str, float] = {}
    for o in ops:
        groups[_op_group(o["op"])] = groups.get(_op_group(o["op"]), 0.0) + o["self_ms_per_token"]
    ops.sort(key=lambda o: -o["self_ms_per_token"])
    in_ops = sum(groups.values())
    return {"backend": model.backend.name, "threads": torch.get_num_threads(), "wall_ms_per_token": 1e3 * wall,
            "profiled_op_ms_per_token": in_ops, "groups_ms_per_token": dict(sorted(groups.items(), key=lambda kv: -kv[1])),
            "note": "self CPU time under the profiler (which adds its own overhead per op); the wall "
                    "time is measured without it",
            "top_ops": ops[:top]}


def rss_bytes() -> int:
    """Current resident memory of this process (VmRSS; the peak where /proc is missing)."""
    now = proc_bytes(STATUS, "VmRSS")
    return now if now is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: VmHWM on Linux. (`ru_maxrss` would do elsewhere, but
    Linux carries it across exec, so a child started by a large parent would report the parent's
    resident size at fork time as its own peak.)"""
    peak = proc_bytes(STATUS, "VmHWM")
    if peak is not None:
        return peak
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text())
    result = measure(spec)
    Path(spec["out"]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
