"""Matplotlib figures (PNG) of analyses and searches."""

from __future__ import annotations

import numpy as np

from qtoolkit.evaluate.analyze import TERNARY_LIKE
from qtoolkit.report.text import as_policy_text, fmt_bytes

_KIND_STYLE = {"q": "C0", "k": "C1", "v": "C2", "o": "C3", "gate": "C4", "up": "C5", "down": "C6"}
_QUANT_COLORS = {"ternary": "C0", "sherry": "C5", "tequila": "C6", "binary": "C7", "int8": "C1", "fp16": "C2",
                 "bf16": "C4", "fp32": "C3"}


def _short_layer(name: str) -> str:
    return name.replace("blocks.", "").replace("attn.", "").replace("mlp.", "").replace("_proj", "")


def _percent_limits(values: list[float], min_span: float = 0.2) -> tuple[float, float]:
    """A y range for fractions that spans at least `min_span` (20 points), so a 2-point spread looks
    like 2 points; centred on the data, inside [0, 1]."""
    lo, hi = min(values), max(values)
    pad = max((min_span - (hi - lo)) / 2, 0.1 * (hi - lo), 0.01)
    lo, hi = lo - pad, hi + pad
    if lo < 0:
        lo, hi = 0.0, min(1.0, hi - lo)
    if hi > 1:
        lo, hi = max(0.0, lo - (hi - 1)), 1.0
    return lo, hi


def _figure_title(a, other=None) -> str:
    def name(x) -> str:
        what = x.recipe or "checkpoint"
        step = f", step {x.step}" if x.step is not None else ""
        return f"{what}{as_policy_text(x.as_policy)} ({x.checkpoint}{step})"

    if other is None:
        return name(a)
    drawn = any(x.quantizer == "ternary" and x.zeros is not None for x in other.layers)
    return f"A: {name(a)}\nB: {name(other)}" + (" (dashed)" if drawn else " (no ternary layers to draw)")


def analysis_figure(a, other=None):
    """Three panels: per-block zero fraction by module kind, alpha per layer, bits per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import (
        FuncFormatter,
        MaxNLocator,
        MultipleLocator,
        NullLocator,
        PercentFormatter,
    )

    fig, axes = plt.subplots(3, 1, figsize=(11, 12), constrained_layout=True)
    fig.suptitle(_figure_title(a, other), fontsize=11)
    n_blocks = len(a.blocks)

    ax = axes[0]
    mb = a.middle_vs_boundary
    if mb:
        lo, hi = mb["middle_blocks"][0], mb["middle_blocks"][-1]
        ax.axvspan(lo - 0.5, hi + 0.5, color="0.92", label="middle blocks", zorder=0)
    ys: list[float] = []
    for kind, color in _KIND_STYLE.items():
        for analysis, style in ((a, {"marker": "o"}), (other, {"marker": "x", "linestyle": "--", "alpha": 0.6})):
            if analysis is None:
                continue
            pts = sorted((x.block, x.zeros) for x in analysis.layers
                         if x.kind == kind and x.zeros is not None and x.quantizer in TERNARY_LIKE)
            if pts:
                ys += [z for _, z in pts]
                ax.plot(*zip(*pts, strict=True), color=color, label=kind if analysis is a else None, **style)
    if mb:
        ax.axhline(mb["middle_zeros"], color="k", linestyle=":", linewidth=1,
                   label=f"middle mean {100 * mb['middle_zeros']:.1f}%")
        ax.axhline(mb["boundary_zeros"], color="0.4", linestyle="-.", linewidth=1,
                   label=f"boundary mean {100 * mb['boundary_zeros']:.1f}%")
    ax.set_xlim(-0.5, n_blocks - 0.5)  # the shading stops where the blocks do
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=0))
    if ys:
        lo, hi = _percent_limits(ys)
        ax.set_ylim(lo, hi)
        step = next(t for t in (0.01, 0.02, 0.05, 0.1, 0.2) if (hi - lo) / t <= 8)
        ax.yaxis.set_major_locator(MultipleLocator(step))
    ax.set_xlabel("block")
    ax.set_ylabel("zero codes (% of weights)")
    ax.set_title("Ternary sparsity per block and module kind", loc="left")
    if ys:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    else:
        ax.text(0.5, 0.5, "no ternary layers", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.grid(alpha=0.3)

    ax = axes[1]
    ternary = [x for x in a.layers if x.alpha and x.quantizer in TERNARY_LIKE]
    bars = any(x.alpha["count"] > 1 for x in ternary)
    if ternary:
        xs = range(len(ternary))
        means = [x.alpha["mean"] for x in ternary]
        if bars:
            err = [[m - x.alpha["min"] for m, x in zip(means, ternary, strict=True)],
                   [x.alpha["max"] - m for m, x in zip(means, ternary, strict=True)]]
            ax.errorbar(xs, means, yerr=err, fmt="o", ms=3, color="C0", ecolor="0.6", capsize=2)
        else:
            ax.plot(xs, means, "o", ms=3, color="C0")
        ax.set_xticks(list(xs))
        ax.set_xticklabels([_short_layer(x.name) for x in ternary], rotation=90, fontsize=6)
        ax.set_xlim(-0.5, len(ternary) - 0.5)
    else:
        ax.text(0.5, 0.5, "no ternary layers", transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.set_ylabel("alpha (scale)")
    ax.set_title("Ternary scale alpha per layer" + (": mean, bars min-max over rows/groups" if bars
                                                    else " (one per-tensor scale each)"), loc="left")
    ax.grid(alpha=0.3)

    ax = axes[2]
    bits = [x.bits_per_weight for x in a.layers]
    ax.bar(range(len(a.layers)), bits, color=[_QUANT_COLORS.get(x.quantizer, "0.5") for x in a.layers])
    ent = [(i, x.entropy_bits) for i, x in enumerate(a.layers) if x.entropy_bits is not None]
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for q, c in _QUANT_COLORS.items() if any(x.quantizer == q for x in a.layers)]
    labels = [q for q in _QUANT_COLORS if any(x.quantizer == q for x in a.layers)]
    if ent:
        (line,) = ax.plot(*zip(*ent, strict=True), "k_", markersize=8)
        handles.append(line)
        labels.append("code entropy (lower bound)")
    ax.set_xticks(range(len(a.layers)))
    ax.set_xticklabels([_short_layer(x.name) for x in a.layers], rotation=90, fontsize=6)
    ax.set_xlim(-0.5, len(a.layers) - 0.5)
    ax.set_yscale("log", base=2)
    low = min(bits + [v for _, v in ent if v > 0])
    ax.set_ylim(max(low / 1.5, 0.05), max(bits) * 1.5)  # the axis fits the data
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("bits per weight (stored, log scale)")
    ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    ax.set_title(f"Bits per weight per layer: total {fmt_bytes(a.totals['bytes'])}, "
                 f"{a.totals['compression_vs_fp32']:.2f}x smaller than fp32", loc="left")
    ax.grid(alpha=0.3, axis="y")
    return fig


def save_analysis_plot(a, path, other=None) -> None:
    import matplotlib.pyplot as plt

    from qtoolkit.checkpoint import atomic_path

    fig = analysis_figure(a, other)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=130)
    plt.close(fig)


def _size_unit(nbytes: float) -> tuple[str, float]:
    """One decimal unit for every size in a figure (axis and titles alike): kB, MB or GB."""
    for unit, div in (("GB", 1e9), ("MB", 1e6)):
        if nbytes >= div:
            return unit, div
    return "kB", 1e3


def _optuna_axes(draw):
    """An Axes drawn by `optuna.visualization.matplotlib` (`draw()`), with matplotlib's settings
    restored afterwards (optuna switches the global style to ggplot) and its look matched to ours."""
    import warnings

    import matplotlib

    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ExperimentalWarning: the matplotlib backend is marked experimental
        ax = draw()
    ax.set_facecolor("white")
    ax.grid(alpha=0.3, color="0.5")
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color("0.2")
    return ax


def search_figure(result):
    """Size vs loss of every trial, the chosen formats per layer, and (single objective) optuna's
    optimization history.

    Left: evaluated trials (dots), the best loss reachable at each size (a staircase), MILP seeds
    (hollow squares), uniform references (stars; faint when over budget), trials the sampler
    proposed over the budget and which were never evaluated (a faint rug at their sizes), the budget
    and the chosen trial. With --pareto the trial scatter and its front are optuna's
    `plot_pareto_front`. Right: the chosen allocation per block and layer. Bottom (single objective):
    optuna's `plot_optimization_history`. Sizes share one unit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization.matplotlib import plot_optimization_history, plot_pareto_front

    trials = result.trials
    sizes = [t["bytes"] for t in trials if t["bytes"] is not None] + [r["bytes"] for r in result.references.values()]
    unit, div = _size_unit(max(sizes + [result.budget]))
    study = result.study
    done = [t for t in trials if t["state"] == "COMPLETE" and t["loss"] is not None]
    fits = [t for t in done if t["bytes"] <= result.budget]

    if study is not None and result.pareto:
        ax = _optuna_axes(lambda: plot_pareto_front(
            study, targets=lambda t: (t.values[0] / div, t.values[1]),
            target_names=[f"packed model size ({unit})", "validation loss"]))
        ax.set_title("")
        names = {"Trial": "evaluated trials", "Best Trial": "Pareto front (optuna)"}
        for artist in ax.collections:
            artist.set_label(names.get(artist.get_label(), artist.get_label()))
        fig, hist = ax.figure, None
    elif study is not None and done:
        hist = _optuna_axes(lambda: plot_optimization_history(study, target_name="validation loss"))
        fig, ax = hist.figure, None
    else:
        fig, ax, hist = plt.figure(), None, None
    fig.set_size_inches(14, 10 if hist is not None else 5.5)
    fig.set_layout_engine("constrained")
    grid = fig.add_gridspec(2 if hist is not None else 1, 2, width_ratios=[1.4, 1],
                            height_ratios=[1.3, 1] if hist is not None else None)
    if ax is None:
        ax = fig.add_subplot(grid[0, 0])
    else:
        ax.set_subplotspec(grid[0, 0])
    ax2 = fig.add_subplot(grid[0, 1])
    if hist is not None:
        hist.set_subplotspec(grid[1, :])
        hist.set_title("")
        hist.set_title("Optimization history (optuna): validation loss of each evaluated trial and the best so far",
                       loc="left")
        hist.set_xlabel("trial number (over-budget proposals are numbered too, but never evaluated)")
        hist.legend(fontsize=8, loc="upper right", framealpha=0.9, facecolor="white")

    if not result.pareto:
        over = [t for t in done if t["bytes"] > result.budget]
        ax.scatter([t["bytes"] / div for t in fits], [t["loss"] for t in fits], s=14, color="0.45",
                   label="evaluated trials", zorder=2)
        if over:
            ax.scatter([t["bytes"] / div for t in over], [t["loss"] for t in over], s=14, color="0.45", alpha=0.25,
                       label="evaluated, over budget", zorder=2)
        if result.pareto_front:
            ax.plot([p["bytes"] / div for p in result.pareto_front], [p["loss"] for p in result.pareto_front],
                    drawstyle="steps-post", color="C0", linewidth=1.2, label="best loss at each size", zorder=1)
        seeds = [t for t in done if t["source"].startswith("milp")]
        ax.scatter([t["bytes"] / div for t in seeds], [t["loss"] for t in seeds], s=70, marker="s",
                   facecolors="none", edgecolors="C1", linewidths=1.5, label="MILP seeds", zorder=3)
    rejected = [t["bytes"] / div for t in trials if t["state"] == "PRUNED" and t["bytes"] is not None]
    if rejected:  # a rug on the x axis: where the sampler proposed allocations that do not fit
        ax.plot(rejected, [0.0] * len(rejected), "|", color="C3", alpha=0.25, markersize=14,
                transform=ax.get_xaxis_transform())
        ax.plot([], [], "|", color="C3", alpha=0.6, markersize=10, linestyle="none",
                label=f"proposed over budget, not evaluated ({len(rejected)})")
    for i, (key, ref) in enumerate(result.references.items()):
        fits_budget = ref["bytes"] <= result.budget
        ax.scatter([ref["bytes"] / div], [ref["loss"]], marker="*", s=160, color=f"C{i + 2}",
                   alpha=1.0 if fits_budget else 0.35, edgecolors="k" if fits_budget else "none", linewidths=0.5,
                   label=f"all-{key}" + ("" if fits_budget else " (over budget)"), zorder=4)
    ax.axvline(result.budget / div, color="k", linestyle="--", linewidth=1, label=f"budget {fmt_bytes(result.budget)}")
    if result.best:
        ax.scatter([result.best["bytes"] / div], [result.best["loss"]], s=260, facecolors="none", edgecolors="r",
                   linewidths=2, label=f"chosen (trial {result.best['number']})", zorder=5)
    ax.set_xlabel(f"packed model size ({unit})")
    ax.set_ylabel("validation loss")
    ax.set_title("Search trials: size vs loss", loc="left")
    ax.legend(fontsize=8, loc="upper right", framealpha=0.9)
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
        grid_ = np.full((len(blocks), len(cols)), np.nan)
        for i, b in enumerate(blocks):
            for j, c in enumerate(cols):
                name = f"blocks.{b}.{c}"
                if name in alloc:
                    grid_[i, j] = keys.index(alloc[name])
        cmap = matplotlib.colormaps["viridis"].resampled(len(keys))
        im = ax2.imshow(grid_, cmap=cmap, vmin=-0.5, vmax=len(keys) - 0.5, aspect="auto")
        ax2.set_xticks(range(len(cols)))
        ax2.set_xticklabels([c.replace("attn.", "").replace("mlp.", "").replace("_proj", "") for c in cols])
        ax2.set_yticks(range(len(blocks)))
        ax2.set_yticklabels([str(b) for b in blocks])
        ax2.set_ylabel("block")
        cb = fig.colorbar(im, ax=ax2, ticks=range(len(keys)))
        cb.ax.set_yticklabels(keys)
        others = ", ".join(f"{u.name}: {alloc[u.name]}" for u in space.units if u.block is None)
        ax2.set_title(f"Chosen formats ({result.best['bytes'] / div:.2f} {unit})\n{others}", fontsize=10)
    else:
        ax2.axis("off")
        ax2.text(0.5, 0.5, "no trial within the budget yet", ha="center", va="center", color="0.4")
    return fig


def save_search_plot(result, path) -> None:
    import matplotlib.pyplot as plt

    from qtoolkit.checkpoint import atomic_path

    fig = search_figure(result)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
