"""The tuning report: ``<output>/report.html`` (self-contained) and ``report.md`` with every method's
default and best validation value, the chosen parameters, trial counts, wall time, the chosen
configuration's one test evaluation, and per method the optimisation history and parameter importances."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

from gradtail.tune.study import TuneResult


def _pct(value: float | None) -> str:
    return "N/A" if value is None else f"{100 * value:.1f}"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k.split('.params.')[-1]}={v:.4g}" if isinstance(v, float) else f"{k.split('.params.')[-1]}={v}"
        for k, v in params.items()
    )


def history_figure(study: Any) -> bytes:
    """Every finished trial's validation value (pruned ones at their last report) and the best so far."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    from gradtail.report.plots import _png

    fig = Figure(figsize=(5.0, 3.0), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    best, xs, ys, best_curve = None, [], [], []
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "COMPLETE":
            value = t.value
            ax.scatter([t.number], [100 * value], color="tab:blue", s=14, zorder=3)
            best = value if best is None else max(best, value)
        elif t.state.name == "PRUNED" and t.intermediate_values:
            last = t.intermediate_values[max(t.intermediate_values)]
            ax.scatter([t.number], [100 * last], color="tab:gray", marker="x", s=14, zorder=3)
        if best is not None:
            xs.append(t.number)
            best_curve.append(100 * best)
    ys = best_curve
    if xs:
        ax.step(xs, ys, where="post", color="tab:red", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial (x: pruned, at its last report)")
    ax.set_ylabel(f"validation {study.user_attrs.get('objective', 'objective')} (%)")
    ax.grid(alpha=0.3)
    if xs:
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return _png(fig)


def importance_figure(study: Any) -> bytes | None:
    """Optuna's parameter importances (PED-ANOVA) over the complete trials; None with fewer than two."""
    import optuna
    from matplotlib.figure import Figure

    from gradtail.report.plots import _png

    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    if len(complete) < 2:
        return None
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # e.g. every complete trial has the same value
        return None
    if not importances:
        return None
    names = [k.split(".params.")[-1] for k in importances][::-1]
    values = list(importances.values())[::-1]
    fig = Figure(figsize=(4.0, 0.5 + 0.35 * len(names)), dpi=110)
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(names, values, color="tab:blue")
    ax.set_xlabel("importance")
    ax.set_xlim(0, 1)
    fig.tight_layout()
    return _png(fig)


def trials_table(study: Any, result: TuneResult) -> str:
    """Every trial of a study as a collapsed HTML table (state, validation value, epochs run, values)."""
    keys = result.space
    head = ["trial", "state", "validation", "epochs", "seconds", *(k.split(".params.")[-1] for k in keys)]
    rows = []
    for t in study.get_trials(deepcopy=False):
        config = t.user_attrs.get("config", {})
        value = t.value
        if value is None and t.intermediate_values:
            value = t.intermediate_values[max(t.intermediate_values)]
        cells = [
            f"{t.number}{' (default)' if t.user_attrs.get('default') else ''}",
            t.state.name.lower(),
            _pct(value),
            str(max(t.intermediate_values)) if t.intermediate_values else "",
            f"{float(t.user_attrs.get('seconds', 0.0)):.0f}",
            *(
                f"{config[k]:.4g}" if isinstance(config.get(k), float) else str(config.get(k, ""))
                for k in keys
            ),
        ]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    header = "<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
    return f"<details><summary>{len(rows)} trials</summary><table>{header}{''.join(rows)}</table></details>"


def write_tune_report(
    results: list[TuneResult], output: Path, studies: dict[str, Any], settings: dict[str, Any]
) -> Path:
    """Write ``report.md``, ``report.html`` and ``tune.json`` into ``output``; returns the HTML path."""
    rows = []
    md = [
        f"# gradtail tune: {output.name}",
        "",
        f"Objective: validation {settings['objective']} (the test split is never read while searching); "
        f"{settings['trials']} trials per method; trial schedule: "
        f"{settings['epochs'] or 'the method’s own'} epochs; pruner {settings['pruner']}; "
        f"TPE seed {settings['seed']}.",
        "",
        "| method | searched | default (val) | best (val) | chosen | trials (complete / pruned / failed) "
        "| wall | test top-1 / few (chosen, once) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if r.skipped:
            md.append(f"| {r.method} | — | | | not tuned: {r.skipped} | | | |")
            continue
        t = r.trials
        final = r.final or {}
        row = [
            r.method,
            ", ".join(k.split(".params.")[-1] for k in r.space),
            _pct(r.default_value),
            _pct(r.best_value),
            _params(r.best_params),
            f"{t.get('COMPLETE', 0)} / {t.get('PRUNED', 0)} / {t.get('FAIL', 0)}",
            f"{r.wall_seconds / 60:.1f} min",
            f"{_pct(final.get('top1'))} / {_pct(final.get('few'))}" if final else "not evaluated",
        ]
        rows.append(row)
        md.append("| " + " | ".join(row) + " |")
    (output / "report.md").write_text("\n".join(md) + "\n")
    (output / "tune.json").write_text(
        json.dumps({"settings": settings, "methods": [r.to_dict() for r in results]}, indent=1)
    )

    figures = []
    for r in results:
        study = studies.get(r.method)
        if study is None:
            continue
        imgs = [history_figure(study)]
        imp = importance_figure(study)
        if imp is not None:
            imgs.append(imp)
        tags = "".join(
            f'<img alt="{html.escape(r.method)}" src="data:image/png;base64,{base64.b64encode(b).decode()}">'
            for b in imgs
        )
        figures.append(
            f"<h3>{html.escape(r.method)}</h3><div class='figs'>{tags}</div>{trials_table(study, r)}"
        )
    head = [
        "method",
        "searched",
        "default (val)",
        "best (val)",
        "chosen",
        "trials c/p/f",
        "wall",
        "test top-1 / few",
    ]
    table = "<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr>"
    table += "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    table += "</table>"
    intro = html.escape(md[2])
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>gradtail tune</title><style>"
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;font-size:13px}"
        "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left}"
        ".figs img{margin-right:12px;vertical-align:top}</style></head><body>"
        f"<h1>gradtail tune: {html.escape(output.name)}</h1><p>{intro}</p>{table}"
        f"<h2>Optimisation history and parameter importances</h2>{''.join(figures)}</body></html>"
    )
    path = output / "report.html"
    path.write_text(page)
    return path
