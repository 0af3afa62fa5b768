"""Rich tables and summaries that the CLI prints after a command."""

from __future__ import annotations

import math
import re
from typing import Any

from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qtoolkit.deploy.bench import SPREAD_WARN
from qtoolkit.policy import Coverage
from qtoolkit.report.text import (
    GROUP_COLUMNS,
    GROUP_LEGEND,
    TERMINAL_LAYER_COLUMNS,
    TERMINAL_LAYER_LEGEND,
    _analysis_heading,
    _num,
    _pct,
    _rho,
    _shape,
    compare_rows,
    fmt_bytes,
    human_count,
    methods_text,
    middle_boundary_text,
    outputs_text,
    spec_short,
    spec_text,
    totals_text,
)


def policy_warnings_text(warnings) -> str:
    """Policy rules that assign nothing on this model, one line each (empty if none)."""
    return "\n".join(f"[yellow]warning:[/] policy rule {escape(k)} {escape(m)}" for k, m in warnings)


def coverage_table(coverage: Coverage, title: str = "Policy coverage") -> Table:
    """Groups layers with the same quantizer spec and rule into one row; warnings as the caption."""
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
    if coverage.warnings:
        table.caption = policy_warnings_text(coverage.warnings)
        table.caption_justify = "left"
    return table


def train_summary(result, extra_outputs=()) -> Table:
    table = Table(title="Training summary", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
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
        ("outputs", outputs_text([*result.outputs(), *extra_outputs])),
    ]
    for k, v in rows:
        table.add_row(k, escape(v))
    return table


def eval_summary(result, extra_outputs=()) -> Table:
    table = Table(title="Evaluation", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    rows = [
        ("checkpoint", f"{result.checkpoint} (step {result.step})"),
        ("data", result.data),
        ("tokens scored", f"{result.val_tokens:,}" + (" (every token of the data)" if result.whole else "")),
        ("val loss", f"{result.val_loss:.4f}"),
        ("val perplexity", f"{result.val_ppl:.2f}"),
    ]
    if extra_outputs:
        rows.append(("outputs", outputs_text(extra_outputs)))
    for k, v in rows:
        table.add_row(k, escape(v))
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
    """Rows: {"name", "spec" (default options), "bits_per_weight_768x768", optional "alias_of" and
    "calibration"}; an alias shows the options that differ from its quantizer's defaults."""
    table = Table(title="Quantizers", title_justify="left")
    for col in ("name", "default options", "bits/weight (768x768)", "data"):
        table.add_column(col, overflow="fold", justify="right" if col.startswith("bits") else "left")
    defaults = {r["name"]: r["spec"] for r in rows if not r.get("alias_of")}
    for r in rows:
        if r.get("alias_of"):
            base = defaults.get(r["alias_of"], {})
            opts = f"= {r['alias_of']} " + (", ".join(f"{k}={v}" for k, v in r["spec"].items()
                                                       if k != "name" and base.get(k) != v) or "(defaults)")
        else:
            opts = ", ".join(f"{k}={v}" for k, v in r["spec"].items() if k != "name") or "-"
        table.add_row(r["name"], escape(opts), f"{r['bits_per_weight_768x768']:.4f}",
                      "calibrates" if r.get("calibration") else "")
    return table


PLAN_ROWS = 200  # a plan with more layer rows groups them across blocks unless --full


def plan_table(plan, title: str, full: bool = False) -> Table:
    """Per-layer bytes of a MemoryPlan; small fp32 parameters (norms) in one row unless `full`, and
    layers grouped across blocks when there are more than PLAN_ROWS of them."""
    table = Table(title=title, title_justify="left")
    table.add_column("layer", no_wrap=True)
    for col, justify in (("shape", "right"), ("quantizer", "left"), ("bits/weight", "right"), ("bytes", "right")):
        table.add_column(col, justify=justify)
    rest = []
    layers = [e for e in plan.entries if full or e.kind != "param"]
    rest = [e for e in plan.entries if not full and e.kind == "param"]
    if not full and len(layers) > PLAN_ROWS:  # thousands of layers: one row per (module, format) over blocks
        groups: dict[tuple, list] = {}
        for e in layers:
            key = (re.sub(r"^blocks\.\d+\.", "blocks.*.", e.name), e.shape,
                   f"tied to {e.tied_to}" if e.tied_to else spec_text(e.spec))
            groups.setdefault(key, []).append(e)
        for (name, shape, quant), members in groups.items():
            label = f"{name} (x{len(members)})" if len(members) > 1 else members[0].name
            table.add_row(label, _shape(shape), quant, f"{float(members[0].bits_per_weight):.4f}",
                          f"{sum(e.nbytes for e in members):,}")
    else:
        for e in layers:
            quant = f"tied to {e.tied_to}" if e.tied_to else spec_text(e.spec)
            table.add_row(e.name, _shape(e.shape), quant, f"{float(e.bits_per_weight):.4f}", f"{e.nbytes:,}")
    if rest:
        n, b = sum(e.params for e in rest), sum(e.nbytes for e in rest)
        table.add_row(f"{len(rest)} norm weights", f"{n:,}", "fp32", f"{8 * b / n:.4f}", f"{b:,}")
    table.add_section()
    table.add_row("[bold]total", f"{plan.params:,}", "", f"{8 * plan.total_bytes / plan.params:.4f}",
                  f"[bold]{plan.total_bytes:,}")
    by_q = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in plan.bytes_by_quantizer().items())
    if plan.correction_bytes:
        by_q += f"; of which low-rank corrections {fmt_bytes(plan.correction_bytes)}"
    table.caption = (f"{fmt_bytes(plan.total_bytes)} ({by_q}) vs {fmt_bytes(plan.fp32_bytes)} in fp32: "
                     f"{plan.compression:.2f}x smaller")
    if plan.warnings:
        table.caption += "\n" + policy_warnings_text(plan.warnings)
    table.caption_justify = "left"
    return table


def pack_summary(result, extra_outputs=()) -> Table:
    table = Table(title="Packed checkpoint", title_justify="left", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(overflow="fold")
    exact = "[green]== predicted[/]" if result.tensor_bytes == result.predicted_bytes else "[red]!= predicted[/]"
    for k, v, note in (
        ("predicted", f"{result.predicted_bytes:,} B", f"{fmt_bytes(result.predicted_bytes)} (the memory model, qtool plan)"),
        ("packed tensors", f"{result.tensor_bytes:,} B", exact),
        ("file size", f"{result.file_bytes:,} B", fmt_bytes(result.file_bytes)),
        ("header", f"{result.overhead_bytes:,} B", "metadata: config, policy, layers, tokenizer"),
        ("fp32 model", f"{result.fp32_bytes:,} B", f"{result.fp32_bytes / result.predicted_bytes:.2f}x larger"),
        ("outputs", "", escape(outputs_text([result.path, *extra_outputs]))),
    ):
        table.add_row(k, v, note)
    return table


# ------------------------------------------------------------------------------ analysis


def analysis_renderables(a, full: bool = False) -> list:
    out: list = [Text(_analysis_heading(a), style="bold")]
    if full:
        table = Table(title="Layers", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                      caption=TERMINAL_LAYER_LEGEND, caption_justify="left")
        for header, _ in TERMINAL_LAYER_COLUMNS:
            table.add_column(header, no_wrap=header == "layer", justify="left" if header in ("layer", "quant") else "right")
        for x in a.layers:
            table.add_row(*(escape(fn(x)) for _, fn in TERMINAL_LAYER_COLUMNS))
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
    out += [Text(line) for line in methods_text(a)]
    return out


def compare_table(a, b) -> Table:
    """A and B layer by layer; readable at 100-120 columns (quantizers by name and non-default values)."""
    table = Table(title=f"A: {escape(_analysis_heading(a))}\nB: {escape(_analysis_heading(b))}", title_justify="left",
                  box=box.SIMPLE_HEAD, pad_edge=False)
    headers, rows, total = compare_rows(a, b, spec_short)
    for col in headers:
        table.add_column(col.replace("quantizer", "quant"), justify="left" if col.startswith(("layer", "quantizer"))
                         else "right", no_wrap=col == "layer")
    for r in rows:
        table.add_row(*(escape(c) for c in r))
    table.add_section()
    table.add_row(*total)
    table.caption = "bits = stored bits per weight (scales included); zeros = share of zero ternary codes; d zeros = B - A in points"
    table.caption_justify = "left"
    return table


def probe_table(result, full: bool = False, outputs=()) -> Table:
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
    if outputs:
        table.caption += f"\n[bold]outputs:[/] {escape(outputs_text(outputs))}"
    return table


_FORMAT_COLORS = {"ternary": "cyan", "sherry": "blue", "tequila": "magenta", "binary": "bright_blue", "int8": "yellow",
                  "fp16": "green", "bf16": "green", "fp32": "red"}


def search_renderables(result, extra_outputs=()) -> list:
    out: list = []
    space = result.space
    if result.best is None:
        out.append(Text("no completed trial within the budget yet", style="bold red"))
        out.append(Text.assemble(("outputs: ", "bold"), outputs_text([*result.outputs(), *extra_outputs])))
        return out
    alloc = result.best["allocation"]
    blocks = sorted({u.block for u in space.units if u.block is not None})
    kinds = []
    for u in space.units:
        if u.block is not None:
            kind = u.name.split(".", 2)[2]
            if kind not in kinds:
                kinds.append(kind)
    grid = Table(title="Chosen format per unit", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                 min_width=len("Chosen format per unit"))  # the title never wraps above a narrow grid
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
    summary.add_column(overflow="fold")
    best = result.best
    summary.add_row("budget", f"{result.budget:,} B", fmt_bytes(result.budget))
    if result.no_search is not None:
        return [*out, *_no_search_rows(result, summary, extra_outputs)]
    summary.add_row("chosen policy", f"{best['bytes']:,} B",
                    f"{100 * best['bytes'] / result.budget:.1f}% of budget; smallest reachable {fmt_bytes(result.min_bytes)}")
    noise = getattr(result, "noise", {}) or {}
    se = f"+- {noise['se']:.4f} (SE over {noise['batches']} batches); " if noise.get("se") is not None else ""
    summary.add_row("validation loss", f"{best['loss']:.4f}",
                    se + (f"trial {best['number']} ({best['source']})" if best["number"] is not None
                          else f"{best['source']} (no searched allocation that fits did better)"))
    for key, ref in result.references.items():
        fits = "fits" if ref["bytes"] <= result.budget else "over budget"
        summary.add_row(f"all-{key}", f"{ref['loss']:.4f}",
                        f"{fmt_bytes(ref['bytes'])}, {fits}" + _versus(noise.get("versus", {}).get(key)))
    ties = [f"all-{f}" for f, c in noise.get("versus", {}).items() if c["fits"] and c["verdict"] == "tied"]
    if ties:
        summary.add_row("[yellow]tied[/]", "", f"[yellow]the chosen policy is statistically tied with {', '.join(ties)}: "
                        "its lower loss is within the noise of the validation batches (more --eval-batches "
                        "would tell)[/]")
    n_done = sum(t["state"] == "COMPLETE" for t in result.trials)
    over = (f"{result.repaired} proposals over budget repaired into it, {result.repeats} repeats not re-evaluated"
            if result.repaired or result.repeats or not result.rejected else f"{result.rejected} rejected over budget")
    summary.add_row("trials", str(n_done), f"target {result.trials_target}; {over} this run; study {result.study_name}")
    rho = result.probe.spearman.get("all")
    summary.add_row("probe", "cached" if result.probe.cached else f"{sum(result.probe.seconds.values()):.0f} s",
                    f"Spearman(measured, estimate) {_rho(rho)}")
    summary.add_row("outputs", "", escape(outputs_text([*result.outputs(), *extra_outputs])))
    for kind, applied in getattr(result, "applied", {}).items():
        loss = f"{applied['loss']:.4f}" if applied.get("loss") is not None else ""
        summary.add_row(f"applied: {kind}", loss, f"{escape(applied['path'])} ({fmt_bytes(applied['bytes'])} packed)")
    out.append(summary)
    out.append(Text.assemble(("browse the trials: ", "bold"), f"optuna-dashboard {result.storage}"))
    if result.interrupted:
        out.append(Text("interrupted: every finished trial is kept in the study; run the same command to continue",
                        style="yellow"))
    return out


def _versus(c) -> str:
    """The chosen policy against one uniform reference (`search.noise.compare`), in words."""
    if not c:
        return ""
    if c["verdict"] == "untested":
        return f"; chosen lower by {c['diff']:.4f} (no noise estimate: one batch)"
    margin = f"{abs(c['diff']):.4f} vs noise {c['threshold']:.4f}"
    return {"better": f"; chosen better by {margin}", "worse": f"; chosen worse by {margin}",
            "tied": f"; statistically tied ({margin})"}[c["verdict"]]


def _no_search_rows(result, summary: Table, extra_outputs) -> list:
    """The budget held the most accurate allocation: what was chosen, why, and what would use the room."""
    best = result.best
    summary.add_row("chosen policy", f"{best['bytes']:,} B",
                    f"{100 * best['bytes'] / result.budget:.1f}% of budget; {escape(result.no_search['reason'])}")
    for kind, applied in getattr(result, "applied", {}).items():
        loss = f"{applied['loss']:.4f}" if applied.get("loss") is not None else ""
        summary.add_row(f"applied: {kind}", loss, f"{escape(applied['path'])} ({fmt_bytes(applied['bytes'])} packed)")
    summary.add_row("outputs", "", escape(outputs_text([*result.outputs(), *extra_outputs])))
    out: list = [summary]
    larger = result.no_search.get("larger") or []
    if larger:
        keys = result.space.keys
        parts = [f"all-{x['format']} is {fmt_bytes(x['bytes'])} ({'fits' if x['fits'] else 'over budget'})" for x in larger]
        out.append(Text.assemble(
            ("room left: ", "bold"),
            f"{fmt_bytes(result.budget - best['bytes'])} of the budget is unused. Larger formats would use it: "
            + "; ".join(parts) + ". To let the search use the room, add them as candidates: --formats "
            + ",".join([*keys, *(x["format"] for x in larger)])))
    return out


def quantize_summary(result) -> Table:
    """After `qtool quantize`: where it went, what it costs, what calibration did."""
    table = Table(title="Quantized checkpoint", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    cal = result.calibration
    if cal.get("layers"):
        calibration = (f"{len(cal['layers'])} layers", f"{cal.get('tokens', 0):,} tokens, seed {cal.get('seed')}, "
                       f"{cal['segments']} segments, {cal['seconds']:.1f} s")
    else:
        calibration = ("not needed", "no quantizer in this policy fits itself on data")
    for k, v, note in (
        ("written", escape(str(result.path)), f"from {escape(result.source)}"),
        ("packed size", f"{result.total_bytes:,} B", f"{fmt_bytes(result.total_bytes)}, "
                                                     f"{result.fp32_bytes / result.total_bytes:.2f}x smaller than fp32"),
        ("calibration", *calibration),
        ("kept trained state", str(len(result.adopted)), ", ".join(result.adopted[:4]) + (" ..." if len(result.adopted) > 4 else "")),
        ("time", f"{result.seconds:.1f} s", ""),
    ):
        table.add_row(k, v, note)
    table.caption = f"next: qtool eval {result.path.parent}  |  qtool pack {result.path.parent}  |  qtool train --init {result.path.parent}"
    return table


def generation_summary(stats, backend) -> Text:
    """One line: token counts, prefill and decode speed, and which kernel path ran."""
    decode = f"{stats.decode_tok_s:.1f} tokens/s" if math.isfinite(stats.decode_tok_s) else "-"
    end = ", stopped at end-of-text" if stats.stopped_at_eos else ""
    return Text(f"{stats.prompt_tokens} prompt tokens, {stats.new_tokens} new{end} | prefill "
                f"{stats.prefill_tok_s:.0f} tokens/s | decode {decode} | kernels: {backend.name} ({backend.reason})",
                style="dim")


def _rate(x: float) -> str:
    """Compact tokens/s for the range columns: 883, 8.7k, 114k."""
    return f"{x:.0f}" if x < 1e3 else f"{x / 1e3:.1f}k" if x < 1e4 else f"{x / 1e3:.0f}k"


def bench_table(report, extra_outputs=()) -> Table:
    """Side-by-side speed and memory of the packed model and its baselines (fits 80 columns): the
    median round with the slowest and fastest beside it, packed/baseline ratios, adjustments made
    to the request and a warning when rounds differ widely."""
    first = report.results[0]
    table = Table(title=f"Inference benchmark: {escape(report.checkpoint)}", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    for col, justify in (("model", "left"), ("weights\nMB", "right"), ("prefill\ntok/s", "right"),
                         ("prefill\nmin-max", "right"), ("decode\ntok/s", "right"), ("decode\nmin-max", "right"),
                         ("peak RSS\nMB", "right")):
        table.add_column(col, justify=justify, no_wrap=True)
    for r in report.results:
        (plo, phi), (dlo, dhi) = r.prefill_tok_s_range, r.decode_tok_s_range
        table.add_row(r.variant, f"{r.weight_bytes / 1e6:,.1f}", f"{r.prefill_tok_s:,.0f}",
                      f"[dim]{_rate(plo)}-{_rate(phi)}[/]", f"{r.decode_tok_s:,.1f}", f"[dim]{_rate(dlo)}-{_rate(dhi)}[/]",
                      f"{r.peak_rss_bytes / 1e6:,.0f}")
    lines = []
    for name, q in report.ratios().items():
        lines.append(f"packed vs {name}: decode {q['decode_speedup']:.2f}x, prefill {q['prefill_speedup']:.2f}x, "
                     f"weights {q['weight_bytes_ratio']:.3f}x, peak RSS {q['peak_rss_ratio']:.3f}x "
                     f"({q['peak_rss_above_torch_ratio']:.3f}x above the torch import)")
    lines.append(f"{first.threads} threads; {first.new_tokens} decode steps after a {first.prompt_len}-token prompt; "
                 f"median of {len(first.decode_s)} rounds, slowest-fastest beside it; `import torch` alone: "
                 f"{first.torch_rss_bytes / 1e6:,.0f} MB resident")
    lines.append(f"packed kernels: {first.backend} ({first.backend_reason})")
    lines = [escape(x) for x in lines]
    lines += [f"[yellow]note:[/] {escape(n)}" for n in report.notes]
    noisy = [r for r in report.results if r.spread() > SPREAD_WARN]
    if noisy:
        each = ", ".join(f"{r.variant} {r.spread():.1f}x" for r in noisy)
        lines.append(f"[yellow]warning:[/] rounds differ widely ({escape(each)}, slowest/fastest): the machine is "
                     "busy or throttling; compare medians with care, or rerun with more --repeats")
    if extra_outputs:
        lines.append(f"[bold]outputs:[/] {escape(outputs_text(extra_outputs))}")
    table.caption = "\n".join(lines)
    table.caption_justify = "left"
    return table


# ------------------------------------------------------------------------------ interop


def import_summary(result) -> Table:
    """What `qtool import` read and wrote."""
    cfg = result.config
    table = Table(title="Imported Hugging Face model", title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    gqa = f", {cfg.n_kv_heads} k/v heads" if cfg.n_kv_heads != cfg.n_heads else ""
    for k, v in (
        ("source", f"{result.source['path']} ({result.source['model_type']}, {result.source['dtype']})"),
        ("model", f"{cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads{gqa}, d_ff {cfg.d_ff}, "
                  f"vocab {cfg.vocab_size}, context {cfg.max_seq_len}, rope theta {cfg.rope_theta:g}"
                  + (", tied head" if cfg.tie_embeddings else "")),
        ("parameters", f"{human_count(result.params)} ({result.params:,})"),
        ("tokenizer", f"{result.tokenizer_size:,} tokens (tokenizer.json kept)"),
        ("checkpoint", f"{result.path} ({fmt_bytes(result.file_bytes)}, fp32 policy: nothing quantized yet)"),
        *(("note", n) for n in result.notes),
    ):
        table.add_row(k, escape(v))
    return table


def gguf_export_table(result) -> Table:
    """Per GGML type: which qtoolkit formats went there and how; fallbacks; file vs packed bytes."""
    table = Table(title=f"GGUF export ({result.target}): {result.path}", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("GGML type", "from", "how", "tensors", "bytes"):
        table.add_column(col, justify="right" if col in ("tensors", "bytes") else "left")
    groups: dict[tuple[str, str, str], list] = {}
    for t in result.tensors:
        groups.setdefault((t.ggml_type, t.source, t.how), []).append(t)
    for (ggml_type, source, how), ts in groups.items():
        table.add_row(ggml_type, source, how, str(len(ts)), f"{sum(t.nbytes for t in ts):,}")
    errs = [t.scale_rel_err for t in result.tensors if t.scale_rel_err is not None]
    lines = [f"file {result.file_bytes:,} B ({fmt_bytes(result.file_bytes)}) | qtoolkit packed tensors: "
             f"{result.packed_bytes['2bit']:,} B 2-bit, {result.packed_bytes['base3']:,} B base-3"]
    if errs:
        lines.append(f"fp16 rounding of the scales: at most {max(errs):.2e} relative")
    for t in result.fallbacks:
        lines.append(f"fallback: {t.name} -> {t.ggml_type} ({t.fallback})")
    lines += [f"note: {n}" for n in result.notes]
    table.caption = escape("\n".join(lines))
    table.caption_justify = "left"
    return table


def hf_export_table(result) -> Table:
    """Which layers run as transformers' bitnet layers and which as dequantized float, and why."""
    table = Table(title=f"transformers export ({result.architecture}): {result.path}", title_justify="left",
                  box=box.SIMPLE_HEAD)
    for col in ("exported as", "qtoolkit format", "layers", "exact", "why"):
        table.add_column(col, justify="right" if col == "layers" else "left")
    groups: dict[tuple[str, str, bool, str], list] = {}
    for x in result.layers:
        groups.setdefault((x.how, spec_text(x.spec), x.exact, x.reason), []).append(x)
    for (how, spec, exact, reason), xs in groups.items():
        label = "bitnet (2-bit codes + alpha)" if how == "bitnet" else "float32 (modules_to_not_convert)"
        table.add_row(label, escape(spec), str(len(xs)), "yes" if exact else "[yellow]no[/]", escape(reason or "-"))
    lines = [f"directory {result.file_bytes:,} B ({fmt_bytes(result.file_bytes)}), model.safetensors "
             f"{result.weights_bytes:,} B | qtoolkit packed tensors: {result.packed_bytes:,} B",
             "embedding and norms: float32; policy and this table: README.md in the directory"]
    lines += [f"not exact: {n}" for n in result.notes]
    table.caption = escape("\n".join(lines))
    table.caption_justify = "left"
    return table


# ------------------------------------------------------------------------------ training memory

_MEMORY_PARTS = {
    "weights": "latent weights, quantizer parameters, buffers",
    "gradients": "one fp32 gradient per trainable parameter",
    "optimizer": "AdamW exp_avg + exp_avg_sq",
    "activations": "saved for the backward, one micro-batch (measured per block)",
    "logits": "the loss's working set (chunked with train.ce_chunk)",
    "runtime": "this process (interpreter, libraries)",
}


def _gib(n: float) -> str:
    return f"{n / 1024**3:.2f} GiB"


def memory_summary(plan: dict) -> str:
    """One or two lines for the start of `qtool train`: the estimate, what is available, and the
    micro-batch chosen (`plan` is `TrainingMemoryPlan.to_dict()` plus the trainer's fields)."""
    est, fitted = plan["estimate"], plan.get("fitted") or plan["estimate"]
    batch, micro = est["batch_size"], plan.get("micro_batch_size") or fitted["micro_batch_size"]
    processes = plan.get("processes", 1)
    of = f"{batch * processes} ({batch} per process)" if processes > 1 else f"{batch}"
    line = (f"memory: ~{_gib(fitted['total'])} estimated peak at micro-batch {micro} of {of} "
            f"({_gib(plan['available'])} available: {plan['available_source']})")
    if plan.get("changed"):
        line += (f"\n[yellow]the batch of {of} at once needs ~{_gib(est['total'])}: running {batch // micro} "
                 f"micro-batches of {micro} per step (train.micro_batch_size={micro}); same global batch and schedule")
    elif not plan["fits"]:
        line += (f"\n[yellow]the estimate exceeds {plan['safety']:.0%} of the available memory and "
                 "train.fit_memory is false: the run may be killed for memory")
    return line


def train_memory_table(plan: dict, title: str) -> Table:
    """The parts of a training-memory estimate (`TrainingMemoryPlan.to_dict()`), at the recipe's
    micro-batch and, when it differs, at the one that fits."""
    est, fitted = plan["estimate"], plan.get("fitted")
    show_fitted = fitted is not None and fitted["micro_batch_size"] != est["micro_batch_size"]
    table = Table(title=title, title_justify="left")
    table.add_column("part", no_wrap=True)
    table.add_column(f"micro-batch {est['micro_batch_size']}", justify="right")
    if show_fitted:
        table.add_column(f"micro-batch {fitted['micro_batch_size']}", justify="right")
    table.add_column("what")
    for part, what in _MEMORY_PARTS.items():
        row = [part, _gib(est["parts"][part])] + ([_gib(fitted["parts"][part])] if show_fitted else [])
        if part == "optimizer" and est.get("optimizer_state", "fp32") != "fp32":
            what += f" ({est['optimizer_state']} for the block linears' weights)"
        table.add_row(*row, what)
    table.add_section()
    total = ["[bold]peak (estimate)", f"[bold]{_gib(est['total'])}"] + ([f"[bold]{_gib(fitted['total'])}"]
                                                                         if show_fitted else [])
    table.add_row(*total, f"on {est['device']}; batch {est['batch_size']} x {est['seq_len']} tokens")
    table.add_row("available", _gib(plan["available"]), *([""] if show_fitted else []), plan["available_source"])
    if plan["fits"]:
        verdict = "fits"
    elif fitted is not None:
        verdict = (f"does not fit: qtool train runs {est['batch_size'] // fitted['micro_batch_size']} micro-batches "
                   f"of {fitted['micro_batch_size']} (train.micro_batch_size={fitted['micro_batch_size']})")
    else:
        verdict = ("does not fit even at micro-batch 1: set train.ce_chunk, train.activation_checkpointing, "
                   "train.optimizer_state=bf16, or a smaller seq_len or model")
    table.caption = f"{verdict} (a micro-batch fits when its estimate is at most {plan['safety']:.0%} of what is available)"
    table.caption_justify = "left"
    return table
