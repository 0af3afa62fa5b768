"""Training-step time of `ternary_all` relative to `fp32_baseline`, measured side by side.

    python benchmarks/train_step.py [--preset small] [--rounds 10] [--batch-size B] [--seq-len T]

Both models are built from the shipped recipes' policies on the same preset and trained on the
same batches; rounds alternate A, B, A, B so machine noise hits both alike. Prints JSON: the median
step time of each and the ratio ternary / fp32 (target <= 1.15).
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
from qtoolkit.training.trainer import build_model, loss_fn, param_groups


def make_step(recipe_name: str, preset: str, seed: int = 0):
    recipe = load_recipe(recipe_name, [f"model.preset={preset}"]).resolved()
    torch.manual_seed(seed)
    model, _ = build_model(recipe.model_config(), recipe.policy)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))

    def step(x, y) -> float:
        t0 = time.perf_counter()
        loss, _ = loss_fn(model(x), y, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return time.perf_counter() - t0

    return step, recipe.model_config().vocab_size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seq-len", type=int)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = TRAIN_DEFAULTS[args.preset]
    B, T = args.batch_size or defaults["batch_size"], args.seq_len or defaults["seq_len"]

    steps = {name: make_step(name, args.preset) for name in ("fp32_baseline", "ternary_all")}
    vocab = steps["fp32_baseline"][1]
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for r in range(args.warmup + args.rounds):
        x = torch.randint(0, vocab, (B, T), generator=g)
        y = torch.randint(0, vocab, (B, T), generator=g)
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            t = steps[name][0](x, y)
            if r >= args.warmup:
                times[name].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "benchmark": "train_step",
        "preset": args.preset,
        "batch_size": B,
        "seq_len": T,
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "fp32_baseline_step_s": round(med["fp32_baseline"], 4),
        "ternary_all_step_s": round(med["ternary_all"], 4),
        "ratio_ternary_over_fp32": round(med["ternary_all"] / med["fp32_baseline"], 4),
        "target_ratio_max": 1.15,
        "tokens_per_s_fp32": round(B * T / med["fp32_baseline"]),
        "tokens_per_s_ternary": round(B * T / med["ternary_all"]),
        "torch": torch.__version__,
        "machine": platform.machine(),
    }, indent=2))


if __name__ == "__main__":
    main()
