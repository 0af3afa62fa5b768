"""Batch-1 decode of a packed model: the one-call C++ Decoder beside the op-by-op path, side by side.

    flock /work/heavy.lock python benchmarks/decode_step.py PACKED [--threads 2] [--rounds 7]
        [--prompt-len 128] [--steps 64] [--kernels auto]

Both paths run in this one process on the same model and cache sizes, alternating round by round (so
a busy machine slows both alike); each round decodes --steps greedy tokens after a --prompt-len
prefill. Prints JSON: ms per token and tokens/s (min / median / max over rounds) per path, the
median ratio, and whether the two paths produced the same tokens (they must: bit-identical logits).
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = load_inference_model(args.packed, kernels=args.kernels)
    if not model.has_decoder:
        raise SystemExit("this model has no one-call decoder (not all-ternary, or no native kernels)")
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))

    def run(one_call: bool) -> tuple[float, list[int]]:
        model.use_decoder(one_call)
        cache = model.new_cache(1, args.prompt_len + args.steps)
        token = model(prompt, cache, last_only=True)[0, -1].argmax().view(1, 1)
        out = []
        t = time.perf_counter()
        for _ in range(args.steps):
            token = model(token, cache)[0, -1].argmax().view(1, 1)
            out.append(int(token))
        return (time.perf_counter() - t) / args.steps, out

    paths = {"op-by-op": False, "one-call": True}
    times: dict[str, list[float]] = {p: [] for p in paths}
    tokens = {}
    for p, flag in paths.items():  # warm-up
        tokens[p] = run(flag)[1]
    for r in range(args.rounds):
        for p in (list(paths) if r % 2 == 0 else list(paths)[::-1]):
            dt, tokens[p] = run(paths[p])
            times[p].append(dt)
    model.use_decoder(True)
    res = {p: {"ms_per_token": {"min": 1e3 * min(v), "median": 1e3 * statistics.median(v), "max": 1e3 * max(v)},
               "tok_s_median": 1 / statistics.median(v)} for p, v in times.items()}
    print(json.dumps({"packed": args.packed, "backend": model.backend.name, "threads": torch.get_num_threads(),
                      "rounds": args.rounds, "steps": args.steps, "paths": res,
                      "one_call_speedup_median": statistics.median(times["op-by-op"]) / statistics.median(times["one-call"]),
                      "same_tokens": tokens["op-by-op"] == tokens["one-call"]}, indent=2))


if __name__ == "__main__":
    main()
