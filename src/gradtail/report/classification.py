"""The report of a classification suite: ``results.json``, ``report.md`` and a self-contained
``report.html`` (PNG figures inlined).

The report states its protocol (docs/methods/protocol.md §5): the subset and its hash, the recipe, the group
thresholds (and the rule that chose them, from the runs' ``final.json``), last-epoch reporting with
mean ± std over seeds, validation-selected results in separate rows.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from gradtail.report import plots
from gradtail.report.aggregate import METRICS, aggregate, display_label, format_mean_std, format_params
from gradtail.report.page import (
    code_spans,
    duration,
    html_page,
    jsonable,
    method_notes,
    plural,
    precision_text,
    report_paths,
    results_header,
    test_curve_figure,
    write_figures,
)
from gradtail.report.table import format_table

HEADERS = ("method", "overall", "many", "medium", "few", "ECE", "cwECE")


def build_results(
    suite: Any, finals: list[dict[str, Any]], output: Path, wall_seconds: float | None
) -> dict[str, Any]:
    """Everything the report shows, as one JSON-serialisable record."""
    order = [m.name for m in suite.methods]
    rows = aggregate(finals, order)
    for row in rows:
        if row["kind"] == "last_epoch" and row["method"] in suite.published:
            row["published"] = suite.published[row["method"]]
    first = finals[0]
    run_dir = output / first["method"] / f"seed{first['seed']}"
    subset = json.loads((run_dir / "subset.json").read_text())
    config = suite.run_config(suite.method(first["method"]), first["seed"])
    return {
        "notes": method_notes(suite),
        **results_header(suite, finals, run_dir, wall_seconds),
        "subset": subset,
        "recipe": {
            "model": config.model.name,
            "model_params": config.model.params,
            "epochs": config.optim.epochs,
            "batch_size": config.optim.batch_size,
            "lr": config.optim.lr,
            "schedule": config.optim.schedule,
            "warmup_epochs": config.optim.warmup_epochs,
            "weight_decay": config.optim.weight_decay,
            "augment": config.data.augment.__dict__,
            "many_threshold": config.eval.many_threshold,
            "few_threshold": config.eval.few_threshold,
            "ece_bins": config.eval.ece_bins,
            "precision": sorted({precision_text(f.get("amp")) for f in finals}),
        },
        "groups": group_record(finals),
        "seeds": suite.seeds,
        "table": rows,
        "runs": [
            {
                "method": f["method"],
                "seed": f["seed"],
                "config_hash": f["config_hash"],
                "subset_sha256": f["subset_sha256"],
                "train_seconds": f.get("train_seconds"),
                "amp": f.get("amp"),
                "last_epoch": {k: f["last_epoch"].get(k) for k in (*METRICS, "per_class", "mce", "nll")},
                "val_selected": f.get("val_selected"),
                "posthoc": {
                    k: {m: v.get(m) for m in (*METRICS, "params")} for k, v in f.get("posthoc", {}).items()
                },
            }
            for f in finals
        ],
    }


def group_record(finals: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The Many / Medium / Few rule the runs recorded (``final.json`` ``groups``): the one record when
    every run has the same, ``{"rule": "per run", "runs": [...]}`` when they differ, None when a run
    predates the record (the report then resolves it from the recipe and the subset's counts)."""
    records = [f.get("groups") for f in finals]
    if not records or any(r is None for r in records):
        return None
    if all(r == records[0] for r in records):
        return dict(records[0])
    runs = [{"method": f["method"], "seed": f["seed"], **f["groups"]} for f in finals]
    return {"rule": "per run", "runs": runs}


def _groups_sentence(results: dict[str, Any]) -> str:
    """The protocol paragraph's Many / Medium / Few sentence: thresholds, the rule that chose them, sizes."""
    from gradtail.metrics import PROTOCOL_FEW_THRESHOLD, PROTOCOL_MANY_THRESHOLD, resolve_shot_groups

    g = results.get("groups")
    if g is None:  # runs from before final.json recorded the rule: resolve it as the trainer does
        r = results["recipe"]
        counts = results["subset"]["counts"]
        g = resolve_shot_groups(counts, r.get("many_threshold"), r.get("few_threshold")).to_dict()
    if g["rule"] == "per run":
        return (
            "Many / Medium / Few: the thresholds differ between runs (each run's in results.json, "
            "groups; N/A: empty group)."
        )
    many, few = g["many_threshold"], g["few_threshold"]
    sizes = " / ".join(str(n) for n in g["sizes"])
    why = {
        "configured": f"thresholds set in the config; {sizes} classes",
        "protocol thresholds": f"the protocol's thresholds, which leave no group empty here: {sizes} classes",
        "terciles": f"terciles of the training counts, {sizes} classes, as the protocol's "
        f"> {PROTOCOL_MANY_THRESHOLD} / < {PROTOCOL_FEW_THRESHOLD} would leave a group empty here",
    }.get(g["rule"], f"{g['rule']}; {sizes} classes")
    return (
        f"Many / Medium / Few: classes with > {many}, {few}–{many}, < {few} training images ({why}; "
        "N/A: empty group)."
    )


def _table_markdown(rows: list[dict[str, Any]], published: bool) -> str:
    headers = [*HEADERS, "published"] if published else list(HEADERS)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        cells = [display_label(r), *(format_mean_std(r[m]) for m in METRICS)]
        if published:
            cells.append(f"{r['published']:.1f}" if r.get("published") is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _model_text(model: str, params: dict[str, Any] | None) -> str:
    return f"{model} ({', '.join(f'{k}={v}' for k, v in params.items())})" if params else model


def _training_set_sentence(s: dict[str, Any]) -> str:
    """How the training set was made, as ``subset.json`` records it: an LDAM-rule subset of a built-in
    dataset, the community's split files, or one's own data (long-tailed by ``data.longtail`` or as given)."""
    name = s.get("dataset", "the data")
    factor, profile = s.get("imbalance_factor"), s.get("profile")
    if s.get("list_files"):
        return f"Training set: {name}, the split files as given (imbalance factor {factor:.0f}): "
    if factor is None:
        return f"Training set: {name} as given (no long-tailed subsampling): "
    seed = f", subset seed {s['subset_seed']}" if s.get("subset_seed") is not None else ""
    return (
        f"Training set: {name} long-tailed with imbalance factor {factor:g} ({profile} profile, LDAM "
        f"rule{seed}): "
    )


def _validation_sentence(s: dict[str, Any]) -> str:
    val = list(s.get("val_counts") or [])
    if not sum(val):
        return "Validation: none (no epoch selection, no post-hoc tuning). "
    per_class = f"{plural(val[0], 'image')} per class" if len(set(val)) == 1 else f"per class {val}"
    return (
        f"Validation: {plural(sum(val), 'held-out image')} ({per_class}), held out of the training data; "
        "used only for model selection and post-hoc tuning. "
    )


def protocol_paragraph(results: dict[str, Any]) -> str:
    s, r = results["subset"], results["recipe"]
    seeds = results["seeds"]
    aug = r["augment"]
    crop = f"random crop with {aug['crop_padding']}-pixel padding" if aug.get("crop_padding") else "no crop"
    warmup = "no warm-up and "
    if r["warmup_epochs"]:
        warmup = f"{plural(r['warmup_epochs'], 'warm-up epoch')} and "
    spread = (
        f"mean ± sample std over {plural(len(seeds), 'seed')} {seeds}"
        if len(seeds) > 1
        else f"{plural(len(seeds), 'seed')} {seeds} (no std with one seed)"
    )
    decay = "no decay (constant lr)" if r["schedule"] == "constant" else f"{r['schedule']} decay"
    posthoc = ""
    if any(row.get("kind") == "posthoc" for row in results.get("table", [])):
        per_seed = "the selected value"
        if len(seeds) > 1:
            per_seed = "mean ± std over seeds, each seed's value in brackets"
        posthoc = (
            "Post-hoc rows (method + adjuster) show in parentheses the adjuster's parameters fitted on "
            f"validation (τ: {per_seed}). "
        )
    return (
        f"{_training_set_sentence(s)}"
        f"{plural(s['train_images'], 'image')}, "
        f"counts {s['counts']} (SHA-256 {s['sha256'][:16]}…). "
        f"{_validation_sentence(s)}"
        f"Test: the untouched test split ({plural(s['test_images'], 'image')}). "
        f"Recipe: {_model_text(r['model'], r['model_params'])}, {plural(r['epochs'], 'epoch')}, "
        f"batch {r['batch_size']}, SGD lr "
        f"{r['lr']:g} with {warmup}{decay}, weight decay "
        f"{r['weight_decay']:g}, {crop}{' + horizontal flip' if aug.get('hflip') else ''}; "
        f"precision {' / '.join(r.get('precision') or ['float32'])}. "
        f"Numbers are top-1 test accuracy (%) at the last epoch, {spread}; "
        "rows marked (val-selected) pick the epoch with the best balanced validation accuracy. "
        f"{posthoc}"
        f"{_groups_sentence(results)} ECE with {plural(r['ece_bins'], 'bin')}."
    )


GRADIENT_RATIO_CAPTION = (
    "g_j = P_j / N_j for each class j: the accumulated positive / negative gradient ratio of the "
    "Equalization Losses paper (Tan et al., TPAMI; docs/methods/eql.md §1). P_j sums the magnitude of the "
    "loss gradient at class j's logit over the training samples of class j (positive), N_j over the "
    "samples of every other class (negative), both accumulated from the first training step (snapshot at "
    "the end of each epoch). Dashed reference lines: g = 1, balanced (as much positive as negative "
    "gradient; well-trained head classes sit around or above it); g = 0.5, the level below which the "
    "diagnostics count a class as starved, i.e. under-compensated (its negative gradient is more than "
    "twice its positive one). One line per class, coloured by its training images (log scale); one panel "
    "per method."
)


def _figures(results: dict[str, Any], output: Path) -> dict[str, tuple[bytes, str]]:
    """Figure title -> (PNG bytes, caption)."""
    counts = results["subset"]["counts"]
    seed = results["seeds"][0]
    figs: dict[str, tuple[bytes, str]] = {}
    per_class: dict[str, list[float | None]] = {}
    for row in results["table"]:
        if row["kind"] != "last_epoch":
            continue
        runs = [r for r in results["runs"] if r["method"] == row["method"]]
        accs = [r["last_epoch"]["per_class"] for r in runs]
        per_class[row["label"]] = [
            (sum(a[j] for a in accs if a[j] is not None) / max(1, sum(a[j] is not None for a in accs)))
            if any(a[j] is not None for a in accs)
            else None
            for j in range(len(counts))
        ]
    figs["Per-class test accuracy vs training count"] = (
        plots.per_class_accuracy_plot(per_class, counts),
        "Each class's test accuracy at the last epoch (mean over seeds) against its number of training "
        "images, head classes first.",
    )
    histories, bins, groups = {}, {}, {}
    for run in results["runs"]:
        if run["seed"] != results["seeds"][0]:
            continue
        d = output / run["method"] / f"seed{run['seed']}"
        diag = d / "diagnostics.json"
        if diag.is_file():
            hist = json.loads(diag.read_text())["history"]
            if hist:
                histories[run["method"]] = hist
        final = json.loads((d / "final.json").read_text())
        bins[run["method"]] = final["last_epoch"]["calibration_bins"]
        state = final.get("update_rule_state") or {}
        if state.get("groups") is not None:
            groups[run["method"]] = state["groups"]
    if histories:
        figs[f"Gradient ratio g = P/N per class over training (diagnostics observer, seed {seed})"] = (
            plots.gradient_ratio_plot(histories, counts),
            GRADIENT_RATIO_CAPTION,
        )
    if groups:
        figs["GBG class groups"] = (
            plots.group_map_plot(groups, counts),
            f"The group GBG put each class in (update-rule state at the end of training, seed {seed}), "
            "classes ordered head → tail; one row per run.",
        )
    methods = [(r["method"], r["label"]) for r in results["table"] if r["kind"] == "last_epoch"]
    curve = test_curve_figure(output, methods, seed, "top1")
    if curve is not None:
        figs[curve[0]] = curve[1:]
    figs[f"Reliability diagrams (seed {seed})"] = (
        plots.reliability_plot(bins),
        "Test accuracy against confidence at the last epoch, in equal-width confidence bins (bars); the "
        "dashed diagonal is perfect calibration.",
    )
    return figs


def _time_text(results: dict[str, Any]) -> str:
    total = results.get("train_seconds_total")
    wall = results.get("wall_seconds")
    parts = []
    if total:
        parts.append(f" Training time summed over runs: {duration(total)}.")
    if wall:
        parts.append(f" Wall time of the last invocation (finished runs are skipped): {duration(wall)}.")
    return "".join(parts)


def write_report(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """Write results.json, report.md (+ PNG files) and report.html; return their paths."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(jsonable(results), indent=1))
    figs = _figures(results, output)
    has_published = any(r.get("published") is not None for r in results["table"])
    table = _table_markdown(results["table"], has_published)
    env = results["environment"]
    env_line = (
        f"gradtail {env.get('gradtail')} ({(env.get('git_commit') or '')[:10]}), torch {env.get('torch')}, "
        f"{env.get('device')}, {env.get('cpu_count')} CPUs"
    )
    md = [
        f"# gradtail bench: {results['suite']}",
        "",
        results.get("description", ""),
        "",
        "## Results",
        "",
        table,
        "",
        *[f"Note: {n}" for n in results.get("notes", [])],
        "",
        "## Protocol",
        "",
        protocol_paragraph(results),
        "",
        f"Environment: {env_line}." + _time_text(results),
        "",
        "## Figures",
        "",
    ]
    html_figs = write_figures([(title, png, caption) for title, (png, caption) in figs.items()], output, md)
    (output / "report.md").write_text("\n".join(md))
    notes_html = "".join(
        f"<p class='protocol'><b>Note:</b> {code_spans(html.escape(n))}</p>"
        for n in results.get("notes", [])
    )
    wall_text = _time_text(results)
    head_cells = "".join(f"<th>{h}</th>" for h in (*HEADERS, *(("published",) if has_published else ())))
    body_rows = []
    for r in results["table"]:
        params = format_params(r.get("params"))
        label = html.escape(r["label"])
        if params:
            label += f" <span class='params'>({html.escape(params)})</span>"
        cells = [label, *(format_mean_std(r[m]) for m in METRICS)]
        if has_published:
            cells.append(f"{r['published']:.1f}" if r.get("published") is not None else "")
        cls = f" class='{r['kind']}'"
        body_rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    body = f"""<p>{html.escape(results.get("description", ""))}</p>
<h2>Results</h2>
<table><thead><tr>{head_cells}</tr></thead><tbody>{"".join(body_rows)}</tbody></table>
{notes_html}
<h2>Protocol</h2><p class="protocol">{html.escape(protocol_paragraph(results))}</p>
<p class="protocol">Environment: {html.escape(env_line)}.{wall_text}</p>
<h2>Figures</h2>{"".join(html_figs)}"""
    page = html_page(f"gradtail bench: {results['suite']}", body)
    (output / "report.html").write_text(page)
    return report_paths(output)


def table(results: dict[str, Any]) -> str:
    """The results table as text (what ``gradtail bench`` / ``report`` print)."""
    rows = [[display_label(r), *(format_mean_std(r[m]) for m in METRICS)] for r in results["table"]]
    return format_table(rows, HEADERS)
