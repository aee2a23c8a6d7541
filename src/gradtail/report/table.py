"""Plain-text / Markdown tables of run results; each task names its columns and metric keys."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from gradtail.metrics import format_percent

__all__ = ["format_percent", "format_table", "run_rows"]

COLUMNS = ("method", "overall", "many", "medium", "few", "ECE", "cwECE")
CLASSIFICATION_KEYS = ("top1", "many", "medium", "few", "ece", "classwise_ece")
SEGMENTATION_COLUMNS = ("method", "mIoU", "mAcc", "aAcc", "frequent", "common", "rare")
SEGMENTATION_KEYS = ("miou", "macc", "aacc", "miou_frequent", "miou_common", "miou_rare")
DETECTION_COLUMNS = ("method", "AP", "AP50", "APr", "APc", "APf")
DETECTION_KEYS = ("AP", "AP50", "APr", "APc", "APf")


def run_rows(final: Mapping[str, Any], label: str, keys: Sequence[str]) -> list[list[str]]:
    """Rows of one run's ``final.json`` (``keys``: the task's metrics, in column order): last epoch,
    val-selected (if any), each post-hoc adjuster."""
    rows = [_row(label, final["last_epoch"], keys)]
    best = final.get("val_selected")
    if best and best.get("test"):
        rows.append(_row(f"{label} (val-selected, epoch {best['epoch']})", best["test"], keys))
    for name, res in (final.get("posthoc") or {}).items():
        params = ", ".join(
            f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in res["params"].items()
        )
        rows.append(_row(f"{label} + {name} ({params})", res, keys))
    return rows


def _row(label: str, metrics: Mapping[str, Any], keys: Sequence[str]) -> list[str]:
    return [label, *(format_percent(metrics.get(k)) for k in keys)]


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
