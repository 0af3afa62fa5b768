"""GLUE results (`qtool glue`): the live progress, the terminal table and the Markdown report.

The table and the Markdown share one row builder (`glue_rows`), so they always show the same
figures: per task and metric, the mean +- sample std over seeds (and their range), the second
checkpoint's and the difference with --compare, the majority-class baseline and the paper's figures.
"""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from qtoolkit.report.text import console, human_count, spec_text

_METRIC = {"accuracy": "accuracy", "f1": "F1", "mcc": "MCC"}


def _pm(s: dict[str, float], compact: bool = False) -> str:
    return f"{s['mean']:.1f}{'±' if compact else ' ± '}{s['std']:.1f}"


def _range(s: dict[str, float]) -> str:
    return f"{s['min']:.1f}-{s['max']:.1f}"


def _policy_text(result) -> str:
    rules = ", ".join(f"{k}: {spec_text(v) if isinstance(v, dict) else v}" for k, v in result.policy.items())
    return f"{rules} (from {result.policy_source})"


def glue_rows(report, compact: bool = False) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the results table: one row per task and metric. `compact` (terminal, 80
    columns): short headers, the paper's two figures in one cell, no seed ranges beside a comparison."""
    from qtoolkit.evaluate.glue import PAPER

    results = report.results
    compare = len(results) > 1
    diffs = report.differences() or {}
    if compact:
        headers = ["task", "metric", *(["A", "B", "B-A", "beyond\nspread"] if compare else ["mean±std", "seeds"]),
                   "majority", "paper\ntern/BERT"]
    else:
        headers = ["task", "metric", *(["A mean ± std", "A seeds", "B mean ± std", "B seeds", "B - A",
                                        "beyond seed spread"] if compare else ["mean ± std", "seeds (min-max)"]),
                   "majority", "paper ternary 132M", "paper BERT-Base"]
    rows = []
    for name, task in results[0].tasks.items():
        for metric in task.metrics:
            s = task.summary()[metric]
            row = [task.title, _METRIC[metric], _pm(s, compact)] + ([] if compact and compare else [_range(s)])
            if compare:
                other = results[1].tasks.get(name)
                if other is None:
                    row += ["-"] * (3 if compact else 4)
                else:
                    t, d = other.summary()[metric], diffs[name][metric]
                    row += [_pm(t, compact), *([] if compact else [_range(t)]), f"{d['diff']:+.1f}",
                            "yes" if d["exceeds_spread"] else "no"]
            paper = ["-" if p is None else f"{p:.{1 if compact else 2}f}"
                     for p in (PAPER[m].get(name, {}).get(metric) for m in ("ternarylm-132m", "bert-base"))]
            row += [f"{task.majority[metric]:.1f}", *(["/".join(paper) if paper[0] != "-" else "-"] if compact else paper)]
            rows.append(row)
    return headers, rows


def _protocol_lines(report) -> list[str]:
    cfg = report.config
    a = report.results[0]
    mode = "linear probe (frozen backbone, head only)" if cfg.freeze else "full finetune with QAT"
    epochs = ", ".join(f"{t.title} {t.epochs}" for t in a.tasks.values())
    lines = [
        f"{mode}; pooling: {cfg.pooling} token; seeds {cfg.seed}..{cfg.seed + cfg.seeds - 1}; "
        f"epochs: {epochs}; batch {cfg.batch_size}; lr {cfg.lr:g} (backbone), {cfg.head_lr:g} (head); "
        f"warmup {cfg.warmup:.0%} then cosine to 0; weight decay {cfg.weight_decay:g}",
    ]
    for t in a.tasks.values():
        tr, dv = t.data["train"], t.data["validation"]
        used = f", {tr['used']:,} used (one seeded subset; --max-train)" if tr["used"] < tr["examples"] else ""
        lines.append(f"{t.title}: {tr['examples']:,} train examples{used}, {dv['examples']:,} dev; "
                     f"truncated at {tr['max_len']} tokens: {tr['truncated']:,} train / {dv['truncated']:,} dev; "
                     f"mean {tr['mean_tokens']:.0f} tokens; {t.steps:,} steps per seed")
    return lines


def _checkpoint_lines(report) -> list[str]:
    lines = []
    for label, r in zip("AB", report.results, strict=False):
        prefix = f"{label}: " if len(report.results) > 1 else ""
        quant = ", ".join(f"{k} {human_count(v)}" for k, v in r.quantizers.items())
        lines.append(f"{prefix}{r.checkpoint} ({r.kind}, step {r.step}); policy {_policy_text(r)}; "
                     f"parameters: {quant}; {r.elapsed_s:.0f} s on {r.device}")
    return lines


def glue_table(report) -> Group:
    """The results table, then the checkpoints, the protocol and the notes as text below it."""
    headers, rows = glue_rows(report, compact=True)
    table = Table(title="GLUE dev results (points x100)", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for h in headers:
        table.add_column(h, justify="left" if h in ("task", "metric") else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    notes = _checkpoint_lines(report) + _protocol_lines(report)
    notes.append("majority: the training split's most frequent label for every dev example. Paper: TernaryLM "
                 "(arXiv 2602.07374), a 132M model pretrained on far more text.")
    if len(report.results) > 1:
        notes.append("beyond seed spread: the two checkpoints' seed ranges do not overlap.")
    return Group(table, Text("\n".join(notes), style="dim"))


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def glue_markdown(report) -> str:
    headers, rows = glue_rows(report)
    parts = ["# GLUE dev results\n", "\n".join(f"* {line}" for line in _checkpoint_lines(report)) + "\n",
             _md_table(headers, rows) + "\n",
             "Metrics in GLUE points (x100): mean ± sample standard deviation over seeds, and the seeds' range. "
             "Majority: the training split's most frequent label predicted for every dev example. Paper: TernaryLM "
             "(arXiv 2602.07374) and its BERT-Base reference; its ternary model has 132M parameters and was "
             "pretrained on far more text than these checkpoints.\n"]
    if len(report.results) > 1:
        parts.append("B - A: difference of the means; beyond seed spread: the seed ranges do not overlap "
                     "(for 3 + 3 seeds, 10% likely by chance when the two are equally good).\n")
    parts.append("## Protocol\n")
    parts.append("\n".join(f"* {line}" for line in _protocol_lines(report)) + "\n")
    parts.append("## Per seed\n")
    seed_rows = []
    for label, r in zip("AB", report.results, strict=False):
        for t in r.tasks.values():
            for run in t.runs:
                metrics = ", ".join(f"{_METRIC[m]} {v:.1f}" for m, v in run.metrics.items())
                seed_rows.append([label if len(report.results) > 1 else "-", t.title, str(run.seed), metrics,
                                  f"{run.train_loss:.3f}", f"{run.elapsed_s:.0f}"])
    parts.append(_md_table(["ckpt", "task", "seed", "metrics", "last-epoch loss", "seconds"], seed_rows) + "\n")
    return "\n".join(parts)


class GlueProgress:
    """A `run_glue` callback: a bar per finetuning run on a terminal, sparse log lines otherwise."""

    def __init__(self, console: Console = console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<18}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(compact=True), console=console)
        self._task: TaskID | None = None
        self._t0 = 0.0

    def __enter__(self) -> GlueProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def __call__(self, event) -> None:
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler:
            handler(event.data)

    @staticmethod
    def _label(d: dict[str, Any]) -> str:
        return f"{d['label']} " if d.get("label") else ""

    def _on_load(self, d) -> None:
        mode = "linear probe" if d["freeze"] else "finetune with QAT"
        self._print(f"[bold]{self._label(d)}{escape(d['checkpoint'])}[/] ({d['kind']}): {mode}, policy from "
                    f"{escape(d['policy_source'])}, on {d['device']}, max {d['max_len']} tokens")

    def _on_data(self, d) -> None:
        tr, dv = d["train"], d["validation"]
        used = f" ({tr['used']:,} used)" if tr["used"] < tr["examples"] else ""
        self._print(f"  {d['task']}: {tr['examples']:,} train{used} / {dv['examples']:,} dev examples; truncated "
                    f"{tr['truncated']:,} / {dv['truncated']:,}; mean {tr['mean_tokens']:.0f} tokens")

    def _on_start(self, d) -> None:
        self._t0 = time.perf_counter()
        if self.live:
            if not self.progress.live.is_started:
                self.progress.start()
            self._task = self.progress.add_task(f"{self._label(d)}{d['task']} seed {d['seed']}", total=d["total"],
                                                info="")

    def _on_features(self, d) -> None:
        text = f"computing {d['split']} features ({d['examples']:,} examples)"
        if self.live and self._task is not None:
            self.progress.update(self._task, info=text)
        elif not self.live:
            self._print(f"    {text}")

    def _on_step(self, d) -> None:
        if self.live and self._task is not None:
            self.progress.update(self._task, completed=d["step"], info=f"loss {d['loss']:.3f}")
        elif not self.live and d["step"] % max(1, d["total"] // 4) == 0 and d["step"] < d["total"]:
            elapsed = time.perf_counter() - self._t0
            self._print(f"    step {d['step']}/{d['total']}  loss {d['loss']:.3f}  elapsed {elapsed:.0f}s  "
                        f"eta {elapsed / d['step'] * (d['total'] - d['step']):.0f}s")

    def _on_result(self, d) -> None:
        if self.live and self._task is not None:
            self.progress.remove_task(self._task)
            self._task = None
        metrics = ", ".join(f"{_METRIC[m]} {v:.1f}" for m, v in d["metrics"].items())
        self._print(f"  {self._label(d)}{d['task']} seed {d['seed']}: {metrics}  "
                    f"(train loss {d['train_loss']:.3f}, {d['elapsed_s']:.0f} s)")


__all__ = ["GlueProgress", "glue_markdown", "glue_rows", "glue_table"]
