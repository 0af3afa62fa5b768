"""The training-memory estimate (qtoolkit.training.memory) against the peak resident set of real runs.

    flock /work/heavy.lock python benchmarks/train_memory.py [--data DIR] [--steps 2] [--case NAME ...]

Each case trains `--steps` steps in a process of its own (so one case's allocations cannot hide
another's) and reports the estimate the trainer made before its first step, the measured peak
resident set of the steps (VmHWM, reset when training starts, so tokenizer training and data
preparation are not counted; where the kernel cannot reset it, the whole process's ru_maxrss) and
the relative error (estimate - measured) / measured. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"

CASES = {
    "tiny-ternary_all": ("ternary_all", "tiny", []),
    "tiny-fp32_baseline": ("fp32_baseline", "tiny", []),
    "small-ternary_all": ("ternary_all", "small", []),
    "small-fp32_baseline": ("fp32_baseline", "small", []),
    "small-ternary_all-micro4": ("ternary_all", "small", ["train.micro_batch_size=4"]),
    "small-ternary_all-savers": ("ternary_all", "small", ["train.ce_chunk=1024", "train.activation_checkpointing=true"]),
}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def child(recipe: str, preset: str, overrides: list[str], data: str, steps: int, out: str) -> dict:
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train

    seen: dict = {"reset": False}

    def callback(event) -> None:
        if event.kind == "memory":
            seen["memory"] = event.data
        elif event.kind == "start":
            seen["rss_at_start"] = _status("VmRSS")
            try:  # "5" resets the peak resident set (VmHWM) to the current one (Linux >= 4.0)
                Path("/proc/self/clear_refs").write_text("5")
                seen["reset"] = True
            except OSError:
                pass

    r = load_recipe(recipe, [f"model.preset={preset}", f"data.path={data}", f"train.steps={steps}",
                             "train.eval_batches=1", "train.warmup_steps=0", *overrides])
    res = train(r, out, callback=callback)
    peak = _status("VmHWM") if seen["reset"] else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    mem = seen["memory"]
    est = (mem.get("fitted") or mem["estimate"])
    return {"estimate": est["total"], "parts": est["parts"], "micro_batch_size": est["micro_batch_size"],
            "batch_size": est["batch_size"], "measured_peak_rss": peak, "peak_from": "VmHWM" if seen["reset"]
            else "ru_maxrss", "rss_at_start": seen["rss_at_start"], "step_s": res.elapsed_s / max(1, res.steps),
            "error": (est["total"] - peak) / peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--case", action="append", choices=sorted(CASES), help="default: every case")
    ap.add_argument("--out-dir", default="/tmp/qtoolkit-train-memory")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        recipe, preset, overrides = CASES[args.child]
        out = Path(args.out_dir) / args.child
        print(json.dumps(child(recipe, preset, overrides, args.data, args.steps, str(out))))
        return
    import shutil

    results = {}
    for name in args.case or list(CASES):
        shutil.rmtree(Path(args.out_dir) / name, ignore_errors=True)
        proc = subprocess.run([sys.executable, __file__, "--child", name, "--data", args.data, "--steps",
                               str(args.steps), "--out-dir", args.out_dir], capture_output=True, text=True)
        if proc.returncode:
            results[name] = {"failed": proc.stderr.strip().splitlines()[-1:]}
        else:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    errors = [abs(r["error"]) for r in results.values() if "error" in r]
    print(json.dumps({"cases": results, "max_abs_error": max(errors) if errors else None}, indent=1))


if __name__ == "__main__":
    main()
