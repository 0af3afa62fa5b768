"""What ternary quantization costs downstream: fp32_baseline vs ternary_all on MRPC, SST-2 and CoLA.

    flock /work/heavy.lock python benchmarks/glue.py --fp32 /work/runs/fp32-small-600/ckpt.pt \\
        --ternary /work/runs/ternary-small-600/ckpt.pt --data-dir ../shared/data/glue [--seeds 3] \\
        [--out bench_glue] [--probe] [--max-train N] [--epochs N] [--jobs 2]

Both checkpoints (the same `small` model, data and steps; one trained in fp32, one with ternary QAT)
go through `qtool glue`'s protocol with the same seeds and batches: each is finetuned under its own
policy (the ternary one stays ternary: QAT) on the three tasks, and scored on the dev splits. With
--probe, the same comparison as linear probes (frozen backbone, head only) follows.

Prints JSON: per task and metric the fp32 and ternary mean, sample std, min and max over seeds,
the difference (ternary - fp32), whether it exceeds the seed spread (the seed ranges do not
overlap), the majority baseline and the paper's figures (a 132M ternary model pretrained on far
more text, and BERT-Base); plus wall-clock seconds per checkpoint and per run. --out also writes the
`qtool glue` JSON and Markdown of every protocol run.

--jobs 2 (default) finetunes the two checkpoints at once, each in its own process on one thread:
on a 2-core machine shared with other work this is about twice as fast as one process on two
threads, whose OpenMP threads wait for each other whenever another process takes a core. The
results do not depend on it (same seeds, same batches; `run_glue(fp32, compare=ternary)` gives the
same figures). Per-run seconds are then those of one thread.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch


def figures(report) -> dict:
    from qtoolkit.evaluate.glue import PAPER

    fp32, ternary = report.results
    diffs = report.differences()
    out = {}
    for name, task in fp32.tasks.items():
        for metric in task.metrics:
            a, b = task.summary()[metric], ternary.tasks[name].summary()[metric]
            d = diffs[name][metric]
            out[f"{name}.{metric}"] = {
                "fp32": {k: round(v, 2) for k, v in a.items()},
                "ternary": {k: round(v, 2) for k, v in b.items()},
                "ternary_minus_fp32": round(d["diff"], 2),
                "exceeds_seed_spread": d["exceeds_spread"],
                "welch_t": None if d["welch_t"] is None else round(d["welch_t"], 2),
                "majority": round(task.majority[metric], 2),
                "paper_ternarylm_132m": PAPER["ternarylm-132m"].get(name, {}).get(metric),
                "paper_bert_base": PAPER["bert-base"].get(name, {}).get(metric),
            }
    return out


def timings(report) -> dict:
    out = {}
    for label, r in zip(("fp32", "ternary"), report.results, strict=True):
        per_task = {}
        for name, task in r.tasks.items():
            secs = [run.elapsed_s for run in task.runs]
            per_task[name] = {"runs": len(secs), "min_s": round(min(secs), 1), "median_s": round(statistics.median(secs), 1),
                              "max_s": round(max(secs), 1), "steps": task.steps,
                              "train_examples_used": task.data["train"]["used"]}
        out[label] = {"total_s": round(r.elapsed_s, 1), "per_task": per_task}
    return out


def _progress(event) -> None:  # a line per finished run, on stderr (stdout carries the JSON)
    if event.kind == "result":
        d = event.data
        metrics = ", ".join(f"{k} {v:.1f}" for k, v in d["metrics"].items())
        print(f"[{time.strftime('%H:%M:%S')}] {d['label']} {d['task']} seed {d['seed']}: {metrics} "
              f"({d['elapsed_s']:.0f} s)", file=sys.stderr, flush=True)


def _one(ckpt: str, cfg, label: str, threads: int | None):
    """One checkpoint through the protocol (in a worker process when --jobs 2)."""
    from qtoolkit.evaluate.glue import run_glue

    if threads:
        torch.set_num_threads(threads)

    def progress(event) -> None:
        event.data["label"] = label
        _progress(event)

    return run_glue(ckpt, cfg, callback=progress).results[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp32", required=True, help="fp32_baseline checkpoint")
    ap.add_argument("--ternary", required=True, help="ternary_all checkpoint (same preset, data and steps)")
    ap.add_argument("--data-dir", default=None, help="local GLUE TSVs (default: the Hub)")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--max-train", type=int, default=None)
    ap.add_argument("--probe", action="store_true", help="also compare linear probes (frozen backbones)")
    ap.add_argument("--out", type=Path, default=None, help="write glue.json / glue.md of each protocol here")
    ap.add_argument("--jobs", type=int, choices=(1, 2), default=2,
                    help="2: the two checkpoints at once, one thread each; 1: one after the other")
    args = ap.parse_args()

    from qtoolkit.checkpoint import atomic_write_text
    from qtoolkit.evaluate.glue import GlueConfig, GlueReport
    from qtoolkit.report import glue_markdown

    threads = 1 if args.jobs == 2 else torch.get_num_threads()
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "jobs": args.jobs,
                          "threads_per_job": threads, "cpus": os.cpu_count(),
                          "device": "cuda" if torch.cuda.is_available() else "cpu"},
              "checkpoints": {"fp32": args.fp32, "ternary": args.ternary}}
    modes = [("finetune", False)] + ([("linear_probe", True)] if args.probe else [])
    for mode, freeze in modes:
        cfg = GlueConfig(tasks=args.tasks, data_dir=args.data_dir, seeds=args.seeds, epochs=args.epochs,
                         max_train=args.max_train, freeze=freeze)
        t0 = time.perf_counter()
        jobs = [(args.fp32, cfg, "fp32", threads if args.jobs == 2 else None),
                (args.ternary, cfg, "ternary", threads if args.jobs == 2 else None)]
        if args.jobs == 2:
            with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
                results = list(pool.map(_one, *zip(*jobs, strict=True)))
        else:
            results = [_one(*job) for job in jobs]
        report = GlueReport(cfg, results)
        result[mode] = {"config": cfg.to_dict(), "figures": figures(report), "timings": timings(report),
                        "wall_s": round(time.perf_counter() - t0, 1)}
        if args.out:
            atomic_write_text(args.out / mode / "glue.json", json.dumps(report.to_dict(), indent=2))
            atomic_write_text(args.out / mode / "glue.md", glue_markdown(report))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
