"""What `train.optimizer_state: bf16` does to the loss, the optimizer's bytes and the step time.

    flock /work/heavy.lock python benchmarks/optimizer_state.py [--data DIR] [--case NAME ...]

Each case trains one recipe once per variant, one run after another in one process, from the same
seed (fp32-seed1 aside):

    fp32          torch.optim.AdamW (the default)
    bf16          the block linears' moments in bf16, stochastically rounded (training.optimizer)
    bf16-nearest  the same moments rounded to nearest (not a recipe option: patched in here, to show
                  what plain bf16 would do)
    fp32-seed1    fp32 from train.seed + 1: the run-to-run spread that a difference is measured against

and reports per variant the final validation loss (`train.eval_batches` batches), the mean training
cross-entropy of the last 10% of steps, their differences from fp32, the checkpoint's optimizer
bytes, and the median seconds per step (min/median/max of the logged windows). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinystories"
VARIANTS = ("fp32", "bf16", "bf16-nearest", "fp32-seed1")
CASES = {  # recipe, preset, overrides
    "tiny-ternary_all": ("ternary_all", "tiny", ["train.steps=1000", "train.warmup_steps=50", "train.eval_every=1000"]),
    "tiny-fp32_baseline": ("fp32_baseline", "tiny", ["train.steps=1000", "train.warmup_steps=50",
                                                     "train.eval_every=1000"]),
    "small-ternary_all": ("ternary_all", "small", ["train.steps=200", "train.batch_size=8", "train.seq_len=128",
                                                   "train.warmup_steps=20", "train.eval_every=200"]),
}


def run(recipe: str, preset: str, overrides: list[str], variant: str, data: str, out: Path) -> dict:
    import torch

    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.training import optimizer
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import train

    state = "fp32" if variant.startswith("fp32") else "bf16"
    r = load_recipe(recipe, [f"model.preset={preset}", f"data.path={data}", "train.eval_batches=16",
                             "train.log_every=1", "train.ckpt_every=100000", f"train.optimizer_state={state}",
                             *overrides])
    if variant == "fp32-seed1":
        r.train.seed += 1
    init = optimizer.LowPrecisionAdamW.__init__
    if variant == "bf16-nearest":
        optimizer.LowPrecisionAdamW.__init__ = lambda self, *a, **k: init(self, *a, **{**k, "rounding": "nearest"})
    try:
        res = train(r, out)
    finally:
        optimizer.LowPrecisionAdamW.__init__ = init
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["type"] == "train"]
    tail = steps[-max(1, len(steps) // 10):]
    times = [b["elapsed"] - a["elapsed"] for a, b in zip(steps, steps[1:], strict=False)]
    moments = load_checkpoint(res.checkpoint)["optimizer"]["state"].values()
    nbytes = sum(v.numel() * v.element_size() for s in moments for k, v in s.items() if k != "step")
    return {"val_loss": res.val_loss, "train_ce_last10pct": sum(x["ce"] for x in tail) / len(tail),
            "optimizer_bytes": nbytes, "s_per_step": {"min": min(times), "median": statistics.median(times),
                                                       "max": max(times)},
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    args = ap.parse_args()
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or list(CASES):
            recipe, preset, overrides = CASES[name]
            res = {v: run(recipe, preset, overrides, v, args.data, Path(tmp) / name / v) for v in VARIANTS}
            for v in VARIANTS[1:]:
                res[v]["val_loss_minus_fp32"] = res[v]["val_loss"] - res["fp32"]["val_loss"]
                res[v]["train_ce_minus_fp32"] = res[v]["train_ce_last10pct"] - res["fp32"]["train_ce_last10pct"]
                res[v]["step_time_ratio_to_fp32"] = res[v]["s_per_step"]["median"] / res["fp32"]["s_per_step"]["median"]
            out[name] = {"recipe": recipe, "preset": preset, "overrides": overrides, **res}
            print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
