"""Report figures (matplotlib, Agg canvas, PNG bytes): per-class accuracy vs training count, gradient
ratios per method, reliability diagram, GBG group map.

Each ``*_plot`` returns PNG bytes of the Figure its ``*_figure`` builds (constrained layout, so axis labels
and tick labels do not collide; epoch axes have integer ticks; log axes plain numbers).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.axis import Axis
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

#: the gradient-ratio plot's dashed reference lines: (level, colour, legend label)
REFERENCE_LINES = (
    (1.0, "0.15", "g = 1: balanced (P = N)"),
    (0.5, "0.6", "g = 0.5: starved (under-compensated) below"),
)
MAX_CLASS_LABELS = 40  # class tick labels on a 7-inch axis before they are thinned
MAX_CELL_TEXT = 24  # classes up to which heatmap cells print their value


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _plain_log_ticks(axis: Axis) -> None:
    """Log-axis ticks at 1, 2, 5 x 10^k written as plain numbers (``20``, not ``2 x 10^1``)."""
    axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _class_ticks(ax: Any, order: Sequence[int], counts: Sequence[int], fontsize: float, limit: int) -> None:
    """x ticks = the classes (labelled by training count), every k-th one when there are over ``limit``."""
    step = max(1, math.ceil(len(order) / limit))
    idx = list(range(0, len(order), step))
    ax.set_xticks(idx, [str(counts[order[i]]) for i in idx], fontsize=fontsize, rotation=90)


def _log_norm(counts: Sequence[int]) -> Any:
    from matplotlib import colors

    lo, hi = max(min(counts), 1), max(max(counts), 1)
    return colors.LogNorm(vmin=lo, vmax=hi if hi > lo else lo * 1.01)


def per_class_accuracy_plot(curves: dict[str, Sequence[float | None]], counts: Sequence[int]) -> bytes:
    """PNG of :func:`per_class_accuracy_figure`."""
    return _png(per_class_accuracy_figure(curves, counts))


def per_class_accuracy_figure(curves: dict[str, Sequence[float | None]], counts: Sequence[int]) -> Figure:
    """Per-class test accuracy (mean over seeds) against training count: one line per method (log x), or
    a methods x classes heatmap with the values printed when there are more than six methods."""
    if len(curves) > 6:
        return _per_class_heatmap(curves, counts)
    fig = Figure(figsize=(7, 4), layout="constrained")
    ax = fig.add_subplot()
    order = sorted(range(len(counts)), key=lambda j: -counts[j])
    xs = [counts[j] for j in order]
    for label, acc in curves.items():
        ax.plot(
            xs,
            [100 * acc[j] if acc[j] is not None else math.nan for j in order],
            marker="o",
            ms=3,
            lw=1.2,
            label=label,
        )
    ax.set_xscale("log")
    ax.invert_xaxis()
    _plain_log_ticks(ax.xaxis)
    ax.set_xlabel("training images of the class (log scale, head → tail)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return fig


def _per_class_heatmap(curves: dict[str, Sequence[float | None]], counts: Sequence[int]) -> Figure:
    order = sorted(range(len(counts)), key=lambda j: -counts[j])
    labels = list(curves)
    matrix = [[100 * curves[m][j] if curves[m][j] is not None else math.nan for j in order] for m in labels]
    text = len(order) <= MAX_CELL_TEXT
    width = 1.5 + 0.55 * len(order) if text else 14.0
    fig = Figure(figsize=(width, 1.2 + 0.28 * len(labels)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(matrix, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    _class_ticks(ax, order, counts, 7, MAX_CLASS_LABELS * 2)
    ax.set_xlabel("class (training images, head → tail)", fontsize=8)
    if text:
        for r, row in enumerate(matrix):
            for c, v in enumerate(row):
                if not math.isnan(v):
                    ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="test accuracy (%)", shrink=0.8)
    return fig


def gradient_ratio_plot(histories: dict[str, list[dict[str, Any]]], counts: Sequence[int]) -> bytes:
    """PNG of :func:`gradient_ratio_figure`."""
    return _png(gradient_ratio_figure(histories, counts))


def gradient_ratio_figure(histories: dict[str, list[dict[str, Any]]], counts: Sequence[int]) -> Figure:
    """Small multiples: g_j = P_j / N_j over epochs for each method, lines coloured by class count, dashed
    reference lines g = 1 (balanced) and g = 0.5 (under-compensated below) named in a figure legend."""
    from matplotlib import cm, colormaps

    n = len(histories)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols + 1.2, 2.6 * rows + 0.6), layout="constrained")
    axes = fig.subplots(rows, cols, sharey=True, squeeze=False).ravel()
    norm = _log_norm(counts)
    cmap = colormaps["viridis"]
    references = []
    for ax, (label, history) in zip(axes, histories.items(), strict=False):
        epochs = [h["epoch"] for h in history]
        for j in sorted(range(len(counts)), key=lambda c: -counts[c]):  # tail classes drawn last, on top
            ax.plot(epochs, [h["g"][j] for h in history], color=cmap(norm(max(counts[j], 1))), lw=1)
        references = [
            ax.axhline(level, color=colour, ls="--", lw=0.9, label=text)
            for level, colour, text in REFERENCE_LINES
        ]
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # epochs are integers
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes[n:]:
        ax.remove()
    axes = axes[:n]
    fig.legend(handles=references, loc="outside upper center", ncol=2, fontsize=7, frameon=False)
    bar = fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=list(axes), shrink=0.8)
    bar.set_label("training images of the class", fontsize=8)
    bar.locator = LogLocator(base=10, subs=(1.0, 2.0, 5.0))
    bar.formatter = FuncFormatter(lambda v, _: f"{v:g}")
    bar.minorformatter = NullFormatter()
    bar.ax.tick_params(labelsize=7)
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("g = P / N", fontsize=8)
    return fig


def reliability_plot(bins: dict[str, dict[str, Any]]) -> bytes:
    """PNG of :func:`reliability_figure`."""
    return _png(reliability_figure(bins))


def reliability_figure(bins: dict[str, dict[str, Any]]) -> Figure:
    """Accuracy vs confidence per bin (15 equal-width bins), one panel per method (first seed)."""
    n = len(bins)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.8 * cols + 0.4, 2.6 * rows + 0.4), layout="constrained")
    fig.get_layout_engine().set(wspace=0.06)  # keep one panel's "1.0" clear of the next one's "0.0"
    axes = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False).ravel()
    for ax, (label, b) in zip(axes, bins.items(), strict=False):
        edges = b["edges"]
        width = edges[1] - edges[0]
        centers = [e + width / 2 for e in edges[:-1]]
        acc = [a if c > 0 else 0.0 for a, c in zip(b["accuracy"], b["count"], strict=True)]
        ax.bar(centers, acc, width=width * 0.95, color="#4c72b0", edgecolor="none", label="accuracy")
        ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[n:]:
        ax.remove()
    fig.supxlabel("confidence", fontsize=8)
    fig.supylabel("accuracy", fontsize=8)
    return fig


def group_map_plot(groups: dict[str, Sequence[int]], counts: Sequence[int]) -> bytes:
    """PNG of :func:`group_map_figure`."""
    return _png(group_map_figure(groups, counts))


def group_map_figure(groups: dict[str, Sequence[int]], counts: Sequence[int]) -> Figure:
    """Which group each class fell into (GBG), classes ordered head → tail, one row per run."""
    from matplotlib import colormaps

    fig = Figure(figsize=(7, 1.1 + 0.45 * len(groups)), layout="constrained")
    ax = fig.add_subplot()
    order = sorted(range(len(counts)), key=lambda j: -counts[j])
    matrix = [[g[j] for j in order] for g in groups.values()]
    cmap = colormaps["tab10" if max(max(row) for row in matrix) < 10 else "tab20"]
    ax.imshow(matrix, aspect="auto", cmap=cmap, vmin=-0.5, vmax=cmap.N - 0.5, interpolation="nearest")
    ax.set_yticks(range(len(groups)), list(groups), fontsize=7)
    _class_ticks(ax, order, counts, 6, MAX_CLASS_LABELS)
    ax.set_xlabel("class (training images, head → tail)", fontsize=8)
    if len(order) <= 2 * MAX_CLASS_LABELS:
        for r, row in enumerate(matrix):
            for c, g in enumerate(row):
                red, green, blue, _ = cmap((g + 0.5) / cmap.N)
                dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.6
                ax.text(
                    c, r, str(g), ha="center", va="center", fontsize=6, color="white" if dark else "black"
                )
    return fig
