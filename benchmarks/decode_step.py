"""Batch-1 decode of a packed model: the one-call C++ Decoder beside the op-by-op path, side by side.

    flock /work/heavy.lock python benchmarks/decode_step.py PACKED [--threads 2] [--rounds 7]
        [--prompt-len 128] [--steps 64] [--kernels auto] [--head-streaming]

Both paths run in this one process on the same model and cache sizes, alternating round by round (so
a busy machine slows both alike); each round decodes --steps greedy tokens after a --prompt-len
prefill. Prints JSON: ms per token and tokens/s (min / median / max over rounds) per path, the
median ratio, and whether the paths produced the same tokens (they must: bit-identical logits).

`phases_us` profiles the one-call step: per phase kind (qkv, attention, o, gate_up, down: summed over
the layers; then the head), the median over steps of the time from the previous phase's completion
to this one's (`Decoder.last_phase_ends_ns`), in microseconds. --head-streaming adds a third path,
the one-call step with the LM head read the other way (`Decoder.stream_head` flipped: non-temporal
prefetches or plain loads), to see which one this machine's caches prefer.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from qtoolkit.deploy.runtime import load_inference_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--head-streaming", action="store_true", help="also time the one-call step with the LM head "
                    "read the other way (Decoder.stream_head flipped)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_inference_model(args.packed, kernels=args.kernels)
    if not model.has_decoder:
        raise SystemExit("this model has no one-call decoder (not all-ternary, or no native kernels)")
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    model.use_decoder(True)
    default_stream = model._decoder.stream_head
    kinds = ("qkv", "attention", "o", "gate_up", "down")
    phases: dict[str, list[float]] = {k: [] for k in (*kinds, "head")}

    def run(path: str) -> tuple[float, list[int]]:
        one_call = path != "op-by-op"
        model.use_decoder(one_call)
        if one_call:
            model._decoder.stream_head = default_stream if path == "one-call" else not default_stream
        cache = model.new_cache(1, args.prompt_len + args.steps)
        token = model(prompt, cache, last_only=True)[0, -1].argmax().view(1, 1)
        out, ends = [], []
        t = time.perf_counter()
        for _ in range(args.steps):
            token = model(token, cache)[0, -1].argmax().view(1, 1)
            out.append(int(token))
            if path == "one-call":
                ends.append(model._decoder.last_phase_ends_ns)
        dt = (time.perf_counter() - t) / args.steps
        for e in ends:  # phase 5 l + k is kind k of layer l; the last phase is the head
            d = [e[0]] + [b - a for a, b in zip(e[:-1], e[1:], strict=True)]
            for k, name in enumerate(kinds):
                phases[name].append(sum(d[k:-1:5]) / 1e3)
            phases["head"].append(d[-1] / 1e3)
        return dt, out

    paths = ["op-by-op", "one-call"] + (["one-call, head streamed the other way"] if args.head_streaming else [])
    times: dict[str, list[float]] = {p: [] for p in paths}
    tokens = {}
    for p in paths:  # warm-up
        tokens[p] = run(p)[1]
    for k in phases:
        phases[k].clear()
    for r in range(args.rounds):
        for p in (paths if r % 2 == 0 else paths[::-1]):
            dt, tokens[p] = run(p)
            times[p].append(dt)
    model.use_decoder(True)
    res = {p: {"ms_per_token": {"min": 1e3 * min(v), "median": 1e3 * statistics.median(v), "max": 1e3 * max(v)},
               "tok_s_median": 1 / statistics.median(v)} for p, v in times.items()}
    report = {"packed": args.packed, "backend": model.backend.name, "threads": torch.get_num_threads(),
              "rounds": args.rounds, "steps": args.steps, "head_streamed_by_default": default_stream, "paths": res,
              "one_call_speedup_median": statistics.median(times["op-by-op"]) / statistics.median(times["one-call"]),
              "phases_us": {k: statistics.median(v) for k, v in phases.items()},
              "same_tokens": all(tokens[p] == tokens["op-by-op"] for p in paths)}
    if args.head_streaming:
        report["default_over_other_head_streaming_median"] = (
            statistics.median(times[paths[2]]) / statistics.median(times["one-call"]))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
