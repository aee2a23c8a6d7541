"""The report of a detection suite: AP / AP50 / APr / APc / APf (mean ± sample std over seeds, last epoch;
validation-selected rows apart), AP per class against the number of training images (LVIS rare / common /
frequent groups marked), and each method's test images with its predicted boxes (the figure every run
draws at its end, :func:`draw_detections`).

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
from gradtail.report.page import (
    duration,
    html_page,
    report_body,
    report_paths,
    results_header,
    test_curve_figure,
    write_figures,
)
from gradtail.report.plots import _png
from gradtail.report.table import format_table

METRICS = ("AP", "AP50", "APr", "APc", "APf")
HEADERS = ("method", "AP", "AP50", "APr", "APc", "APf")
GROUP_NAMES = {"r": "rare", "c": "common", "f": "frequent"}


def _rows(suite: Any, finals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_method: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for f in finals:
        by_method[f["method"]].append(f)
    rows = []
    for kind in ("last_epoch", "val_selected"):
        for m in suite.methods:
            runs = sorted(by_method.get(m.name, []), key=lambda f: f["seed"])
            if kind == "last_epoch":
                recs = [r["last_epoch"] for r in runs]
            else:
                recs = [r["val_selected"]["test"] for r in runs if (r.get("val_selected") or {}).get("test")]
            if not recs:
                continue
            label = m.label or m.name
            rows.append(
                {
                    "label": label if kind == "last_epoch" else f"{label} (val-selected)",
                    "method": m.name,
                    "kind": kind,
                    "seeds": [r["seed"] for r in runs],
                    **{k: mean_std([r.get(k) for r in recs]) for k in METRICS},
                    "train_seconds": mean_std([r.get("train_seconds") for r in runs]),
                    "mean_step_s": mean_std([r.get("mean_step_s") for r in runs]),
                }
            )
    return rows


def build_results(
    suite: Any, finals: list[dict[str, Any]], output: Path, wall_seconds: float | None
) -> dict[str, Any]:
    """Everything the detection report shows, as one JSON-serialisable record."""
    first = finals[0]
    run_dir = output / first["method"] / f"seed{first['seed']}"
    subset = json.loads((run_dir / "subset.json").read_text())
    per_class: dict[str, list[float | None]] = {}
    for m in suite.methods:
        runs = [f for f in finals if f["method"] == m.name]
        if runs:
            aps = [r["last_epoch"]["per_class_ap"] for r in runs]
            per_class[m.name] = [mean_std([a[k] for a in aps])["mean"] for k in range(len(aps[0]))]
    classes = [
        {"name": n, "frequency": f, "train_images": c}
        for n, f, c in zip(subset["class_names"], subset["frequencies"], subset["counts"], strict=True)
    ]
    recipes = {}
    for f in finals:
        if f["seed"] == first["seed"]:
            cfg = suite.run_config(suite.method(f["method"]), f["seed"]).to_dict()
            recipes[f["method"]] = {k: cfg[k] for k in ("model", "loss", "optim", "data")}
    return {
        "task": "detection",
        **results_header(suite, finals, run_dir, wall_seconds),
        "protocol": first["last_epoch"].get("protocol"),
        "subset": subset,
        "recipes": recipes,
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
                "last_epoch": {k: f["last_epoch"].get(k) for k in (*METRICS, "per_class_ap")},
                "val_selected": f.get("val_selected"),
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
    s = results["subset"]
    groups = defaultdict(list)
    for c in results["classes"]:
        groups[c["frequency"]].append(f"{c['name']} ({c['train_images']})")
    group_text = "; ".join(f"{GROUP_NAMES.get(k, k)}: {', '.join(v)}" for k, v in sorted(groups.items()))
    where = (
        f"the Fashion-MNIST detection benchmark ({s.get('benchmark_root')})"
        if s.get("dataset") == "fm_detection"
        else f"annotation files {s.get('annotation_files')}"
    )
    recipes = []
    for method, r in results["recipes"].items():
        model, loss, o, d = r["model"], r["loss"], r["optim"], r["data"]
        params = model.get("params") or {}
        recipes.append(
            f"{method}: {model['name']} ({params.get('backbone', 'tiny')}, width {params.get('width', 64)}), "
            f"loss {loss['name']}{' ' + str(loss['params']) if loss.get('params') else ''}, "
            f"{o['epochs']} epochs, batch {o['batch_size']}, SGD lr {o['lr']:g} ({o['schedule']}: warm-up "
            f"{o['warmup_iters']} iterations, x{o['step_gamma']:g} at {list(o['step_fractions'])} of the "
            "run), "
            f"sampler {d['sampler']}"
        )
    keys = [k for k in ("train_images", "val_images", "test_images") if k in s]
    splits = ", ".join(f"{s[k]} {k.removesuffix('_images')}" for k in keys)
    return (
        f"Data: {where}; images: {splits}; data SHA-256 {str(s.get('sha256'))[:16]}…. Classes by LVIS "
        f"frequency group (training images with the class): {group_text}. Evaluation: "
        f"{str(results.get('protocol')).upper()} AP through the official API on the test split once, after "
        f"the last epoch (validation AP, every evaluated epoch, selects the val-selected rows), mean ± "
        f"sample std over seeds {results['seeds']}. Recipes: " + "; ".join(recipes) + "."
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
        drawn = output / row["method"] / f"seed{seed}" / "predictions.png"
        if row["kind"] == "last_epoch" and drawn.is_file():
            figs.append(
                (
                    f"Test images: {row['label']} (seed {seed})",
                    drawn.read_bytes(),
                    "Ground-truth boxes in green; the top predictions in red with class and score.",
                )
            )
    methods = [(r["method"], r["label"]) for r in results["table"] if r["kind"] == "last_epoch"]
    curve = test_curve_figure(output, methods, seed, "AP")
    if curve is not None:
        figs.append(curve)
    headers = [*HEADERS, "training / run", "step"]
    rows_md = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    rows_html = []
    for row in results["table"]:
        cells = [format_mean_std(row[m]) for m in METRICS]
        t, step = row["train_seconds"]["mean"], row["mean_step_s"]["mean"]
        cells += [f"{t:.0f} s" if t is not None else "N/A", f"{1000 * step:.0f} ms" if step else "N/A"]
        rows_md.append("| " + " | ".join([row["label"], *cells]) + " |")
        rows_html.append(
            f"<tr class='{row['kind']}'><td>{html.escape(row['label'])}</td>"
            + "".join(f"<td>{c}</td>" for c in cells)
            + "</tr>"
        )
    env = results["environment"]
    timing = f"Training time summed over runs: {duration(results['train_seconds_total'])}."
    if results.get("wall_seconds") is not None:  # finished runs are skipped: a re-run takes seconds
        timing += f" Wall time of the last invocation: {duration(results['wall_seconds'])}."
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


def table(results: dict[str, Any]) -> str:
    """The results table as text (what ``gradtail bench`` / ``report`` print)."""
    rows = [[r["label"], *(format_mean_std(r[m]) for m in METRICS)] for r in results["table"]]
    return format_table(rows, HEADERS)


def draw_detections(
    items: list[tuple[Any, dict[str, Any]]],
    outputs: list[dict[str, Any]],
    names: list[str],
    path: Path,
    top: int = 4,
    min_score: float = 0.1,
) -> None:
    """A row of test images with ground truth (green) and the top predictions (red, labelled): what every
    detection run writes at its end (``predictions.png``) and the report shows."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    count = len(items)
    fig = Figure(figsize=(2.6 * count, 2.9), layout="constrained")
    axes = fig.subplots(1, count, squeeze=False)
    for k, ax in enumerate(axes[0]):
        image, target = items[k]
        ax.imshow(image.permute(1, 2, 0).float().numpy().clip(0, 1))
        for x1, y1, x2, y2 in target["boxes"].tolist():
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", lw=1))
        out = outputs[k]
        keep = (out["scores"] >= min_score).nonzero().flatten()[:top]
        for i in keep.tolist():
            x1, y1, x2, y2 = out["boxes"][i].tolist()
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1))
            label = f"{names[int(out['labels'][i])]} {float(out['scores'][i]):.2f}"
            ax.text(x1, y1, label, color="yellow", fontsize=5, va="bottom")
        ax.set_axis_off()
    fig.suptitle(
        f"test images: ground truth (green), predictions (red, score >= {min_score:.1f})", fontsize=8
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(fig))


__all__ = ["HEADERS", "METRICS", "ap_vs_frequency_figure", "build_results", "draw_detections", "write_report"]
