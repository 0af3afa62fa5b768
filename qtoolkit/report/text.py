"""Shared terminal objects and formatting helpers of the report layer."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape

from qtoolkit import quantizers

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
    defaults = quantizers.canonical(spec["name"])
    opts = ", ".join(f"{k}={v}" for k, v in spec.items() if k != "name" and defaults.get(k) != v)
    return f"{spec['name']}({opts})" if opts else spec["name"]


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


def _rho(x: float | None) -> str:
    return "-" if x is None else f"{x:+.3f}"
