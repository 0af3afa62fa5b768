"""All terminal rendering lives here (rich). Library modules return data or emit events."""

from __future__ import annotations

import math
import time
from typing import Any

from rich.console import Console
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

from qtoolkit import quantizers
from qtoolkit.policy import Coverage

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def spec_text(spec: dict[str, Any] | None) -> str:
    """`ternary` or `ternary(alpha=learned)`: the name plus options that differ from defaults."""
    if spec is None:
        return "float32 (unquantized)"
    defaults = quantizers.build(spec["name"]).spec()
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name" and defaults.get(k) != v)
    return f"{spec['name']}({opts})" if opts else spec["name"]


def coverage_table(coverage: Coverage, title: str = "Policy coverage") -> Table:
    """Groups layers with the same quantizer spec and rule into one row."""
    table = Table(title=title, title_justify="left")
    table.add_column("quantizer")
    table.add_column("rule")
    table.add_column("layers", justify="right")
    table.add_column("params", justify="right")
    table.add_column("examples", overflow="fold")
    groups: dict[tuple[str, str], list] = {}
    for a in coverage.layers:
        groups.setdefault((spec_text(a.spec), a.rule or "-"), []).append(a)
    for (spec, rule), layers in groups.items():
        names = [a.name for a in layers]
        examples = ", ".join(names[:3]) + (f", ... (+{len(names) - 3})" if len(names) > 3 else "")
        table.add_row(spec, rule, str(len(layers)), human_count(sum(a.numel for a in layers)), examples)
    return table


class TrainProgress:
    """A `train()` callback: live progress bars on a terminal, plain log lines otherwise (CI, pipes)."""

    TOKEN_STAGES = ("tokenizing train", "tokenizing validation")

    def __init__(self, console: Console = console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<22}"),
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(compact=True),
            console=console,
        )
        self._data_tasks: dict[str, TaskID] = {}
        self._train_task: TaskID | None = None
        self._t0, self._step0, self._total = 0.0, 0, 0

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def __call__(self, event) -> None:
        if self.live and not self.progress.live.is_started:  # lazily: an early error draws no bar
            self.progress.start()
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler:
            handler(event)

    def _print(self, text: str) -> None:
        self.console.print(text, highlight=False)

    def _on_data(self, event) -> None:
        d = event.data
        unit = "tokens" if d["stage"] in self.TOKEN_STAGES else ""
        if not self.live:
            if d["stage"] not in self._data_tasks:
                self._data_tasks[d["stage"]] = TaskID(0)
                self._print(f"{d['stage']} ...")
            return
        task = self._data_tasks.get(d["stage"])
        if task is None:
            task = self._data_tasks[d["stage"]] = self.progress.add_task(d["stage"], total=d["total"], info=unit)
        self.progress.update(task, completed=d["done"], total=d["total"])

    def _on_start(self, event) -> None:
        for task in self._data_tasks.values() if self.live else ():  # close streaming tasks
            self.progress.update(task, total=self.progress.tasks[task].completed)
        d = event.data
        self._print(
            f"[bold]{d['recipe']}[/]: {human_count(d['params'])} parameters on {d['device']}; "
            f"data: {escape(d['data'])} ({human_count(d['data_info'].get('train_tokens', 0))} train / "
            f"{human_count(d['data_info'].get('val_tokens', 0))} val tokens)"
            + ("; resuming from step " + str(event.step) if d["resumed"] else "")
        )
        self.console.print(coverage_table(d["coverage"]))
        self._t0, self._step0, self._total = time.perf_counter(), event.step, d["total_steps"]
        if self.live:
            self._train_task = self.progress.add_task("train", total=self._total, completed=event.step, info="")

    def _on_step(self, event) -> None:
        d = event.data
        info = f"loss {d['loss']:.3f} lr {d['lr']:.1e} {human_count(d['tokens_per_s'])} tok/s"
        if self.live:
            self.progress.update(self._train_task, completed=event.step, info=info)
        elif event.step % max(1, self._total // 20) == 0 or event.step == self._total:
            elapsed = time.perf_counter() - self._t0
            eta = elapsed / max(1, event.step - self._step0) * (self._total - event.step)
            self._print(f"step {event.step:>6}/{self._total}  {info}  elapsed {elapsed:.0f}s  eta {eta:.0f}s")

    def _on_eval(self, event) -> None:
        d = event.data
        self._print(
            f"step {event.step:>6}  val_loss {d['val_loss']:.4f}  val_ppl {d['val_ppl']:.2f}  "
            f"train_ce {d['train_ce']:.4f}  train/val {d['train_val_ratio']:.3f}"
        )

    def _on_stop(self, event) -> None:
        self._print(f"[yellow]interrupted at step {event.step}; checkpoint saved to {escape(event.data['path'])}")


def train_summary(result) -> Table:
    table = Table(title="Training summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("checkpoint", str(result.checkpoint)),
        ("steps", f"{result.steps} / {result.total_steps}" + (" (interrupted)" if result.interrupted else "")),
        ("parameters", human_count(result.params)),
        ("quantizers", ", ".join(f"{k}: {human_count(v)}" for k, v in result.coverage.params_by_quantizer().items())),
        ("val loss", f"{result.val_loss:.4f}"),
        ("val perplexity", f"{result.val_ppl:.2f}"),
        ("train cross-entropy", f"{result.train_ce:.4f}" if math.isfinite(result.train_ce) else "-"),
        ("throughput", f"{human_count(result.tokens_per_s)} tokens/s"),
        ("time", f"{result.elapsed_s:.0f} s"),
    ]
    for k, v in rows:
        table.add_row(k, v)
    return table


def eval_summary(result) -> Table:
    table = Table(title="Evaluation", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in (
        ("checkpoint", f"{result.checkpoint} (step {result.step})"),
        ("data", result.data),
        ("tokens", human_count(result.val_tokens)),
        ("val loss", f"{result.val_loss:.4f}"),
        ("val perplexity", f"{result.val_ppl:.2f}"),
    ):
        table.add_row(k, v)
    return table


def recipes_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Recipes", title_justify="left")
    for col in ("name", "preset", "policy", "description"):
        table.add_column(col, overflow="fold")
    for r in rows:
        rules = ", ".join(f"{k}={s if isinstance(s, str) else s.get('name', '?')}" for k, s in r["policy"].items())
        table.add_row(r["name"], r["preset"], rules, r["description"])
    return table


def quantizers_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="Quantizers", title_justify="left")
    for col in ("name", "default options", "bits/weight (768x768)"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], r["options"], r["bits"])
    return table


def fmt_bytes(n: int | float) -> str:
    """Decimal units (1 MB = 10^6 B), as budgets are written; exact bytes live in the JSON."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def plan_table(plan, title: str, full: bool = False) -> Table:
    """Per-layer bytes of a MemoryPlan; small fp32 parameters (norms) in one row unless `full`."""
    table = Table(title=title, title_justify="left")
    table.add_column("layer", no_wrap=True)
    for col, justify in (("shape", "right"), ("quantizer", "left"), ("bits/weight", "right"), ("bytes", "right")):
        table.add_column(col, justify=justify)
    rest = []
    for e in plan.entries:
        if e.kind == "param" and not full:
            rest.append(e)
            continue
        quant = f"tied to {e.tied_to}" if e.tied_to else spec_text(e.spec)
        table.add_row(e.name, _shape(e.shape), quant, f"{float(e.bits_per_weight):.4f}", f"{e.nbytes:,}")
    if rest:
        n, b = sum(e.params for e in rest), sum(e.nbytes for e in rest)
        table.add_row(f"{len(rest)} norm weights", f"{n:,}", "fp32", f"{8 * b / n:.4f}", f"{b:,}")
    table.add_section()
    table.add_row("[bold]total", f"{plan.params:,}", "", f"{8 * plan.total_bytes / plan.params:.4f}",
                  f"[bold]{plan.total_bytes:,}")
    by_q = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in plan.bytes_by_quantizer().items())
    table.caption = (f"{fmt_bytes(plan.total_bytes)} ({by_q}) vs {fmt_bytes(plan.fp32_bytes)} in fp32: "
                     f"{plan.compression:.2f}x smaller")
    return table


def pack_summary(result) -> Table:
    table = Table(title="Packed checkpoint", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    exact = "[green]== predicted[/]" if result.tensor_bytes == result.predicted_bytes else "[red]!= predicted[/]"
    for k, v, note in (
        ("file", str(result.path), ""),
        ("predicted (memory model)", f"{result.predicted_bytes:,} B", fmt_bytes(result.predicted_bytes)),
        ("packed tensors written", f"{result.tensor_bytes:,} B", exact),
        ("file size", f"{result.file_bytes:,} B", fmt_bytes(result.file_bytes)),
        ("header + metadata", f"{result.overhead_bytes:,} B", "config, policy, layers, tokenizer"),
        ("fp32 model", f"{result.fp32_bytes:,} B", f"{result.fp32_bytes / result.predicted_bytes:.2f}x larger"),
    ):
        table.add_row(k, v, note)
    return table
