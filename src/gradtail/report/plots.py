"""Report figures (matplotlib, Agg canvas, PNG bytes): per-class accuracy vs training count, gradient
ratios per method, reliability diagram, GBG group map."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def per_class_accuracy_plot(curves: dict[str, Sequence[float | None]], counts: Sequence[int]) -> bytes:
    """Per-class test accuracy (mean over seeds) against training count: one line per method (log x), or
    a methods x classes heatmap with the values printed when there are more than six methods."""
    if len(curves) > 6:
        return _per_class_heatmap(curves, counts)
    fig = Figure(figsize=(7, 4))
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
    ax.set_xlabel("training images of the class (log scale, head → tail)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def _per_class_heatmap(curves: dict[str, Sequence[float | None]], counts: Sequence[int]) -> bytes:
    order = sorted(range(len(counts)), key=lambda j: -counts[j])
    labels = list(curves)
    matrix = [[100 * curves[m][j] if curves[m][j] is not None else math.nan for j in order] for m in labels]
    fig = Figure(figsize=(1.0 + 0.55 * len(order), 0.8 + 0.28 * len(labels)))
    ax = fig.add_subplot()
    im = ax.imshow(matrix, aspect="auto", cmap="RdYlGn", vmin=0, vmax=100, interpolation="nearest")
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.set_xticks(range(len(order)), [str(counts[j]) for j in order], fontsize=7, rotation=90)
    ax.set_xlabel("class (training images, head → tail)", fontsize=8)
    for r, row in enumerate(matrix):
        for c, v in enumerate(row):
            if not math.isnan(v):
                ax.text(c, r, f"{v:.0f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=ax, label="test accuracy (%)", shrink=0.8)
    return _png(fig)


def gradient_ratio_plot(histories: dict[str, list[dict[str, Any]]], counts: Sequence[int]) -> bytes:
    """Small multiples: g_j = P_j / N_j over epochs for each method, lines coloured by class count."""
    from matplotlib import cm, colormaps, colors

    n = len(histories)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows))
    norm = colors.LogNorm(vmin=max(min(counts), 1), vmax=max(counts))
    cmap = colormaps["viridis"]
    first = None
    for k, (label, history) in enumerate(histories.items()):
        ax = fig.add_subplot(rows, cols, k + 1, sharey=first)
        first = first or ax
        epochs = [h["epoch"] for h in history]
        for j, count in enumerate(counts):
            ax.plot(epochs, [h["g"][j] for h in history], color=cmap(norm(count)), lw=1)
        for level in (0.5, 1.0):
            ax.axhline(level, color="grey", ls="--", lw=0.7)
        ax.set_title(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap=cmap), ax=fig.axes, label="training images", shrink=0.8)
    fig.supxlabel("epoch", fontsize=8)
    fig.supylabel("g = P / N", fontsize=8)
    return _png(fig)


def reliability_plot(bins: dict[str, dict[str, Any]]) -> bytes:
    """Accuracy vs confidence per bin (15 equal-width bins), one panel per method (first seed)."""
    n = len(bins)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(2.8 * cols, 2.6 * rows))
    for k, (label, b) in enumerate(bins.items()):
        ax = fig.add_subplot(rows, cols, k + 1)
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
    fig.supxlabel("confidence", fontsize=8)
    fig.supylabel("accuracy", fontsize=8)
    return _png(fig)


def group_map_plot(groups: dict[str, Sequence[int]], counts: Sequence[int]) -> bytes:
    """Which group each class fell into (GBG), classes ordered head → tail, one row per run."""
    fig = Figure(figsize=(7, 0.6 + 0.45 * len(groups)))
    ax = fig.add_subplot()
    order = sorted(range(len(counts)), key=lambda j: -counts[j])
    matrix = [[g[j] for j in order] for g in groups.values()]
    ax.imshow(matrix, aspect="auto", cmap="tab10", interpolation="nearest")
    ax.set_yticks(range(len(groups)), list(groups), fontsize=7)
    ax.set_xticks(range(len(order)), [str(counts[j]) for j in order], fontsize=6, rotation=90)
    ax.set_xlabel("class (training images, head → tail)")
    for r, row in enumerate(matrix):
        for c, g in enumerate(row):
            ax.text(c, r, str(g), ha="center", va="center", fontsize=6, color="white")
    return _png(fig)
