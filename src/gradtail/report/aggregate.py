"""Aggregate the ``final.json`` of a suite's runs into table rows: mean ± std over seeds.

Rows: each method's last epoch (the reported number, docs/methods/protocol.md §5), its validation-selected
epoch (reported separately, labelled), and each post-hoc adjuster fit on validation (its fitted parameters,
e.g. the selected tau, under ``params``: :func:`posthoc_params`, shown by :func:`display_label`). Std is the
sample standard deviation (ddof = 1); with one seed it is reported as None.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

METRICS = ("top1", "many", "medium", "few", "ece", "classwise_ece")


def mean_std(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample std of the non-None values; None where a group is empty in every seed."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not kept:
        return {"mean": None, "std": None, "values": values}
    mean = sum(kept) / len(kept)
    std = math.sqrt(sum((v - mean) ** 2 for v in kept) / (len(kept) - 1)) if len(kept) > 1 else None
    return {"mean": mean, "std": std, "values": values}


def _row(
    label: str, kind: str, method: str, records: list[dict[str, Any]], seeds: list[int]
) -> dict[str, Any]:
    return {
        "label": label,
        "kind": kind,
        "method": method,
        "seeds": seeds,
        **{m: mean_std([r.get(m) for r in records]) for m in METRICS},
    }


def aggregate(finals: list[dict[str, Any]], method_order: list[str]) -> list[dict[str, Any]]:
    """Rows in suite order: last epoch, then val-selected, then post-hoc rows of every method."""
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in finals:
        by_method[f["method"]].append(f)
    rows: list[dict[str, Any]] = []
    for method in method_order:
        runs = sorted(by_method.get(method, []), key=lambda f: f["seed"])
        if not runs:
            continue
        seeds = [f["seed"] for f in runs]
        rows.append(_row(method, "last_epoch", method, [f["last_epoch"] for f in runs], seeds))
    for method in method_order:
        runs = sorted(by_method.get(method, []), key=lambda f: f["seed"])
        for name in runs[0].get("posthoc", {}) if runs else {}:
            recs = [f["posthoc"][name] for f in runs if name in f.get("posthoc", {})]
            row = _row(f"{method} + {name}", "posthoc", method, recs, [f["seed"] for f in runs])
            row["params"] = posthoc_params([r.get("params") or {} for r in recs])
            rows.append(row)
    for method in method_order:
        runs = sorted(by_method.get(method, []), key=lambda f: f["seed"])
        picked = [f["val_selected"]["test"] for f in runs if f.get("val_selected")]
        if picked:
            rows.append(
                _row(f"{method} (val-selected)", "val_selected", method, picked, [f["seed"] for f in runs])
            )
    return rows


def posthoc_params(per_seed: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The fitted parameters of a post-hoc adjuster over seeds (``final.json`` ``posthoc[name]["params"]``):
    numbers as :func:`mean_std` (``values`` per seed), anything else as its per-seed ``values``."""
    names: list[str] = []
    for params in per_seed:
        names += [k for k in params if k not in names]
    out: dict[str, dict[str, Any]] = {}
    for k in names:
        values = [p.get(k) for p in per_seed]
        known = [v for v in values if v is not None]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in known)
        out[k] = mean_std(values) if numeric else {"values": values}
    return out


_PARAM_SYMBOLS = {"tau": "τ"}


def format_params(params: dict[str, dict[str, Any]] | None) -> str:
    """``τ = 1.13 ± 0.06 [1.1, 1.2, 1.1]``: mean ± std over seeds with the per-seed values (one seed, or the
    same value in every seed: that value); non-numeric parameters by their distinct values. Empty string
    when there are none."""
    parts = []
    for k, cell in (params or {}).items():
        name = _PARAM_SYMBOLS.get(k, k)
        values = [v for v in cell.get("values", []) if v is not None]
        if "mean" not in cell:
            distinct = list(dict.fromkeys(str(v) for v in values))
            parts.append(f"{name} = {' / '.join(distinct)}")
        elif cell["mean"] is None:
            parts.append(f"{name} = N/A")
        elif cell["std"] is None:
            parts.append(f"{name} = {cell['mean']:.3g}")
        elif len(set(values)) == 1:
            parts.append(f"{name} = {values[0]:.3g} [every seed]")
        else:
            seeds = ", ".join(f"{v:.3g}" for v in values)
            parts.append(f"{name} = {cell['mean']:.2f} ± {cell['std']:.2f} [{seeds}]")
    return ", ".join(parts)


def display_label(row: dict[str, Any]) -> str:
    """A table row's label, post-hoc rows followed by their fitted parameters in parentheses."""
    params = format_params(row.get("params"))
    return f"{row['label']} ({params})" if params else row["label"]


def format_mean_std(cell: dict[str, Any], scale: float = 100.0) -> str:
    if cell["mean"] is None:
        return "N/A"
    if cell["std"] is None:
        return f"{scale * cell['mean']:.1f}"
    return f"{scale * cell['mean']:.1f} ± {scale * cell['std']:.1f}"
