"""What verifying a checkpoint on load costs, and how long `plan` takes on very deep models.

    python benchmarks/load_checks.py [--ckpt RUN/ckpt.pt] [--rounds 5] [--layers 300,3000]

Loads (each in this process, `--rounds` times, after one warm-up):
    train_raw       torch.load(weights_only=True): what loading cost before verification
    train_verified  qtoolkit.load_checkpoint: + zip CRC32s, config-vs-shape check, finite weights
    packed_raw      safetensors load_file of the packed form of the same checkpoint
    packed_verified load_checkpoint: + digest, layer records against layouts, finite weights
Plans: `memory_plan` (+ the recipe check) for the `tiny` preset with N blocks, each in a fresh
process (`qtool plan --json`, wall time including Python start-up and imports).

Prints JSON with min/median/max seconds and the verified/raw ratios measured side by side.
Without --ckpt an untrained `small` ternary_all checkpoint (weights only, no optimizer) is used.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def _times(fn, rounds: int) -> dict[str, float]:
    fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return {"min": min(ts), "median": statistics.median(ts), "max": max(ts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", default="300,3000")
    args = ap.parse_args()

    from safetensors.torch import load_file

    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.pack import pack_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="qtool-loadbench-"))
    ckpt = Path(args.ckpt) if args.ckpt else None
    if ckpt is None:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.conftest import save_untrained_checkpoint

        ckpt = save_untrained_checkpoint(tmp / "ckpt.pt", overrides=["model.preset=small"])
    packed = pack_checkpoint(ckpt, tmp / "packed.safetensors").path
    out = {"checkpoint": str(ckpt), "bytes": ckpt.stat().st_size, "packed_bytes": packed.stat().st_size,
           "rounds": args.rounds, "threads": torch.get_num_threads()}
    out["train_raw_s"] = _times(lambda: torch.load(ckpt, weights_only=True), args.rounds)
    out["train_verified_s"] = _times(lambda: load_checkpoint(ckpt), args.rounds)
    out["packed_raw_s"] = _times(lambda: load_file(str(packed)), args.rounds)
    out["packed_verified_s"] = _times(lambda: load_checkpoint(packed), args.rounds)
    for kind in ("train", "packed"):
        out[f"{kind}_verified_over_raw_median"] = out[f"{kind}_verified_s"]["median"] / out[f"{kind}_raw_s"]["median"]

    plans = {}
    for n in (int(x) for x in args.layers.split(",") if x):
        cmd = [sys.executable, "-c", "from qtoolkit.cli import app; app()", "plan", "--model", "tiny",
               "--set", f"model.n_layers={n}", "--json"]
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        plans[n] = time.perf_counter() - t0
    out["plan_tiny_wall_s_by_layers"] = plans
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
