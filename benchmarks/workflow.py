"""From an fp32 checkpoint to a quantized model at a byte budget: which path gives the lowest loss?

    python benchmarks/workflow.py --ckpt /work/runs/fp32-small-600/ckpt.pt --lock /work/heavy.lock \
        [--data ../shared/data/tinystories] [--out /tmp/qtoolkit-workflow] [--trials 30] \
        [--finetune-steps 200] [--qat-steps 600] [--skip-warmup] [--skip-scratch] [--json workflow.json]

On the given fp32 checkpoint (`small`, trained for S steps), at the budget halfway between the
all-ternary and the all-INT8 bytes (formats ternary, int8, fp16):

  (a) PTQ: `qtool search --apply`, the searched allocation post-training quantized (no training);
  (b) (a) then `--finetune-steps N` of the search's short QAT (constant lr, the recipe's final lr);
  (c) `qtool train --init CKPT` under the searched policy for Q steps (the recipe's full schedule),
      and (c') the same with `train.quant_warmup_steps = Q/6` (the ramped-in quantization);
  (d) the searched policy trained from scratch for Q + S steps (the fp32 run's steps plus Q);

and the all-ternary allocation (the budget's lower end: every unit ternary) through (a)-(c).
Every model is evaluated the same way (`qtool eval --eval-batches E`: E x 16 x 256 validation
tokens) and its packed bytes are those `qtool pack` writes. Stages whose checkpoint already exists
in --out are reused (a crashed run continues). With --lock, every stage runs holding that file's
lock (flock), so other heavy jobs on a shared machine interleave between stages rather than run
beside them. Prints JSON (and writes it with --json).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default="/work/runs/fp32-small-600/ckpt.pt")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "tinystories"))
    ap.add_argument("--out", default="/tmp/qtoolkit-workflow")
    ap.add_argument("--trials", type=int, default=30)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--qat-steps", type=int, default=600)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--calib-tokens", type=int, default=4096)
    ap.add_argument("--json")
    ap.add_argument("--lock", help="hold this file's flock during every stage")
    ap.add_argument("--skip-warmup", action="store_true", help="leave out (c') (the quantization-warmup run)")
    ap.add_argument("--skip-scratch", action="store_true",
                    help="leave out (d) (training the searched policy from scratch for Q + S steps: the longest stage)")
    args = ap.parse_args()

    @contextlib.contextmanager
    def held():
        if not args.lock:
            yield
            return
        with open(args.lock, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    from qtoolkit.checkpoint import load_checkpoint
    from qtoolkit.config import ModelConfig
    from qtoolkit.pack import memory_plan
    from qtoolkit.search.allocate import build_space, run_search
    from qtoolkit.search.probes import parse_formats
    from qtoolkit.training.ptq import finetune_checkpoint, quantize_checkpoint
    from qtoolkit.training.recipe import load_recipe
    from qtoolkit.training.trainer import evaluate_checkpoint, train

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = load_checkpoint(args.ckpt)
    cfg = ModelConfig.from_dict(src["model_config"])
    src_steps = int(src["step"])
    preset = src["recipe"]["model"]["preset"]
    formats = parse_formats("ternary,int8,fp16")
    space = build_space(cfg, formats)
    lo, hi = space.bytes_of(space.uniform("ternary")), space.bytes_of(space.uniform("int8"))
    budget = (lo + hi) // 2
    timings: dict[str, float] = {}
    log = lambda *a: print(*a, flush=True)  # noqa: E731

    def timed(name, fn):
        with held():
            t = time.perf_counter()
            value = fn()
            timings[name] = round(time.perf_counter() - t, 1)
        log(f"[{name}] {timings[name]} s")
        return value

    # (a) the search, applied
    search_dir = out / "search"
    result = timed("search", lambda: run_search(args.ckpt, budget, formats, search_dir, args.data, args.trials,
                                                calib_tokens=args.calib_tokens, eval_batches=8,
                                                apply=not (search_dir / "quantized" / "ckpt.pt").exists()))
    ternary_file = out / "all-ternary.yaml"
    ternary_file.write_text(yaml.safe_dump(space.policy(space.uniform("ternary")), sort_keys=False))
    policies = {"searched": search_dir / "policy.yaml", "all-ternary": ternary_file}

    def finetuned(name: str, quantized: Path) -> Path:
        dest = out / f"{name}-finetuned" / "ckpt.pt"
        if not dest.exists():
            timed(f"{name} finetune {args.finetune_steps}", lambda: finetune_checkpoint(
                quantized, dest, args.finetune_steps, data=args.data, seed=1))
        return dest

    def trained(name: str, policy: Path, steps: int, init: str | None, extra=()) -> Path:
        run = out / name
        recipe = load_recipe("ternary_all", [f"model.preset={preset}", f"data.path={args.data}", f"policy={policy}",
                                             f"train.steps={steps}", *extra])
        ckpt = run / "ckpt.pt"
        if ckpt.exists() and load_checkpoint(ckpt).get("step") == steps:
            return ckpt
        timed(f"{name} ({steps} steps)", lambda: train(recipe, run, resume=ckpt.exists(),
                                                         init=init))
        return ckpt

    runs: dict[str, dict[str, Path]] = {"searched": {}, "all-ternary": {}}
    runs["searched"]["a_ptq"] = search_dir / "quantized" / "ckpt.pt"
    q = out / "all-ternary-quantized" / "ckpt.pt"
    if not q.exists():
        timed("all-ternary quantize", lambda: quantize_checkpoint(args.ckpt, str(policies["all-ternary"]), q,
                                                                 data=args.data, calib_tokens=args.calib_tokens))
    runs["all-ternary"]["a_ptq"] = q
    for name in runs:
        runs[name]["b_finetune"] = finetuned(name, runs[name]["a_ptq"])
        runs[name]["c_init_qat"] = trained(f"{name}-init", policies[name], args.qat_steps, args.ckpt)
    if not args.skip_scratch:
        runs["searched"]["d_scratch"] = trained("searched-scratch", policies["searched"], args.qat_steps + src_steps,
                                                None)
    if not args.skip_warmup:
        runs["searched"]["c_init_qat_warmup"] = trained("searched-init-warmup", policies["searched"], args.qat_steps,
                                                        args.ckpt, [f"train.quant_warmup_steps={args.qat_steps // 6}"])

    with held():
        fp32 = evaluate_checkpoint(args.ckpt, data_path=args.data, batches=args.eval_batches)
    table = {}
    for name, variants in runs.items():
        for variant, path in variants.items():
            with held():
                ev = evaluate_checkpoint(path, data_path=args.data, batches=args.eval_batches)
            ck = load_checkpoint(path)
            table[f"{name}/{variant}"] = {
                "val_loss": round(ev.val_loss, 4), "val_ppl": round(ev.val_ppl, 2),
                "gap_to_fp32": round(ev.val_loss - fp32.val_loss, 4),
                "bytes": memory_plan(cfg, ck["policy"]).total_bytes, "path": str(path),
            }
            log(f"{name}/{variant}: {table[f'{name}/{variant}']}")
    report = {
        "checkpoint": args.ckpt, "checkpoint_steps": src_steps, "preset": preset,
        "budget": budget, "all_ternary_bytes": lo, "all_int8_bytes": hi,
        "search": {"trials": args.trials, "loss_on_search_batches": result.best["loss"], "bytes": result.best["bytes"],
                   "policy": result.policy},
        "fp32": {"val_loss": round(fp32.val_loss, 4), "val_ppl": round(fp32.val_ppl, 2),
                 "bytes": memory_plan(cfg, src["policy"]).total_bytes},
        "eval_tokens": fp32.val_tokens, "finetune_steps": args.finetune_steps, "qat_steps": args.qat_steps,
        "scratch_steps": None if args.skip_scratch else args.qat_steps + src_steps, "results": table, "seconds": timings,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)


if __name__ == "__main__":
    main()
