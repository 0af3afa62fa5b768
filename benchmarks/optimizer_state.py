"""What `train.optimizer_state: bf16` does to the loss, the optimizer's bytes and the step time.

    flock /work/heavy.lock python benchmarks/optimizer_state.py [--data DIR] [--case NAME ...]
    flock /work/heavy.lock python benchmarks/optimizer_state.py --step-time small [--rounds 20]

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

`--step-time PRESET` times optimizer.step() alone (fp32 vs bf16 moments, rounds alternating), the
part of a training step that the choice changes.
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


def step_times(preset: str, rounds: int) -> dict:
    """Seconds of one optimizer.step() over `preset`'s ternary_all parameters with fixed random
    gradients: torch.optim.AdamW (fp32 moments) against bf16 moments, rounds alternating in order."""
    import time

    import torch

    from qtoolkit.config import ModelConfig
    from qtoolkit.policy import build_model
    from qtoolkit.training.optimizer import build_adamw
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import param_groups

    torch.manual_seed(0)
    model, _ = build_model(ModelConfig.from_name(preset), load_recipe("ternary_all").policy)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opts = {state: build_adamw(param_groups(model, 0.1), model, 1e-4, (0.9, 0.95), 1e-8, state)
            for state in ("fp32", "bf16")}
    times: dict[str, list[float]] = {k: [] for k in opts}
    for r in range(rounds + 1):
        for name in (list(opts) if r % 2 == 0 else list(reversed(opts))):
            t = time.perf_counter()
            opts[name].step()
            if r:  # round 0 creates the state
                times[name].append(time.perf_counter() - t)
    out = {k: {"min": min(v), "median": statistics.median(v), "max": max(v)} for k, v in times.items()}
    out["bf16_over_fp32_median"] = out["bf16"]["median"] / out["fp32"]["median"]
    out["threads"] = torch.get_num_threads()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--case", action="append", choices=sorted(CASES))
    ap.add_argument("--step-time", metavar="PRESET", help="only time optimizer.step() on this preset's parameters")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, fp32 first")
    ap.add_argument("--steps", type=int, help="override the cases' train.steps (eval at the end)")
    args = ap.parse_args()
    if args.step_time:
        print(json.dumps({"optimizer_step_s": step_times(args.step_time, args.rounds), "preset": args.step_time},
                         indent=1))
        return
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.case or list(CASES):
            recipe, preset, overrides = CASES[name]
            if args.steps:
                overrides = [*overrides, f"train.steps={args.steps}", f"train.eval_every={args.steps}"]
            variants = args.variants.split(",")
            res = {v: run(recipe, preset, overrides, v, args.data, Path(tmp) / name / v) for v in variants}
            for v in variants[1:]:
                res[v]["val_loss_minus_fp32"] = res[v]["val_loss"] - res["fp32"]["val_loss"]
                res[v]["train_ce_minus_fp32"] = res[v]["train_ce_last10pct"] - res["fp32"]["train_ce_last10pct"]
                res[v]["step_time_ratio_to_fp32"] = res[v]["s_per_step"]["median"] / res["fp32"]["s_per_step"]["median"]
            out[name] = {"recipe": recipe, "preset": preset, "overrides": overrides, **res}
            print(json.dumps({name: out[name]}), flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
