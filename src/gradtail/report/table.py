"""Plain-text / Markdown tables of run results: overall, Many / Medium / Few, ECE, class-wise ECE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from gradtail.metrics import format_percent

COLUMNS = ("method", "overall", "many", "medium", "few", "ECE", "cwECE")
SEGMENTATION_COLUMNS = ("method", "mIoU", "mAcc", "aAcc", "frequent", "common", "rare")
SEGMENTATION_KEYS = ("miou", "macc", "aacc", "miou_frequent", "miou_common", "miou_rare")


def is_segmentation(final: dict[str, Any]) -> bool:
    """Whether a ``final.json`` is a segmentation run's (its metrics are mIoU and its groups)."""
    last = final.get("last_epoch") or {}
    return "miou" in last


def columns_for(final: dict[str, Any]) -> tuple[str, ...]:
    """The table columns of a run: classification's, or mIoU / mAcc / aAcc / per-group mIoU."""
    return SEGMENTATION_COLUMNS if is_segmentation(final) else COLUMNS


def run_rows(final: dict[str, Any], label: str) -> list[list[str]]:
    """Rows for one run's ``final.json``: last epoch, val-selected (if any), each post-hoc adjuster."""
    row = _segmentation_row if is_segmentation(final) else _row
    rows = [row(label, final["last_epoch"])]
    best = final.get("val_selected")
    if best and best.get("test"):
        rows.append(row(f"{label} (val-selected, epoch {best['epoch']})", best["test"]))
    for name, res in (final.get("posthoc") or {}).items():
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res["params"].items()
        )
        rows.append(_row(f"{label} + {name} ({params})", res))
    return rows


def _row(label: str, metrics: dict[str, Any]) -> list[str]:
    return [
        label,
        format_percent(metrics.get("top1")),
        format_percent(metrics.get("many")),
        format_percent(metrics.get("medium")),
        format_percent(metrics.get("few")),
        format_percent(metrics.get("ece")),
        format_percent(metrics.get("classwise_ece")),
    ]


def _segmentation_row(label: str, metrics: dict[str, Any]) -> list[str]:
    return [label, *(format_percent(metrics.get(k)) for k in SEGMENTATION_KEYS)]


def format_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table (also readable as plain text), columns padded to equal width."""
    widths = [max(len(str(c)), *(len(str(r[i])) for r in rows)) for i, c in enumerate(columns)]

    def line(cells: Sequence[str]) -> str:
        return (
            "| "
            + " | ".join(
                str(c).ljust(w) if i == 0 else str(c).rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            )
            + " |"
        )

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(columns), sep, *(line(r) for r in rows)])
