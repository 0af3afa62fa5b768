"""Training-step time of `ternary_all` relative to `fp32_baseline`, measured side by side, per device
and with `train.compile` off and on.

    python benchmarks/train_step.py [--preset small] [--rounds 10] [--device cpu,cuda] [--compile off,on]
                                    [--batch-size B] [--seq-len T] [--threads N]

Both models are built from the shipped recipes' policies on the same preset and trained on the same
random batches by the trainer's own step (`training.step.TrainStep`: the LossModule under
torch.compile when asked, fused AdamW, clipping, the non-finite guard), so the figures are those of
`qtool train` less data loading, logging and evaluation. Rounds alternate A, B, A, B so machine noise
hits both alike; on CUDA each timed round runs `--steps-per-round` steps between two synchronizations
(the step itself never waits for the GPU). Prints JSON: one row per (device, compile) with the
min/median/max step time of each recipe, tokens/s and MFU (CUDA, `training.throughput`) at the
median, and the ratio ternary / fp32 of the medians (target <= 1.15 on the CPU, <= 1.05 on a GPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from qtoolkit import load_recipe
from qtoolkit.config import TRAIN_DEFAULTS
from qtoolkit.device import resolve_device
from qtoolkit.training.step import TrainStep, fused_adamw_kwargs
from qtoolkit.training.throughput import flops_per_token, mfu, peak_flops
from qtoolkit.training.trainer import build_model, param_groups

RECIPES = ("fp32_baseline", "ternary_all")


def make_step(recipe_name: str, preset: str, device: torch.device, compile: bool, seed: int = 0,
              notice=None) -> tuple[TrainStep, int]:
    """The trainer's step for `recipe_name` on `preset` (fresh weights, seed `seed`), and the vocabulary size."""
    recipe = load_recipe(recipe_name, [f"model.preset={preset}"]).resolved()
    torch.manual_seed(seed)
    model, _ = build_model(recipe.model_config(), recipe.policy)
    model.to(device).train()
    cfg = recipe.train
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=1e-4, betas=(cfg.beta1, cfg.beta2),
                            **fused_adamw_kwargs(device))
    return TrainStep(model, opt, cfg, device, compile=compile, notice=notice), recipe.model_config().vocab_size


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(device: torch.device, preset: str, compile: bool, B: int, T: int, rounds: int, warmup: int,
            steps_per_round: int, recipes=RECIPES) -> dict:
    """One row: the recipes' step times on `device`, side by side (module docstring)."""
    notices: list[str] = []
    steps = {name: make_step(name, preset, device, compile, notice=notices.append) for name in recipes}
    vocab = steps[recipes[0]][1]
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in steps}
    index = 0
    for r in range(warmup + rounds):
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = torch.randint(0, vocab, (B, T), generator=g)
        for name in list(steps) if r % 2 == 0 else list(reversed(steps)):
            step = steps[name][0]
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                index += 1
                step(x, y, index)
            sync(device)
            if r >= warmup:
                times[name].append((time.perf_counter() - t0) / steps_per_round)
    peak, device_name = peak_flops(device)
    row = {"device": device_name, "compile": compile,
           "compiled": {name: s.compiled for name, (s, _) in steps.items()}, "notices": notices}
    for name, ts in times.items():
        med = statistics.median(ts)
        per_token = flops_per_token(steps[name][0].model, T)
        row[name] = {"step_s": {"min": round(min(ts), 5), "median": round(med, 5), "max": round(max(ts), 5)},
                     "tokens_per_s": round(B * T / med), "mfu": mfu(B * T / med, per_token, peak)}
    if len(recipes) == 2:
        a, b = (statistics.median(times[n]) for n in recipes)
        row["ratio_ternary_over_fp32"] = round(b / a, 4)
    for name, (s, _) in steps.items():
        if s.guard.first_bad() is not None:
            row.setdefault("non_finite", []).append(name)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first (compilation happens here)")
    ap.add_argument("--device", default="cpu", help="comma-separated: cpu, cuda, auto")
    ap.add_argument("--compile", default="off", help="comma-separated: off, on")
    ap.add_argument("--steps-per-round", type=int, default=None, help="default: 1 on the CPU, 5 on CUDA")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = TRAIN_DEFAULTS[args.preset]
    B, T = args.batch_size or defaults["batch_size"], args.seq_len or defaults["seq_len"]
    rows = []
    for dev_name in args.device.split(","):
        device = resolve_device(dev_name.strip())
        per_round = args.steps_per_round or (5 if device.type == "cuda" else 1)
        for c in args.compile.split(","):
            rows.append(measure(device, args.preset, c.strip() == "on", B, T, args.rounds, args.warmup, per_round))
    print(json.dumps({
        "benchmark": "train_step", "preset": args.preset, "batch_size": B, "seq_len": T, "rounds": args.rounds,
        "threads": torch.get_num_threads(), "rows": rows, "target_ratio_max": {"cpu": 1.15, "cuda": 1.05},
        "torch": torch.__version__, "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
