"""Shared terminal objects and formatting helpers of the report layer."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.text import Text

from qtoolkit import quantizers
from qtoolkit.policy import UNQUANTIZED

console = Console()
err_console = Console(stderr=True)


def error(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


def warn(message: str) -> None:
    """A one-line warning on stderr (deprecated options, policy rules that assign nothing, ...)."""
    err_console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


@contextlib.contextmanager
def stdout_to_stderr(enabled: bool = True) -> Iterator[None]:
    """Send everything `console` prints to stderr meanwhile (stdout then carries JSON alone)."""
    if not enabled:
        yield
        return
    console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # back to whatever sys.stdout is at print time


def display_path(path: str | Path, base: str | Path | None = None) -> str:
    """`path` relative to `base` (default: the working directory) when the two share a directory
    below the filesystem root (`../runs/x/ckpt.pt`), else absolute: reports name their inputs by
    paths that still work when the report moves together with them."""
    p, b = Path(path).resolve(), Path(base or ".").resolve()
    try:
        common = Path(os.path.commonpath([p, b]))
    except ValueError:  # different drives (Windows)
        return str(p)
    return os.path.relpath(p, b) if common != Path(common.anchor) else str(p)


def outputs_text(paths: Iterable[str | Path]) -> str:
    """The value of every summary's "outputs" row: the files a command wrote, comma-separated."""
    return ", ".join(str(p) for p in paths) or "-"


def print_renderables(items: Iterable[Any], out: Console | None = None) -> None:
    """Print tables and lines; lines (Text) are not wrapped by rich, so paths and commands in them
    stay whole for copy and paste (the terminal wraps them)."""
    for item in items:
        (out or console).print(item, soft_wrap=isinstance(item, Text))


def print_outputs(paths: Iterable[str | Path], stderr: bool = False) -> None:
    """An "outputs: ..." line for commands whose output has no summary table (nothing if no files)."""
    paths = list(paths)
    if paths:
        (err_console if stderr else console).print(Text.assemble(("outputs: ", "bold"), outputs_text(paths)),
                                                   soft_wrap=True)


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def spec_text(spec: dict[str, Any] | None) -> str:
    """`ternary` or `ternary(alpha=learned)`: the name plus options that differ from defaults."""
    if spec is None:
        return UNQUANTIZED  # no rule assigned it: stored as the fp32 quantizer stores weights
    defaults = quantizers.canonical(spec["name"])
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("name", "correction") and defaults.get(k) != v)
    text = f"{spec['name']}({opts})" if opts else spec["name"]
    c = spec.get("correction")
    if c:  # `ternary+lowrank(r=3)`: a low-rank gated correction, its non-default gate options after the rank
        base = quantizers.CorrectionConfig()
        extra = "".join(f", {k}={v}" for k, v in c.items() if k != "rank" and getattr(base, k) != v)
        text += f"+lowrank(r={c['rank']}{extra})"
    return text


def spec_short(spec: dict[str, Any] | None) -> str:
    """`ternary(learned, channel)`: the name plus the values of options that differ from defaults
    (narrow tables; `spec_text` names the options)."""
    if spec is None:
        return UNQUANTIZED
    defaults = quantizers.build(spec["name"]).spec()
    vals = ", ".join(str(v) for k, v in spec.items() if k != "name" and defaults.get(k) != v)
    return f"{spec['name']}({vals})" if vals else spec["name"]


def fmt_bytes(n: int | float) -> str:
    """Decimal units (1 MB = 10^6 B), as budgets are written; exact bytes live in the JSON."""
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _num(x: float | None, fmt: str = ".3f") -> str:
    return "-" if x is None else format(x, fmt)


def _sqnr(x) -> str:
    """A layer's SQNR in dB; "exact" for fp32 (no quantization error); "-" when unknown (packed)."""
    return "exact" if x.sqnr_db is None and x.quantizer == "fp32" else _num(x.sqnr_db, ".1f")


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
    ("SQNR dB", lambda x: _sqnr(x)),
]

TERMINAL_LAYER_COLUMNS = [  # `analyze --full` on a terminal: fits ~100 columns (+1/-1 and shapes in the JSON)
    ("layer", lambda x: x.name),
    ("quant", lambda x: spec_short(x.spec)),
    ("bits/w", lambda x: f"{x.bits_per_weight:.3f}"),
    ("bytes", lambda x: fmt_bytes(x.bytes)),
    ("zeros", lambda x: _pct(x.zeros)),
    ("alpha", lambda x: _num((x.alpha or {}).get("mean"), ".3g")),
    ("H b/w", lambda x: _num(x.entropy_bits, ".2f")),
    ("near", lambda x: _pct(x.near_threshold)),
    ("SQNR", lambda x: _sqnr(x)),
]
TERMINAL_LAYER_LEGEND = ("bits/w stored (scales included); zeros over codes; alpha = mean scale; "
                         "H = code entropy; near = share within the rounding band; SQNR in dB")

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
GROUP_LEGEND = ("zeros/H/near/alpha over ternary-coded weights (ternary, sherry, tequila); H = code entropy (bits/weight lower bound); "
                "near = share within the rounding band; SQNR in dB")


def as_policy_text(policy: dict[str, Any] | None) -> str:
    """", analysed as ternary" for `--as ternary`; the whole policy for a policy file; "" without --as."""
    if not policy:
        return ""
    if set(policy) == {"_default"}:
        spec = policy["_default"]
        return f", analysed as {spec if isinstance(spec, str) else spec_text(quantizers.canonical(spec))}"
    return ", analysed as " + ", ".join(f"{k}: {v if isinstance(v, str) else spec_text(quantizers.canonical(v))}"
                                          for k, v in policy.items())


def _analysis_heading(a, base: str | Path | None = None) -> str:
    """"runs/x/ckpt.pt (train, step 600, recipe ternary_all)": the path as given, or relative to a
    document's directory `base` (`display_path`)."""
    parts = [a.kind] + ([f"step {a.step}"] if a.step is not None else []) + ([f"recipe {a.recipe}"] if a.recipe else [])
    path = a.checkpoint if base is None else display_path(a.checkpoint, base)
    return f"{path} ({', '.join(parts)}){as_policy_text(a.as_policy)}"


def middle_boundary_text(a) -> str:
    mb = a.middle_vs_boundary
    if not mb:
        return "middle vs boundary: needs ternary layers in both middle and boundary blocks"
    return (f"middle blocks {mb['middle_blocks'][0]}-{mb['middle_blocks'][-1]}: {_pct(mb['middle_zeros'])} zeros; "
            f"boundary blocks: {_pct(mb['boundary_zeros'])} zeros; difference "
            f"{100 * mb['difference']:+.2f} points")


def methods_text(a) -> list[str]:
    """One line per method with statistics of its own (analysis totals["methods"])."""
    t = a.totals
    lines = []
    for name, m in (t.get("methods") or {}).items():
        parts = []
        if "groups_with_one_zero" in m:  # sherry
            where = "/".join(f"{100 * p:.1f}" for p in m.get("zero_position", []))
            parts.append(f"zeros {_pct(m['zero_fraction'])}, exactly one zero in {_pct(m['groups_with_one_zero'])} "
                         f"of the groups of 4 (zero at position 0/1/2/3: {where}%)")
        if "dead_zone" in m:  # tequila
            parts.append(f"dead zone {_pct(m['dead_zone'])} of the weights, dead-zone bias |b| mean "
                         f"{m['bias_abs_mean']:.3g} (max {m['bias_abs_max']:.3g})")
        if "correction_bytes" in m:
            parts.append(f"low-rank correction rank {m['correction_rank']:.0f}: {m['correction_bytes']:,} B "
                         f"({_pct(m['correction_share'])} of these layers' bytes), |gate| {m['gate_abs_mean']:.3g}")
        if "act_step" in m:
            parts.append(f"elastic input step {m['act_step']:.3g}, offset {m['act_offset']:+.3g} (means)")
        if parts:
            lines.append(f"{name}: " + "; ".join(parts))
    if t.get("correction_bytes"):
        lines.append(f"corrections: {t['correction_bytes']:,} B = {_pct(t['correction_share'])} of the model's bytes")
    return lines


def totals_text(a) -> str:
    t = a.totals
    return (f"total {fmt_bytes(t['bytes'])} ({t['bytes']:,} B) vs {fmt_bytes(t['fp32_bytes'])} in fp32: "
            f"{t['compression_vs_fp32']:.2f}x smaller; ternary zeros overall {_pct(t['zeros'])}")


def _rho(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"


def compare_rows(a, b, spec_fmt=spec_text) -> tuple[list[str], list[list[str]], list[str]]:
    """(headers, one row per layer both analyses have, the totals row): the comparison of A and B that
    the terminal table, the Markdown and the HTML share."""
    headers = ["layer", "quantizer A", "quantizer B", "bits A", "bits B", "zeros A", "zeros B", "d zeros",
               "SQNR A", "SQNR B"]
    other = {x.name: x for x in b.layers}
    rows = []
    for x in a.layers:
        y = other.get(x.name)
        if y is None:
            continue
        dz = None if x.zeros is None or y.zeros is None else y.zeros - x.zeros
        rows.append([x.name, spec_fmt(x.spec), spec_fmt(y.spec), f"{x.bits_per_weight:.3f}",
                     f"{y.bits_per_weight:.3f}", _pct(x.zeros), _pct(y.zeros),
                     "-" if dz is None else f"{100 * dz:+.1f}", _sqnr(x), _sqnr(y)])
    ta, tb = a.totals, b.totals
    total = ["total", fmt_bytes(ta["bytes"]), fmt_bytes(tb["bytes"]), f"{8 * ta['bytes'] / ta['params']:.3f}",
             f"{8 * tb['bytes'] / tb['params']:.3f}", _pct(ta["zeros"]), _pct(tb["zeros"]),
             "-" if ta["zeros"] is None or tb["zeros"] is None else f"{100 * (tb['zeros'] - ta['zeros']):+.1f}", "", ""]
    return headers, rows, total
