"""Batch-1 decode on a GPU: each weight layout and step driver side by side, beside the CPU path.

    python benchmarks/gpu_decode.py [--ckpt PACKED] [--preset ternarylm-132m] [--device cuda]
        [--layouts bf16,packed] [--drivers dynamic,static,graph,compile] [--prompt-len 128]
        [--new-tokens 128] [--rounds 5] [--cpu-threads N] [--no-cpu]

Every variant decodes through `generate` (the public path; greedy) on the same random prompt:

    layout   `weights=` of `load_inference_model`: bf16 (the CUDA default), fp16, fp32, packed
    driver   dynamic  `forward` per token (`use_static_decode(False)`, the old CUDA path's loop)
             static   the fixed-shape step run eagerly (`use_static_decode(True, cuda_graphs=False)`)
             graph    the step captured once as a CUDA graph and replayed (the CUDA default)
             compile  `torch.compile` of the step, then captured (`compile=True`)
    cpu      the CPU path of the same machine (`device="cpu"`: C++ kernels, one-call Decoder)

One warm-up round per variant (graph capture, compilation), then --rounds rounds whose order
alternates. Prints JSON: decode tokens/s (min / median / max), prefill seconds, the weight bytes the
device holds (`InferenceModel.weight_summary`), whether each variant produced the same tokens as the
first (dense layouts compute the integer path's numbers, so the ternary layers agree; bf16 rounding
of the head input can still move a near-tie), the best GPU variant over the CPU path, and the
issue-14 target (`ternarylm-132m`: >= 1,000 tokens/s at batch 1 on an H100, faster than the CPU).
Without --ckpt a random `ternary_all` model of --preset is packed once (speed does not depend on the
weights' values). With --device cpu it runs the same drivers on the CPU (graph = static there).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from inference import random_packed  # benchmarks/inference.py: a random model, packed once

from qtoolkit.deploy.runtime import GenerationStats, generate, load_inference_model

DRIVERS = {"dynamic": (False, False, False), "static": (True, False, False), "graph": (True, True, False),
           "compile": (True, True, True)}
TARGET_TOK_S = 1000


def decode_round(model, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    stats = GenerationStats()
    tokens = list(generate(model, prompt, max_new_tokens=new_tokens, temperature=0, stats=stats))
    return stats.decode_tok_s, stats.prefill_s, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, help="a packed checkpoint (default: a random one of --preset)")
    ap.add_argument("--preset", default="ternarylm-132m")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layouts", default="bf16,packed")
    ap.add_argument("--drivers", default="dynamic,static,graph,compile")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--cpu-threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--no-cpu", action="store_true", help="skip the CPU path")
    args = ap.parse_args()
    path = args.ckpt or random_packed(args.preset, args.out_dir)
    drivers = [d for d in args.drivers.split(",") if d]
    unknown = set(drivers) - set(DRIVERS)
    if unknown:
        raise SystemExit(f"--drivers: unknown {sorted(unknown)}; choose from {', '.join(DRIVERS)}")

    variants = {}  # name -> (model, driver flags or None for the CPU path)
    for layout in [x for x in args.layouts.split(",") if x]:
        model = load_inference_model(path, device=args.device, weights=layout)
        for d in drivers:
            variants[f"{layout}/{d}"] = (model, DRIVERS[d])
    if not args.no_cpu:
        torch.set_num_threads(args.cpu_threads)
        variants["cpu"] = (load_inference_model(path, device="cpu"), None)
    cfg = next(iter(variants.values()))[0].config
    n_prompt = min(args.prompt_len, cfg.max_seq_len - args.new_tokens)
    prompt = torch.randint(0, cfg.vocab_size, (n_prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(name: str) -> tuple[float, float, list[int]]:
        model, flags = variants[name]
        if flags is not None:
            model.use_static_decode(*flags)  # captured decoders are kept per driver (their key has the flags)
        return decode_round(model, prompt, args.new_tokens)

    results: dict[str, dict] = {}
    t0 = time.perf_counter()
    for name in variants:  # warm-up round: capture, compile, first-use allocations
        tw = time.perf_counter()
        _, _, tokens = run(name)
        results[name] = {"warmup_s": time.perf_counter() - tw, "tokens": tokens, "tok_s": [], "prefill_s": []}
    names = list(variants)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            tok_s, prefill_s, tokens = run(name)
            results[name]["tok_s"].append(tok_s)
            results[name]["prefill_s"].append(prefill_s)
            results[name]["same_tokens_every_round"] = tokens == results[name]["tokens"]
    first = results[names[0]]["tokens"]
    out = {}
    for name, res in results.items():
        model, flags = variants[name]
        v = res["tok_s"]
        model.use_static_decode(*(flags or (False, False, False)))
        decoders = [d for k, d in model._static.items() if flags and flags[0] and k[-2:] == flags[1:]]
        out[name] = {"decode_tok_s": {"min": min(v), "median": statistics.median(v), "max": max(v)},
                     "prefill_s_median": statistics.median(res["prefill_s"]), "warmup_s": res["warmup_s"],
                     "weights": model.weight_summary(), "same_tokens_as_first": res["tokens"] == first,
                     "graph_captured": bool(decoders) and decoders[-1].graph is not None,
                     "graph_error": decoders[-1].graph_error if decoders else ""}
    gpu = {n: o["decode_tok_s"]["median"] for n, o in out.items() if n != "cpu"}
    best = max(gpu, key=gpu.get) if gpu else None
    summary = {"best_gpu_variant": best, "best_gpu_tok_s": gpu.get(best)}
    if "cpu" in out and best:
        summary["best_gpu_over_cpu"] = gpu[best] / out["cpu"]["decode_tok_s"]["median"]
    if cfg.d_model == 768 and cfg.n_layers == 12 and best:
        summary["target_1000_tok_s_met"] = gpu[best] >= TARGET_TOK_S
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(json.dumps({"ckpt": str(path), "device": device, "torch": torch.__version__, "prompt_len": n_prompt,
                      "new_tokens": args.new_tokens, "rounds": args.rounds, "cpu_threads": args.cpu_threads,
                      "elapsed_s": time.perf_counter() - t0, "variants": out, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
