"""QAT methods beyond absmean ternary, trained on the same data, steps, seeds and schedule.

    python benchmarks/qat_methods.py --data ../shared/data/tinystories [--steps 600] [--seeds 0,1] [--preset small]
        [--recipes fp32_baseline,ternary_all,...] [--out runs/qat_methods] [--lock /work/heavy.lock]
        [--batch-size B] [--threads N] [--markdown]

For every recipe and seed it trains `small` from scratch (the recipe's policy and schedule, with
`train.steps`, `train.seed` and the data set on the command line), then measures on the whole
validation set (every window, `--eval-batches`):

    val_loss, gap_nats      validation cross-entropy, and its difference to fp32_baseline of the same seed
    bytes, bits_per_weight  exact stored bytes of the model (memory model == packed file, checked by
                            packing the checkpoint) and bits/weight of the block linears (what the
                            methods change; embed/lm_head are INT8 in all quantized recipes but trilm)
    packed_val_loss         the same loss from the packed checkpoint (must be identical)
and, after all runs, the train-step time of every recipe relative to fp32_baseline, measured side by
side (rounds alternate over the recipes, same batches; min/median/max). Derived figures: the share
of ternary_all's gap to fp32 that each method closes, mean over seeds.

Resumable: each finished run leaves `<out>/<recipe>-seed<N>/result.json` and is skipped; an
interrupted run continues from its checkpoint (`--resume` semantics: bit-identical). Every training
run and the timing phase take `--lock` (flock) for their duration only, so other heavy jobs can
interleave. Prints one JSON document (and with --markdown a table for README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from qtoolkit import load_recipe
from qtoolkit.checkpoint import atomic_write_text
from qtoolkit.pack import memory_plan, pack_checkpoint
from qtoolkit.training.trainer import (
    build_model,
    evaluate_checkpoint,
    loss_fn,
    param_groups,
    progress_quantizers,
    train,
)

RECIPES = ["fp32_baseline", "ternary_all", "trilm", "sherry_all", "tequila_all", "ternary_hgf", "binary_all"]
ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str | None:
    """The code's commit: a COMMIT file beside the package (a source snapshot), else git's HEAD."""
    import subprocess

    if (ROOT / "COMMIT").is_file():
        return (ROOT / "COMMIT").read_text().strip()
    try:
        return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def default_data() -> str | None:
    for parent in ROOT.parents:
        if (parent / "shared" / "data" / "tinystories").is_dir():
            return str(parent / "shared" / "data" / "tinystories")
    return None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def heavy_lock(path: str | None):
    if not path:
        yield
        return
    with open(path, "a") as f:
        t = time.perf_counter()
        fcntl.flock(f, fcntl.LOCK_EX)
        waited = time.perf_counter() - t
        if waited > 1:
            log(f"waited {waited:.0f} s for {path}")
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def overrides(args, seed: int) -> list[str]:
    extra = [f"train.batch_size={args.batch_size}"] if args.batch_size else []
    return [f"model.preset={args.preset}", f"data.path={args.data}", f"train.steps={args.steps}", f"train.seed={seed}",
            f"train.eval_every={args.steps}", "train.ckpt_every=50", "train.device=cpu", *extra]


def block_bits(plan) -> float:
    blocks = [e for e in plan.entries if e.kind == "linear" and e.name.startswith("blocks.")]
    return 8 * sum(e.nbytes for e in blocks) / sum(e.params for e in blocks)


def run_one(args, recipe_name: str, seed: int) -> dict[str, Any]:
    out = Path(args.out) / f"{recipe_name}-seed{seed}"
    result_path = out / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    recipe = load_recipe(recipe_name, overrides(args, seed))
    resume = (out / "ckpt.pt").is_file()
    with heavy_lock(args.lock):
        log(f"{recipe_name} seed {seed}: {'resuming' if resume else 'training'} {args.steps} steps")

        def progress(event) -> None:
            if event.kind == "step" and event.step % 50 == 0:
                log(f"  {recipe_name}/{seed} step {event.step} loss {event.data['loss']:.3f} "
                    f"{event.data['tokens_per_s']:.0f} tok/s")

        t = time.perf_counter()
        res = train(recipe, out, resume=resume, callback=progress)
        train_s = time.perf_counter() - t
        if res.interrupted or res.steps < args.steps:  # Ctrl-C / SIGTERM: saved; the next start resumes
            raise SystemExit(f"{recipe_name} seed {seed}: interrupted at step {res.steps}; rerun to resume")
        ev = evaluate_checkpoint(out / "ckpt.pt", batches=args.eval_batches, device="cpu")
        packed = pack_checkpoint(out / "ckpt.pt", out / "packed.safetensors", overwrite=True)
        pev = evaluate_checkpoint(packed.path, batches=args.eval_batches, device="cpu")
    plan = memory_plan(recipe.model_config(), recipe.policy)
    rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if line.strip() and json.loads(line).get("type") == "train"]
    result = {
        "recipe": recipe_name, "seed": seed, "steps": res.steps,
        "batch_size": recipe.resolved().train.batch_size, "val_loss": ev.val_loss,
        "val_tokens": ev.val_tokens, "packed_val_loss": pev.val_loss,
        "bytes": plan.total_bytes, "packed_tensor_bytes": packed.tensor_bytes,
        "bits_per_weight_blocks": block_bits(plan), "bits_per_weight_model": 8 * plan.total_bytes / plan.params,
        "activations": block_activations(recipe.policy),
        "train_tokens_per_s_median": statistics.median(rates) if rates else None,
        "train_wall_s": train_s, "resumed": resume, "commit": git_commit(),
    }
    atomic_write_text(result_path, json.dumps(result, indent=2))
    (out / "packed.safetensors").unlink(missing_ok=True)  # the figures are recorded; keep the disk light
    log(f"{recipe_name} seed {seed}: val_loss {ev.val_loss:.4f} (packed {pev.val_loss:.4f}), "
        f"{plan.total_bytes} bytes")
    return result


def block_activations(policy: dict[str, Any]) -> str:
    from qtoolkit import quantizers

    spec = policy.get("_default")
    return quantizers.canonical(spec)["activations"] if spec is not None else "none"


def step_times(args, recipes: list[str]) -> dict[str, Any]:
    """Median/min/max train-step seconds per recipe, rounds alternating over recipes (same batches)."""
    timing_path = Path(args.out) / f"timing-{args.timing_rounds}.json"
    if timing_path.is_file():
        return json.loads(timing_path.read_text())
    steps = {}
    for name in recipes:
        recipe = load_recipe(name, overrides(args, 0)).resolved()
        torch.manual_seed(0)
        model, _ = build_model(recipe.model_config(), recipe.policy)
        for q in progress_quantizers(model):
            q.set_progress(0.5)  # mid-run cost (Sherry's residual is on)
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, betas=(0.9, 0.95))
        steps[name] = (model, opt)
    cfg = load_recipe("fp32_baseline", overrides(args, 0)).resolved()
    B, T, V = cfg.train.batch_size, cfg.train.seq_len, cfg.model_config().vocab_size
    g = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {n: [] for n in recipes}
    with heavy_lock(args.lock):
        log(f"timing {len(recipes)} recipes x {args.timing_rounds} rounds")
        for r in range(2 + args.timing_rounds):
            x, y = torch.randint(0, V, (B, T), generator=g), torch.randint(0, V, (B, T), generator=g)
            order = recipes if r % 2 == 0 else list(reversed(recipes))
            for name in order:
                model, opt = steps[name]
                t0 = time.perf_counter()
                loss, _ = loss_fn(model(x), y, 0.1)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                if r >= 2:
                    times[name].append(time.perf_counter() - t0)
    fp32 = statistics.median(times["fp32_baseline"])
    out = {name: {"median_s": statistics.median(v), "min_s": min(v), "max_s": max(v),
                  "ratio_vs_fp32": statistics.median(v) / fp32} for name, v in times.items()}
    out = {"batch_size": B, "seq_len": T, "rounds": args.timing_rounds, "threads": torch.get_num_threads(),
           "recipes": out}
    atomic_write_text(timing_path, json.dumps(out, indent=2))
    return out


def summarize(results: list[dict[str, Any]], timing: dict[str, Any] | None, recipes: list[str],
              seeds: list[int]) -> dict[str, Any]:
    by = {(r["recipe"], r["seed"]): r for r in results}
    rows = {}
    for name in recipes:
        runs = [by[(name, s)] for s in seeds if (name, s) in by]
        if not runs:
            continue
        gaps = [r["val_loss"] - by[("fp32_baseline", r["seed"])]["val_loss"] for r in runs
                if ("fp32_baseline", r["seed"]) in by]
        closed = []
        for r in runs:
            f, t = by.get(("fp32_baseline", r["seed"])), by.get(("ternary_all", r["seed"]))
            if f and t and t["val_loss"] > f["val_loss"]:
                closed.append((t["val_loss"] - r["val_loss"]) / (t["val_loss"] - f["val_loss"]))
        tern = by.get(("ternary_all", runs[0]["seed"]))
        rows[name] = {
            "val_loss": {str(r["seed"]): r["val_loss"] for r in runs},
            "val_loss_mean": statistics.mean(r["val_loss"] for r in runs),
            "gap_nats": {str(r["seed"]): g for r, g in zip(runs, gaps, strict=False)},
            "gap_nats_mean": statistics.mean(gaps) if gaps else None,
            "share_of_ternary_gap_closed_mean": statistics.mean(closed) if closed else None,
            "bytes": runs[0]["bytes"],
            "bytes_vs_ternary_all": runs[0]["bytes"] / tern["bytes"] if tern else None,
            "bits_per_weight_blocks": runs[0]["bits_per_weight_blocks"],
            "bits_per_weight_model": runs[0]["bits_per_weight_model"],
            "activations": runs[0]["activations"],
            "packed_equals_training": all(r["packed_val_loss"] == r["val_loss"] for r in runs),
            "packed_bytes_equal_predicted": all(r["packed_tensor_bytes"] == r["bytes"] for r in runs),
            "step_time_vs_fp32": (timing or {}).get("recipes", {}).get(name),
        }
    return rows


def markdown(rows: dict[str, Any], seeds: list[int]) -> str:
    head = ("| recipe | acts | val loss " + " / ".join(f"s{s}" for s in seeds) + " | gap to fp32 (nats, mean) "
            "| ternary gap closed | bytes (MB) | bits/weight blocks (model) | step time vs fp32 (min-max) |")
    lines = [head, "|" + "---|" * 8]
    for name, r in rows.items():
        losses = " / ".join(f"{r['val_loss'][str(s)]:.3f}" for s in seeds if str(s) in r["val_loss"])
        gap = "0" if name == "fp32_baseline" else (f"{r['gap_nats_mean']:+.3f}" if r["gap_nats_mean"] is not None else "")
        closed = r["share_of_ternary_gap_closed_mean"]
        closed = "" if closed is None or name in ("fp32_baseline", "ternary_all") else f"{100 * closed:.0f}%"
        t = r["step_time_vs_fp32"]
        times = f"{t['ratio_vs_fp32']:.2f} ({t['min_s']:.2f}-{t['max_s']:.2f} s)" if t else ""
        lines.append(f"| `{name}` | {r['activations']} | {losses} | {gap} | {closed} | {r['bytes'] / 1e6:.2f} "
                     f"| {r['bits_per_weight_blocks']:.3f} ({r['bits_per_weight_model']:.2f}) | {times} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=default_data(), help="text data (default: the nearest ../shared/data/tinystories)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--preset", default="small", help="model preset (tiny: a smoke test)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--recipes", default=",".join(RECIPES))
    ap.add_argument("--out", default=str(ROOT / "runs" / "qat_methods"))
    ap.add_argument("--eval-batches", type=int, default=64, help="validation windows of 16 x 256 tokens (64 = all)")
    ap.add_argument("--timing-rounds", type=int, default=6)
    ap.add_argument("--lock", default=None, help="flock this file around every heavy phase (e.g. /work/heavy.lock)")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="sequences per step (default: the preset's, 16 on small); fewer = a cheaper, shorter run")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's)")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    seeds = [int(s) for s in args.seeds.split(",")]
    if "fp32_baseline" not in recipes:
        raise SystemExit("--recipes must include fp32_baseline (the reference of every gap)")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = [run_one(args, name, seed) for seed in seeds for name in recipes]
    timing = step_times(args, recipes) if args.timing_rounds > 0 else None
    rows = summarize(results, timing, recipes, seeds)
    doc = {"benchmark": "qat_methods", "preset": args.preset, "steps": args.steps, "seeds": seeds,
           "batch_size": load_recipe("fp32_baseline", overrides(args, 0)).resolved().train.batch_size,
           "data": args.data, "eval_batches": args.eval_batches, "runs": results, "timing": timing,
           "summary": rows, "torch": torch.__version__, "machine": platform.machine()}
    print(json.dumps(doc, indent=2, default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    if args.markdown:
        print(markdown(rows, seeds))


if __name__ == "__main__":
    main()
