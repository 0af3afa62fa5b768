"""Live progress displays: training, staged library work, benchmarks, streamed generation."""

from __future__ import annotations

import time

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
from rich.text import Text

from qtoolkit.report.tables import coverage_table, memory_summary
from qtoolkit.report.text import console, err_console, human_count


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

    def _on_memory(self, event) -> None:
        self._print(memory_summary(event.data))

    def _on_start(self, event) -> None:
        for task in self._data_tasks.values() if self.live else ():  # close streaming tasks
            self.progress.update(task, total=self.progress.tasks[task].completed)
        d = event.data
        self._print(
            f"[bold]{d['recipe']}[/]: {human_count(d['params'])} parameters on {d['device']}; "
            f"data: {escape(d['data'])} ({human_count(d['data_info'].get('train_tokens', 0))} train / "
            f"{human_count(d['data_info'].get('val_tokens', 0))} val tokens)"
            + ("; resuming from step " + str(event.step) if d["resumed"] else "")
            + (f"; weights from {escape(d['init']['checkpoint'])} (step {d['init']['step']})" if d.get("init") else "")
        )
        if d.get("stale_metrics"):
            self._print(f"an earlier run stopped before its first checkpoint: its metrics moved to {escape(d['stale_metrics'])}")
        self.console.print(coverage_table(d["coverage"]))
        self._t0, self._step0, self._total = time.perf_counter(), event.step, d["total_steps"]
        if self.live:
            self._train_task = self.progress.add_task("train", total=self._total, completed=event.step, info="")

    def _on_step(self, event) -> None:
        d = event.data
        info = f"loss {d['loss']:.3f} lr {d['lr']:.1e} {human_count(d['tokens_per_s'])} tok/s"
        if d.get("mfu") is not None:
            info += f" MFU {100 * d['mfu']:.1f}%"
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

    def _on_notice(self, event) -> None:
        self._print(f"[yellow]{escape(event.data['message'])}")

    def _on_stop(self, event) -> None:
        self._print(f"[yellow]interrupted at step {event.step}; checkpoint saved to {escape(event.data['path'])}")


class StageProgress:
    """A (stage, done, total) callback: a bar per stage on a terminal, sparse log lines otherwise."""

    def __init__(self, console: Console = console):
        self.console = console
        self.live = console.is_terminal
        self.progress = Progress(SpinnerColumn(), TextColumn("[bold]{task.description:<22}"), BarColumn(bar_width=30),
                                 MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                 TimeRemainingColumn(compact=True), console=console)
        self.tasks: dict[str, TaskID] = {}
        self._last: dict[str, int] = {}
        self._first: dict[str, tuple[float, int]] = {}  # stage -> (time, done) when first seen: the ETA's base

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if not self.live:
            now = time.perf_counter()
            t0, done0 = self._first.setdefault(stage, (now, done))
            step = max(1, (total or 10) // 10)
            if stage not in self._last or done == total or done - self._last[stage] >= step:
                self._last[stage] = done
                eta = ""
                if total and done > done0 and done < total:
                    eta = f"  elapsed {now - t0:.0f}s  eta {(now - t0) / (done - done0) * (total - done):.0f}s"
                self.console.print(f"{stage}: {done}" + (f"/{total}" if total else "") + eta, highlight=False)
            return
        if not self.progress.live.is_started:
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def stream_generation(prompt: str, pieces, out: Console = console) -> str:
    """The prompt (bold), then each generated text piece as soon as it arrives; the generated text."""
    out.print(Text(prompt, style="bold"), end="", soft_wrap=True)
    text = []
    for piece in pieces:
        text.append(piece)
        out.print(Text(piece), end="", soft_wrap=True)
        out.file.flush()
    out.print()
    out.file.flush()
    return "".join(text)


class KernelBuildNotice:
    """A kernel-build progress callback (`qtoolkit.deploy.kernels`, (stage, done, total)): says once,
    on stderr, that the C++ kernels are being compiled and how long it took; silent otherwise."""

    def __init__(self, out: Console = err_console, spinner: bool = True):
        self.out, self.spinner = out, spinner
        self.status = None
        self._t0 = 0.0

    def __enter__(self) -> KernelBuildNotice:
        return self

    def __exit__(self, *exc) -> None:
        self._stop()

    def _stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if done == 0:
            self._t0 = time.perf_counter()
            self.out.print(f"[yellow]note:[/] {escape(stage)} for this machine (first use only, typically "
                           "15-60 s; later runs load the cached build)", highlight=False)
            if self.spinner and self.out.is_terminal:
                self.status = self.out.status(escape(stage), spinner="dots")
                self.status.start()
        elif total is not None and done >= total:
            self._stop()
            self.out.print(f"{escape(stage)}: done in {time.perf_counter() - self._t0:.0f} s", highlight=False,
                           style="dim")


class BenchProgress:
    """A `run_bench` progress callback ((stage, done, total)): a spinner naming what is being done;
    a first-use kernel build is announced once, as `KernelBuildNotice` does."""

    def __init__(self, out: Console = err_console):
        self.out = out
        self.status = out.status("starting", spinner="dots")
        self.build = KernelBuildNotice(out, spinner=False)  # one live display at a time: ours

    def __enter__(self) -> BenchProgress:
        self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.status.__exit__(*exc)

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        from qtoolkit.deploy.kernels import BUILD_STAGE

        if stage == BUILD_STAGE:
            self.build(stage, done, total)
            self.status.update(escape(stage))
            return
        if total is not None and done >= total:
            return
        self.status.update(f"{escape(stage)} in its own process ({done + 1}/{total})")
