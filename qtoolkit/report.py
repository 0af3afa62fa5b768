"""All terminal rendering lives here (rich). Library modules return data or emit events."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from rich import box
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
from rich.text import Text

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


# ------------------------------------------------------------------------------ analysis


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _alpha(a: dict[str, float] | None) -> str:
    if not a:
        return "-"
    if a["count"] == 1:
        return f"{a['mean']:.4g}"
    return f"{a['mean']:.3g} [{a['min']:.2g}, {a['max']:.2g}]"


LAYER_COLUMNS = [  # (header, LayerStats -> text); the --full table and the markdown share them
    ("layer", lambda x: x.name),
    ("shape", lambda x: _shape(x.shape)),
    ("quantizer", lambda x: spec_text(x.spec)),
    ("bits/w", lambda x: f"{x.bits_per_weight:.3f}"),
    ("bytes", lambda x: f"{x.bytes:,}"),
    ("zeros", lambda x: _pct(x.zeros)),
    ("+1", lambda x: _pct(x.plus)),
    ("-1", lambda x: _pct(x.minus)),
    ("alpha", lambda x: _alpha(x.alpha)),
    ("entropy b/w", lambda x: _num(x.entropy_bits) + (f" / {x.code_bits:.1f}" if x.code_bits else "")),
    ("near thr", lambda x: _pct(x.near_threshold)),
    ("SQNR dB", lambda x: "exact" if x.sqnr_db is None and x.quantizer in ("fp32",) else _num(x.sqnr_db, ".1f")),
]

GROUP_COLUMNS = [  # per block / per kind aggregate rows (compact: fits 80 columns)
    ("quant", lambda g: ",".join(g["quantizers"])),
    ("bytes", lambda g: fmt_bytes(g["bytes"])),
    ("bits/w", lambda g: f"{g['bits_per_weight']:.2f}"),
    ("zeros", lambda g: _pct(g["zeros"])),
    ("H b/w", lambda g: _num(g["entropy_bits"], ".2f")),
    ("near", lambda g: _pct(g["near_threshold"])),
    ("alpha", lambda g: _num(g["alpha_mean"], ".3g")),
    ("SQNR", lambda g: _num(g["sqnr_db"], ".1f")),
]
GROUP_LEGEND = ("zeros/H/near/alpha over ternary weights; H = code entropy (bits/weight lower bound); "
                "near = share within the rounding band; SQNR in dB")


def _analysis_heading(a) -> str:
    what = f"{a.checkpoint} ({a.kind}" + (f", step {a.step}" if a.step is not None else "") + ")"
    if a.as_policy:
        what += f" analysed as {a.as_policy}"
    return what


def middle_boundary_text(a) -> str:
    mb = a.middle_vs_boundary
    if not mb:
        return "middle vs boundary: needs ternary layers in both middle and boundary blocks"
    return (f"middle blocks {mb['middle_blocks'][0]}-{mb['middle_blocks'][-1]}: {_pct(mb['middle_zeros'])} zeros; "
            f"boundary blocks: {_pct(mb['boundary_zeros'])} zeros; difference "
            f"{100 * mb['difference']:+.2f} points")


def totals_text(a) -> str:
    t = a.totals
    return (f"total {fmt_bytes(t['bytes'])} ({t['bytes']:,} B) vs {fmt_bytes(t['fp32_bytes'])} in fp32: "
            f"{t['compression_vs_fp32']:.2f}x smaller; ternary zeros overall {_pct(t['zeros'])}")


def analysis_renderables(a, full: bool = False) -> list:
    out: list = [Text(_analysis_heading(a), style="bold")]
    if full:
        table = Table(title="Layers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for header, _ in LAYER_COLUMNS:
            table.add_column(header, no_wrap=header == "layer", justify="left" if header in ("layer", "quantizer") else "right")
        for x in a.layers:
            table.add_row(*(fn(x) for _, fn in LAYER_COLUMNS))
        out.append(table)
    blocks = Table(title="By block", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    blocks.add_column("block", justify="right")
    for header, _ in GROUP_COLUMNS:
        blocks.add_column(header, justify="left" if header == "quant" else "right")
    mids = set((a.middle_vs_boundary or {}).get("middle_blocks", []))
    for g in a.blocks:
        blocks.add_row(f"{g['block']}{'*' if g['block'] in mids else ''}", *(fn(g) for _, fn in GROUP_COLUMNS))
    for kind in ("embed", "lm_head"):
        if kind in a.kinds:
            blocks.add_row(kind, *(fn(a.kinds[kind]) for _, fn in GROUP_COLUMNS))
    blocks.caption = "* middle block. " + GROUP_LEGEND
    out.append(blocks)
    kinds = Table(title="By module kind", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    kinds.add_column("kind")
    for header, _ in GROUP_COLUMNS:
        kinds.add_column(header, justify="left" if header == "quant" else "right")
    for kind, g in a.kinds.items():
        kinds.add_row(kind, *(fn(g) for _, fn in GROUP_COLUMNS))
    out.append(kinds)
    out.append(Text(middle_boundary_text(a)))
    out.append(Text(totals_text(a)))
    return out


def compare_table(a, b) -> Table:
    table = Table(title=f"A: {a.checkpoint}\nB: {b.checkpoint}", title_justify="left")
    for col in ("layer", "quantizer A", "quantizer B", "bits A", "bits B", "zeros A", "zeros B", "d zeros",
                "SQNR A", "SQNR B"):
        table.add_column(col, justify="left" if col.startswith(("layer", "quantizer")) else "right",
                         no_wrap=col == "layer")
    other = {x.name: x for x in b.layers}
    for x in a.layers:
        y = other.get(x.name)
        if y is None:
            continue
        dz = None if x.zeros is None or y.zeros is None else y.zeros - x.zeros
        table.add_row(x.name, spec_text(x.spec), spec_text(y.spec), f"{x.bits_per_weight:.3f}",
                      f"{y.bits_per_weight:.3f}", _pct(x.zeros), _pct(y.zeros),
                      "-" if dz is None else f"{100 * dz:+.1f}", _num(x.sqnr_db, ".1f"), _num(y.sqnr_db, ".1f"))
    table.add_section()
    ta, tb = a.totals, b.totals
    table.add_row("total", "", "", f"{8 * ta['bytes'] / ta['params']:.3f}", f"{8 * tb['bytes'] / tb['params']:.3f}",
                  _pct(ta["zeros"]), _pct(tb["zeros"]),
                  "-" if ta["zeros"] is None or tb["zeros"] is None else f"{100 * (tb['zeros'] - ta['zeros']):+.1f}",
                  "", "")
    table.caption = f"A: {fmt_bytes(ta['bytes'])}  B: {fmt_bytes(tb['bytes'])}"
    return table


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def analysis_markdown(a, other=None) -> str:
    parts = [f"# Quantization analysis\n\n{_analysis_heading(a)}\n", f"{middle_boundary_text(a)}.\n",
             f"{totals_text(a)}.\n", "## By block\n"]
    parts.append(_md_table(["block"] + [h for h, _ in GROUP_COLUMNS],
                           [[str(g["block"])] + [fn(g) for _, fn in GROUP_COLUMNS] for g in a.blocks]))
    parts.append("\n## By module kind\n")
    parts.append(_md_table(["kind"] + [h for h, _ in GROUP_COLUMNS],
                           [[k] + [fn(g) for _, fn in GROUP_COLUMNS] for k, g in a.kinds.items()]))
    parts.append("\n## Layers\n")
    parts.append(_md_table([h for h, _ in LAYER_COLUMNS], [[fn(x) for _, fn in LAYER_COLUMNS] for x in a.layers]))
    if other is not None:
        parts.append(f"\n## Compared with {other.checkpoint}\n")
        o = {x.name: x for x in other.layers}
        rows = [[x.name, spec_text(x.spec), spec_text(o[x.name].spec), _pct(x.zeros), _pct(o[x.name].zeros),
                 _num(x.sqnr_db, ".1f"), _num(o[x.name].sqnr_db, ".1f")] for x in a.layers if x.name in o]
        parts.append(_md_table(["layer", "quantizer A", "quantizer B", "zeros A", "zeros B", "SQNR A", "SQNR B"], rows))
    return "\n".join(parts) + "\n"


_KIND_STYLE = {"q": "C0", "k": "C1", "v": "C2", "o": "C3", "gate": "C4", "up": "C5", "down": "C6"}


def analysis_figure(a, other=None):
    """Three panels: per-block zero fraction by module kind, alpha per layer, bits per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(11, 11), constrained_layout=True)
    ax = axes[0]
    mb = a.middle_vs_boundary
    if mb:
        lo, hi = mb["middle_blocks"][0], mb["middle_blocks"][-1]
        ax.axvspan(lo - 0.5, hi + 0.5, color="0.92", label="middle blocks")
    for kind, color in _KIND_STYLE.items():
        pts = sorted((x.block, x.zeros) for x in a.layers if x.kind == kind and x.zeros is not None and x.quantizer == "ternary")
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=kind)
        if other is not None:
            opts = sorted((x.block, x.zeros) for x in other.layers if x.kind == kind and x.zeros is not None
                          and x.quantizer == "ternary")
            if opts:
                ax.plot(*zip(*opts, strict=True), marker="x", linestyle="--", color=color, alpha=0.6)
    if mb:
        ax.axhline(mb["middle_zeros"], color="k", linestyle=":", linewidth=1,
                   label=f"middle mean {100 * mb['middle_zeros']:.1f}%")
        ax.axhline(mb["boundary_zeros"], color="0.4", linestyle="-.", linewidth=1,
                   label=f"boundary mean {100 * mb['boundary_zeros']:.1f}%")
    ax.set_xlabel("block")
    ax.set_ylabel("fraction of zero codes")
    ax.set_title("Ternary sparsity per block and module kind" + (" (B dashed)" if other is not None else ""))
    ax.legend(ncol=5, fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    ternary = [x for x in a.layers if x.alpha and x.quantizer == "ternary"]
    if ternary:
        xs = range(len(ternary))
        means = [x.alpha["mean"] for x in ternary]
        err = [[m - x.alpha["min"] for m, x in zip(means, ternary, strict=True)],
               [x.alpha["max"] - m for m, x in zip(means, ternary, strict=True)]]
        ax.errorbar(xs, means, yerr=err, fmt="o", ms=3, color="C0", ecolor="0.6", capsize=2)
        ax.set_xticks(list(xs))
        ax.set_xticklabels([x.name.replace("blocks.", "").replace("_proj", "") for x in ternary], rotation=90, fontsize=6)
    ax.set_ylabel("alpha (scale)")
    ax.set_title("Ternary scale alpha per layer (bars: min-max over rows/groups)")
    ax.grid(alpha=0.3)

    ax = axes[2]
    names = [x.name.replace("blocks.", "").replace("_proj", "") for x in a.layers]
    colors = {"ternary": "C0", "int8": "C1", "fp16": "C2", "bf16": "C4", "fp32": "C3"}
    ax.bar(range(len(a.layers)), [x.bits_per_weight for x in a.layers],
           color=[colors.get(x.quantizer, "0.5") for x in a.layers])
    ent = [(i, x.entropy_bits) for i, x in enumerate(a.layers) if x.entropy_bits is not None]
    if ent:
        ax.plot(*zip(*ent, strict=True), "k_", markersize=8, label="code entropy (lower bound)")
        ax.legend(fontsize=8)
    ax.set_xticks(range(len(a.layers)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_yscale("log", base=2)
    ax.set_ylim(1, 48)
    ax.set_ylabel("bits per weight (stored, log scale)")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for q, c in colors.items() if any(x.quantizer == q for x in a.layers)]
    labels = [q for q in colors if any(x.quantizer == q for x in a.layers)]
    ax.legend(handles + ax.get_legend_handles_labels()[0], labels + ax.get_legend_handles_labels()[1], fontsize=8)
    ax.set_title(f"Bits per weight per layer — total {fmt_bytes(a.totals['bytes'])}, "
                 f"{a.totals['compression_vs_fp32']:.2f}x smaller than fp32")
    ax.grid(alpha=0.3, axis="y")
    return fig


def save_analysis_plot(a, path, other=None) -> None:
    import matplotlib.pyplot as plt

    from qtoolkit.checkpoint import atomic_path

    fig = analysis_figure(a, other)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)


def analysis_html(a, other=None) -> str:
    import base64
    import html
    import io

    import matplotlib.pyplot as plt

    fig = analysis_figure(a, other)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()

    def table(headers, rows):
        head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    blocks = table(["block"] + [h for h, _ in GROUP_COLUMNS],
                   [[str(g["block"])] + [fn(g) for _, fn in GROUP_COLUMNS] for g in a.blocks])
    kinds = table(["kind"] + [h for h, _ in GROUP_COLUMNS], [[k] + [fn(g) for _, fn in GROUP_COLUMNS] for k, g in a.kinds.items()])
    layers = table([h for h, _ in LAYER_COLUMNS], [[fn(x) for _, fn in LAYER_COLUMNS] for x in a.layers])
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;"
             "font-size:12px;margin-bottom:1.5em} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left} img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>qtoolkit analysis</title>"
            f"<style>{style}</style></head><body><h1>Quantization analysis</h1>"
            f"<p>{html.escape(_analysis_heading(a))}</p><p>{html.escape(middle_boundary_text(a))}</p>"
            f"<p>{html.escape(totals_text(a))}</p><img src='data:image/png;base64,{img}' alt='analysis plots'>"
            f"<h2>By block</h2>{blocks}<h2>By module kind</h2>{kinds}<h2>Layers</h2>{layers}</body></html>")


# ------------------------------------------------------------------------------ probes and search


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

    def __enter__(self) -> StageProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self.progress.live.is_started:
            self.progress.stop()

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if not self.live:
            step = max(1, (total or 10) // 10)
            if stage not in self._last or done == total or done - self._last[stage] >= step:
                self._last[stage] = done
                self.console.print(f"{stage}: {done}" + (f"/{total}" if total else ""), highlight=False)
            return
        if not self.progress.live.is_started:
            self.progress.start()
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(stage, total=total)
        self.progress.update(self.tasks[stage], completed=done, total=total)


def _rho(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def probe_table(result, full: bool = False) -> Table:
    fkeys = [f["key"] for f in result.formats]
    table = Table(title=f"Sensitivity: increase in calibration loss (base {result.base_loss:.4f}, "
                  f"{result.calibration['tokens']:,} tokens)", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("unit", no_wrap=True)
    for f in fkeys:
        table.add_column(f"dL {f}", justify="right")
    for f in fkeys if full else ():
        table.add_column(f"est {f}", justify="right")
    table.add_column("zeros", justify="right")
    table.add_column("near", justify="right")
    for u in result.units:
        name = u["name"]
        meas = result.measured.get(name, {})
        cheap = result.cheap.get(name, {})
        sp = [result.sparsity[m] for m in u["modules"] if m in result.sparsity]
        zeros = sum(s["zeros"] for s in sp) / len(sp) if sp else None
        near = sum(s["near_threshold"] for s in sp) / len(sp) if sp else None
        table.add_row(name, *(_num(meas.get(f), ".4f") for f in fkeys),
                      *(_num(cheap.get(f), ".2e") for f in (fkeys if full else ())), _pct(zeros), _pct(near))
    rho = ", ".join(f"{k} {_rho(v)}" for k, v in result.spearman.items())
    state = "cached" if result.cached else ("complete" if result.complete else
                                            f"incomplete: {len(result.missing())} measurements left (re-run to continue)")
    secs = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items())
    table.caption = f"Spearman(measured, one-pass estimate): {rho}.  {state}; {secs}"
    return table


_FORMAT_COLORS = {"ternary": "cyan", "int8": "yellow", "fp16": "green", "bf16": "green", "fp32": "red"}


def search_renderables(result) -> list:
    out: list = []
    space = result.space
    if result.best is None:
        out.append(Text("no completed trial within the budget yet", style="bold red"))
        return out
    alloc = result.best["allocation"]
    blocks = sorted({u.block for u in space.units if u.block is not None})
    kinds = []
    for u in space.units:
        if u.block is not None:
            kind = u.name.split(".", 2)[2]
            if kind not in kinds:
                kinds.append(kind)
    grid = Table(title="Chosen format per unit", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    grid.add_column("block", justify="right")
    for k in kinds:
        grid.add_column(k.replace("attn.", "").replace("mlp.", "").replace("_proj", ""))
    for b in blocks:
        row = []
        for k in kinds:
            key = alloc.get(f"blocks.{b}.{k}", "")
            color = _FORMAT_COLORS.get(key.split("(")[0], "white")
            row.append(f"[{color}]{escape(key)}[/]")
        grid.add_row(str(b), *row)
    others = [u for u in space.units if u.block is None]
    grid.caption = "; ".join(f"{u.name}: {alloc[u.name]}" for u in others)
    out.append(grid)

    summary = Table(title="Search summary", title_justify="left", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_column()
    best = result.best
    summary.add_row("budget", f"{result.budget:,} B", fmt_bytes(result.budget))
    summary.add_row("chosen policy", f"{best['bytes']:,} B",
                    f"{100 * best['bytes'] / result.budget:.1f}% of budget; smallest reachable {fmt_bytes(result.min_bytes)}")
    summary.add_row("validation loss", f"{best['loss']:.4f}", f"trial {best['number']} ({best['source']})")
    for key, ref in result.references.items():
        fits = "fits" if ref["bytes"] <= result.budget else "over budget"
        summary.add_row(f"all-{key}", f"{ref['loss']:.4f}", f"{fmt_bytes(ref['bytes'])}, {fits}")
    n_done = sum(t["state"] == "COMPLETE" for t in result.trials)
    summary.add_row("trials", str(n_done), f"{result.rejected} rejected over budget this run; study {result.study_name}")
    rho = result.probe.spearman.get("all")
    summary.add_row("probe", "cached" if result.probe.cached else f"{sum(result.probe.seconds.values()):.0f} s",
                    f"Spearman(measured, estimate) {_rho(rho)}")
    summary.add_row("outputs", "", f"{result.out_dir / 'policy.yaml'}, {result.out_dir / 'search.json'}")
    out.append(summary)
    if result.interrupted:
        out.append(Text("interrupted: every finished trial is kept in the study; run the same command to continue",
                        style="yellow"))
    return out


def save_search_plot(result, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qtoolkit.checkpoint import atomic_path

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(14, 5.5), constrained_layout=True,
                                  gridspec_kw={"width_ratios": [1.4, 1]})
    done = [t for t in result.trials if t["state"] == "COMPLETE" and t["loss"] is not None]
    ax.scatter([t["bytes"] / 1e6 for t in done], [t["loss"] for t in done], s=14, color="0.6", label="trials")
    seeds = [t for t in done if t["source"].startswith("milp")]
    ax.scatter([t["bytes"] / 1e6 for t in seeds], [t["loss"] for t in seeds], s=30, marker="s", color="C1",
               label="MILP seeds")
    if result.pareto_front:
        ax.plot([p["bytes"] / 1e6 for p in result.pareto_front], [p["loss"] for p in result.pareto_front], "-o",
                color="C0", ms=4, label="Pareto front")
    for key, ref in result.references.items():
        ax.scatter([ref["bytes"] / 1e6], [ref["loss"]], marker="*", s=120, label=f"all-{key}")
    ax.axvline(result.budget / 1e6, color="k", linestyle="--", linewidth=1, label="budget")
    if result.best:
        ax.scatter([result.best["bytes"] / 1e6], [result.best["loss"]], s=120, facecolors="none", edgecolors="r",
                   linewidths=2, label="chosen")
    ax.set_xlabel("packed model size (MB)")
    ax.set_ylabel("validation loss")
    ax.set_title("Search trials: size vs loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    if result.best:
        space = result.space
        keys = space.keys
        alloc = result.best["allocation"]
        blocks = sorted({u.block for u in space.units if u.block is not None})
        cols = []
        for u in space.units:
            if u.block is not None and u.name.split(".", 2)[2] not in cols:
                cols.append(u.name.split(".", 2)[2])
        grid = np.full((len(blocks), len(cols)), np.nan)
        for i, b in enumerate(blocks):
            for j, c in enumerate(cols):
                name = f"blocks.{b}.{c}"
                if name in alloc:
                    grid[i, j] = keys.index(alloc[name])
        cmap = matplotlib.colormaps["viridis"].resampled(len(keys))
        im = ax2.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(keys) - 0.5, aspect="auto")
        ax2.set_xticks(range(len(cols)))
        ax2.set_xticklabels([c.replace("attn.", "").replace("mlp.", "").replace("_proj", "") for c in cols])
        ax2.set_yticks(range(len(blocks)))
        ax2.set_yticklabels([str(b) for b in blocks])
        ax2.set_ylabel("block")
        cb = fig.colorbar(im, ax=ax2, ticks=range(len(keys)))
        cb.ax.set_yticklabels(keys)
        others = ", ".join(f"{u.name}: {alloc[u.name]}" for u in space.units if u.block is None)
        ax2.set_title(f"Chosen formats ({fmt_bytes(result.best['bytes'])})\n{others}", fontsize=9)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)

# ------------------------------------------------------------------------------ inference


def stream_generation(prompt: str, pieces, out: Console = console) -> None:
    """The prompt (bold), then each generated text piece as soon as it arrives."""
    out.print(Text(prompt, style="bold"), end="", soft_wrap=True)
    for piece in pieces:
        out.print(Text(piece), end="", soft_wrap=True)
        out.file.flush()
    out.print()
    out.file.flush()


def generation_summary(stats, backend) -> Text:
    """One line: token counts, prefill and decode speed, and which kernel path ran."""
    decode = f"{stats.decode_tok_s:.1f} tokens/s" if math.isfinite(stats.decode_tok_s) else "-"
    end = ", stopped at end-of-text" if stats.stopped_at_eos else ""
    return Text(f"{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new{end} | prefill "
                f"{stats.prefill_tok_s:.0f} tokens/s | decode {decode} | kernels: {backend.name} ({backend.reason})",
                style="dim")


class BenchProgress:
    """A `run_bench` progress callback: a spinner naming the variant being measured."""

    def __init__(self, out: Console = err_console):
        self.status = out.status("starting", spinner="dots")

    def __enter__(self) -> BenchProgress:
        self.status.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.status.__exit__(*exc)

    def __call__(self, variant: str) -> None:
        self.status.update(f"measuring [bold]{escape(variant)}[/] in its own process")


def bench_table(report) -> Table:
    """Side-by-side speed and memory of the packed model and its baselines, with packed/baseline ratios."""
    first = report.results[0]
    table = Table(title=f"Inference benchmark: {report.checkpoint}", title_justify="left", box=box.SIMPLE_HEAD)
    for col, justify in (("model", "left"), ("kernels", "left"), ("weights\nMB", "right"),
                         ("prefill\ntok/s", "right"), ("decode\ntok/s", "right"), ("decode\nms/tok", "right"),
                         ("peak RSS\nMB", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in report.results:
        table.add_row(r.variant, r.backend, f"{r.weight_bytes / 1e6:,.1f}", f"{r.prefill_tok_s:,.0f}",
                      f"{r.decode_tok_s:,.1f}", f"{r.decode_ms_per_token:.2f}", f"{r.peak_rss_bytes / 1e6:,.0f}")
    lines = []
    for name, q in report.ratios().items():
        lines.append(f"packed vs {name}: decode {q['decode_speedup']:.2f}x, prefill {q['prefill_speedup']:.2f}x, "
                     f"weights {q['weight_bytes_ratio']:.3f}x, peak RSS {q['peak_rss_ratio']:.3f}x "
                     f"({q['peak_rss_above_torch_ratio']:.3f}x above the torch import)")
    lines.append(f"{first.threads} threads; {first.new_tokens} decode steps after a {first.prompt_len}-token prompt; "
                 f"median of {len(first.decode_s)} rounds; `import torch` alone: "
                 f"{first.torch_rss_bytes / 1e6:,.0f} MB resident")
    lines.append(f"packed kernels: {first.backend} ({first.backend_reason})")
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table
