"""Inference speed and memory of ternarylm-132m: the packed runtime vs PyTorch FP32 and dynamic INT8.

    python benchmarks/inference.py [--ckpt PACKED] [--preset ternarylm-132m] [--threads 2]
                                   [--prompt-len 128] [--new-tokens 64] [--repeats 3] [--profile]

Without --ckpt, a randomly initialised `ternary_all` model of the preset (2-bit packing, INT8
embed/head) is packed into --out-dir first and reused on later runs; speed does not depend on the
weights' values. Runs `qtoolkit.deploy.bench.run_bench` (each variant in its own process) and prints JSON:
the per-variant figures, the packed/baseline ratios, the issue's targets and whether each is met,
and with --profile the packed model's per-op decode profile (where the time of a token goes).

Targets (issue 6; batch 1, this 2-core machine): decode >= 6x FP32 and >= 2x dynamic INT8;
prefill (128 tokens) >= 2x FP32; peak resident memory of the generating process <= 1/4 of FP32's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from qtoolkit.checkpoint import save_checkpoint
from qtoolkit.deploy.bench import profile_decode, run_bench
from qtoolkit.pack import pack_checkpoint
from qtoolkit.policy import build_model
from qtoolkit.training.recipe import load_recipe


def random_packed(preset: str, out_dir: Path) -> Path:
    path = out_dir / f"qtoolkit-bench-{preset}-ternary_all-2bit.safetensors"
    if path.is_file():
        return path
    r = load_recipe("ternary_all", [f"model.preset={preset}"]).resolved()
    torch.manual_seed(0)
    model, coverage = build_model(r.model_config(), r.policy)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        ckpt = save_checkpoint({"kind": "train", "model_config": r.model_config().to_dict(), "recipe": r.to_dict(),
                                "policy": r.policy, "coverage": coverage.to_dict(), "tokenizer": "{}",
                                "model": model.state_dict(), "step": 0}, Path(tmp) / "ckpt.pt")
        del model
        pack_checkpoint(ckpt, path, "2bit")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", type=Path, help="a packed checkpoint (default: a random one of --preset)")
    ap.add_argument("--preset", default="ternarylm-132m")
    ap.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()))
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kernels", default=None)
    ap.add_argument("--baselines", default="fp32,int8-dynamic")
    ap.add_argument("--profile", action="store_true", help="add the packed model's per-op decode profile")
    args = ap.parse_args()
    ckpt = args.ckpt or random_packed(args.preset, args.out_dir)
    baselines = [b for b in args.baselines.split(",") if b]
    rep = run_bench(ckpt, baselines, threads=args.threads, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                    repeats=args.repeats, kernels=args.kernels)
    out = rep.to_dict()
    q = out["ratios"]
    targets = {}
    if "fp32" in q:
        targets["decode_vs_fp32 >= 6"] = [q["fp32"]["decode_speedup"], q["fp32"]["decode_speedup"] >= 6]
        targets["prefill_vs_fp32 >= 2"] = [q["fp32"]["prefill_speedup"], q["fp32"]["prefill_speedup"] >= 2]
        targets["peak_rss_vs_fp32 <= 0.25"] = [q["fp32"]["peak_rss_ratio"], q["fp32"]["peak_rss_ratio"] <= 0.25]
    if "int8-dynamic" in q:
        s = q["int8-dynamic"]["decode_speedup"]
        targets["decode_vs_int8_dynamic >= 2"] = [s, s >= 2]
    out["targets"] = targets
    if args.profile:
        out["decode_profile"] = profile_decode(ckpt, threads=args.threads, prompt_len=args.prompt_len,
                                               steps=args.new_tokens, kernels=args.kernels)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
