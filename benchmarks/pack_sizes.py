"""Stored bytes of ternarylm-132m under each shipped precision recipe: predicted vs written.

    python benchmarks/pack_sizes.py [--preset ternarylm-132m] [--out-dir /tmp]

For each configuration the memory model's prediction (`memory_plan`, on the meta device) is set
beside the bytes of the packed tensors actually produced from a randomly initialised model and the
size of the safetensors file written (the difference is the header: JSON metadata, no tokenizer
here). Prints JSON. Target: ternary_all with base-3 packing and INT8 embed/head >= 7x smaller than
fp32; predicted == written exactly.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch

from qtoolkit import load_recipe
from qtoolkit.checkpoint import write_packed
from qtoolkit.pack import memory_plan, pack_model
from qtoolkit.policy import build_model

CONFIGS = [
    ("fp32_baseline", None),
    ("fp16_all", None),
    ("int8_all", None),
    ("ternary_all", "2bit"),
    ("ternary_all", "base3"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="ternarylm-132m")
    ap.add_argument("--out-dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    rows = []
    fp32_bytes = None
    for name, packing in CONFIGS:
        recipe = load_recipe(name, [f"model.preset={args.preset}"])
        cfg = recipe.model_config()
        t0 = time.perf_counter()
        plan = memory_plan(cfg, recipe.policy, packing)
        plan_s = time.perf_counter() - t0
        torch.manual_seed(0)
        model, coverage = build_model(cfg, recipe.policy)
        tensors, _ = pack_model(model, coverage, packing)
        written = sum(t.numel() * t.element_size() for t in tensors.values())
        path = os.path.join(args.out_dir, f"qtoolkit-bench-{name}-{packing or 'default'}.safetensors")
        write_packed(tensors, {"model_config": cfg.to_dict(), "policy": recipe.policy, "layers": []}, "", path)
        file_bytes = os.path.getsize(path)
        os.remove(path)
        fp32_bytes = fp32_bytes or plan.fp32_bytes
        rows.append({
            "recipe": name,
            "packing": packing,
            "predicted_bytes": plan.total_bytes,
            "written_tensor_bytes": written,
            "file_bytes": file_bytes,
            "header_bytes": file_bytes - written,
            "predicted_equals_written": plan.total_bytes == written,
            "compression_vs_fp32": round(fp32_bytes / plan.total_bytes, 3),
            "bits_per_param": round(8 * plan.total_bytes / plan.params, 4),
            "plan_seconds": round(plan_s, 3),
        })
        del model, tensors
    best = next(r for r in rows if r["recipe"] == "ternary_all" and r["packing"] == "base3")
    print(json.dumps({
        "benchmark": "pack_sizes",
        "preset": args.preset,
        "params": plan.params,
        "rows": rows,
        "target": "ternary_all base3 >= 7x smaller than fp32, predicted == written",
        "target_met": best["compression_vs_fp32"] >= 7 and all(r["predicted_equals_written"] for r in rows),
    }, indent=2))


if __name__ == "__main__":
    main()
