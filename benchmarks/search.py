"""Probe and search figures: timings, the acceptance comparison, and calibration rank stability.

    python benchmarks/search.py --ckpt runs/fp32_baseline-small/ckpt.pt [--data ../shared/data/tinystories]
                                [--trials 30] [--big] [--skip-stability]

On the given (trained, `small`) checkpoint:
  * time of the full per-layer sensitivity probe (fresh cache) and of N search trials;
  * a search at the budget halfway between the all-ternary and all-INT8 sizes; its validation loss
    against (a) the best uniform policy that fits and (b) random allocations of the same bytes
    (+-2%), evaluated the same way;
  * rank stability of the measured sensitivities: Spearman between two calibration sets (seeds 0
    and 1) at 512 to 4096 tokens, per format (int8/fp16 effects sit at the noise floor, so their
    ranks are noise and do not matter to the allocation; ternary ranks are what the search uses).
With --big (or only that: --big-only): the per-layer probe of ternarylm-132m (an untrained fp32 checkpoint
made at --big-ckpt; --big-tokens calibration tokens, default 4096): its time, the estimate it announced
before measuring, and at --big-compare-tokens its rank agreement (Spearman per format) with the full
probe that measures every (unit, format) pair, and both times.
Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch


def spearman(a: dict, b: dict, fmt: str | None = None) -> float:
    from scipy.stats import spearmanr

    pairs = [(a[u][f], b[u][f]) for u in a for f in a[u] if f in b.get(u, {}) and fmt in (None, f)]
    x, y = zip(*pairs, strict=True)
    return round(float(spearmanr(x, y).statistic), 4)


def big_checkpoint(small_ckpt: Path, data: str | None, path: Path) -> Path:
    """An untrained fp32 ternarylm-132m training checkpoint (seed 0, the preset's seq_len), made once."""
    from qtoolkit import load_recipe
    from qtoolkit.checkpoint import load_checkpoint, save_checkpoint
    from qtoolkit.policy import build_model

    if path.is_file():
        return path
    small = load_checkpoint(small_ckpt)
    r = load_recipe("fp32_baseline", ["model.preset=ternarylm-132m",
                                      f"data.path={data or small['recipe']['data']['path']}"]).resolved()
    torch.manual_seed(0)
    model, _ = build_model(r.model_config(), r.policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"kind": "train", "model_config": r.model_config().to_dict(), "recipe": r.to_dict(),
                     "policy": r.policy, "tokenizer": small["tokenizer"], "model": model.state_dict(), "step": 0}, path)
    return path


def big_probe(ckpt: Path, data: str | None, tokens: int, compare_tokens: int | None) -> dict:
    """The per-layer probe of ternarylm-132m (ternary, int8, fp16) at `tokens` calibration tokens: time,
    the estimate announced before measuring, pairs measured; and at `compare_tokens` the rank agreement
    (Spearman per format) of the probe's sensitivities with the probe before issue 19 (fp32, every
    pair measured), and both times."""
    from qtoolkit.search.probes import parse_formats, run_probe

    formats = parse_formats("ternary,int8,fp16")
    plans: list = []
    t = time.perf_counter()
    res = run_probe(ckpt, formats, "layer", data, calib_tokens=tokens, use_cache=False, announce=plans.append)
    total = time.perf_counter() - t
    out = {"preset": "ternarylm-132m", "units": len(res.units), "formats": 3, "calib_tokens": tokens,
           "precision": res.calibration.get("precision", "fp32"),
           "seq_len": res.calibration["seq_len"], "probe_seconds_total": round(total, 1),
           "seconds": {k: round(v, 1) for k, v in res.seconds.items()},
           "announced_estimate_s": round(plans[-1]["seconds"], 1) if plans else None,
           "estimate_ratio_measured_over_announced": round(res.seconds["measured"] / plans[-1]["seconds"], 2) if plans else None,
           "pairs_measured": {f.key: sum(f.key in fs for fs in res.measured.values()) for f in formats},
           "target_seconds": 300, "target_met": total < 300}
    print(json.dumps({"partial": out}), file=sys.stderr, flush=True)  # the headline figure, before the comparison
    if compare_tokens:
        t = time.perf_counter()
        new = run_probe(ckpt, formats, "layer", data, calib_tokens=compare_tokens, use_cache=False)
        new_s = time.perf_counter() - t
        t = time.perf_counter()
        old = run_probe(ckpt, formats, "layer", data, calib_tokens=compare_tokens, use_cache=False, prune=False,
                        precision="fp32")
        old_s = time.perf_counter() - t
        a, b = new.sensitivity(), old.measured
        out["versus_full_probe"] = {
            "calib_tokens": compare_tokens, "seconds_new": round(new_s, 1), "seconds_full": round(old_s, 1),
            "speedup": round(old_s / new_s, 2),
            "spearman_per_format": {f.key: spearman(a, b, f.key) for f in formats}, "spearman_all": spearman(a, b),
            "pairs_measured_new": {f.key: sum(f.key in fs for fs in new.measured.values()) for f in formats}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--random", type=int, default=5, help="random allocations evaluated for the comparison")
    ap.add_argument("--big", action="store_true")
    ap.add_argument("--big-tokens", type=int, default=4096, help="calibration tokens of the 132M probe (the default)")
    ap.add_argument("--big-compare-tokens", type=int, default=1024,
                    help="calibration tokens of the 132M comparison with the full probe (0: skip)")
    ap.add_argument("--big-ckpt", default="runs/ternarylm-132m-init/ckpt.pt", help="made here if missing")
    ap.add_argument("--big-only", action="store_true", help="only the 132M figures")
    ap.add_argument("--skip-stability", action="store_true")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="qtoolkit-bench-search-"))
    os.environ["QTOOLKIT_CACHE"] = str(tmp / "cache")  # fresh: the probe is really measured
    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.config import ModelConfig
    from qtoolkit.search.allocate import build_space, run_search
    from qtoolkit.search.probes import parse_formats, run_probe

    formats = parse_formats("ternary,int8,fp16")
    out: dict = {"benchmark": "search", "checkpoint": args.ckpt, "threads": torch.get_num_threads()}
    if args.big_only:
        big = big_checkpoint(Path(args.ckpt), args.data, Path(args.big_ckpt))
        out["big"] = big_probe(big, args.data, args.big_tokens, args.big_compare_tokens or None)
        print(json.dumps(out, indent=2))
        return

    t = time.perf_counter()
    probe = run_probe(args.ckpt, formats, "layer", args.data, calib_tokens=4096)
    out["probe"] = {"units": len(probe.units), "formats": len(formats), "calib_tokens": 4096,
                    "seconds_total": round(time.perf_counter() - t, 1),
                    "seconds": {k: round(v, 1) for k, v in probe.seconds.items()}, "spearman_estimate": probe.spearman}

    cfg = ModelConfig.from_dict(load_checkpoint(args.ckpt)["model_config"])
    space = build_space(cfg, formats)
    ternary, int8 = space.bytes_of(space.uniform("ternary")), space.bytes_of(space.uniform("int8"))
    budget = (ternary + int8) // 2
    t = time.perf_counter()
    res = run_search(args.ckpt, budget, formats, tmp / "search", args.data, trials=args.trials)
    search_s = time.perf_counter() - t
    best = res.best
    fits = {k: v for k, v in res.references.items() if v["bytes"] <= budget}
    best_uniform = min(fits.items(), key=lambda kv: kv[1]["loss"]) if fits else None

    # random allocations of (about) the same bytes, evaluated like the trials
    from qtoolkit.search.allocate import Evaluator
    from qtoolkit.search.probes import float_model
    from qtoolkit.training.data import prepare_data, tokenizer_from_json
    from qtoolkit.training.recipe import DataConfig

    ckpt = load_checkpoint(args.ckpt)
    data_cfg = DataConfig(**ckpt["recipe"]["data"])
    if args.data:
        data_cfg.path = args.data
    data = prepare_data(data_cfg, cfg.vocab_size, tokenizer=tokenizer_from_json(ckpt["tokenizer"]), need_train=False)
    tc = ckpt["recipe"]["train"]
    evaluate = Evaluator(float_model(ckpt), space, list(data.val.eval_batches(tc["batch_size"], tc["seq_len"], 8)))
    rng = random.Random(0)
    randoms = []
    while len(randoms) < args.random:
        alloc = {u.name: rng.choice(space.keys) for u in space.units}
        b = space.bytes_of(alloc)
        if abs(b - best["bytes"]) <= 0.02 * best["bytes"] and b <= budget:
            randoms.append({"bytes": b, "loss": evaluate(alloc)})
    out["search"] = {
        "budget": budget, "all_ternary_bytes": ternary, "all_int8_bytes": int8, "trials": args.trials,
        "seconds_total": round(search_s, 1), "seconds_per_trial": round(search_s / args.trials, 2),
        "best": {"bytes": best["bytes"], "loss": round(best["loss"], 4), "source": best["source"], "trial": best["number"]},
        "best_uniform_that_fits": {"format": best_uniform[0], **best_uniform[1]} if best_uniform else None,
        "references": res.references,
        "rejected_over_budget": res.rejected,
        "random_same_bytes": {"n": len(randoms), "mean_loss": sum(r["loss"] for r in randoms) / len(randoms),
                              "best_loss": min(r["loss"] for r in randoms)},
        "beats_best_uniform": best_uniform is None or best["loss"] < best_uniform[1]["loss"],
        "beats_random": best["loss"] < min(r["loss"] for r in randoms),
        "milp_seed_loss": next((t["loss"] for t in res.trials if t["source"] == "milp#1"), None),
    }

    if not args.skip_stability:
        stab = {}
        for tokens in (512, 1024, 2048, 4096):
            a = run_probe(args.ckpt, formats, "layer", args.data, calib_tokens=tokens, seed=0).measured
            b = run_probe(args.ckpt, formats, "layer", args.data, calib_tokens=tokens, seed=1).measured
            stab[str(tokens)] = {"all": spearman(a, b), **{f.key: spearman(a, b, f.key) for f in formats}}
        out["rank_stability_spearman_seed0_vs_seed1"] = stab
    if args.big:
        big = big_checkpoint(Path(args.ckpt), args.data, Path(args.big_ckpt))
        out["big"] = big_probe(big, args.data, args.big_tokens, args.big_compare_tokens or None)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
