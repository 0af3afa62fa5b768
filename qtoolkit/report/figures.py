"""Matplotlib figures (PNG) of analyses and searches."""

from __future__ import annotations

import numpy as np

from qtoolkit.evaluate.analyze import TERNARY_LIKE
from qtoolkit.report.text import fmt_bytes

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
        pts = sorted((x.block, x.zeros) for x in a.layers if x.kind == kind and x.zeros is not None and x.quantizer in TERNARY_LIKE)
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=kind)
        if other is not None:
            opts = sorted((x.block, x.zeros) for x in other.layers if x.kind == kind and x.zeros is not None
                          and x.quantizer in TERNARY_LIKE)
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
    ternary = [x for x in a.layers if x.alpha and x.quantizer in TERNARY_LIKE]
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
    colors = {"ternary": "C0", "sherry": "C5", "tequila": "C6", "binary": "C7", "int8": "C1", "fp16": "C2",
              "bf16": "C4", "fp32": "C3"}
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
