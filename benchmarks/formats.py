"""The formats between ternary and INT8, post-training on one fp32 checkpoint (issue 12).

    python benchmarks/formats.py --ckpt /work/runs/fp32-small-600/ckpt.pt [--data ../shared/data/tinystories]
        [--formats fp16,int8,gptq8,int6,gptq6,int4,gptq4,int3,gptq3,int2,gptq2,ptqtp,ternary,binary]
        [--calib-tokens 4096] [--eval-batches 16] [--trials 12] [--budgets 0.25,0.5,0.75] [--skip-search]

1. Every format applied post-training (`qtool quantize`'s path: `training.ptq.quantize_source`,
   calibrated on the same windows when the format needs data) to all block linears, embed and
   lm_head INT8: stored bytes (the exact memory model of `qtool plan`), bits per weight of the block
   linears (codes, scales and zero points), validation loss, and the time to quantize (min/median/max
   over --repeats runs: loading, calibration when the format needs it, and the codes of every layer).
2. The search (`search.allocate.run_search`, post-training, no finetuning) at budgets 25%, 50% and
   75% of the way from the all-ternary to the all-INT8 bytes, with the old candidate set
   (ternary,int8,fp16) and the new one (--new-formats): the validation loss of the best trial.
Prints JSON (and a markdown table with --markdown). Heavy: run it under `flock /work/heavy.lock`.
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

OLD = "ternary,int8,fp16"
NEW = "ternary,ptqtp,int4,int8,fp16"
FORMATS = "fp16,int8,gptq8,int6,gptq6,int4,gptq4,int3,gptq3,int2,gptq2,ptqtp,ternary,binary"


def block_bits(plan) -> float:
    """Bits per weight over the block linears (codes, scales, zero points, extras)."""
    e = [x for x in plan.entries if x.kind == "linear" and x.name.startswith("blocks.")]
    return 8 * sum(x.nbytes for x in e) / sum(x.params for x in e)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data")
    ap.add_argument("--formats", default=FORMATS)
    ap.add_argument("--old-formats", default=OLD)
    ap.add_argument("--new-formats", default=NEW)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--eval-batches", type=int, default=16)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=1, help="quantize each format this many times (timing)")
    ap.add_argument("--budgets", default="0.25,0.5,0.75")
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--skip-formats", action="store_true", help="only the search part")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as markdown (stderr)")
    ap.add_argument("--partial", help="rewrite this JSON file after every format and search (a long run "
                                      "interrupted keeps what it measured)")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qtoolkit-bench-formats-"))
    os.environ.setdefault("QTOOLKIT_CACHE", str(tmp / "cache"))
    from qtoolkit import quantizers
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.config import ModelConfig
    from qtoolkit.layers import QUANT_MODULES
    from qtoolkit.pack import memory_plan
    from qtoolkit.search.allocate import build_space, run_search
    from qtoolkit.search.probes import format_key, parse_formats
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.ptq import checkpoint_calibration, quantize_source
    from qtoolkit.training.recipe import checkpoint_data_config
    from qtoolkit.training.trainer import evaluate_batches

    ckpt = load_checkpoint(args.ckpt)
    cfg = ModelConfig.from_dict(ckpt["model_config"])
    tc = ckpt["recipe"]["train"]
    bs, sl = int(tc["batch_size"]), int(tc["seq_len"])
    data = prepare_data(checkpoint_data_config(ckpt, args.data), cfg.vocab_size,
                        tokenizer=tokenizer_from_json(ckpt["tokenizer"]))
    val = list(data.val.eval_batches(bs, sl, args.eval_batches))
    calib, calib_info = checkpoint_calibration(ckpt, calib_tokens=args.calib_tokens, train=data.train)
    out: dict = {"benchmark": "formats", "checkpoint": args.ckpt, "preset_dims": cfg.to_dict(),
                 "threads": torch.get_num_threads(), "calibration": calib_info,
                 "eval": {"batches": len(val), "tokens": sum(int(y.numel()) for _, y in val)}}

    import sys

    def step(what: str) -> None:  # progress on stderr; partial results on disk
        print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)
        if args.partial:
            Path(args.partial).write_text(json.dumps(out, indent=2))

    rows = []
    out["formats"] = rows
    # --formats: names/aliases or a YAML list of specs (e.g. "[gptq2, {name: intn, bits: 2, rounding: gptq, damp: 0.1}]")
    for fmt in [] if args.skip_formats else [None, *parse_formats(args.formats)]:
        name = "fp32" if fmt is None else fmt.key
        spec = quantizers.canonical(name if fmt is None else fmt.spec)
        policy = {"_default": spec, "embed": "int8", "lm_head": "int8"} if name != "fp32" else {"_default": "fp32"}
        plan = memory_plan(cfg, policy)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            q = quantize_source(ckpt, policy, calib=calib)
            with torch.no_grad():  # the codes themselves (what packing stores): RTN formats quantize lazily
                for m in q.model.modules():
                    if isinstance(m, QUANT_MODULES):
                        m.quantizer.quantize(m.weight)
            times.append(time.perf_counter() - t)
        loss = evaluate_batches(q.model, val)["val_loss"]
        rows.append({"format": name if name == "fp32" else format_key(spec), "spec": spec, "bytes": plan.total_bytes,
                     "block_bits_per_weight": round(block_bits(plan), 4), "val_loss": round(loss, 4),
                     "quantize_seconds": {"min": round(min(times), 2), "median": round(statistics.median(times), 2),
                                          "max": round(max(times), 2)},
                     "calibrated": bool(quantizers.build(spec).calibration)})
        del q
        step(f"{name}: loss {loss:.4f}, {min(times):.1f} s")

    if not args.skip_search:
        old, new = parse_formats(args.old_formats), parse_formats(args.new_formats)
        space = build_space(cfg, old)
        lo, hi = space.bytes_of(space.uniform("ternary")), space.bytes_of(space.uniform("int8"))
        searches = []
        out["search"] = {"all_ternary_bytes": lo, "all_int8_bytes": hi, "trials": args.trials, "budgets": searches}
        for frac in (float(f) for f in args.budgets.split(",")):
            budget = int(lo + frac * (hi - lo))
            row = {"fraction": frac, "budget": budget}
            for label, fmts in (("old", old), ("new", new)):
                t = time.perf_counter()
                res = run_search(args.ckpt, budget, fmts, tmp / f"search-{label}-{frac}", args.data, trials=args.trials,
                                 calib_tokens=args.calib_tokens, eval_batches=args.eval_batches, device="cpu")
                chosen: dict[str, int] = {}
                for key in res.best["allocation"].values():
                    chosen[key] = chosen.get(key, 0) + 1
                row[label] = {"formats": [f.key for f in fmts], "loss": round(res.best["loss"], 4),
                              "bytes": res.best["bytes"], "source": res.best["source"], "units_per_format": chosen,
                              "seconds": round(time.perf_counter() - t, 1)}
                step(f"search {label} at {frac}: loss {res.best['loss']:.4f}")
            searches.append(row)
    print(json.dumps(out, indent=2))
    if args.markdown:
        print(markdown(out), file=sys.stderr)


def markdown(out: dict) -> str:
    lines = [] if not out.get("formats") else ["| format | stored bytes | bits/weight (block linears) | val loss | quantize s |", "|---|---:|---:|---:|---:|"]
    for r in out.get("formats", []):
        lines.append(f"| {r['format']} | {r['bytes']:,} | {r['block_bits_per_weight']:.3f} | {r['val_loss']:.4f} | "
                     f"{r['quantize_seconds']['median']:.1f} |")
    if "search" in out:
        lines += ["", "| budget | bytes | old set loss | new set loss | new set choice |", "|---|---:|---:|---:|---|"]
        for b in out["search"]["budgets"]:
            choice = ", ".join(f"{k} x{v}" for k, v in sorted(b["new"]["units_per_format"].items()))
            lines.append(f"| {int(b['fraction'] * 100)}% | {b['budget']:,} | {b['old']['loss']:.4f} | "
                         f"{b['new']['loss']:.4f} | {choice} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
