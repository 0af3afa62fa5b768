"""Markdown and one-file HTML reports.

Both name what they describe (checkpoint paths relative to the report's own directory `base`, the
recipe, the step), the qtoolkit version and the date they were made, and with a second analysis B
they carry B in full: the comparison table, both summaries and both sets of tables.
"""

from __future__ import annotations

from qtoolkit.report.figures import analysis_figure
from qtoolkit.report.text import (
    GROUP_COLUMNS,
    LAYER_COLUMNS,
    _analysis_heading,
    compare_rows,
    methods_text,
    middle_boundary_text,
    totals_text,
)


def _provenance() -> str:
    import datetime

    from qtoolkit import __version__

    return f"qtoolkit {__version__}, {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}"


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    esc = [[c.replace("|", "\\|") for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in esc]
    return "\n".join(lines)


def _sections(a) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, headers, rows) of one analysis's tables: by block, by module kind, layers."""
    return [
        ("By block", ["block"] + [h for h, _ in GROUP_COLUMNS],
         [[str(g["block"])] + [fn(g) for _, fn in GROUP_COLUMNS] for g in a.blocks]),
        ("By module kind", ["kind"] + [h for h, _ in GROUP_COLUMNS],
         [[k] + [fn(g) for _, fn in GROUP_COLUMNS] for k, g in a.kinds.items()]),
        ("Layers", [h for h, _ in LAYER_COLUMNS], [[fn(x) for _, fn in LAYER_COLUMNS] for x in a.layers]),
    ]


def analysis_markdown(a, other=None, base=None) -> str:
    """The report as GitHub Markdown; paths relative to `base` (the Markdown file's directory)."""
    named = [("A", a), ("B", other)] if other is not None else [("", a)]
    parts = ["# Quantization analysis\n", f"Made with {_provenance()}.\n"]
    for label, x in named:
        parts.append(f"{label + ': ' if label else ''}{_analysis_heading(x, base)}. {middle_boundary_text(x)}. "
                     f"{totals_text(x)}.\n")
        parts += [f"{line}.\n" for line in methods_text(x)]
    if other is not None:
        headers, rows, total = compare_rows(a, other)
        parts += ["## Comparison, A vs B\n", _md_table(headers, rows + [total]), ""]
    for label, x in named:
        for title, headers, rows in _sections(x):
            parts += [f"## {title}{' (' + label + ')' if label else ''}\n", _md_table(headers, rows), ""]
    return "\n".join(parts).rstrip() + "\n"


def analysis_html(a, other=None, base=None) -> str:
    """One self-contained HTML file: provenance, the figure, the comparison and every table of A
    (and B); paths relative to `base` (the HTML file's directory)."""
    import base64
    import html
    import io

    import matplotlib.pyplot as plt

    fig = analysis_figure(a, other)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    img = base64.b64encode(buf.getvalue()).decode()
    esc = html.escape

    def table(headers, rows, total=None):
        head = "".join(f"<th>{esc(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in rows)
        foot = "<tfoot><tr>" + "".join(f"<td>{esc(c)}</td>" for c in total) + "</tr></tfoot>" if total else ""
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>{foot}</table>"

    named = [("A", a), ("B", other)] if other is not None else [("", a)]
    about = "".join(f"<tr><th>{esc(label or 'checkpoint')}</th><td>{esc(_analysis_heading(x, base))}</td></tr>"
                    f"<tr><th></th><td>{esc(middle_boundary_text(x))}</td></tr>"
                    f"<tr><th></th><td>{esc(totals_text(x))}</td></tr>"
                    + "".join(f"<tr><th></th><td>{esc(line)}</td></tr>" for line in methods_text(x)) for label, x in named)
    body = [f"<h1>Quantization analysis</h1><p class='meta'>Made with {esc(_provenance())}</p>",
            f"<table class='about'>{about}</table>", f"<img src='data:image/png;base64,{img}' alt='analysis figure'>"]
    if other is not None:
        headers, rows, total = compare_rows(a, other)
        body.append(f"<h2>Comparison, A vs B</h2>{table(headers, rows, total)}")
    for label, x in named:
        if label:
            body.append(f"<h2>{label}: {esc(_analysis_heading(x, base))}</h2>")
        for title, headers, rows in _sections(x):
            tag = "h3" if label else "h2"
            body.append(f"<{tag}>{title}</{tag}>{table(headers, rows)}")
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px} table{border-collapse:collapse;"
             "font-size:12px;margin-bottom:1.5em} td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left} tfoot td{font-weight:bold} img{max-width:100%}"
             " table.about td,table.about th{border:none;text-align:left;font-size:14px} .meta{color:#666}")
    title = "qtoolkit analysis: " + " vs ".join(x.recipe or "checkpoint" for _, x in named)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


# ------------------------------------------------------------------------------ probes and search
