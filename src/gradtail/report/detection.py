"""The report of a detection suite (``gradtail bench`` on a ``task: detection`` suite): AP / AP50 / APr /
APc / APf (mean ± sample std over seeds, last epoch), AP per class against the number of training images
(LVIS rare / common / frequent groups marked), and each method's test images with its predicted boxes.

Files: ``results.json`` (everything below, JSON), ``report.md`` with ``figure_<k>.png``, and a
self-contained ``report.html``.
"""

from __future__ import annotations

import html
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from gradtail.report.aggregate import format_mean_std, mean_std
from gradtail.report.plots import _png
from gradtail.report.render import (
    _duration,
    html_page,
    report_body,
    report_paths,
    results_header,
    write_figures,
)

METRICS = ("AP", "AP50", "APr", "APc", "APf")
HEADERS = ("method", "AP", "AP50", "APr", "APc", "APf")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def _rows(suite: Any, finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in finals:
        by_method[f["method"]].append(f)
    rows = []
    for m in suite.methods:
        runs = sorted(by_method.get(m.name, []), key=lambda f: f["seed"])
        if not runs:
            continue
        steps = [r.get("mean_step_s") for r in runs]
        rows.append(
            {
                "label": m.label or m.name,
                "method": m.name,
                "kind": "last_epoch",
                "seeds": [r["seed"] for r in runs],
                **{k: mean_std([r["metrics"].get(k) for r in runs]) for k in METRICS},
                "train_seconds": mean_std([r.get("train_seconds") for r in runs]),
                "mean_step_s": mean_std(steps),
            }
        )
    return rows


def build_results(
    suite: Any, finals: list[dict[str, Any]], output: Path, wall_seconds: float | None
) -> dict[str, Any]:
    """Everything the detection report shows, as one JSON-serialisable record."""
    first = finals[0]
    run_dir = output / first["method"] / f"seed{first['seed']}"
    per_class: dict[str, list[float | None]] = {}
    for m in suite.methods:
        runs = [f for f in finals if f["method"] == m.name]
        if runs:
            aps = [[c["ap"] for c in r["per_class"]] for r in runs]
            per_class[m.name] = [mean_std([a[k] for a in aps])["mean"] for k in range(len(aps[0]))]
    classes = [
        {"name": c["class"], "frequency": c["frequency"], "train_images": c["train_images"]}
        for c in first["per_class"]
    ]
    cfg = first["config"]
    return {
        "task": "detection",
        **results_header(suite, finals, run_dir, wall_seconds),
        "protocol": first.get("protocol"),
        "data": {
            **cfg["data"],
            "sha256": first.get("data_sha256"),
            "train_images": first.get("train_images"),
            "eval_split": first.get("eval_split"),
        },
        "recipes": {
            f["method"]: {"detector": f["config"]["detector"], "train": f["config"]["train"]}
            for f in finals
            if f["seed"] == first["seed"]
        },
        "seeds": suite.seeds,
        "metrics": list(METRICS),
        "columns": list(HEADERS),
        "table": _rows(suite, finals),
        "classes": classes,
        "per_class_ap": per_class,
        "runs": [
            {
                "method": f["method"],
                "seed": f["seed"],
                "config_hash": f["config_hash"],
                "metrics": f["metrics"],
                "train_seconds": f.get("train_seconds"),
                "mean_step_s": f.get("mean_step_s"),
            }
            for f in finals
        ],
    }


def ap_vs_frequency_figure(
    per_class: dict[str, list[float | None]], classes: list[dict[str, Any]], labels: dict[str, str]
) -> Any:
    """AP of every class (mean over seeds) against its number of training images (log x), one line per
    method; the class names are written at the bottom, coloured by their LVIS frequency group."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    counts = np.array([max(c["train_images"], 1) for c in classes], dtype=np.float64)
    order = np.argsort(-counts, kind="stable")
    for method, aps in per_class.items():
        y = [np.nan if aps[k] is None else 100 * aps[k] for k in order]
        ax.plot(counts[order], y, marker="o", label=labels.get(method, method))
    colors = {"r": "tab:red", "c": "tab:orange", "f": "tab:blue"}
    for k in order:
        c = classes[k]
        ax.annotate(c["name"], (counts[k], 1), fontsize=7, rotation=90, ha="center", va="bottom",
                    color=colors.get(c["frequency"], "0.4"))  # fmt: skip
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training images with the class (log scale; frequent left); names: rare red, common "
                  "orange, frequent blue")  # fmt: skip
    ax.set_ylabel("test AP (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _protocol(results: dict[str, Any]) -> str:
    d = results["data"]
    groups = defaultdict(list)
    for c in results["classes"]:
        groups[c["frequency"]].append(f"{c['name']} ({c['train_images']})")
    group_text = "; ".join(f"{GROUP_NAMES.get(k, k)}: {', '.join(v)}" for k, v in sorted(groups.items()))
    where = (
        f"the Fashion-MNIST detection benchmark under {d.get('root')} (spec {d.get('fm') or 'default'})"
        if d.get("kind") == "fm_benchmark"
        else f"annotation files {d.get('train')} (train) and {d.get(d.get('eval_split') or 'test')}"
    )
    recipes = []
    for method, r in results["recipes"].items():
        det, tr = r["detector"], r["train"]
        recipes.append(
            f"{method}: {det['arch']} ({det['backbone']}, width {det.get('width')}), loss "
            f"{det['loss'] or 'stock'}{' ' + str(det['loss_params']) if det.get('loss_params') else ''}, "
            f"{tr['epochs']} epochs, batch {tr['batch_size']}, SGD lr "
            f"{tr['lr']:g} (warm-up {tr['warmup_iters']} iterations, x0.1 at {list(tr['lr_steps'])} of the "
            f"run), sampler {tr['sampler']}"
        )
    return (
        f"Data: {where}; {d.get('train_images')} training images, data SHA-256 "
        f"{str(d.get('sha256'))[:16]}…. Classes by LVIS frequency group (training images with the class): "
        f"{group_text}. Evaluation: {str(results.get('protocol')).upper()} AP on the {d.get('eval_split')} "
        f"split through the official API, at the last epoch (no epoch is selected), mean ± sample std over "
        f"seeds {results['seeds']}. Recipes: " + "; ".join(recipes) + "."
    )


def write_report(results: dict[str, Any], output: Path) -> dict[str, Path]:
    """results.json, report.md (+ PNG files) and a self-contained report.html."""
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=1, default=float))
    labels = {r["method"]: r["label"] for r in results["table"]}
    figs: list[tuple[str, bytes, str]] = [
        (
            "AP per class against training frequency",
            _png(ap_vs_frequency_figure(results["per_class_ap"], results["classes"], labels)),
            "Each class's test AP at the last epoch (mean over seeds) against the number of training "
            "images that contain it, most frequent first.",
        )
    ]
    seed = results["seeds"][0]
    for row in results["table"]:
        drawn = output / row["method"] / f"seed{seed}" / "detections.png"
        if drawn.is_file():
            figs.append(
                (
                    f"Test images: {row['label']} (seed {seed})",
                    drawn.read_bytes(),
                    "Ground-truth boxes in green; the top predictions in red with class and score.",
                )
            )
    headers = [*HEADERS, "training / run", "step"]
    rows_md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    rows_html = []
    for row in results["table"]:
        cells = [format_mean_std(row[m]) for m in METRICS]
        t, step = row["train_seconds"]["mean"], row["mean_step_s"]["mean"]
        cells += [f"{t:.0f} s" if t is not None else "N/A", f"{1000 * step:.0f} ms" if step else "N/A"]
        rows_md.append("| " + " | ".join([row["label"], *cells]) + " |")
        rows_html.append(
            f"<tr><td>{html.escape(row['label'])}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    env = results["environment"]
    timing = f"Training time summed over runs: {_duration(results['train_seconds_total'])}."
    if results.get("wall_seconds") is not None:  # finished runs are skipped: a re-run takes seconds
        timing += f" Wall time of the last invocation: {_duration(results['wall_seconds'])}."
    env_line = (
        f"gradtail {env.get('gradtail')} ({(env.get('git_commit') or '')[:10]}), torch {env.get('torch')}, "
        f"torchvision {env.get('torchvision')}, {env.get('device')}, {env.get('cpu_count')} CPUs. {timing}"
    )
    md = [f"# gradtail bench: {results['suite']}", "", results.get("description", ""), "", "## Results", ""]
    md += [*rows_md, "", "## Protocol", "", _protocol(results), "", f"Environment: {env_line}", ""]
    md += ["## Figures", ""]
    html_figs = write_figures(figs, output, md)
    (output / "report.md").write_text("\n".join(md))
    head = "".join(f"<th>{h}</th>" for h in headers)
    seeds = results["seeds"]
    lead = f"\n<p class='protocol'>Test AP (%) at the last epoch, mean ± sample std over seeds {seeds}.</p>"
    body = report_body(results, head, "".join(rows_html), _protocol(results), env_line, html_figs, lead)
    page = html_page(f"gradtail bench: {results['suite']}", body)
    (output / "report.html").write_text(page)
    return report_paths(output)


__all__ = ["HEADERS", "METRICS", "ap_vs_frequency_figure", "build_results", "write_report"]
