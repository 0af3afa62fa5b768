"""Markdown and one-file HTML reports."""

from __future__ import annotations

from qtoolkit.report.figures import analysis_figure
from qtoolkit.report.text import (
    GROUP_COLUMNS,
    LAYER_COLUMNS,
    _analysis_heading,
    _num,
    _pct,
    methods_text,
    middle_boundary_text,
    spec_text,
    totals_text,
)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def analysis_markdown(a, other=None) -> str:
    parts = [f"# Quantization analysis\n\n{_analysis_heading(a)}\n", f"{middle_boundary_text(a)}.\n",
             f"{totals_text(a)}.\n", *(f"{line}.\n" for line in methods_text(a)), "## By block\n"]
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
            f"<p>{html.escape(totals_text(a))}</p>"
            + "".join(f"<p>{html.escape(line)}</p>" for line in methods_text(a))
            + f"<img src='data:image/png;base64,{img}' alt='analysis plots'>"
            f"<h2>By block</h2>{blocks}<h2>By module kind</h2>{kinds}<h2>Layers</h2>{layers}</body></html>")


# ------------------------------------------------------------------------------ probes and search
