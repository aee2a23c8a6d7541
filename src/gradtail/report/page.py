"""What every report page shares: the results header (suite, time, machine), the page shell and style,
figures written beside the page and inlined in it, method notes, and small text helpers. The per-task
report modules (:mod:`~gradtail.report.classification`, :mod:`~gradtail.report.segmentation`,
:mod:`~gradtail.report.detection`) build on it; it imports none of them."""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import re
from pathlib import Path
from typing import Any


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def results_header(
    suite: Any, finals: list[dict[str, Any]], run_dir: Path, wall_seconds: float | None
) -> dict[str, Any]:
    """The record every report's ``results.json`` starts with: the suite, when, how long, and the machine
    (``environment.json`` of ``run_dir``, the suite's first run)."""
    return {
        "suite": suite.name,
        "description": suite.description,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": wall_seconds,
        "train_seconds_total": sum(f.get("train_seconds") or 0.0 for f in finals),
        "environment": json.loads((run_dir / "environment.json").read_text()),
    }


def plural(count: float, noun: str, plural_form: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``, ``0.5 epochs`` (singular only for exactly one)."""
    return f"{count:g} {noun if count == 1 else plural_form or noun + 's'}"


def precision_text(amp: dict[str, str] | None) -> str:
    """``bfloat16 autocast (auto: CPU with AVX512-BF16)`` from a run's ``amp`` record; runs recorded
    before ``train.amp`` had ``auto`` trained in float32."""
    if not amp:
        return "float32"
    name = {"none": "float32", "bf16": "bfloat16 autocast", "fp16": "float16 autocast"}[amp["resolved"]]
    return f"{name} (auto: {amp['reason']})" if amp.get("setting") == "auto" else name


def code_spans(escaped: str) -> str:
    """Markdown code spans in already-escaped text as <code> (notes are written for both formats)."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)


def duration(seconds: float) -> str:
    """``42 s`` under a minute, else ``3.5 min`` (a short run no longer reads ``0.0 min``)."""
    return f"{seconds:.0f} s" if seconds < 59.5 else f"{seconds / 60:.1f} min"


def method_notes(suite: Any) -> list[str]:
    """Notes the methods themselves attach to reports (``report_note`` on a loss / regularizer / rule),
    then the suite's own (``Suite.notes``: the values ``gradtail tune`` chose for tuned twins)."""
    from gradtail.losses import LOSSES
    from gradtail.optim import UPDATE_RULES
    from gradtail.regularizers import REGULARIZERS

    notes: list[str] = []
    for m in suite.methods:
        cfg = suite.run_config(m, suite.seeds[0])
        for registry, name in ((LOSSES, cfg.loss.name), (REGULARIZERS, cfg.regularizer.name),
                               (UPDATE_RULES, cfg.update_rule.name)):  # fmt: skip
            factory = registry.get(name) if name else None
            # classes declare ``report_note`` (gradtail.contracts); factory functions (``drw``) have none
            note = factory.report_note if isinstance(factory, type) else None  # type: ignore[attr-defined]
            if note and note not in notes:
                notes.append(note)
    notes += list(suite.notes)
    return notes


PAGE_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 14px; }
th, td { padding: 4px 10px; border-bottom: 1px solid #ddd; text-align: right; }
td:first-child, th:first-child { text-align: left; }
tr.posthoc td { color: #345; background: #f5f8fb; }
tr.val_selected td { color: #666; font-style: italic; }
img { max-width: 100%; } .protocol { font-size: 14px; line-height: 1.5; }
figure { margin: 0 0 1.5em 0; }
figcaption { font-size: 13px; line-height: 1.45; color: #444; max-width: 900px; }
span.params { font-size: 12px; color: #567; }
"""


def html_page(title: str, body: str) -> str:
    """A self-contained report page: ``title`` (escaped here) and ``body`` (HTML) in the shared style."""
    t = html.escape(title)
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{t}</title>\n'
        f"<style>{PAGE_STYLE}</style></head><body>\n<h1>{t}</h1>\n{body}\n</body></html>\n"
    )


def report_body(
    results: dict[str, Any],
    table_head: str,
    table_rows: str,
    protocol: str,
    env_line: str,
    figures: list[str],
    lead: str = "",
) -> str:
    """The body of the segmentation and detection pages: description, results table (``lead``: a line
    above it), protocol, environment, figures."""
    return f"""<p>{html.escape(results.get("description", ""))}</p>
<h2>Results</h2>{lead}
<table><thead><tr>{table_head}</tr></thead><tbody>{table_rows}</tbody></table>
<h2>Protocol</h2><p class='protocol'>{html.escape(protocol)}</p>
<p class='protocol'>Environment: {html.escape(env_line)}</p>
<h2>Figures</h2>{"".join(figures)}"""  # fmt: skip


def report_paths(output: Path) -> dict[str, Path]:
    """The files every report writes into ``output``."""
    return {
        "results": output / "results.json",
        "markdown": output / "report.md",
        "html": output / "report.html",
    }


def write_figures(figures: list[tuple[str, bytes, str]], output: Path, md: list[str]) -> list[str]:
    """Write each (title, PNG, caption) as ``figure_<k>.png``, append its Markdown to ``md`` and return its
    HTML (the PNG inlined), for every report page (classification, segmentation)."""
    html_figs = []
    for k, (title, png, caption) in enumerate(figures):
        name = f"figure_{k + 1}.png"
        (output / name).write_bytes(png)
        md += [f"### {title}", "", f"![{title}]({name})", "", caption, ""]
        b64 = base64.b64encode(png).decode()
        html_figs.append(
            f"<h3>{html.escape(title)}</h3><figure><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{b64}'><figcaption>{html.escape(caption)}</figcaption></figure>"
        )
    return html_figs


def test_curve_figure(
    output: Path, methods: list[tuple[str, str]], seed: int, metric: str
) -> tuple[str, bytes, str] | None:
    """The per-epoch test curve of runs that recorded one (``eval.test_curve``): ``metric`` of each
    method's ``test_curve`` records in ``<output>/<method>/seed<seed>/metrics.jsonl`` (``methods``:
    (name, label)); None when no run recorded one. The caption says that nothing selects on it."""
    from matplotlib.figure import Figure

    from gradtail.report.plots import _png

    curves = {}
    for name, label in methods:
        path = output / name / f"seed{seed}" / "metrics.jsonl"
        if not path.is_file():
            continue
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        points = [(r["epoch"], r["test_curve"].get(metric)) for r in records if "test_curve" in r]
        points = [(e, v) for e, v in points if v is not None]
        if points:
            curves[label] = points
    if not curves:
        return None
    fig = Figure(figsize=(7.0, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for label, points in curves.items():
        ax.plot([e for e, _ in points], [100 * v for _, v in points], marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"test {metric} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    caption = (
        f"Test {metric} after every evaluated epoch (eval.test_curve, seed {seed}): a curve for reading "
        "only. It is never used for selection: the val-selected rows pick their epoch on the validation "
        "split, and the table's test numbers are the last epoch's and the validation-selected epoch's."
    )
    return f"Test curve (seed {seed}; never used for selection)", _png(fig), caption
